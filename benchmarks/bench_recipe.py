"""Pooled-training recipe of MedViTV2-nano at 28 px: the measured table and the ablations.

Table (default): for each dataset, ``medfed train`` with the default recipe over seeds;
mean ± std of test ACC and AUC beside the MedMNIST v2 ResNet-18 (28) baseline and the
paper's MedViTV2-tiny at 224 px. Each row is one ``medfed train`` command (printed).

Ablations (``--ablation``): one seed per variant (class weighting of the loss, mirroring,
label smoothing), with the test metrics of every epoch recorded through
``train_pooled``'s ``on_epoch`` hook, so that the epoch-selection rules (best single
validation epoch, trailing means of 3 and 5 epochs, last epoch) are compared on the
same runs. Selection itself only ever sees validation metrics.

Usage::

    python benchmarks/bench_recipe.py --data-root ../shared/data                 # 3 seeds x 2 datasets
    python benchmarks/bench_recipe.py --data-root ../shared/data --ablation --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from medfed.client.task import TrainSettings, evaluate, make_loader, make_loss
from medfed.data import default_hflip_p, load_medmnist
from medfed.train import train_pooled

RESULTS = Path(__file__).parent / "results"

#: Per-dataset settings of the table's commands (epochs scale inversely with data size).
DATASETS = {
    "breastmnist": dict(epochs=100, batch_size=32, lr=1e-3),
    "pneumoniamnist": dict(epochs=20, batch_size=64, lr=2e-3),
}
#: MedMNIST v2 ResNet-18 (28) test ACC / AUC, and the paper's MedViTV2-tiny (224 px) ACC.
BASELINES = {
    "breastmnist": {"resnet18_28": (0.863, 0.901), "medvitv2_tiny_224_acc": 0.882},
    "pneumoniamnist": {"resnet18_28": (0.854, 0.944), "medvitv2_tiny_224_acc": 0.951},
}
#: Ablation variants: keyword arguments of ``train_pooled`` over the defaults.
VARIANTS = {
    "default": {},
    "weighting=none": {"loss_weighting": "none"},
    "weighting=sqrt": {"loss_weighting": "sqrt"},
    "weighting=balanced": {"loss_weighting": "balanced"},
    "mirror": {"hflip_p": 0.5},
    "no-mirror": {"hflip_p": 0.0},
    "label-smoothing=0.1": {"label_smoothing": 0.1},
}


def _command(dataset: str, root: str, seed: int, extra: dict, epochs: int | None = None) -> str:
    s = {**DATASETS[dataset], **({"epochs": epochs} if epochs else {})}
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in extra.items())
    return (f"medfed train --dataset {dataset} --data-root {root} --model nano --img-size 28 --epochs {s['epochs']} "
            f"--batch-size {s['batch_size']} --lr {s['lr']} --seed {seed}{flags} --out runs/{dataset}-{seed}")


def run(dataset: str, root: str, seed: int, extra: dict, track_test: bool, epochs: int | None = None) -> dict:
    s = {**DATASETS[dataset], **({"epochs": epochs} if epochs else {})}
    settings = TrainSettings(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], weight_decay=0.05)
    per_epoch_test = []
    on_epoch: Callable[[int, torch.nn.Module], None] | None = None
    if track_test:
        test = load_medmnist(dataset, root, size=28)["test"]
        loader = make_loader(test, 256, shuffle=False)
        loss = make_loss(test.info.task)

        def on_test_epoch(epoch: int, model: torch.nn.Module) -> None:
            mirror = extra.get("hflip_p", default_hflip_p(dataset)) > 0  # as train_pooled predicts
            m = evaluate(model, loader, loss, task=test.info.task, device=torch.device("cpu"), mirror=mirror)
            per_epoch_test.append({"epoch": epoch, "acc": m["acc"], "auc": m["auc"]})

        on_epoch = on_test_epoch

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = train_pooled(
            dataset=dataset, data_root=root, model_name="medvit_v2_nano", img_size=28, settings=settings,
            out_dir=out, seed=seed, device="cpu", console=Console(quiet=True), on_epoch=on_epoch, **extra,
        )
    return {
        "dataset": dataset, "seed": seed, "variant": extra, "command": _command(dataset, root, seed, extra, epochs),
        "test_acc": result["test"]["acc"], "test_auc": result["test"]["auc"], "best_epoch": result["best_epoch"],
        "val_scores": [(h["acc"] + h["auc"]) / 2 for h in result["history"]],
        "per_epoch_test": per_epoch_test, "config": result["config"], "wall_s": round(time.perf_counter() - start, 1),
    }


def selection_rules(r: dict) -> dict:
    """Test ACC/AUC that each selection rule would have reported for one run."""
    scores, tests = r["val_scores"], r["per_epoch_test"]
    out = {}
    for window in (1, 3, 5):
        smoothed = [sum(scores[i - window + 1 : i + 1]) / window if i >= window - 1 else -1 for i in range(len(scores))]
        best = max(range(len(scores)), key=lambda i: (smoothed[i], -i))
        out[f"trailing-{window}"] = {"epoch": best + 1, "acc": tests[best]["acc"], "auc": tests[best]["auc"]}
    out["last"] = {"epoch": len(scores), "acc": tests[-1]["acc"], "auc": tests[-1]["auc"]}
    return out


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ablation", nargs="*", default=None, metavar="VARIANT",
                        help=f"run ablation variants (default: all of {list(VARIANTS)})")
    parser.add_argument("--track-test", action="store_true",
                        help="also record every epoch's test metrics to compare selection rules (ablations always do)")
    parser.add_argument("--epochs", type=int, default=None, help="override every dataset's epochs (ablations)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    root = str(Path(args.data_root).resolve())
    if not all((Path(root) / f"{d}.npz").is_file() for d in args.datasets):
        raise SystemExit(f"bench_recipe: needs {', '.join(d + '.npz' for d in args.datasets)} in {root} (--data-root).")
    ablation = args.ablation is not None
    track = ablation or args.track_test
    variants = (args.ablation or list(VARIANTS)) if ablation else ["default"]
    rows = []
    for dataset in args.datasets:
        for variant in variants:
            for seed in args.seeds:
                r = run(dataset, root, seed, VARIANTS[variant], track_test=track, epochs=args.epochs)
                r["variant_name"] = variant
                if track:
                    r["selection"] = selection_rules(r)
                rows.append(r)
                print(f"{dataset:15} {variant:20} seed {seed}: test ACC {r['test_acc']:.3f} AUC {r['test_auc']:.3f} "
                      f"(epoch {r['best_epoch']}, {r['wall_s']:.0f} s)", flush=True)
    print()
    if track:
        print(f"{'dataset':15} {'variant':20} {'seed':>4}  " + "  ".join(f"{k:>20}" for k in ("trailing-1", "trailing-3", "trailing-5", "last")))
        for r in rows:
            cells = "  ".join(f"{s['acc']:.3f}/{s['auc']:.3f} (e{s['epoch']:>3})" for s in r["selection"].values())
            print(f"{r['dataset']:15} {r['variant_name']:20} {r['seed']:4d}  {cells}")
        print()
    if not ablation:
        print("| dataset | test ACC | test AUC | ResNet-18 (28) ACC / AUC | MedViTV2-T (224) ACC | seeds |")
        print("|---|---|---|---|---|---|")
        for dataset in args.datasets:
            rs = [r for r in rows if r["dataset"] == dataset]
            b = BASELINES[dataset]
            print(f"| {dataset} | {_mean_std([r['test_acc'] for r in rs])} | {_mean_std([r['test_auc'] for r in rs])} | "
                  f"{b['resnet18_28'][0]:.3f} / {b['resnet18_28'][1]:.3f} | {b['medvitv2_tiny_224_acc']:.3f} | {len(rs)} |")
        for r in rows:
            print(f"  {r['command']}")
    out = Path(args.out or RESULTS / ("recipe_ablation.json" if ablation else "recipe_table.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                               "torch": torch.__version__, "baselines": BASELINES, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
