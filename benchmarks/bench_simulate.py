"""One ``medfed simulate`` run, timed, with its final-round test metrics, as JSON.

The README's federated figures come from here: the run's wall time from the call to its
end (start-up included), the last round's test metrics (example-weighted mean over sites,
and on the pooled test set), the bytes exchanged over the whole run (``bytes_sent + bytes_received`` of the
round records), and the machine, with its load average before and after (the times mean
little on a loaded machine; the metrics do not depend on it).

Usage::

    python benchmarks/bench_simulate.py --config experiments/pneumoniamnist-fedavg-4sites.yaml \\
        --set data.root=../shared/data --out benchmarks/results/simulate_pneumoniamnist_4sites_cpu.json
    python benchmarks/bench_simulate.py --out benchmarks/results/simulate_default_cpu.json   # the default
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def run(config: str | None, overrides: list[str], output_dir: Path) -> dict:
    """Run the federation in ``output_dir``; return what the README quotes."""
    from medfed.config import load_config
    from medfed.server.metrics_log import load_run_metrics
    from medfed.simulation import simulate
    from medfed.simulation.run import resolve_engine

    # The pooled figures it reports need the sites' score histograms (off by default: privacy).
    cfg = load_config(config, ["federation.pooled_test_metrics=true", *overrides, f"output_dir={output_dir}"])
    load_before = os.getloadavg()
    started = time.perf_counter()
    run_dir = simulate(cfg)
    total_s = time.perf_counter() - started
    metrics = load_run_metrics(run_dir)
    last = metrics.rounds[-1]
    rounds = metrics.round_records.values()
    return {
        "config": config or "(default)", "overrides": overrides, "engine": resolve_engine(cfg),
        "sites": cfg.federation.num_sites, "rounds": cfg.rounds, "local_epochs": cfg.train.local_epochs,
        "model": cfg.model.name, "dataset": cfg.data.dataset, "img_size": cfg.data.img_size,
        "total_s": total_s, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "last_round": last,
        "evaluate": metrics.aggregate(last, "evaluate"),
        "evaluate_pooled": metrics.aggregate(last, "evaluate_pooled"),
        "bytes_exchanged": sum(r.get("bytes_sent", 0) + r.get("bytes_received", 0) for r in rounds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="experiment YAML (default: the built-in federation)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.__main__ import describe_machine

    with tempfile.TemporaryDirectory(prefix="bench-simulate-") as folder:
        result = run(args.config, args.overrides, Path(folder))
    record = {"benchmark": "simulate", "machine": describe_machine(), **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    evaluate, pooled = result["evaluate"], result["evaluate_pooled"]
    print(f"{result['config']}: {result['total_s']:.1f} s, round {result['last_round']}: test ACC "
          f"{evaluate.get('acc', float('nan')):.3f} AUC {evaluate.get('auc', float('nan')):.3f} (pooled "
          f"{pooled.get('acc', float('nan')):.3f} / {pooled.get('auc', float('nan')):.3f}), "
          f"{result['bytes_exchanged'] / 1e6:.0f} MB exchanged; load {result['load_average_before'][0]:.2f} -> "
          f"{result['load_average_after'][0]:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
