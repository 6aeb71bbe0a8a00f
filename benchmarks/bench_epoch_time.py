"""CPU time of one training epoch of a MedViTV2 variant, here and at another git revision.

Trains ``--model`` for ``--epochs`` epochs on a MedMNIST training split through medfed's
own training path (``medfed.client.task.train_epoch``, the training augmentation,
AdamW), after one warm-up epoch, and reports seconds per epoch. With ``--revision REV``
the same measurement runs on a checkout of ``REV`` (a temporary ``git worktree``),
alternating with the current tree ``--repeats`` times, each in a fresh subprocess, so
that both see the same machine load; the ratio is current / REV.

Usage::

    python benchmarks/bench_epoch_time.py --data-root ../shared/data --dataset pneumoniamnist \\
        --revision 3ad4e78 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

_CHILD = r"""
import json, sys, time, torch
from medfed.client.task import TrainSettings, make_loader, make_loss, make_optimizer, train_epoch
from medfed.data import load_medmnist, train_augmentation
from medfed.models import create_model
args = json.loads(sys.argv[1])
torch.manual_seed(0)
splits = load_medmnist(args["dataset"], args["data_root"], size=args["img_size"])
info = splits["train"].info
train = splits["train"].with_transform(train_augmentation(args["img_size"]))
model = create_model(args["model"], num_classes=info.num_classes, in_chans=info.in_chans, img_size=args["img_size"])
settings = TrainSettings(epochs=1, batch_size=args["batch_size"], optimizer="adamw", lr=1e-3, weight_decay=0.05)
loader = make_loader(train, args["batch_size"], shuffle=True, seed=0)
loss_fn, opt = make_loss(info.task, splits["train"].class_counts()), make_optimizer(model, settings)
times = []
for epoch in range(args["epochs"] + 1):
    start = time.perf_counter()
    train_epoch(model, loader, loss_fn, opt, task=info.task, device=torch.device("cpu"))
    times.append(time.perf_counter() - start)
print(json.dumps({"epoch_s": times[1:], "images": len(train), "threads": torch.get_num_threads()}))
"""


def _run(tree: Path, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], env=env, check=True,
                         capture_output=True, text=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--model", default="medvit_v2_nano")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run (after one warm-up)")
    parser.add_argument("--revision", default=None, help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "epoch_time_cpu.json"))
    args = parser.parse_args()
    spec = {k: getattr(args, k) for k in ("dataset", "data_root", "model", "img_size", "batch_size", "epochs")}
    spec["data_root"] = str(Path(spec["data_root"]).resolve())
    trees = {"current": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.revision:
            trees[args.revision] = Path(tmp) / "rev"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(trees[args.revision]),
                            args.revision], check=True)
        try:
            runs = {name: [] for name in trees}
            threads = set()
            for _ in range(args.repeats):
                for name, tree in trees.items():
                    result = _run(tree, spec)
                    runs[name] += result["epoch_s"]
                    threads.add(result["threads"])
        finally:
            if args.revision:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[args.revision])])
    summary = {name: {"median_epoch_s": statistics.median(t), "epoch_s": t} for name, t in runs.items()}
    print(f"{args.model} on {args.dataset} at {args.img_size} px, batch {args.batch_size}, CPU ({os.cpu_count()} cores)")
    for name, s in summary.items():
        print(f"  {name:>12}: {s['median_epoch_s']:.2f} s/epoch (median of {len(s['epoch_s'])})")
    if args.revision:
        ratio = summary["current"]["median_epoch_s"] / summary[args.revision]["median_epoch_s"]
        print(f"  ratio current / {args.revision}: {ratio:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"spec": spec, "machine": platform.processor() or platform.machine(),
                                          "cores": os.cpu_count(), "torch_threads": sorted(threads), "revision": args.revision,
                                          "runs": summary}, indent=2))


if __name__ == "__main__":
    main()
