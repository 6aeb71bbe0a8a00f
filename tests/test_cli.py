"""The `medfed` command: pooled training end to end, and one-line errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medfed.cli import main
from medfed.server.checkpoint import load_arrays


def test_train_writes_selected_model_and_metrics(tiny_root, tmp_path, capsys):
    # Prepare
    out = tmp_path / "run"
    # Execute
    code = main(["train", "--data-root", str(tiny_root), "--epochs", "2", "--batch-size", "8", "--out", str(out)])
    # Assert
    assert code == 0
    captured = capsys.readouterr()
    # The tiny file's counts differ from the official ones: one line says so.
    assert "medfed: warning: " in captured.err and "the official breastmnist release has" in captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"acc", "auc", "balanced_acc"}
    assert 0.0 <= metrics["test"]["acc"] <= 1.0
    assert metrics["best_epoch"] in (1, 2)
    assert len(metrics["history"]) == 2
    assert (metrics["config"]["precision"], metrics["config"]["precision_used"]) == ("auto", "float32")  # CPU
    weights = load_arrays(out / "model.safetensors")
    assert any(k.endswith("head.weight") for k in weights)
    assert "test ACC" in captured.out


def test_sigterm_stops_train_like_ctrl_c(tiny_root, tmp_path):
    # Prepare: a long training run, stopped by SIGTERM (a batch scheduler's stop) after epoch 1.
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "medfed.cli", "train", "--data-root", str(tiny_root), "--epochs",
                             "500", "--batch-size", "8", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch   1"):
                break
        # Execute
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        # Assert: Ctrl-C's exit code and message, and no temporary file left in the run folder.
        assert code == 130
        assert "medfed: interrupted" in proc.stderr.read()
        assert list(out.rglob("*.tmp")) == []
    finally:
        proc.kill()


def test_an_interrupted_server_prints_the_whole_command_that_resumes_it(tmp_path, capsys, monkeypatch):
    # Prepare: a server with its own certificates, address and join timeout, interrupted while running.
    import medfed.deploy.superlink as superlink

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(superlink, "run_server", interrupted)
    run_dir, certs = tmp_path / "my run", tmp_path / "certs"
    command = ["server", "--run-dir", str(run_dir), "--certs", str(certs), "--address", "0.0.0.0:9999",
               "--join-timeout", "1234567.5"]
    # Execute: stopped while it waited for its sites (the run has not started), then stopped during the run.
    before_start = main(command)
    before_start_err = capsys.readouterr().err.strip()
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("rounds: 3\n")
    during_run = main(command)
    # Assert: one line each; the second with every option that reaches the same sites (paths quoted for the shell).
    assert before_start == during_run == 130
    assert before_start_err == (f"medfed: interrupted before the run started (config.yaml is not in {run_dir} yet); "
                                "nothing to resume: run the same command again")
    assert capsys.readouterr().err.strip() == (
        f"medfed: interrupted; continue with medfed server --resume --run-dir '{run_dir}' --certs {certs} "
        f"--address 0.0.0.0:9999 --join-timeout 1234567.5 (medfed report '{run_dir}' reports the rounds done)"
    )


def test_train_selects_only_after_a_full_window_and_records_the_recipe(tiny_root, tmp_path):
    # Prepare: a 2-epoch trailing window over 3 epochs can only pick epoch 2 or 3.
    out = tmp_path / "run"
    # Execute
    code = main(["train", "--data-root", str(tiny_root), "--epochs", "3", "--batch-size", "8",
                 "--selection-window", "2", "--loss-weighting", "none", "--hflip-p", "0", "--out", str(out)])
    # Assert
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] in (2, 3)
    assert metrics["config"]["selection_window"] == 2
    assert metrics["config"]["loss_weighting"] == "none"
    assert metrics["config"]["hflip_p"] == 0.0


def test_train_saves_the_epoch_whose_trailing_validation_mean_is_best(tiny_root, tmp_path, monkeypatch):
    # Prepare: scripted validation scores (ACC = AUC) per epoch 1.0, 0.0, 0.3, 0.3; with a
    # 2-epoch window the trailing means are -, 0.5, 0.15, 0.3, so epoch 2 is selected. A
    # single-epoch rule would pick epoch 1, and so would a window counted before it is full
    # (1.0 / 2 = 0.5 comes first); saving the last epoch would save epoch 4.
    import torch

    import medfed.train as train_module
    from medfed.client.task import TrainSettings

    scores = iter([1.0, 0.0, 0.3, 0.3])
    calls = {"n": 0}

    def scripted_evaluate(*args, **kwargs):
        calls["n"] += 1
        value = next(scores, 0.5)  # after the 4 epochs: the final val and test passes
        return {"acc": value, "auc": value, "balanced_acc": value, "loss": 1.0}

    weights_after = {}
    monkeypatch.setattr(train_module, "evaluate", scripted_evaluate)
    # Execute
    with pytest.warns(UserWarning, match="breastmnist"):
        result = train_module.train_pooled(
            dataset="breastmnist", data_root=tiny_root, model_name="medvit_v2_nano", img_size=28,
            settings=TrainSettings(epochs=4, batch_size=8), out_dir=tmp_path / "run", selection_window=2,
            on_epoch=lambda epoch, model: weights_after.update(
                {epoch: {k: v.detach().clone() for k, v in model.state_dict().items()}}),
        )
    # Assert: epoch 2 is named and its weights, not the last epoch's, are saved.
    assert result["best_epoch"] == 2
    saved = load_arrays(tmp_path / "run" / "model.safetensors")
    for name, value in weights_after[2].items():
        if value.is_floating_point():
            assert torch.equal(torch.from_numpy(saved[name]), value), name
    assert any(not torch.equal(weights_after[2][k], weights_after[4][k]) for k in weights_after[2]
               if weights_after[2][k].is_floating_point())


def test_train_whose_every_validation_score_is_nan_stops_with_why_and_leaves_no_folder(tiny_root, tmp_path,
                                                                                       monkeypatch):
    # A model that predicts NaN in eval mode only (finite training loss): load_state_dict(None) raised TypeError.
    import medfed.train as train_module
    from medfed.client.task import TrainingDivergedError, TrainSettings

    nan = float("nan")
    monkeypatch.setattr(train_module, "evaluate",
                        lambda *a, **k: {"acc": nan, "auc": nan, "balanced_acc": nan, "loss": nan})
    with pytest.warns(UserWarning, match="breastmnist"), \
            pytest.raises(TrainingDivergedError, match="No epoch of the 2 gave a finite validation score"):
        train_module.train_pooled(dataset="breastmnist", data_root=tiny_root, model_name="medvit_v2_nano",
                                  img_size=28, settings=TrainSettings(epochs=2, batch_size=8), out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_train_applies_the_speed_knobs_it_records(tiny_root, tmp_path, monkeypatch):
    # Prepare: the knobs of TrainSettings reach the model and every training and
    # evaluation pass (they used to be recorded in metrics.json but never applied).
    import medfed.train as train_module
    from medfed.client.task import TrainSettings

    seen = {"prepare": [], "train": [], "evaluate": []}
    real = {name: getattr(train_module, name) for name in ("prepare_model", "train_epoch", "evaluate")}

    def spy(name, key):
        def call(*args, **kwargs):
            seen[key].append({k: kwargs.get(k) for k in ("precision", "channels_last", "compile")})
            return real[name](*args, **kwargs)
        return call

    monkeypatch.setattr(train_module, "prepare_model", spy("prepare_model", "prepare"))
    monkeypatch.setattr(train_module, "train_epoch", spy("train_epoch", "train"))
    monkeypatch.setattr(train_module, "evaluate", spy("evaluate", "evaluate"))
    settings = TrainSettings(epochs=1, batch_size=8, precision="bfloat16", channels_last=True)
    # Execute
    with pytest.warns(UserWarning, match="breastmnist"):
        result = train_module.train_pooled(dataset="breastmnist", data_root=tiny_root, model_name="medvit_v2_nano",
                                           img_size=28, settings=settings, out_dir=tmp_path / "run")
    # Assert
    assert seen["prepare"] == [{"precision": None, "channels_last": True, "compile": False}]
    assert seen["train"] == [{"precision": "bfloat16", "channels_last": True, "compile": None}]
    assert len(seen["evaluate"]) == 3 and all(
        call == {"precision": "bfloat16", "channels_last": True, "compile": None} for call in seen["evaluate"])
    assert (result["config"]["precision"], result["config"]["channels_last"]) == ("bfloat16", True)
    assert result["config"]["precision_used"] == "bfloat16"


def test_default_selection_window_is_a_tenth_of_the_run_between_1_and_5():
    from medfed.train import default_selection_window

    assert [default_selection_window(e) for e in (1, 9, 20, 30, 100, 300)] == [1, 1, 2, 3, 5, 5]


def test_train_on_a_missing_dataset_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import medfed.data.medmnist_files as files

    monkeypatch.setattr(files, "_open_url", lambda url, timeout_s: (_ for _ in ()).throw(OSError("offline")))
    code = main(["train", "--dataset", "pneumoniamnist", "--data-root", str(tmp_path), "--epochs", "1",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "pneumoniamnist.npz" in err
    assert not (tmp_path / "run").exists()  # a failed start leaves no output folder


def test_train_refuses_a_folder_that_holds_a_run_and_changes_nothing_in_it(tiny_root, tmp_path, capsys):
    # Prepare: a finished federated run's folder (its final model and metrics).
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"the federation's final model")
    (run / "metrics.jsonl").write_text("{}\n")
    # Execute
    code = main(["train", "--data-root", str(tiny_root), "--epochs", "1", "--out", str(run)])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{run} already holds a run (model.safetensors, metrics.jsonl)" in err
    assert (run / "model.safetensors").read_bytes() == b"the federation's final model"
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "model.safetensors"]


def test_train_refuses_a_certificate_folder_and_takes_a_folder_with_a_log(tiny_root, tmp_path, capsys):
    # Prepare: a certificate folder given as --out by mistake; a folder where `| tee out/train.log` made a log.
    certs = tmp_path / "fl-certs"
    certs.mkdir()
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        (certs / name).write_text(name)
    logged = tmp_path / "logged"
    logged.mkdir()
    (logged / "train.log").write_text("")
    # Execute
    refused = main(["train", "--data-root", str(tiny_root), "--epochs", "1", "--out", str(certs)])
    err = capsys.readouterr().err.strip()
    taken = main(["train", "--data-root", str(tiny_root), "--epochs", "1", "--batch-size", "8", "--out", str(logged)])
    # Assert
    assert refused == 2 and len(err.splitlines()) == 1
    assert f"{certs} holds private keys (ca.key, server.key): a certificate folder" in err
    assert sorted(p.name for p in certs.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    assert taken == 0 and (logged / "model.safetensors").is_file()


@pytest.mark.parametrize("out", ["afile", "afile/run"])
def test_train_into_a_file_is_one_line_before_any_training(tiny_root, tmp_path, capsys, out):
    (tmp_path / "afile").write_text("not a folder")
    code = main(["train", "--data-root", str(tiny_root), "--epochs", "1", "--out", str(tmp_path / out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{tmp_path / 'afile'} is a file; give a folder (--out)" in err


def test_train_into_a_dangling_link_is_one_line_before_any_training(tiny_root, tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    code = main(["train", "--data-root", str(tiny_root), "--epochs", "1", "--out", str(tmp_path / "link" / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{tmp_path / 'link'} is a link to {tmp_path / 'nowhere'}, which does not exist; give a folder" in err


def test_a_failed_or_diverged_train_leaves_no_folder_and_says_why_in_one_line(tiny_root, tmp_path, capsys):
    # An unknown variant (found after the data checks) and a learning rate that makes the loss NaN.
    code = main(["train", "--data-root", str(tiny_root), "--epochs", "1", "--model", "huge",
                 "--out", str(tmp_path / "unknown")])
    assert code == 2 and "huge" in capsys.readouterr().err
    code = main(["train", "--data-root", str(tiny_root), "--epochs", "3", "--batch-size", "8", "--lr", "1e30",
                 "--out", str(tmp_path / "diverged")])
    # The tiny file's size warning is a line of its own.
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("medfed: warning: "))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "Training loss became" in err and "lower the learning rate" in err
    assert not (tmp_path / "unknown").exists() and not (tmp_path / "diverged").exists()


def test_a_selection_window_longer_than_the_run_is_refused(tiny_root, tmp_path, capsys):
    code = main(["train", "--data-root", str(tiny_root), "--epochs", "1", "--selection-window", "50",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert "--selection-window 50 is longer than the run (--epochs 1); give at most 1." in capsys.readouterr().err


def test_bad_numbers_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "must be a finite number > 0" in capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--hflip-p", "2"], "--hflip-p: must be in [0, 1], got 2"),
    (["--hflip-p", "-0.5"], "--hflip-p: must be in [0, 1], got -0.5"),
    (["--label-smoothing", "1.5"], "--label-smoothing: must be in [0, 1), got 1.5"),
    (["--label-smoothing", "-0.5"], "--label-smoothing: must be in [0, 1), got -0.5"),
    (["--weight-decay", "-1"], "--weight-decay: must be a number >= 0, got -1"),
    (["--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr: must be a finite number > 0, got inf"),
    (["--seed", "-1"], "--seed: must be an int from 0 to 4294967295, got -1"),
    (["--seed", "4294967296"], "--seed: must be an int from 0 to 4294967295, got 4294967296"),
])
def test_train_options_out_of_range_are_refused_by_the_parser(tiny_root, tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:  # tiny and short, should it get past the parser
        main(["train", "--data-root", str(tiny_root), "--epochs", "1", "--out", str(tmp_path / "run"), *args])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_train_on_a_device_that_is_not_there_is_one_line_and_exit_2(tiny_root, tmp_path, capsys, device):
    code = main(["train", "--data-root", str(tiny_root), "--epochs", "1", "--device", device,
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert repr(device) in err and "cpu" in err


@pytest.mark.parametrize(
    "text, expected",
    [
        ("rounds: [1\n", "line 2"),                      # YAML syntax
        ("rounds: 3\ntrain:\n  lrr: 0.1\n", "train.lrr"),  # unknown key
        ("rounds: -1\n", "'rounds' must be an int >= 1"),  # impossible value
    ],
)
def test_simulate_with_a_malformed_yaml_is_one_line_and_exit_2(tmp_path, capsys, text, expected):
    config = tmp_path / "exp.yaml"
    config.write_text(text)
    code = main(["simulate", "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert expected in err and "exp.yaml" in err


def test_a_file_where_a_folder_is_expected_is_one_line_and_exit_2(tmp_path, capsys):
    # `medfed certs --out experiment.yaml` raised FileExistsError with a traceback.
    target = tmp_path / "experiment.yaml"
    target.write_text("name: x\n")
    code = main(["certs", "--out", str(target), "--server-host", "localhost", "--sites", "a"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("medfed certs: error: ") and "\n" not in err


@pytest.mark.parametrize(("counts", "named"), [((6, 0, 3), "no val images"), ((0, 2, 0), "no train and no test images")])
def test_train_refuses_a_file_with_an_empty_split_before_training(tmp_path, capsys, counts, named):
    # Prepare: a breastmnist.npz whose val (or train and test) split holds no images.
    import numpy as np

    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        arrays[f"{split}_images"] = np.zeros((n, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = np.zeros((n, 1), np.uint8)
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    # Execute
    code = main(["train", "--data-root", str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "run")])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the split-size warning, where shown
    assert code == 2
    assert f"breastmnist.npz has {named} (train/val/test = {'/'.join(map(str, counts))})" in err
    assert not (tmp_path / "run").exists()


def test_simulate_ends_by_naming_its_run_folder_and_report(tiny_root, tmp_path, capsys):
    settings = [f"data.root={tiny_root}", f"output_dir={tmp_path}", "name=named", "rounds=1", "federation.num_sites=2",
                "simulation.engine=inprocess"]
    assert main(["simulate"] + [a for s in settings for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"run folder: {tmp_path / 'named'}\nreport: {tmp_path / 'named' / 'report.html'}")


@pytest.mark.parametrize("command", ["simulate", "report"])
def test_a_run_folder_that_cannot_be_written_is_one_line_and_exit_2(command, tiny_root, tmp_path, capsys, monkeypatch):
    # simulate and server made the run folder first and died with a PermissionError or
    # NotADirectoryError traceback; report, in a read-only run folder, in savefig.
    import os

    if command == "simulate":
        (tmp_path / "afile").write_text("not a folder")
        code = main(["simulate", "--set", f"data.root={tiny_root}", "--set", f"output_dir={tmp_path / 'afile'}",
                     "--set", "name=x"])
        expected = f"The output folder {tmp_path / 'afile' / 'x'} cannot be made: {tmp_path / 'afile'} is a file"
    else:
        run = tmp_path / "run"
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"event": "round", "round": 1, "train": {"loss": 1.0},
                                                       "evaluate": {"acc": 0.5}}) + "\n")
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == run else real_access(path, mode))
        code = main(["report", str(run)])
        expected = f"Cannot write the report into {run}: no write permission; copy the run folder"
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.parametrize("command", [["sites"], ["simulate"]])
def test_results_never_go_into_a_certificate_folder(command, tiny_root, tmp_path, capsys):
    # medfed sites wrote its preview next to ca.key (and medfed certs --force then refused
    # the folder); a run folder there would be shared with its keys.
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.key").write_text("secret")
    where = ["--out", str(certs)] if command == ["sites"] else ["--set", f"output_dir={tmp_path}", "--set", "name=certs"]
    code = main([*command, "--set", f"data.root={tiny_root}", *where])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{certs} holds private keys (ca.key): a certificate folder" in err
    assert sorted(p.name for p in certs.iterdir()) == ["ca.key"]


def test_python_dash_m_medfed_is_the_medfed_command():
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "medfed", "--version"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("medfed "), shown.stderr


@pytest.mark.parametrize("given, expected", [(None, "0"), ("1", "1")])
def test_flowers_usage_telemetry_is_off_unless_the_user_turns_it_on(tmp_path, given, expected):
    # Flower posts usage events (simulation start and end...) unless FLWR_TELEMETRY_ENABLED=0;
    # it reads the variable when flwr is first imported, which medfed's commands do after main starts.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    if given is not None:
        env["FLWR_TELEMETRY_ENABLED"] = given
    env.pop("FLWR_DISABLE_UPDATE_CHECK", None)
    script = ("from medfed.cli import main; main(['report', 'no-such-run']); "
              "import os, flwr.supercore.telemetry as t; print(t.FLWR_TELEMETRY_ENABLED); "
              "print(os.environ['FLWR_DISABLE_UPDATE_CHECK'])")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip().splitlines()[-2:] == [expected, "1"], done.stderr  # no update check either


def test_simulate_leaves_flowers_colour_codes_out_of_output_that_is_not_a_terminal(tmp_path, monkeypatch):
    # `medfed simulate > run.log` filled the log with ESC[92m ... ESC[0m around every Flower line.
    from flwr.supercore import logger

    monkeypatch.setattr(logger.console_handler, "colored", True)
    (tmp_path / "exp.yaml").write_text("rounds: -1\n")
    assert main(["simulate", "--config", str(tmp_path / "exp.yaml")]) == 2  # stderr is pytest's, not a terminal
    assert logger.console_handler.colored is False


def test_a_full_disk_is_one_line_that_says_nothing_written_is_lost_and_how_to_go_on(tmp_path, capsys, monkeypatch):
    # A full disk printed a 35-line traceback and no way on, though the last checkpoint was intact.
    import errno

    import medfed.simulation

    def full_disk(cfg, **_kwargs):
        run_dir = tmp_path / "runs" / "full"
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text("rounds: 3\n")
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / ".checkpoint.safetensors.x.tmp"))

    monkeypatch.setattr(medfed.simulation, "simulate", full_disk)
    code = main(["simulate", "--set", f"output_dir={tmp_path / 'runs'}", "--set", "name=full"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("medfed simulate: error: No space left on device writing ")
    assert err.endswith(f"free space, then continue with medfed simulate --resume {tmp_path / 'runs' / 'full'} "
                        f"(medfed report {tmp_path / 'runs' / 'full'} reports the rounds done)")
