"""Local loops: mirrored prediction, class weighting, the learning-rate schedule."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from medfed.client.task import TrainSettings, make_loss, make_optimizer, make_scheduler, predict


def test_predict_averages_logits_over_the_mirrored_image():
    # Prepare: a model that is not mirror-invariant
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(1 * 4 * 5, 3))
    images = torch.randn(6, 1, 4, 5)
    loader = [(images, torch.zeros(6, dtype=torch.long), torch.full((6,), -1))]
    # Execute
    scores, labels, groups, _ = predict(model, loader, task="multi-class", device=torch.device("cpu"))
    # Assert
    with torch.no_grad():
        expected = torch.softmax(0.5 * (model(images) + model(torch.flip(images, dims=[3]))), dim=1)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-6)
    assert labels.shape == (6,) and (groups == -1).all()


def test_balanced_class_weights_follow_sklearn_formula():
    loss = make_loss("binary-class", np.array([100, 300]))
    # n / (C * n_c): 400 / (2 * 100) = 2, 400 / (2 * 300) = 2/3
    torch.testing.assert_close(loss.weight, torch.tensor([2.0, 2.0 / 3.0]))
    assert isinstance(make_loss("multi-label, binary-class", np.array([3, 4])), nn.BCEWithLogitsLoss)


def test_sqrt_and_no_class_weighting_and_label_smoothing():
    counts = np.array([100, 300])
    sqrt = make_loss("binary-class", counts, weighting="sqrt")
    torch.testing.assert_close(sqrt.weight, torch.tensor([2.0, 2.0 / 3.0]).sqrt())
    assert make_loss("binary-class", counts, weighting="none").weight is None
    assert make_loss("binary-class", counts, label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(ValueError, match="Unknown loss weighting 'inverse'"):
        make_loss("binary-class", counts, weighting="inverse")


def test_norms_and_biases_get_no_weight_decay():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = make_optimizer(model, TrainSettings(weight_decay=0.1)).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(p.numel() for p in groups[0]["params"]) == 12  # only the Linear weight


def test_schedule_warms_up_then_decays_by_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, total_steps=10, warmup_steps=2, min_lr_ratio=0.0)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert math.isclose(lrs[2], 1.0) and math.isclose(lrs[6], 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_round_learning_rate_decays_from_full_to_five_percent():
    from medfed.client.task import round_learning_rate

    assert round_learning_rate(0.1, 1, 10) == 0.1
    assert math.isclose(round_learning_rate(0.1, 11, 10), 0.005)
    assert math.isclose(round_learning_rate(0.1, 6, 10), 0.1 * (0.05 + 0.95 * 0.5))


def test_prediction_metrics_add_per_group_figures_only_for_known_groups():
    from medfed.client.task import prediction_metrics

    y_true = np.array([0, 1, 0, 1, 1, 0])
    y_score = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4], [0.7, 0.3]])
    unknown = prediction_metrics("binary-class", y_true, y_score, np.full(6, -1))
    grouped = prediction_metrics("binary-class", y_true, y_score, np.array([0, 0, 0, 1, 1, 1]))
    assert "groups" not in unknown
    assert grouped["acc"] == 4 / 6
    assert grouped["groups"][0]["acc"] == 2 / 3 and grouped["groups"][1]["acc"] == 2 / 3
    assert grouped["confusion"].tolist() == [[2, 1], [1, 2]]


def test_client_metric_record_flattens_confusion_and_groups():
    from medfed.client.client_app import _metric_record
    from medfed.data import ImageDataset
    from medfed.data.info import dataset_info

    result = {"loss": 0.5, "acc": 0.75, "auc": 0.8, "balanced_acc": 0.7,
              "confusion": np.array([[3, 1], [0, 4]]), "groups": {2: {"acc": 1.0, "auc": 0.9, "num_examples": 3}}}
    split = ImageDataset(np.zeros((8, 4, 4), np.uint8), np.zeros((8, 1), np.int64), dataset_info("breastmnist"),
                         groups=np.array([2, 2, 2, 0, 0, 0, 0, 0]))
    record = _metric_record(result, split, with_confusion=True, num_groups=3)
    # Every declared group has its keys (NaN and 0 for the groups the site does not hold).
    groups = {k: record.pop(k) for k in list(record) if "group" in k}
    assert record == {"num-examples": 8, "loss": 0.5, "acc": 0.75, "auc": 0.8, "balanced_acc": 0.7,
                      "confusion": [3, 1, 0, 4], "num-classes": 2}
    assert groups["acc-group-2"] == 1.0 and groups["auc-group-2"] == 0.9
    assert np.isnan(groups["acc-group-0"]) and np.isnan(groups["auc-group-1"])
    # Counts are the split's, whatever the results saw.
    assert [groups[f"num-examples-group-{g}"] for g in range(3)] == [5, 0, 3]
    assert sorted(groups) == sorted(f"{m}-group-{g}" for m in ("acc", "auc", "num-examples") for g in range(3))


def test_select_device_refuses_unknown_or_absent_devices_and_names_the_ones_there(monkeypatch):
    from medfed.client.task import DeviceError, select_device
    from medfed.errors import MedfedError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device() == torch.device("cpu") and select_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"Unknown device 'bogus': use one this machine has \(cpu\)"):
        select_device("bogus")
    with pytest.raises(MedfedError, match=r"Device 'cuda' is not on this machine: use one it has \(cpu\)"):
        select_device("cuda")


def test_select_device_takes_a_present_gpu_and_refuses_a_missing_index(monkeypatch):
    from medfed.client.task import DeviceError, select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert select_device("cuda") == torch.device("cuda") and select_device("cuda:1") == torch.device("cuda:1")
    # cuda:1 also becomes the current GPU (code that uses the current one would run on cuda:0),
    # but not where it is only checked (medfed client's own process, which trains nothing)
    assert made_current == [torch.device("cuda:1")]
    from medfed.client.task import check_device

    assert check_device("cuda:1") == torch.device("cuda:1") and made_current == [torch.device("cuda:1")]
    with pytest.raises(DeviceError, match=r"'cuda:2' is not on this machine: use one it has \(cpu, cuda:0, cuda:1\)"):
        select_device("cuda:2")


def test_training_loss_reported_is_the_task_loss_without_the_strategy_term():
    # FedProx's and FedLD's terms are optimised, not reported: losses then compare across strategies.
    from medfed.client.task import train_epoch

    torch.manual_seed(0)
    images, labels = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    loader = [(images, labels, torch.zeros(6, dtype=torch.long))]
    reported = []
    for extra in (None, lambda logits, _targets: logits.sum() * 0 + 7.0):
        model = nn.Linear(3, 2)
        torch.nn.init.constant_(model.weight, 0.1)
        torch.nn.init.zeros_(model.bias)
        expected = float(nn.CrossEntropyLoss()(model(images), labels))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        fit = train_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, task="multi-class",
                          device=torch.device("cpu"), extra_loss=extra)
        reported.append(fit["loss"])
        assert math.isclose(fit["loss"], expected, rel_tol=1e-6)
    assert reported[0] == reported[1]
