"""Site-local strategy state: per site in context.state, per round on disk, newest usable round."""

import torch
from flwr.app import Context, RecordDict

from medfed.client.site_state import SITE_STATE_DIR_KEY, load_site_state, save_site_state


def _context(state_dir=None) -> Context:
    run_config = {SITE_STATE_DIR_KEY: str(state_dir)} if state_dir else {}
    return Context(run_id=0, node_id=2, node_config={}, state=RecordDict(), run_config=run_config)


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
