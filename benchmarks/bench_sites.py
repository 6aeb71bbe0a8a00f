"""Multi-center domain shift: local-only training vs FedAvg, per site, plus an unseen hospital.

The federation is the ``unseen-hospital`` scenario: the four training sites of
``scanner-and-label-shift`` (four scanners, Dirichlet(0.5) label skew) plus one
held-out hospital with a fifth scanner that never trains. For every seed:

- ``fedavg``: the federation through medfed's ServerApp and ClientApp in one process
  (:func:`medfed.simulation.local.run_local`, which gives the same weights as Flower's
  Ray engine); the final global model's test ACC/AUC on every site's own test split
  (the held-out site included), the sample-weighted mean of the training sites, and the
  pooled figure (the union of the training sites' test sets: ACC exact, AUC from the
  summed score histograms).
- ``local``: every training site runs exactly the clients' procedure on its own data
  (same rounds, local epochs, per-round learning rate, optimiser reset, seeds) without
  averaging; its final model is tested on its own test split and on the held-out site's.

Mean ± std over the seeds (sample std, ddof=1). Site data are identical in both arms
(:func:`medfed.client.site_data.load_site_data`).

Usage::

    python benchmarks/bench_sites.py                       # 3 seeds, 8 rounds x 1 epoch, nano, 28 px
    python benchmarks/bench_sites.py --seeds 0 --rounds 2  # a quick look
    python benchmarks/bench_sites.py --merge a.json b.json --out all.json   # seeds run apart
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

DATA = Path("/work/shared/data")
RESULTS = Path(__file__).resolve().parent / "results"


def _config(seed: int, args: argparse.Namespace, output_dir: str):
    from medfed.config import load_config

    return load_config(overrides=[
        f"name=bench-sites-{seed}", f"seed={seed}", f"output_dir={output_dir}", f"rounds={args.rounds}",
        "data.dataset=pneumoniamnist", f"data.root={args.data_root}", "data.img_size=28",
        f"model.name={args.model}", f"train.local_epochs={args.epochs}", f"train.batch_size={args.batch_size}",
        "federation.scenario=unseen-hospital", "simulation.cpus_per_site=1",
        "federation.pooled_test_metrics=true",  # the table's pooled row (off by default: privacy)
    ])


def _fedavg(cfg) -> dict:
    from medfed.server.metrics_log import load_run_metrics
    from medfed.simulation.local import run_local

    start = time.perf_counter()
    run_dir = run_local(cfg)
    run = load_run_metrics(run_dir)
    last = run.rounds[-1]
    sites = {}
    for site in run.sites:
        record = run.site_record(last, "evaluate", site)
        if record is not None:
            metrics = record["metrics"]
            sites[site] = {"acc": metrics["acc"], "auc": metrics["auc"], "num_test": record["num_examples"],
                           "held_out": bool(record.get("held_out"))}
    mean, pooled = run.aggregate(last, "evaluate"), run.aggregate(last, "evaluate_pooled")
    return {
        "sites": sites,
        "mean_of_sites": {"acc": mean.get("acc"), "auc": mean.get("auc")},
        "pooled": {"acc": pooled.get("acc"), "auc": pooled.get("auc"), "auc_error_bound": pooled.get("auc_error_bound"),
                   "num_test": pooled.get("num_examples")},
        "held_out": {k: run.aggregate(last, "held_out").get(k) for k in ("acc", "auc")},
        "wall_s": time.perf_counter() - start,
    }


def _local(cfg) -> dict:
    """Each training site alone: the ClientApp's procedure, rounds without averaging."""
    import torch

    from medfed.client.site_data import derive_seed, load_site_data
    from medfed.client.task import (
        TrainSettings, evaluate, make_loader, make_loss, make_optimizer, round_learning_rate, seed_everything,
        train_epoch,
    )
    from medfed.data import train_augmentation
    from medfed.models import create_model
    from medfed.server.server_app import initial_model_arrays
    from medfed.sites.profiles import num_nodes

    start = time.perf_counter()
    torch.set_num_threads(1)  # as a simulated site
    total = num_nodes(cfg.federation)
    sites = [load_site_data({"partition-id": pid, "num-partitions": total}, pid, cfg) for pid in range(total)]
    held_out = [s for s in sites if s.held_out]
    initial = {k: torch.from_numpy(v.copy()) for k, v in initial_model_arrays(cfg).items()}
    device = torch.device("cpu")
    results = {}
    for site in (s for s in sites if not s.held_out):
        model = create_model(cfg.model.name, num_classes=site.info.num_classes, in_chans=site.info.in_chans,
                             img_size=cfg.data.img_size)
        model.load_state_dict(initial)
        loss_fn = make_loss(site.info.task, site.train.class_counts())
        for server_round in range(1, cfg.rounds + 1):
            settings = TrainSettings(
                epochs=cfg.train.local_epochs, batch_size=cfg.train.batch_size, optimizer=cfg.train.optimizer,
                lr=round_learning_rate(cfg.train.lr, server_round, cfg.rounds), weight_decay=cfg.train.weight_decay,
                momentum=cfg.train.momentum,
            )
            seed = derive_seed(cfg.seed, server_round, site.key)
            seed_everything(seed)
            loader = make_loader(site.train.with_transform(train_augmentation(cfg.data.img_size)),
                                 settings.batch_size, shuffle=True, seed=seed)
            optimizer = make_optimizer(model, settings)
            for _ in range(settings.epochs):
                train_epoch(model, loader, loss_fn, optimizer, task=site.info.task, device=device)
        test_loss = make_loss(site.info.task)  # plain cross-entropy, as a site's evaluation
        own = evaluate(model, make_loader(site.test, 256, shuffle=False), test_loss, task=site.info.task, device=device)
        entry = {"acc": own["acc"], "auc": own["auc"], "num_test": len(site.test)}
        for other in held_out:
            unseen = evaluate(model, make_loader(other.test, 256, shuffle=False), test_loss, task=site.info.task,
                              device=device)
            entry["on_held_out"] = {"site": other.name, "acc": unseen["acc"], "auc": unseen["auc"]}
        results[site.name] = entry
    return {"sites": results, "wall_s": time.perf_counter() - start}


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def summarize(per_seed: list[dict]) -> list[dict]:
    """Rows of the table: per site, then mean of sites, pooled, held-out; mean ± std over seeds."""
    names = list(per_seed[0]["fedavg"]["sites"])
    rows = []
    for name in names:
        fed = [s["fedavg"]["sites"].get(name, {}) for s in per_seed]
        loc = [s["local"]["sites"].get(name, {}) for s in per_seed]
        held = fed[0].get("held_out", False)
        row = {"site": name, "held_out": held}
        for key in ("acc", "auc"):
            row[f"fedavg_{key}"] = _mean_std([f.get(key) for f in fed])
            if held:  # no local model of its own: the training sites' local models, averaged
                row[f"local_{key}"] = _mean_std([
                    sum(v["on_held_out"][key] for v in s["local"]["sites"].values()) / len(s["local"]["sites"])
                    for s in per_seed
                ])
            else:
                row[f"local_{key}"] = _mean_std([entry.get(key) for entry in loc])
        row["num_test"] = [f.get("num_test") for f in fed]
        rows.append(row)
    for label, key in (("mean of training sites", "mean_of_sites"), ("pooled (training sites)", "pooled")):
        row = {"site": label, "held_out": False}
        for metric in ("acc", "auc"):
            row[f"fedavg_{metric}"] = _mean_std([s["fedavg"][key][metric] for s in per_seed])
            sizes = [[v["num_test"] for v in s["local"]["sites"].values()] for s in per_seed]
            if key == "mean_of_sites":
                row[f"local_{metric}"] = _mean_std([
                    sum(v[metric] * v["num_test"] for v in s["local"]["sites"].values()
                        if not math.isnan(v[metric])) / sum(n for v, n in zip(s["local"]["sites"].values(), size)
                                                            if not math.isnan(v[metric]))
                    for s, size in zip(per_seed, sizes)
                ])
            else:
                row[f"local_{metric}"] = (float("nan"), float("nan"))
        rows.append(row)
    return rows


def _fmt(pair: tuple[float, float]) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if not math.isnan(std) else f"{mean:.3f}"


def print_table(rows: list[dict], seeds: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"PneumoniaMNIST, unseen-hospital (scanner-and-label-shift + 1 held-out), seeds {seeds}",
                  caption="test ACC / AUC of the final models; mean ± sample std over seeds. Held-out row, local "
                          "column: the training sites' local models on the held-out site, averaged.")
    for header in ("Site", "Local ACC", "Local AUC", "FedAvg ACC", "FedAvg AUC"):
        table.add_column(header, justify="left" if header == "Site" else "right")
    for row in rows:
        table.add_row(row["site"] + (" (held out)" if row["held_out"] else ""), _fmt(row["local_acc"]),
                      _fmt(row["local_auc"]), _fmt(row["fedavg_acc"]), _fmt(row["fedavg_auc"]))
    Console(width=120).print(table)


def _merge(paths: list[str], out: Path) -> int:
    results = [json.loads(Path(p).read_text()) for p in paths]
    per_seed = sorted((s for r in results for s in r["per_seed"]), key=lambda s: s["seed"])
    merged = {**results[0], "seeds_done": [s["seed"] for s in per_seed], "per_seed": per_seed,
              "rows": summarize(per_seed), "merged_from": [str(p) for p in paths],
              "machine": [r["machine"] for r in results]}
    out.write_text(json.dumps(merged, indent=2, default=float) + "\n")
    print_table(merged["rows"], merged["seeds_done"])
    print(f"wrote {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="medvit_v2_nano")
    parser.add_argument("--data-root", default=str(DATA))
    parser.add_argument("--out", default=str(RESULTS / "sites_pneumoniamnist.json"))
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="combine the seeds of earlier result files (e.g. seeds run in parallel) into --out")
    args = parser.parse_args()
    if args.merge:
        return _merge(args.merge, Path(args.out))
    if not (Path(args.data_root) / "pneumoniamnist.npz").is_file():
        print(f"skipped: no pneumoniamnist.npz in {args.data_root}", file=sys.stderr)
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-sites-") as tmp:
        for seed in seeds:
            cfg = _config(seed, args, tmp)
            entry = {"seed": seed, "fedavg": _fedavg(cfg), "local": _local(cfg)}
            per_seed.append(entry)
            rows = summarize(per_seed)
            result = {
                "what": "local-only vs FedAvg per site; held-out site; pooled figure",
                "scenario": "unseen-hospital", "dataset": "pneumoniamnist", "img_size": 28, "model": args.model,
                "rounds": args.rounds, "local_epochs": args.epochs, "batch_size": args.batch_size,
                "seeds_done": [s["seed"] for s in per_seed], "rows": rows, "per_seed": per_seed,
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "load_avg_1m": os.getloadavg()[0]},
                "time": datetime.now(timezone.utc).isoformat(),
            }
            out.write_text(json.dumps(result, indent=2, default=float) + "\n")  # after every seed
            print(f"seed {seed} done: fedavg {entry['fedavg']['wall_s']:.0f} s, local {entry['local']['wall_s']:.0f} s",
                  flush=True)
    print_table(summarize(per_seed), seeds)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
