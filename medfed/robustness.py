"""Robustness of a trained model to acquisition shift, as MedMNIST-C measures it.

The clean test split and the test split under every chosen corruption at every
severity 1..5 (:mod:`medfed.sites.corruptions`) are predicted by the model; for each the
ACC, AUC and balanced error (1 - balanced accuracy, MedMNIST-C's measure) are
reported, and per corruption their mean over the severities. MedMNIST-C also divides
the balanced error by an AlexNet baseline's; that baseline is not part of medfed, so
the raw balanced error is reported, with the clean one for reference.

Models: a federated run folder (``RUN_DIR/model.safetensors`` with the run's
``config.yaml``) or a ``medfed train`` output (``model.safetensors`` beside its
``metrics.json``, which names the model, dataset and image size). A run's model is
first adapted as its strategy adapts it at a site that never trained
(:meth:`~medfed.strategies.ClientHooks.before_evaluation`): a FedBN run's global model
holds no site's BatchNorm, so its statistics are estimated from the dataset's training
images (recorded under ``"adapted"``). Predictions average each image and its mirror
as the model's own evaluation did (recorded under ``"mirror"``): always for a run, as
a site's ClientApp evaluates; for a ``medfed train`` model only when it trained on
mirrored images (``hflip_p`` > 0), as ``medfed train`` tested it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed._io import json_text, write_bytes_atomic
from medfed.errors import MedfedError
from medfed.server.run_files import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, MODEL_FILE, TRAIN_METRICS_FILE

__all__ = ["ModelSpec", "RobustnessError", "evaluate_robustness", "model_from_run", "model_from_file",
           "robustness_table"]

ROBUSTNESS_JSON = "robustness.json"
ROBUSTNESS_FIGURE = "robustness.png"


class RobustnessError(MedfedError):
    """A model or dataset to evaluate cannot be found or does not fit."""


@dataclass(frozen=True)
class ModelSpec:
    """Which weights to evaluate and how to build the network for them."""

    weights: Path
    model_name: str
    dataset: str
    data_root: str | None
    img_size: int
    strategy: str = "fedavg"  # whose client hooks adapt the model before evaluation
    # Average the predictions over each image and its mirror, as the model's own
    # evaluation did (``medfed train`` does only when it trained on mirrored images).
    mirror: bool = True
    #: The rounds of the federated run whose final model this is (None: a ``medfed train`` model).
    rounds: int | None = None


#: Strategies whose run's ``model.safetensors`` is no model to evaluate on its own, and why.
_NO_GLOBAL_MODEL = {
    "local": "in a local-only run each site kept its own model; model.safetensors is the untrained initial model",
    "fairlora": "a FairLoRA run's model.safetensors holds only its group adapters and head, and its predictions "
                "need each image's patient group, which a dataset's test split does not carry (the run's report "
                "has its per-group metrics)",
}


def model_from_run(run_dir: str | Path, data_root: str | None = None) -> ModelSpec:
    """The final global model of a federated run folder.

    ``data_root`` replaces the run's ``data.root`` (the same files, elsewhere). A relative
    ``data.root`` is relative to the folder the run was started in, so from another folder
    it is refused unless it holds the dataset's file.
    """
    from medfed.config import load_config
    from medfed.data.medmnist_files import medmnist_filename

    run_dir = Path(run_dir)
    weights = run_dir / MODEL_FILE
    if not (run_dir / CONFIG_FILE).is_file() or not weights.is_file():
        raise RobustnessError(
            f"{run_dir} is not a finished medfed run folder: it needs {CONFIG_FILE} and {MODEL_FILE}."
        )
    rounds = _final_model_rounds(run_dir)
    cfg = load_config(run_dir / CONFIG_FILE, run_folder=True)
    if cfg.strategy.name in _NO_GLOBAL_MODEL:
        raise RobustnessError(f"medfed evaluate cannot evaluate {run_dir}: {_NO_GLOBAL_MODEL[cfg.strategy.name]}.")
    root = data_root if data_root is not None else cfg.data.root
    if data_root is None and root is not None and not Path(root).expanduser().is_absolute():
        wanted = Path(root) / medmnist_filename(cfg.data.dataset, cfg.data.img_size)
        if not wanted.is_file():
            raise RobustnessError(
                f"The run's data.root {root!r} is relative to the folder the run started in; from here it has no "
                f"{wanted.name} ({wanted.resolve()}): give --data-root."
            )
    # A site's ClientApp evaluates with predict's default: the mean over the mirror.
    return ModelSpec(weights, cfg.model.name, cfg.data.dataset, root, cfg.data.img_size, cfg.strategy.name,
                     mirror=True, rounds=rounds)


def _final_model_rounds(run_dir: Path) -> int | None:
    """The rounds after which the run wrote its ``model.safetensors`` (None: no metrics.jsonl says).

    The model is written at a run's end, so a run resumed with more rounds that has
    completed rounds since, without finishing, holds an older model than its checkpoint.
    """
    from medfed.server.checkpoint import CheckpointError, checkpoint_round
    from medfed.server.metrics_log import read_metrics

    if not (run_dir / METRICS_FILE).is_file():  # a copied folder: config.yaml and model.safetensors alone
        return None
    ends = [r["rounds_done"] for r in read_metrics(run_dir / METRICS_FILE)
            if r["event"] == "end" and isinstance(r.get("rounds_done"), int)]
    resume = f"medfed simulate --resume {run_dir}, or medfed server --resume --run-dir {run_dir}"
    if not ends:
        raise RobustnessError(f"{run_dir} has not finished (its {METRICS_FILE} has no end record): finish the run "
                              f"first ({resume}).")
    try:
        last_round = checkpoint_round(run_dir / CHECKPOINT_FILE)
    except CheckpointError:  # none, or damaged: nothing says the model is older
        return ends[-1]
    if last_round > ends[-1]:
        raise RobustnessError(
            f"{run_dir} ended after round {ends[-1]}, then was resumed and has completed round {last_round} "
            f"without finishing: its {MODEL_FILE} is still round {ends[-1]}'s model. Finish the run first ({resume})."
        )
    return ends[-1]


def model_from_file(path: str | Path, dataset: str | None, data_root: str | None, img_size: int | None,
                    model_name: str | None) -> ModelSpec:
    """A ``medfed train`` model; missing settings come from the ``metrics.json`` beside it.

    A ``dataset``, ``model_name`` or ``img_size`` that contradicts ``metrics.json`` is refused. Predictions
    average the mirror when the model trained on mirrored images (its recorded
    ``hflip_p``, else ``medfed train``'s default for the dataset), as ``medfed train``
    tested it.
    """
    from medfed.data import default_hflip_p

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise RobustnessError(f"No model file at {path}; give a medfed train output ({MODEL_FILE}).")
    recorded: dict[str, Any] = {}
    metrics_file = path.parent / TRAIN_METRICS_FILE
    if metrics_file.is_file():
        try:
            content = json.loads(metrics_file.read_text())
            recorded = content.get("config", {}) if isinstance(content, dict) else None
            if not isinstance(recorded, dict):
                raise ValueError("no 'config' mapping")
        except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise RobustnessError(
                f"{metrics_file} is not a readable medfed train metrics.json ({error}): restore it, "
                "or move it away and give --dataset and --model-name."
            ) from None
    # An override would evaluate the weights on data or a network they were not trained for.
    for flag, given, trained in (("--dataset", dataset, recorded.get("dataset")),
                                 ("--model-name", _variant(model_name), _variant(recorded.get("model"))),
                                 ("--img-size", img_size, recorded.get("img_size"))):
        if given and trained and given != trained:
            raise RobustnessError(
                f"{path} was trained with {flag} {trained} (its metrics.json says so), but {flag} {given} was asked: "
                f"leave out {flag}, or give a model trained with {given}."
            )
    dataset = dataset or recorded.get("dataset")
    model_name = _variant(model_name or recorded.get("model"))
    img_size = img_size or recorded.get("img_size") or 28
    if not dataset or not model_name:
        raise RobustnessError(
            f"{path} has no metrics.json beside it naming its dataset and model: give --dataset and --model-name."
        )
    hflip_p = recorded.get("hflip_p")  # None: no metrics.json, or one older than the option
    mirror = (hflip_p if isinstance(hflip_p, (int, float)) else default_hflip_p(dataset)) > 0
    return ModelSpec(path, model_name, dataset, data_root, int(img_size), mirror=mirror)


def _variant(name: str | None) -> str | None:
    """The full model name of a variant ("nano" -> "medvit_v2_nano"), None kept."""
    from medfed.models import registered_name

    return registered_name(name) if name else name


def evaluate_robustness(spec: ModelSpec, corruptions: list[str] | str = "default",
                        severities: tuple[int, ...] = (1, 2, 3, 4, 5), *, seed: int = 0,
                        out_dir: str | Path | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Evaluate ``spec`` on the clean and corrupted test split.

    Parameters
    ----------
    spec : ModelSpec
    corruptions : list[str] or str
        Names, ``"default"`` (the dataset's MedMNIST-C corruptions) or ``"all"``
        (every corruption that fits the images).
    severities : tuple[int, ...]
        Severities to run, each in 1..5.
    seed : int
        Seed of the corruptions' random draws.
    out_dir : str or Path, optional
        Where to write ``robustness.json`` and ``robustness.png``.

    Returns
    -------
    dict
        ``{"clean": {...}, "corruptions": {name: {"severities": {s: {...}}, "mean": {...}}}, ...}``
        with ``acc``, ``auc`` and ``balanced_error`` at every level, and ``"mirror"``: whether
        predictions averaged each image's mirror (:attr:`ModelSpec.mirror`).
    """
    import torch

    from medfed.client.task import image_batches, make_loader, predict, select_device
    from medfed.data import DatasetSizeWarning, ImageDataset, classification_metrics, load_medmnist
    from medfed.models import create_model
    from medfed.models.pretrained import state_dict_misfit
    from medfed.server.checkpoint import load_arrays
    from medfed.sites.corruptions import corrupt, default_corruptions, list_corruptions, parameter_source
    from medfed.strategies import client_hooks_for

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetSizeWarning)
        splits = load_medmnist(spec.dataset, spec.data_root, size=spec.img_size)
    test = splits["test"]
    info = test.info
    if corruptions == "default":
        names = default_corruptions(spec.dataset, channels=info.in_chans)
    elif corruptions == "all":
        names = [n for n in list_corruptions() if not (n == "saturate" and info.in_chans != 3)]
    else:
        names = list(corruptions)
        for name in names:
            corrupt(test.images[:1], name, 1, seed, dataset=spec.dataset)  # one-line error for unknown or unfit names
    model = create_model(spec.model_name, num_classes=info.num_classes, in_chans=info.in_chans, img_size=spec.img_size)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in load_arrays(spec.weights).items()}
    misfit = state_dict_misfit(model.state_dict(), state)
    if misfit:
        raise RobustnessError(
            f"The weights in {spec.weights} do not fit {spec.model_name} for {spec.dataset} at {spec.img_size} px: "
            f"{misfit} (were they written for another model variant, dataset or image size?)."
        )
    model.load_state_dict(state, strict=True)
    device = select_device()
    model.to(device)
    adapted = client_hooks_for(spec.strategy)({}).before_evaluation(
        model, {}, image_batches(splits["train"], batch_size), device)

    def measure(images: np.ndarray) -> dict[str, float]:
        data = ImageDataset(images, test.labels, info)
        y_score, y_true, _, _ = predict(model, make_loader(data, batch_size, shuffle=False), task=info.task,
                                        device=device, mirror=spec.mirror)
        metrics = classification_metrics(info.task, y_true, y_score)
        return {"acc": metrics["acc"], "auc": metrics["auc"], "balanced_error": 1.0 - metrics["balanced_acc"]}

    result: dict[str, Any] = {
        "model": str(spec.weights), "model_name": spec.model_name, "dataset": spec.dataset,
        "img_size": spec.img_size, "rounds": spec.rounds, "seed": seed, "num_test": len(test), "adapted": adapted, "mirror": spec.mirror,
        "clean": measure(test.images),
        "corruptions": {},
    }
    for name in names:
        levels = {str(s): measure(corrupt(test.images, name, s, seed, dataset=spec.dataset)) for s in severities}
        # A plain mean: a severity where the model broke down (NaN) must not leave the mean
        # to the milder ones.
        mean = {k: float(np.mean([v[k] for v in levels.values()])) for k in ("acc", "auc", "balanced_error")}
        result["corruptions"][name] = {"severities": levels, "mean": mean,
                                       "parameters": parameter_source(name, spec.dataset)}
    if result["corruptions"]:
        result["mean_over_corruptions"] = {
            k: float(np.mean([c["mean"][k] for c in result["corruptions"].values()]))
            for k in ("acc", "auc", "balanced_error")
        }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out_dir / ROBUSTNESS_JSON, (json_text(result, indent=2) + "\n").encode())
        _write_figure(out_dir / ROBUSTNESS_FIGURE, result)
    return result


def _write_figure(path: Path, result: dict[str, Any]) -> None:
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10.0, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, metric, label in zip(figure.subplots(1, 2), ("balanced_error", "auc"), ("Balanced error", "AUC")):
        for index, (name, entry) in enumerate(result["corruptions"].items()):
            severities = [int(s) for s in entry["severities"]]
            axes.plot([0, *severities], [result["clean"][metric], *(v[metric] for v in entry["severities"].values())],
                      marker=".", color=f"C{index % 10}", linestyle="-" if index < 10 else "--", label=name)
        axes.set_title(f"{label} under corruption ({result['dataset']})")
        axes.set_xlabel("severity (0 = clean)")
        axes.grid(alpha=0.3)
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside right", fontsize="small")
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    write_bytes_atomic(path, buffer.getvalue())


def robustness_table(result: dict[str, Any]):
    """A rich table: clean, then per corruption the mean over severities and the worst severity."""
    from rich.table import Table

    table = Table(title=f"Robustness of {result['model_name']} on {result['dataset']} ({result['num_test']} test images)",
                  caption="balanced error = 1 - balanced accuracy (MedMNIST-C); mean over the severities run")
    for header in ("Corruption", "ACC", "AUC", "Bal. error", "Bal. error (sev. 5)"):
        table.add_column(header, justify="left" if header == "Corruption" else "right")

    def fmt(value: float | None) -> str:
        return "–" if value is None or value != value else f"{value:.4f}"

    clean = result["clean"]
    table.add_row("clean", fmt(clean["acc"]), fmt(clean["auc"]), fmt(clean["balanced_error"]), "", end_section=True)
    for name, entry in result["corruptions"].items():
        worst = entry["severities"].get("5", {}).get("balanced_error")
        table.add_row(name, fmt(entry["mean"]["acc"]), fmt(entry["mean"]["auc"]), fmt(entry["mean"]["balanced_error"]),
                      fmt(worst))
    if "mean_over_corruptions" in result:
        mean = result["mean_over_corruptions"]
        table.add_row("mean", fmt(mean["acc"]), fmt(mean["auc"]), fmt(mean["balanced_error"]), "", style="bold")
    return table
