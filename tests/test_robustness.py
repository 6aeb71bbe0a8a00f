"""medfed evaluate: a model's test metrics under corruptions (tiny data, untrained nano model)."""

from __future__ import annotations

import json

import pytest
import torch

from medfed.cli import main
from medfed.config import load_config, save_config
from medfed.models import create_model
from medfed.server.checkpoint import save_arrays


def _save_model(folder, seed=0):
    torch.manual_seed(seed)
    model = create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=28)
    folder.mkdir(parents=True, exist_ok=True)
    save_arrays(folder / "model.safetensors", {k: v.detach().numpy().copy() for k, v in model.state_dict().items()})


def _finish(run, rounds=2):
    """The records a run's metrics.jsonl holds once its rounds are done."""
    (run / "metrics.jsonl").write_text(
        json.dumps({"event": "start", "num_rounds": rounds, "resumed_from_round": 0}) + "\n"
        + json.dumps({"event": "end", "rounds_done": rounds}) + "\n")


def test_evaluate_a_train_output_writes_table_json_and_figure(tiny_root, tmp_path, capsys):
    # Prepare: a medfed-train-like folder.
    _save_model(tmp_path / "train")
    (tmp_path / "train" / "metrics.json").write_text(json.dumps(
        {"config": {"dataset": "breastmnist", "model": "medvit_v2_nano", "img_size": 28}}))
    # Execute
    code = main(["evaluate", "--model", str(tmp_path / "train"), "--data-root", str(tiny_root),
                 "--corruptions", "gaussian_noise,pixelate", "--severities", "1,5"])
    # Assert
    assert code == 0
    result = json.loads((tmp_path / "train" / "robustness.json").read_text())
    assert (tmp_path / "train" / "robustness.png").read_bytes().startswith(b"\x89PNG")
    assert result["num_test"] == 12 and set(result["corruptions"]) == {"gaussian_noise", "pixelate"}
    # breastmnist: MedMNIST-C gives pixelate's values, not gaussian_noise's (not among its corruptions)
    assert {n: c["parameters"] for n, c in result["corruptions"].items()} == {
        "gaussian_noise": "medfed", "pixelate": "medmnist-c"}
    levels = result["corruptions"]["pixelate"]["severities"]
    assert set(levels) == {"1", "5"}
    mean = result["corruptions"]["pixelate"]["mean"]["balanced_error"]
    assert mean == pytest.approx((levels["1"]["balanced_error"] + levels["5"]["balanced_error"]) / 2)
    assert 0.0 <= result["clean"]["balanced_error"] <= 1.0
    assert "pixelate" in capsys.readouterr().out


def test_evaluate_a_run_folder_uses_its_config(tiny_root, tmp_path):
    # Prepare: a run folder with its config and final model.
    run = tmp_path / "run"
    _save_model(run)
    save_config(load_config(overrides=[f"data.root={tiny_root}"]), run / "config.yaml")
    _finish(run)
    # Execute
    code = main(["evaluate", "--run", str(run), "--corruptions", "brightness_up", "--severities", "2"])
    # Assert
    assert code == 0 and "brightness_up" in json.loads((run / "robustness.json").read_text())["corruptions"]


@pytest.mark.parametrize("strategy", ["fedavg", "fedbn"])
def test_a_fedbn_run_is_evaluated_with_batchnorm_statistics_of_the_evaluation_data(tiny_root, tmp_path, capsys,
                                                                                   strategy):
    # Prepare: a FedBN run's global model holds the initial BatchNorm of no site.
    run = tmp_path / "run"
    _save_model(run)
    save_config(load_config(overrides=[f"data.root={tiny_root}", f"strategy.name={strategy}"]), run / "config.yaml")
    _finish(run)
    # Execute
    code = main(["evaluate", "--run", str(run), "--corruptions", "pixelate", "--severities", "1"])
    # Assert: the training split (24 tiny images) was read, for FedBN only.
    adapted = json.loads((run / "robustness.json").read_text())["adapted"]
    assert code == 0
    if strategy == "fedbn":
        assert adapted == "FedBN: BatchNorm statistics estimated from 24 training images (the site has none of its own)"
        assert adapted in capsys.readouterr().out
    else:
        assert adapted is None


@pytest.mark.parametrize("args", [["--corruptions", "nope"], ["--severities", "0,9"]])
def test_evaluate_bad_arguments_are_one_line_errors(tiny_root, tmp_path, capsys, args):
    run = tmp_path / "run"
    _save_model(run)
    save_config(load_config(overrides=[f"data.root={tiny_root}"]), run / "config.yaml")
    _finish(run)
    assert main(["evaluate", "--run", str(run), *args]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("hflip_p", [0.0, 0.5])
def test_evaluate_predicts_as_medfed_train_tested_the_model(tiny_root, tmp_path, hflip_p):
    # Prepare: a 1-epoch medfed train output; it averages the mirror only when it trained mirrored.
    from rich.console import Console

    from medfed.client.task import TrainSettings
    from medfed.robustness import evaluate_robustness, model_from_file
    from medfed.train import train_pooled

    with pytest.warns(UserWarning, match="breastmnist"):  # the tiny split's counts differ from the official
        recorded = train_pooled(dataset="breastmnist", data_root=tiny_root, model_name="medvit_v2_nano", img_size=28,
                                settings=TrainSettings(epochs=1, batch_size=8), out_dir=tmp_path, hflip_p=hflip_p,
                                console=Console(quiet=True))["test"]
    # Execute
    result = evaluate_robustness(model_from_file(tmp_path, None, str(tiny_root), None, None), [], (1,))
    # Assert: the clean metrics are the ones medfed train reported for these weights.
    assert result["mirror"] is (hflip_p > 0)
    assert result["clean"] == pytest.approx(
        {"acc": recorded["acc"], "auc": recorded["auc"], "balanced_error": 1.0 - recorded["balanced_acc"]})


def test_a_run_is_evaluated_on_mirrored_images_as_its_sites_evaluate(tiny_root, tmp_path):
    # A site's ClientApp evaluates with predict's default (mirror) whatever the dataset.
    run = tmp_path / "run"
    _save_model(run)
    save_config(load_config(overrides=[f"data.root={tiny_root}"]), run / "config.yaml")
    _finish(run)
    assert main(["evaluate", "--run", str(run), "--corruptions", "pixelate", "--severities", "1"]) == 0
    assert json.loads((run / "robustness.json").read_text())["mirror"] is True


def _train_output(folder, **config):
    _save_model(folder)
    (folder / "metrics.json").write_text(json.dumps(
        {"config": {"dataset": "breastmnist", "model": "medvit_v2_nano", "img_size": 28, **config}}))


@pytest.mark.parametrize("text", ["{\"config\": {", "[1, 2]", "\xff"])
def test_a_corrupt_metrics_json_is_a_one_line_error(tiny_root, tmp_path, capsys, text):
    _save_model(tmp_path)
    (tmp_path / "metrics.json").write_bytes(text.encode("latin-1"))
    assert main(["evaluate", "--model", str(tmp_path), "--data-root", str(tiny_root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.json" in err and "--dataset and --model-name" in err


@pytest.mark.parametrize("args, expected", [
    (["--dataset", "pneumoniamnist"], "--dataset breastmnist (its metrics.json says so), but --dataset pneumoniamnist"),
    (["--model-name", "tiny"], "--model-name medvit_v2_nano (its metrics.json says so), but --model-name medvit_v2_tiny"),
    # MedViTV2's weights load at any size: without the check, a 28 px model ran on 64 px images unnoticed.
    (["--img-size", "64"], "--img-size 28 (its metrics.json says so), but --img-size 64"),
])
def test_evaluate_refuses_a_dataset_model_or_size_other_than_the_recorded_one(tiny_root, tmp_path, capsys, args, expected):
    _train_output(tmp_path)
    assert main(["evaluate", "--model", str(tmp_path), "--data-root", str(tiny_root), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not (tmp_path / "robustness.json").exists()


def test_evaluate_takes_dataset_and_model_name_that_agree_or_replace_a_missing_metrics_json(tiny_root, tmp_path):
    from medfed.robustness import model_from_file

    _train_output(tmp_path / "recorded")
    _save_model(tmp_path / "bare")
    same = model_from_file(tmp_path / "recorded", "breastmnist", None, None, "nano")
    bare = model_from_file(tmp_path / "bare", "pneumoniamnist", None, None, "tiny")
    assert (same.dataset, same.model_name) == ("breastmnist", "medvit_v2_nano")
    assert (bare.dataset, bare.model_name, bare.mirror) == ("pneumoniamnist", "medvit_v2_tiny", True)


def test_weights_that_do_not_fit_name_the_first_misfit_key_and_shapes(tiny_root, tmp_path, capsys):
    # Prepare: a 3-class model's weights, for a 2-class dataset.
    torch.manual_seed(0)
    model = create_model("medvit_v2_nano", num_classes=3, in_chans=1, img_size=28)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    fits = create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=28).state_dict()
    head = next(k for k, v in state.items() if v.shape != tuple(fits[k].shape))
    save_arrays(tmp_path / "model.safetensors", state)
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {"dataset": "breastmnist", "model": "nano"}}))
    # Execute
    code = main(["evaluate", "--model", str(tmp_path), "--data-root", str(tiny_root)])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"their '{head}' has shape {state[head].shape}, the model's {tuple(fits[head].shape)}" in err
    assert not err.rstrip().endswith(":")


def test_a_run_with_a_relative_data_root_is_refused_from_elsewhere_and_takes_data_root(tiny_root, tmp_path, capsys,
                                                                                        monkeypatch):
    # Prepare: a run started in another folder, with data.root relative to that folder.
    run = tmp_path / "run"
    _save_model(run)
    save_config(load_config(overrides=["data.root=../shared/data"]), run / "config.yaml")
    _finish(run)
    monkeypatch.chdir(tmp_path)
    # Execute: from here, without and with --data-root.
    refused = main(["evaluate", "--run", str(run), "--corruptions", "pixelate", "--severities", "1"])
    err = capsys.readouterr().err.strip()
    given = main(["evaluate", "--run", str(run), "--data-root", str(tiny_root), "--corruptions", "pixelate",
                  "--severities", "1"])
    # Assert: no download attempted into the wrong folder; --data-root is used, not ignored.
    assert refused == 2 and len(err.splitlines()) == 1
    assert "data.root '../shared/data' is relative to the folder the run started in" in err
    assert "give --data-root" in err and not (tmp_path.parent / "shared").exists()
    assert given == 0 and json.loads((run / "robustness.json").read_text())["num_test"] == 12


@pytest.mark.parametrize(("args", "expected"), [
    (["--dataset", "pneumoniamnist"], "--dataset is for --model: --run takes it from the run's config.yaml"),
    (["--model-name", "tiny"], "--model-name is for --model"),
    (["--img-size", "64"], "--img-size is for --model"),
])
def test_a_run_refuses_settings_that_its_config_decides(tiny_root, tmp_path, capsys, args, expected):
    run = tmp_path / "run"
    _save_model(run)
    save_config(load_config(overrides=[f"data.root={tiny_root}"]), run / "config.yaml")
    _finish(run)
    assert main(["evaluate", "--run", str(run), *args]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(("strategy", "expected"), [
    ("local", "each site kept its own model; model.safetensors is the untrained initial model"),
    ("fairlora", "holds only its group adapters and head"),
])
def test_a_run_without_a_global_model_to_evaluate_is_refused_with_why(tiny_root, tmp_path, capsys, strategy,
                                                                      expected):
    run = tmp_path / "run"
    _save_model(run)
    save_config(load_config(overrides=[f"data.root={tiny_root}", f"strategy.name={strategy}"]), run / "config.yaml")
    _finish(run)
    assert main(["evaluate", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and not (run / "robustness.json").exists()


@pytest.mark.parametrize("command", ["evaluate", "sites"])
def test_an_output_folder_that_is_a_file_is_refused_before_the_work(tiny_root, tmp_path, capsys, command):
    run = tmp_path / "run"
    _save_model(run)
    save_config(load_config(overrides=[f"data.root={tiny_root}"]), run / "config.yaml")
    _finish(run)
    args = (["evaluate", "--run", str(run)] if command == "evaluate"
            else ["sites", "--set", f"data.root={tiny_root}"])
    assert main([*args, "--out", str(run / "config.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{run / 'config.yaml'} is a file; give a folder (--out).")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("log", ["no end", "resumed and stopped after a round", "resumed and stopped before a round",
                                 "finished", "copied without its log"])
def test_only_a_run_whose_model_is_its_latest_is_evaluated(tiny_root, tmp_path, capsys, log):
    # Prepare: model.safetensors is written at a run's end; a run resumed with more rounds that
    # completed a round since (its checkpoint is newer) still holds its earlier end's model.
    from medfed.server.checkpoint import save_checkpoint

    run = tmp_path / "run"
    _save_model(run)
    save_config(load_config(overrides=[f"data.root={tiny_root}", "rounds=4"]), run / "config.yaml")
    start = {"event": "start", "num_rounds": 2}
    end = {"event": "end", "rounds_done": 2}
    resumed = {"event": "start", "num_rounds": 4, "resumed_from_round": 2}
    records, checkpoint_round = {
        "no end": ([start], 1),
        "resumed and stopped after a round": ([start, end, resumed], 3),
        "resumed and stopped before a round": ([start, end, resumed], 2),
        "finished": ([start, end], 2),
        "copied without its log": (None, None),
    }[log]
    if records is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if checkpoint_round is not None:
        save_checkpoint(run / "checkpoint.safetensors", server_round=checkpoint_round, arrays={}, strategy_state={},
                        state={})
    # Execute
    code = main(["evaluate", "--run", str(run), "--corruptions", "pixelate", "--severities", "1"])
    # Assert
    err = capsys.readouterr().err.strip()
    if log in ("no end", "resumed and stopped after a round"):
        assert code == 2 and len(err.splitlines()) == 1 and not (run / "robustness.json").exists()
        assert f"medfed simulate --resume {run}" in err
        assert {"no end": "has no end record",
                "resumed and stopped after a round": "has completed round 3 without finishing: its model.safetensors "
                                                     "is still round 2's model"}[log] in err
    else:
        assert code == 0
        rounds = json.loads((run / "robustness.json").read_text())["rounds"]
        assert rounds == (None if log == "copied without its log" else 2)


def test_a_severity_where_the_model_breaks_down_makes_the_corruption_mean_nan(tiny_root, tmp_path, monkeypatch):
    # {1: 0.9, 2: NaN} averaged to 0.9 with nanmean: the corruption looked harmless.
    import math

    import medfed.data
    from medfed.robustness import evaluate_robustness, model_from_file

    _save_model(tmp_path)
    real = medfed.data.classification_metrics
    calls = []

    def broken_at_severity_2(task, y_true, y_score):
        calls.append(1)
        metrics = real(task, y_true, y_score)
        return dict.fromkeys(metrics, float("nan")) if len(calls) == 3 else metrics  # clean, severity 1, 2

    monkeypatch.setattr(medfed.data, "classification_metrics", broken_at_severity_2)
    result = evaluate_robustness(model_from_file(tmp_path, "breastmnist", str(tiny_root), 28, "medvit_v2_nano"),
                                 ["gaussian_noise"], (1, 2))
    levels = result["corruptions"]["gaussian_noise"]
    assert math.isfinite(levels["severities"]["1"]["acc"]) and math.isnan(levels["severities"]["2"]["acc"])
    assert math.isnan(levels["mean"]["acc"]) and math.isnan(result["mean_over_corruptions"]["acc"])
