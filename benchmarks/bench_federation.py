"""What a federation costs on top of its compute: medfed's two simulation engines vs a plain loop.

One run measures the same experiment (sites, rounds, local epochs, model, data, seed)
up to three ways, each in a fresh subprocess so no path profits from another's warm caches:

- ``plain``: a plain PyTorch loop in one process. For every round and site: load the
  global weights, train the local epochs (the ClientApp's training, which reports the
  training loss and evaluates nothing); then FedAvg in NumPy (same order and arithmetic as Flower's); then
  evaluate every site's test split. Sites run one after the other, with the sites' torch
  thread count. This is the pure compute.
- ``inprocess``: ``medfed simulate`` with ``simulation.engine: inprocess``: medfed's
  ServerApp and ClientApp through Flower's Message API in one process
  (:mod:`medfed.simulation.local`, no Ray): adds the strategy, the per-round metrics
  log, checkpoints and the report.
- ``ray``: ``medfed simulate`` with ``simulation.engine: ray`` (Flower's simulation
  engine), sites in parallel on ``floor(cores / cpus_per_site)`` actors.

Targets (issue 9): the default ``medfed simulate`` at most 1.1x the plain loop's total
time with the in-process engine, at most 1.3x with Ray (``--preset default``).

For each path: total wall time from the call to its return, the start-up (from the call to
the start of round 1: Ray, data, model), each round's wall time and the teardown (report,
Ray shutdown). Round 1 also pays one-off costs (Ray's actor processes start and import
torch and medfed when the first messages arrive), so the fixed cost is: time to round 1
+ (round 1 - mean later round) + teardown; the steady-state ratio compares later rounds.
Round start/end come from ``metrics.jsonl`` (``round`` records carry their end time and
wall time). Ratios are path / plain. On a CPU the paths end with bit-identical weights
(checked and reported; on a GPU some kernels are not deterministic). The paths run one
after the other, minutes apart, and a shared machine's speed drifts over minutes:
``--repeats N`` runs them in turn N times and reports, per path, the repeat with the
median ratio to the plain loop of the same repeat.

Without ``--root`` the embedded BreastMNIST (28 px) is used; at other ``--img-size`` it
is upsampled (bilinear) into a temporary folder: fine for speed, not for accuracy.

Usage::

    python benchmarks/bench_federation.py --preset default    # the default `medfed simulate`
    python benchmarks/bench_federation.py --preset default --repeats 3    # on a shared machine
    python benchmarks/bench_federation.py                     # 4 sites, 3 rounds, embedded BreastMNIST
    python benchmarks/bench_federation.py --device cuda --paths plain inprocess --model medvit_v2_tiny \
        --img-size 64 --sites 4 --rounds 3 --out benchmarks/results/federation_cuda.json
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
import time
from datetime import datetime
from pathlib import Path

PATHS = ("plain", "inprocess", "ray")
TARGETS = {"inprocess": 1.1, "ray": 1.3}  # max total time / plain loop's, for the default experiment


# --------------------------------------------------------------------------------------
# Workers (one path, in a fresh process)
# --------------------------------------------------------------------------------------
def _config(args: dict, output_dir: str):
    from medfed.config import config_from_dict

    return config_from_dict({
        "name": "bench", "seed": args["seed"], "output_dir": output_dir, "rounds": args["rounds"],
        "data": {"dataset": args["dataset"], "root": args["root"], "img_size": args["img_size"]},
        "model": {"name": args["model"]},
        "train": {"local_epochs": args["epochs"], "batch_size": args["batch_size"]},
        "federation": {"num_sites": args["sites"], "partition": "iid"},
        "simulation": {"cpus_per_site": args["cpus_per_site"], "gpus_per_site": 1.0 if args["device"] == "cuda" else 0.0,
                       "engine": "ray" if args.get("path") == "ray" else "inprocess"},
    })


def _round_times(run_dir: Path) -> tuple[float, float, list[float]]:
    """(wall-clock start of round 1, wall-clock end of the last round, each round's wall time)."""
    from medfed.server.metrics_log import read_metrics

    rounds = read_metrics(run_dir / "metrics.jsonl")
    rounds = [r for r in rounds if r["event"] == "round"]
    first_start = datetime.fromisoformat(rounds[0]["time"]).timestamp() - rounds[0]["wall_time_s"]
    return first_start, datetime.fromisoformat(rounds[-1]["time"]).timestamp(), [r["wall_time_s"] for r in rounds]


def _worker_flower(path: str, args: dict, output_dir: str) -> dict:
    from medfed.server.checkpoint import load_arrays

    from medfed.simulation import simulate

    cfg = _config({**args, "path": path}, output_dir)
    launched, cpu_launched, load_start = time.time(), time.process_time(), os.getloadavg()[0]
    run_dir = simulate(cfg)  # the engine named by cfg.simulation.engine
    returned, cpu_s = time.time(), time.process_time() - cpu_launched
    first_start, last_end, round_s = _round_times(run_dir)
    return {
        "total_s": returned - launched, "startup_s": first_start - launched,
        # CPU time of this process: all the work in-process; the driver's share only with Ray.
        "cpu_s": cpu_s if path == "inprocess" else None, "load_avg_1m": [load_start, os.getloadavg()[0]],
        "rounds_s": last_end - first_start, "teardown_s": returned - last_end, "round_s": round_s,
        "weights": str(run_dir / "model.safetensors"), "arrays": len(load_arrays(run_dir / "model.safetensors")),
    }


def _worker_plain(args: dict, output_dir: str) -> dict:
    launched, cpu_launched, load_start = time.time(), time.process_time(), os.getloadavg()[0]
    import numpy as np
    import torch

    from medfed.client.site_data import load_site_data
    from medfed.client.task import (
        TrainSettings, evaluate, make_loader, make_loss, make_optimizer, round_learning_rate, seed_everything,
        train_epoch,
    )
    from medfed.client.site_data import derive_seed
    from medfed.data import train_augmentation
    from medfed.models import create_model
    from medfed.server.checkpoint import save_arrays
    from medfed.server.server_app import initial_model_arrays

    cfg = _config(args, output_dir)
    device = torch.device(args["device"])
    torch.set_num_threads(max(1, int(cfg.simulation.cpus_per_site)))
    n = cfg.federation.num_sites
    sites = [load_site_data({"partition-id": i, "num-partitions": n}, i, cfg) for i in range(n)]
    global_arrays = initial_model_arrays(cfg)
    reference = {k: np.asarray(v) for k, v in global_arrays.items()}
    info = sites[0].info
    model = create_model(
        cfg.model.name, num_classes=info.num_classes, in_chans=info.in_chans, img_size=cfg.data.img_size
    ).to(device)
    t = cfg.train

    def load(arrays):
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, strict=True)
        model.to(device)

    first_start = time.time()
    round_s = []
    for server_round in range(1, cfg.rounds + 1):
        round_started = time.perf_counter()
        replies = []
        lr = round_learning_rate(t.lr, server_round, cfg.rounds)
        settings = TrainSettings(t.local_epochs, t.batch_size, t.optimizer, lr, t.weight_decay, t.momentum)
        for site in sites:  # as in medfed.client.client_app.train
            load(global_arrays)
            seed = derive_seed(cfg.seed, server_round, site.key)
            seed_everything(seed)
            loader = make_loader(site.train.with_transform(train_augmentation(cfg.data.img_size)),
                                 settings.batch_size, shuffle=True, seed=seed, device=device,
                                 on_device=cfg.train.data_on_device)
            loss_fn = make_loss(info.task, site.train.class_counts())
            optimizer = make_optimizer(model, settings)
            for _ in range(settings.epochs):
                train_epoch(model, loader, loss_fn, optimizer, task=info.task, device=device)
            replies.append(({k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()},
                            len(site.train)))
        total = sum(count for _, count in replies)  # FedAvg, as flwr's aggregate_arrayrecords
        aggregated: dict = {}
        for arrays, count in replies:
            for key, value in arrays.items():
                if key in aggregated:
                    aggregated[key] += value * (count / total)
                else:
                    aggregated[key] = value * (count / total)
        # Back to each array's dtype, integer counters rounded, as medfed's strategies do.
        global_arrays = {k: (v if np.issubdtype(reference[k].dtype, np.inexact) else np.rint(v))
                         .astype(reference[k].dtype) for k, v in aggregated.items()}
        load(global_arrays)
        for site in sites:  # as in medfed.client.client_app.evaluate_global
            evaluate(model, make_loader(site.test, 256, shuffle=False), make_loss(info.task),
                     task=info.task, device=device)
        round_s.append(time.perf_counter() - round_started)
    last_end = time.time()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    weights = Path(output_dir) / "plain.safetensors"
    save_arrays(weights, global_arrays)
    returned = time.time()
    return {
        "total_s": returned - launched, "startup_s": first_start - launched, "rounds_s": last_end - first_start,
        "cpu_s": time.process_time() - cpu_launched, "load_avg_1m": [load_start, os.getloadavg()[0]],
        "teardown_s": returned - last_end, "round_s": round_s, "weights": str(weights), "arrays": len(global_arrays),
    }


def _worker(path: str, args: dict, output_dir: str) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    result = _worker_plain(args, output_dir) if path == "plain" else _worker_flower(path, args, output_dir)
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------
def upsampled_breastmnist(root: Path, img_size: int) -> Path:
    """Write ``root/breastmnist_{img_size}.npz``: the embedded 28 px set, bilinearly upsampled (speed tests only)."""
    import numpy as np
    import torch

    from medfed.data.medmnist_files import default_data_root

    source = np.load(Path(default_data_root()) / "breastmnist.npz")
    arrays = {}
    for key in source.files:
        value = source[key]
        if key.endswith("_images"):
            images = torch.from_numpy(value).float()[:, None]
            images = torch.nn.functional.interpolate(images, size=(img_size, img_size), mode="bilinear")
            value = images[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
        arrays[key] = value
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / f"breastmnist_{img_size}.npz", **arrays)
    return root


def _run_path(path: str, args: dict, output_dir: Path, timeout_s: float) -> dict:
    command = [sys.executable, __file__, "--worker", path, "--worker-args", json.dumps(args),
               "--worker-dir", str(output_dir / path)]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"The '{path}' run failed (exit {done.returncode}):\n{tail}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_s"] = time.time() - started  # includes interpreter start and imports
    return result


def _add_ratios(run: dict[str, dict]) -> None:
    """Add each path's steady-state round, fixed cost and ratios to the plain loop of the same repeat."""
    for r in run.values():
        # Round 1 also pays one-off costs (Ray actor processes and their imports, first
        # use of each input shape); later rounds are the steady state.
        steady = r["round_s"][1:] or r["round_s"]
        r["steady_round_s"] = sum(steady) / len(steady)
        r["first_round_extra_s"] = r["round_s"][0] - r["steady_round_s"]
        r["fixed_s"] = r["startup_s"] + r["first_round_extra_s"] + r["teardown_s"]
    plain = run["plain"]
    for r in run.values():
        r["plain_total_s"] = plain["total_s"]  # the row's ratios are to this plain loop, of the same repeat
        r["ratio_total"] = r["total_s"] / plain["total_s"]
        # On a shared machine wall time follows the load; CPU time follows the work.
        r["ratio_cpu"] = r["cpu_s"] / plain["cpu_s"] if r.get("cpu_s") is not None else None
        r["ratio_rounds"] = r["rounds_s"] / plain["rounds_s"]
        r["ratio_steady_round"] = r["steady_round_s"] / plain["steady_round_s"]
        r["fixed_beyond_plain_s"] = r["fixed_s"] - plain["fixed_s"]


def _same_weights(paths: list[str]) -> bool:
    import numpy as np

    from medfed.server.checkpoint import load_arrays

    if len(paths) < 2:
        return None
    first, *others = [load_arrays(p) for p in paths]
    return all(list(o) == list(first) and all(np.array_equal(first[k], o[k]) for k in first) for o in others)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("default",), default=None,
                        help="'default': the experiment `medfed simulate` runs with no arguments (overrides the "
                        "experiment options)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="rounds after the first give the steady state")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--root", default=None, help="MedMNIST folder (default: the embedded BreastMNIST)")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--model", default="medvit_v2_nano")
    parser.add_argument("--cpus-per-site", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per path")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the paths in turn this many times and report, per path, the repeat whose ratio "
                        "to that repeat's plain loop is the median: a shared machine's speed drifts over minutes")
    parser.add_argument("--out", default="benchmarks/results/federation_cpu.json")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.worker:
        _worker(ns.worker, json.loads(ns.worker_args), ns.worker_dir)
        return {}

    args = {k: getattr(ns, k) for k in ("sites", "rounds", "epochs", "batch_size", "dataset", "root", "img_size",
                                        "model", "cpus_per_site", "seed", "device")}
    if ns.preset == "default":
        from medfed.config import load_config

        cfg = load_config(None)
        args.update(sites=cfg.federation.num_sites, rounds=cfg.rounds, epochs=cfg.train.local_epochs,
                    batch_size=cfg.train.batch_size, dataset=cfg.data.dataset, root=cfg.data.root,
                    img_size=cfg.data.img_size, model=cfg.model.name, cpus_per_site=cfg.simulation.cpus_per_site,
                    seed=cfg.seed)
    if "plain" not in ns.paths:
        parser.error("--paths must include plain: every ratio is against it")
    with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
        data_note = "as given"
        if args["root"] is None and args["img_size"] != 28:
            args["root"] = str(upsampled_breastmnist(Path(tmp) / "data", args["img_size"]))
            data_note = f"embedded BreastMNIST upsampled from 28 to {args['img_size']} px (speed only)"
        elif args["root"] is None:
            data_note = "embedded BreastMNIST (28 px)"
        repeats = []
        for repeat in range(ns.repeats):
            run = {path: _run_path(path, args, Path(tmp) / f"repeat-{repeat}", ns.timeout) for path in ns.paths}
            _add_ratios(run)
            repeats.append(run)
        identical = _same_weights([run[p]["weights"] for run in repeats for p in ns.paths])
    # Per path, the repeat with the median ratio (of an even count, the lower middle one:
    # with 2 repeats, the better); each row keeps the plain loop of its own repeat.
    results = {}
    for path in ns.paths:
        ratios = [run[path]["ratio_total"] for run in repeats]
        results[path] = dict(repeats[ratios.index(statistics.median_low(ratios))][path])
        results[path]["ratio_total_repeats"] = ratios
        results[path]["total_s_repeats"] = [run[path]["total_s"] for run in repeats]
    for path, r in results.items():
        if path in TARGETS:
            r["target_ratio_total"] = TARGETS[path]
            r["meets_target"] = r["ratio_total"] <= TARGETS[path]
            r["meets_target_cpu"] = None if r["ratio_cpu"] is None else r["ratio_cpu"] <= TARGETS[path]
    report = {
        "benchmark": "federation_overhead",
        "preset": ns.preset,
        "settings": args,
        "data": data_note,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_1m_at_end": os.getloadavg()[0], "actors": int((os.cpu_count() or 1) // ns.cpus_per_site)},
        "results": {p: {k: v for k, v in r.items() if k != "weights"} for p, r in results.items()},
        "identical_final_weights": identical,
        "repeats": ns.repeats,
    }
    _print_table(report)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    table = Table(title=f"Federation overhead (seconds): {s['sites']} sites x {s['rounds']} rounds x {s['epochs']} "
                        f"epochs, {s['model']}, {s['dataset']} {s['img_size']} px, {s['device']}, "
                        f"{report['machine']['cpus']} CPUs")
    columns = {"total": "total_s", "to rnd 1": "startup_s", "rnd 1": None, "later rnd": "steady_round_s",
               "teardown": "teardown_s", "fixed": "fixed_s", "x plain": "ratio_total", "cpu s": "cpu_s",
               "cpu x plain": "ratio_cpu"}
    table.add_column("path")
    for column in columns:
        table.add_column(column, justify="right")
    table.add_column("target", justify="right")
    for path, r in report["results"].items():
        values = [r["round_s"][0] if key is None else r[key] for key in columns.values()]
        target = f"<= {r['target_ratio_total']}x {'met' if r['meets_target'] else 'MISSED'}" if "meets_target" in r else ""
        table.add_row(LABELS[path], *("-" if v is None else f"{v:.2f}" for v in values), target)
    console = Console(width=max(150, Console().width))  # the table needs ~140 columns
    console.print(table)
    console.print(
        "fixed = to round 1 + (round 1 - later round) + teardown; "
        f"identical final weights: {report['identical_final_weights']}; data: {report['data']}"
    )
    if report["repeats"] > 1:
        console.print(f"{report['repeats']} repeats, each row the median one; x plain per repeat: " + "; ".join(
            f"{path} {', '.join(f'{x:.2f}' for x in r['ratio_total_repeats'])}"
            for path, r in report["results"].items() if path != "plain"))


LABELS = {"plain": "plain loop", "inprocess": "medfed simulate, engine inprocess", "ray": "medfed simulate, engine ray"}


if __name__ == "__main__":
    main()
