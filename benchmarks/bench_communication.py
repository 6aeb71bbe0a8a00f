"""Bytes on the wire per ``federation.transfer_dtype``, and its effect on accuracy.

Bytes: the Flower ArrayRecord payload (``ArrayRecord.count_bytes``, what the metrics log
counts) of each MedViTV2 variant's state (1 channel, 2 classes, BreastMNIST's shape) in
float32, float16 and bfloat16, and per round for ``--sites`` sites: the global model out
to each site and its update back (train), the global model out again (evaluate).

Accuracy (unless ``--bytes-only``): the same federation (embedded BreastMNIST,
``--sites`` IID sites, ``--rounds`` rounds x ``--local-epochs`` of nano, in-process
engine; by default the default ``medfed simulate``, which learns: 5 rounds x 1 epoch
still predicted the majority class) once per transfer dtype; the mean over sites of
the last round's test ACC, AUC and balanced ACC (0.5: the majority class only), and the
largest absolute difference of the final weights from the float32 run.

Usage::

    python benchmarks/bench_communication.py
    python benchmarks/bench_communication.py --bytes-only --variants nano tiny small base large
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")


def model_bytes(variant: str, dtype: str) -> int:
    """Payload bytes of one ``medvit_v2_{variant}`` state sent in ``dtype``."""
    from flwr.app import ArrayRecord

    from medfed.models import create_model
    from medfed.transfer import to_wire

    model = create_model(f"medvit_v2_{variant}", num_classes=2, in_chans=1, img_size=28)
    record = ArrayRecord({k: v.detach() for k, v in model.state_dict().items()})
    return to_wire(record, dtype).count_bytes()


def federation_effect(dtype: str, args: argparse.Namespace, output_dir: Path) -> dict:
    """One in-process federation with ``dtype`` transfer: last-round test metrics and weights."""
    from medfed.config import config_from_dict
    from medfed.server.checkpoint import load_arrays
    from medfed.server.metrics_log import read_metrics
    from medfed.simulation import simulate

    cfg = config_from_dict({
        "name": f"transfer-{dtype}", "seed": 0, "output_dir": str(output_dir), "rounds": args.rounds,
        "model": {"name": "medvit_v2_nano"}, "train": {"local_epochs": args.local_epochs},
        "federation": {"num_sites": args.sites, "transfer_dtype": dtype},
        "simulation": {"engine": "inprocess", "gpus_per_site": 1.0 if args.device == "cuda" else 0.0},
    })
    started = time.perf_counter()
    run_dir = simulate(cfg)
    total_s = time.perf_counter() - started
    records = read_metrics(run_dir / "metrics.jsonl")
    last = records[-1] if records[-1]["event"] == "round" else [r for r in records if r["event"] == "round"][-1]
    sites = [r for r in records if r["event"] == "site" and r["phase"] == "evaluate" and r["round"] == last["round"]]
    acc = sum(r["metrics"]["acc"] for r in sites) / len(sites)
    auc = sum(r["metrics"]["auc"] for r in sites) / len(sites)
    balanced_acc = sum(r["metrics"]["balanced_acc"] for r in sites) / len(sites)
    train_bytes = sum(r["bytes_sent"] + r["bytes_received"] for r in records
                      if r["event"] == "site" and r["phase"] == "train" and r["round"] == last["round"])
    return {"transfer_dtype": dtype, "acc": acc, "auc": auc, "balanced_acc": balanced_acc, "total_s": total_s, "train_bytes_last_round": train_bytes,
            "weights": load_arrays(run_dir / "model.safetensors")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["nano", "tiny"])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bytes-only", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "communication_cpu.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import numpy as np

    rows = []
    for variant in args.variants:
        full = model_bytes(variant, "float32")
        for dtype in DTYPES:
            size = full if dtype == "float32" else model_bytes(variant, dtype)
            rows.append({"model": f"medvit_v2_{variant}", "transfer_dtype": dtype, "bytes_per_model": size,
                         "bytes_per_round": 3 * args.sites * size, "ratio_to_float32": size / full})
    print(f"{'model':<16} {'dtype':<9} {'MiB/model':>9} {'MiB/round':>9} {'x fp32':>7}")
    for r in rows:
        print(f"{r['model']:<16} {r['transfer_dtype']:<9} {r['bytes_per_model'] / 2**20:>9.2f}"
              f" {r['bytes_per_round'] / 2**20:>9.2f} {r['ratio_to_float32']:>7.2f}")
    report = {"benchmark": "communication", "sites": args.sites, "bytes": rows, "accuracy": None}
    if not args.bytes_only:
        with tempfile.TemporaryDirectory(prefix="medfed-transfer-") as tmp:
            results = [federation_effect(dtype, args, Path(tmp)) for dtype in DTYPES]
        reference = results[0]["weights"]
        for r in results:
            weights = r.pop("weights")
            r["max_abs_weight_diff"] = float(max(np.abs(weights[k].astype(np.float64) - reference[k]).max()
                                                 for k in reference if reference[k].dtype == np.float32))
        report["accuracy"] = {
            "description": f"embedded BreastMNIST, {args.sites} IID sites, {args.rounds} rounds x {args.local_epochs} "
                           f"local epoch{'s' if args.local_epochs > 1 else ''}, "
                           f"medvit_v2_nano, in-process engine, {args.device}",
            "results": results,
        }
        print(f"\n{'dtype':<9} {'test ACC':>8} {'test AUC':>8} {'bal. ACC':>8} {'max |dw|':>9} {'seconds':>8}")
        for r in results:
            print(f"{r['transfer_dtype']:<9} {r['acc']:>8.4f} {r['auc']:>8.4f} {r['balanced_acc']:>8.4f}"
                  f" {r['max_abs_weight_diff']:>9.2e}"
                  f" {r['total_s']:>8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
