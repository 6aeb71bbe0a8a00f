"""`medfed simulate` refuses bad names and data in one line before any run folder exists."""

import pytest

from medfed.cli import main


@pytest.mark.parametrize(
    ("overrides", "content", "message"),
    [
        ([], b"PK\x03\x04 truncated", "is not a readable .npz archive"),
        (["model.name=bogus"], None, "Config key 'model.name' must be one of medvit_v2_base"),
        (["data.dataset=pneumoniamnist", "data.root=null"], None, "pneumoniamnist.npz is not embedded"),
    ],
)
def test_bad_data_or_model_stops_before_the_run_starts(overrides, content, message, tmp_path, capsys):
    # Prepare: a corrupt breastmnist.npz under data.root, or a bad name with good data.
    root = tmp_path / "data"
    root.mkdir()
    (root / "breastmnist.npz").write_bytes(content or b"")
    settings = [f"data.root={root}", f"output_dir={tmp_path / 'runs'}", "name=bad", "simulation.engine=inprocess"]
    if content is None:  # the name is what is wrong: use the embedded data
        settings[0] = "data.root=null"
    args = ["simulate"] + [a for s in settings + overrides for a in ("--set", s)]
    # Execute
    code = main(args)
    # Assert: one line, exit 2, no run folder that would block the corrected run.
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "\n" not in err
    assert not (tmp_path / "runs" / "bad").exists()


def test_a_ray_address_where_no_cluster_answers_is_one_line_within_seconds(tmp_path, capsys):
    # Prepare: a port nothing listens on (ray.init would retry for minutes).
    from medfed.deploy.processes import free_port

    address = f"127.0.0.1:{free_port()}"
    settings = [f"output_dir={tmp_path / 'runs'}", "name=bad", "simulation.engine=ray",
                f"simulation.ray_address={address}"]
    # Execute
    code = main(["simulate"] + [a for s in settings for a in ("--set", s)])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"no Ray cluster answers at {address} (Connection refused)" in err
    assert "remove ray_address to run on this machine" in err
    assert not (tmp_path / "runs" / "bad").exists()


def test_a_ray_temporary_folder_too_deep_for_its_sockets_is_one_line(tiny_root, tmp_path, capsys, monkeypatch):
    # Prepare: a batch scheduler's deep per-job temporary folder (Ray's socket paths are limited to 107 bytes).
    import ray

    deep = tmp_path / ("job-" + "x" * 60) / "tmp"
    deep.mkdir(parents=True)
    monkeypatch.setenv("RAY_TMPDIR", str(deep))
    settings = [f"output_dir={tmp_path / 'runs'}", "name=deep", "simulation.engine=ray", f"data.root={tiny_root}",
                "federation.num_sites=2"]
    # Execute
    code = main(["simulate"] + [a for s in settings for a in ("--set", s)])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert f"Ray cannot start: its socket path {deep}/ray/" in err
    assert "set RAY_TMPDIR to a short folder (RAY_TMPDIR=/tmp), or use simulation.engine: inprocess" in err
    assert not ray.is_initialized()


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy.name=fairlora", "strategy.params.targets=[nomatch*]"], "strategy.params.targets"),
    (["model.name=medvit_v2_tiny"], "do not fit"),  # nano weights for a tiny model
])
def test_initial_weights_that_cannot_be_built_stop_before_the_run_folder(tiny_root, tmp_path, capsys, overrides,
                                                                         message):
    # Prepare: pretrained nano weights (model.init_from).
    import torch

    from medfed.models import create_model
    from medfed.server.checkpoint import save_arrays

    torch.manual_seed(0)
    model = create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=28)
    save_arrays(tmp_path / "base.safetensors", {k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    settings = [f"output_dir={tmp_path / 'runs'}", "name=bad", f"data.root={tiny_root}",
                f"model.init_from={tmp_path / 'base.safetensors'}", "simulation.engine=inprocess", *overrides]
    # Execute
    code = main(["simulate"] + [a for s in settings for a in ("--set", s)])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.parametrize("command", ["simulate", "server"])
def test_fairlora_without_a_backbone_stops_before_the_run_folder_and_the_port(tiny_root, tmp_path, capsys, command):
    # simulate wrote config.yaml first; medfed server opened its port and waited for the sites.
    from medfed.deploy.processes import free_port

    if command == "server":  # a second's wait for sites, should it start after all
        command = ["server", "--insecure", "--address", f"127.0.0.1:{free_port()}", "--join-timeout", "1"]
    else:
        command = [command]
    settings = [f"output_dir={tmp_path / 'runs'}", "name=bad", f"data.root={tiny_root}", "strategy.name=fairlora",
                "simulation.engine=inprocess"]
    code = main(command + [a for s in settings for a in ("--set", s)])
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if "WARNING: --insecure" not in line)
    assert code == 2 and "adapts a pretrained backbone: set model.init_from" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("dataset", "embedded"), [("pneumoniamnist", False), ("breastmnist", True)])
def test_a_data_root_without_the_file_says_where_it_looked_and_where_the_file_is(tmp_path, capsys, monkeypatch,
                                                                                  dataset, embedded):
    # Prepare: a relative data.root, read from a folder that has no such file.
    monkeypatch.chdir(tmp_path)
    settings = ["data.root=../shared/data", f"data.dataset={dataset}", f"output_dir={tmp_path / 'runs'}", "name=bad",
                "simulation.engine=inprocess"]
    # Execute
    code = main(["simulate"] + [a for s in settings for a in ("--set", s)])
    # Assert: null is offered only where the embedded copy is the study's data.
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"points to {tmp_path.parent / 'shared' / 'data'}, which" in err  # resolved from here
    assert f"which has no {dataset}.npz; put the file there (from https://zenodo.org/" in err
    assert ("null for the embedded copy" in err) == embedded


@pytest.mark.parametrize(("key", "value", "what"), [("cpus_per_site", "64", "CPU cores"), ("gpus_per_site", "1", "GPUs")])
def test_a_site_larger_than_the_machine_is_refused_before_ray_starts(tiny_root, tmp_path, capsys, monkeypatch, key,
                                                                      value, what):
    # cpus_per_site=64 on 2 cores: Ray's "ActorPool is empty" tracebacks, then a run that never ended.
    from medfed.simulation import run as run_module

    monkeypatch.setattr(run_module, "_available_cpus", lambda: 2)
    monkeypatch.setattr(run_module, "_visible_gpus", lambda: 0)
    settings = [f"output_dir={tmp_path / 'runs'}", "name=big", f"data.root={tiny_root}", "simulation.engine=ray",
                f"simulation.{key}={value}"]
    code = main(["simulate"] + [a for s in settings for a in ("--set", s)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"Config key 'simulation.{key}' is {value} but this machine has" in err and what in err
    assert not (tmp_path / "runs").exists()
