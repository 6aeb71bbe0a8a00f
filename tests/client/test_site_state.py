"""Site-local strategy state: per site in context.state, per round on disk, newest usable round."""

import contextlib
import signal
import sys

import pytest
import torch
from flwr.app import Context, RecordDict

from medfed.client.site_state import NODE_STATE_DIR_KEY, SITE_STATE_DIR_KEY, load_site_state, save_site_state


def _context(state_dir=None, node_state_dir=None) -> Context:
    run_config = {SITE_STATE_DIR_KEY: str(state_dir)} if state_dir else {}
    node_config = {NODE_STATE_DIR_KEY: str(node_state_dir)} if node_state_dir else {}
    return Context(run_id=0, node_id=2, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_state_lives_in_each_sites_own_context():
    # Prepare
    a, b = _context(), _context()
    # Execute
    save_site_state(a, "site-0", 1, {"bn": torch.tensor([1.0])})
    # Assert
    assert load_site_state(a, "site-0", latest_round=1)["bn"].tolist() == [1.0]
    assert load_site_state(b, "site-1", latest_round=1) == {}


def test_a_fresh_process_reads_the_newest_round_it_may_use_from_disk(tmp_path):
    # Prepare: rounds 1..4 written; a restarted process (new context) resumes round 3.
    writer = _context(tmp_path)
    for r in range(1, 5):
        save_site_state(writer, "site-0", r, {"bn": torch.tensor([float(r)])})
    reader = _context(tmp_path)
    # Execute
    for_training_round_3 = load_site_state(reader, "site-0", latest_round=2)
    # Assert: round 4 (written by a round the server never completed) is ignored; only 3 files kept.
    assert for_training_round_3["bn"].tolist() == [2.0]
    assert sorted(p.name for p in (tmp_path / "site-0").iterdir()) == [
        "round-000002.safetensors", "round-000003.safetensors", "round-000004.safetensors"]
    assert load_site_state(reader, "site-0", latest_round=0) == {}


def test_in_memory_state_newer_than_allowed_falls_back_to_disk(tmp_path):
    context = _context(tmp_path)
    save_site_state(context, "site-0", 1, {"bn": torch.tensor([1.0])})
    save_site_state(context, "site-0", 2, {"bn": torch.tensor([2.0])})
    assert load_site_state(context, "site-0", latest_round=1)["bn"].tolist() == [1.0]
    assert load_site_state(context, "site-0", latest_round=2)["bn"].tolist() == [2.0]


def test_runs_that_share_a_sites_state_folder_neither_read_nor_prune_each_others_state(tmp_path):
    # Prepare: a deployed site's one state folder (node config); run A went to round 10.
    run_a = _context(node_state_dir=tmp_path)
    for r in range(1, 11):
        save_site_state(run_a, "alpha", r, {"bn": torch.tensor([100.0 + r])}, run_key="a")
    # Execute: run B's rounds 1-4, then a restarted SuperNode (fresh context) for each run.
    run_b = _context(node_state_dir=tmp_path)
    for r in range(1, 5):
        save_site_state(run_b, "alpha", r, {"bn": torch.tensor([float(r)])}, run_key="b")
    restarted = _context(node_state_dir=tmp_path)
    # Assert: run B resumes at round 5 with its own round 4, which A's higher rounds did not prune;
    # run B's evaluation at round 9 never sees A's round 9; A's newest three are still there.
    assert load_site_state(restarted, "alpha", latest_round=4, run_key="b")["bn"].tolist() == [4.0]
    assert load_site_state(restarted, "alpha", latest_round=9, run_key="b")["bn"].tolist() == [4.0]
    assert load_site_state(restarted, "alpha", latest_round=9, run_key="c") == {}
    assert load_site_state(restarted, "alpha", latest_round=10, run_key="a")["bn"].tolist() == [110.0]
    assert sorted(p.name for p in (tmp_path / "alpha" / "b").iterdir()) == [
        "round-000002.safetensors", "round-000003.safetensors", "round-000004.safetensors"]
    assert sorted(p.name for p in (tmp_path / "alpha").iterdir()) == ["a", "b"]


def test_a_run_key_cannot_leave_the_sites_folder(tmp_path):
    context = _context(node_state_dir=tmp_path / "state")
    save_site_state(context, "alpha", 1, {"bn": torch.tensor([1.0])}, run_key="../../evil")
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors")] == [
        "state/alpha/_.._evil/round-000001.safetensors"]


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_round_whose_state_write_fails_midway_leaves_no_file_and_the_previous_round_is_read(tmp_path):
    # A disk that fills while round 2's file is written: a file written in place would be left
    # half written, and a restarted process would load it as round 2's state. Written through
    # a temporary file and a rename, round 2 has no file and round 1's state is the newest.
    import resource

    # Prepare
    save_site_state(_context(tmp_path), "site-0", 1, {"bn": torch.tensor([1.0])})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a killed process
    # Execute: no file may grow beyond 4 KiB while round 2's 40 KB state is written.
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with contextlib.suppress(OSError):
            save_site_state(_context(tmp_path), "site-0", 2, {"bn": torch.zeros(10_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)

    # Assert
    assert sorted(p.name for p in (tmp_path / "site-0").iterdir()) == ["round-000001.safetensors"]
    assert load_site_state(_context(tmp_path), "site-0", latest_round=2)["bn"].tolist() == [1.0]


def test_state_is_read_only_by_the_study_that_wrote_it(tmp_path):
    from medfed.client.site_state import ForeignSiteState

    # Prepare: study "s1" keeps state under run key "k", on disk and in memory.
    writer = _context(node_state_dir=tmp_path)
    save_site_state(writer, "alpha", 1, {"bn": torch.tensor([1.0])}, run_key="k", study="s1")
    # Execute / Assert: the same study reads it (a restarted process and the same one) ...
    assert load_site_state(_context(node_state_dir=tmp_path), "alpha", latest_round=1, run_key="k",
                           study="s1")["bn"].tolist() == [1.0]
    assert load_site_state(writer, "alpha", latest_round=1, run_key="k", study="s1")["bn"].tolist() == [1.0]
    # ... another study, sent the same run key, does not, from disk or from memory.
    with pytest.raises(ForeignSiteState, match="round-000001.safetensors was written by another study"):
        load_site_state(_context(node_state_dir=tmp_path), "alpha", latest_round=1, run_key="k", study="s2")
    with pytest.raises(ForeignSiteState, match="in memory was written by another study"):
        load_site_state(writer, "alpha", latest_round=1, run_key="k", study="s2")
    # State from a medfed that recorded no study is not read by a study either, and says why.
    save_site_state(_context(node_state_dir=tmp_path), "alpha", 1, {"bn": torch.tensor([1.0])}, run_key="old")
    with pytest.raises(ForeignSiteState, match="written by an older medfed") as caught:
        load_site_state(_context(node_state_dir=tmp_path), "alpha", latest_round=1, run_key="old", study="s1")
    assert caught.value.legacy


def test_a_studys_fingerprint_ignores_what_a_resume_may_change_only():
    from medfed.config import config_from_dict, study_fingerprint

    base = {"name": "a", "rounds": 5, "strategy": {"name": "fedbn"}}
    same = [
        {**base, "name": "b", "rounds": 9, "output_dir": "elsewhere"},
        {**base, "simulation": {"engine": "ray"}, "federation": {"round_timeout_s": 60}},
        {**base, "data": {"root": "../data"}},  # a path, as another working folder names it
    ]
    other = [
        {**base, "strategy": {"name": "local"}},
        {**base, "strategy": {"name": "fedbn", "params": {"unknown_but_kept": 1}}},
        {**base, "seed": 1},
        {**base, "model": {"name": "medvit_v2_tiny"}},
    ]
    fingerprint = study_fingerprint(config_from_dict(base))
    assert all(study_fingerprint(config_from_dict(c)) == fingerprint for c in same)
    assert all(study_fingerprint(config_from_dict(c)) != fingerprint for c in other)


def test_a_damaged_state_file_is_named_with_what_to_do(tmp_path):
    # A truncated file failed every round as "SafetensorError at the site", naming no file.
    from medfed.client.site_state import DamagedSiteState

    writer = _context(tmp_path)
    for r in (1, 2):
        save_site_state(writer, "site-0", r, {"bn": torch.tensor([float(r)])}, study="s")
    damaged = tmp_path / "site-0" / "round-000002.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:20])
    with pytest.raises(DamagedSiteState, match=r"round-000002.safetensors cannot be read .* delete it to go on from "
                                               r"the site's state before it \(kept: round-000001\)"):
        load_site_state(_context(tmp_path), "site-0", latest_round=2, study="s")
    damaged.unlink()  # as the message says
    assert load_site_state(_context(tmp_path), "site-0", latest_round=2, study="s")["bn"].tolist() == [1.0]
    # The ClientApp leaves the site out with a reason that names no file; its log has the rest.
    from medfed.client.client_app import SiteRefusal, _kept_state

    (tmp_path / "site-0" / "round-000003.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(SiteRefusal, match="kept state for this run cannot be read") as refused:
        _kept_state(_context(tmp_path), "site-0", "s", 3, "")
    assert "round-" not in str(refused.value)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_state_files_are_private_to_the_sites_account(tmp_path):
    # A Local-only site's file is its whole model: other accounts on the machine must not read it.
    save_site_state(_context(node_state_dir=tmp_path), "site-0", 1, {"w": torch.ones(2)}, run_key="k1")
    folder = tmp_path / "site-0" / "k1"
    (written,) = folder.iterdir()
    assert written.stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700
    # A folder an older medfed made readable by all is made private at the next write.
    folder.chmod(0o755)
    save_site_state(_context(node_state_dir=tmp_path), "site-0", 2, {"w": torch.ones(2)}, run_key="k1")
    assert folder.stat().st_mode & 0o777 == 0o700
