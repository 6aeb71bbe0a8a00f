"""Local-only, FedAvg, FedProx, FedBN, FedLD and FairLoRA on one federation, over seeds.

The federation (dataset, sites, partition or scenario, rounds, training) comes from an
experiment YAML; only ``strategy`` and ``seed`` change between runs. Every run goes
through medfed's own ServerApp and ClientApp in one process
(:func:`medfed.simulation.local.run_local`, same results as ``medfed simulate`` on a CPU).

FairLoRA adapts a pretrained backbone: unless ``--backbone`` names one, it starts from
the same seed's FedAvg run (so "fairlora" means FedAvg's rounds, then FairLoRA's: it has
had twice the rounds of the others, which the table says). Its groups come from the
sites' data (site folders' ``group`` column, or a scenario that simulates groups); without
groups every sample has weight ``1 / G`` on each group and FairLoRA is plain LoRA.

Per run, from ``metrics.jsonl``'s last evaluated round: test ACC, AUC and loss (sample-weighted over
the sites' test splits; for Local-only and FedBN each site evaluates its own model),
worst-site ACC, held-out ACC (the ``held_out: true`` sites, which never train, when the
federation has any), ES-AUC (when sites report groups) and bytes per round (sent +
received, mean over rounds). The table gives mean ± std over seeds.

Usage (the issue's two federations; ``benchmarks/results/strategies_*.json``)::

    python benchmarks/bench_strategies.py --config experiments/pneumoniamnist-scanner-and-label-shift.yaml \\
        --seeds 0 1 2
    python benchmarks/bench_strategies.py --config experiments/breastmnist-group-shift.yaml --seeds 0 1 2

Flower's server optimisers at their defaults, beside FedAvg, on the default experiment
(``benchmarks/results/strategies_flower_optimisers.json``)::

    python benchmarks/bench_strategies.py --strategies fedavg fedadam fedyogi fedadagrad --seeds 0 \
        --set rounds=4 --out benchmarks/results/strategies_flower_optimisers.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STRATEGIES = {
    "local": ("local", {}),
    "fedavg": ("fedavg", {}),
    "fedprox": ("fedprox", {"proximal_mu": 0.01}),  # FedLD's authors' baseline mu
    "fedbn": ("fedbn", {}),
    "fedld": ("fedld", {"margin_lambda": 0.03}),
    "fairlora": ("fairlora", {"num_groups": 2, "rank": 4}),
    # Flower's server optimisers at Flower's defaults (eta 0.1, 0.01, 0.1): not in the default set.
    "fedadam": ("fedadam", {}),
    "fedyogi": ("fedyogi", {}),
    "fedadagrad": ("fedadagrad", {}),
}
DEFAULT_STRATEGIES = ("local", "fedavg", "fedprox", "fedbn", "fedld", "fairlora")
COLUMNS = ("acc", "auc", "loss", "worst_site_acc", "held_out_acc", "es_auc", "bytes_per_round")


def run_metrics(run_dir: Path) -> dict[str, float | None]:
    """The table's numbers for one finished run.

    ACC, AUC and ES-AUC are the strategy's sample-weighted means over the training sites'
    own test sets, as its ``evaluate`` aggregate gives them: ES-AUC is
    ``AUC / (1 + sum_g |AUC_g - AUC|)`` with ``AUC`` and each group's ``AUC_g`` such a mean
    of the sites' values (``evaluate["es-auc"]``), not the report's pooled ES-AUC over the
    union of the test sets (``evaluate_pooled["es_auc"]``).
    """
    from medfed.server.metrics_log import load_run_metrics

    run = load_run_metrics(run_dir)
    # The last round that was evaluated: a final round whose evaluation was skipped (too few
    # sites in time) would give no figures, and the seed would drop out of the mean.
    last = max((r for r in run.rounds if run.aggregate(r, "evaluate")), default=run.rounds[-1])
    evaluate = run.aggregate(last, "evaluate")
    records = {site: run.site_record(last, "evaluate", site) for site in run.sites}
    in_federation = [r["metrics"]["acc"] for r in records.values() if r and not r.get("held_out")]
    held_out = run.aggregate(last, "held_out") or {}
    per_round = [r["bytes_sent"] + r["bytes_received"] for r in run.round_records.values()]
    return {
        "acc": evaluate.get("acc"), "auc": evaluate.get("auc"), "loss": evaluate.get("loss"),
        # A site whose ACC is NaN (its training diverged) is the worst; min() would skip it or not,
        # by where it stands in the list.
        "worst_site_acc": (math.nan if any(math.isnan(a) for a in in_federation) else min(in_federation))
        if in_federation else None,
        "held_out_acc": held_out.get("acc"),
        "es_auc": evaluate.get("es-auc"),
        "bytes_per_round": statistics.mean(per_round) if per_round else None,
    }


def _fmt(values: list[float | None], kind: str) -> str:
    """Mean ± std over the seeds; seeds whose value is NaN (a diverged site or run) are named, not hidden."""
    given = [v for v in values if v is not None]
    values = [v for v in given if not (isinstance(v, float) and math.isnan(v))]
    nan = f" ({len(given) - len(values)} of {len(given)} NaN)" if len(values) < len(given) else ""
    if not values:
        return "-" + nan
    if kind == "bytes_per_round":
        return f"{statistics.mean(values) / 1e6:.2f} MB" + nan
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}" + nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None,
                        help="experiment YAML: the federation (default: medfed simulate's default experiment)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--backbone", default=None, help="FairLoRA backbone (default: the seed's FedAvg run)")
    parser.add_argument("--work-dir", default=None, help="where run folders go (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="JSON result (default: benchmarks/results/strategies_<name>.json)")
    args = parser.parse_args()

    import dataclasses
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.__main__ import describe_machine

    from medfed.config import StrategyConfig, load_config
    from medfed.simulation.local import run_local

    base = load_config(args.config, args.overrides)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="medfed-bench-strategies-"))
    needs_fedavg = "fedavg" in args.strategies or ("fairlora" in args.strategies and args.backbone is None)
    # FedAvg first: without --backbone it is FairLoRA's backbone.
    order = (["fedavg"] if needs_fedavg else []) + [s for s in args.strategies if s != "fedavg"]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in order}
    for seed in args.seeds:
        for label in order:
            name, params = STRATEGIES[label]
            model = base.model
            if label == "fairlora":
                backbone = args.backbone or str(work / f"fedavg-seed{seed}")
                model = dataclasses.replace(base.model, init_from=backbone)
            cfg = dataclasses.replace(
                base, name=f"{label}-seed{seed}", seed=seed, output_dir=str(work), model=model,
                strategy=dataclasses.replace(base.strategy, name=name, params=params) if base.strategy else StrategyConfig(),
            )
            start = time.perf_counter()
            threads = torch.get_num_threads()
            run_dir = run_local(cfg, resume=(work / cfg.name / "model.safetensors").exists())
            torch.set_num_threads(threads)
            metrics = {**run_metrics(run_dir), "seed": seed, "wall_s": round(time.perf_counter() - start, 1)}
            results[label].append(metrics)
            print(f"{label:>9} seed {seed}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()), flush=True)

    header = f"{'strategy':<10}" + "".join(f"{c:>18}" for c in COLUMNS)
    print(f"\n{base.data.dataset}, {base.federation.num_sites} sites ({base.federation.partition}), "
          f"{base.rounds} rounds, seeds {args.seeds}\n{header}")
    for label in args.strategies:
        row = f"{label:<10}" + "".join(f"{_fmt([r[c] for r in results[label]], c):>18}" for c in COLUMNS)
        print(row)
    out = Path(args.out or Path(__file__).parent / "results" / f"strategies_{base.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": args.config, "overrides": args.overrides, "seeds": args.seeds, "rounds": base.rounds,
        "scenario": base.federation.scenario, "local_epochs": base.train.local_epochs,
        "dataset": base.data.dataset, "num_sites": base.federation.num_sites,
        "partition": base.federation.partition, "strategies": {k: STRATEGIES[k] for k in args.strategies},
        "fairlora_backbone": args.backbone or "the same seed's FedAvg run",
        "runs": {label: results[label] for label in args.strategies},
        "machine": platform.processor() or platform.machine(), "time": datetime.now(timezone.utc).isoformat(),
        "environment": describe_machine(), "torch_threads": torch.get_num_threads(),
    }, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
