"""Per-round wall time of a localhost deployment vs the same rounds in simulation vs compute.

For each number of sites (default 2 and 4) the script runs the same tiny experiment
(``medvit_v2_nano``, 28 px, a few generated images per site, 1 local epoch) three ways:

- ``deploy``: ``medfed certs`` + ``medfed server`` (TLS, site keys) + one ``medfed client``
  per site, all on 127.0.0.1, each a separate process tree as in a real federation;
- ``deploy-stock-polls`` (mode ``stock``): the same, with Flower's default latencies
  that medfed changes: SuperExec task poll 1 s (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``)
  and the ServerApp pulling replies every 3 s (``MEDFED_REPLY_POLL_S=3``, Flower's
  ``HttpGrid.send_and_receive`` interval);
- ``simulate``: ``medfed simulate`` (Flower's Ray simulation engine).

Reported per round (median over rounds 2..R; round 1 also pays one-off start-up):
``wall`` (the server's ``round`` line), ``compute`` (the slowest site's training plus
the slowest site's evaluation, as the sites measured them inside the ClientApp) and
``overhead = wall - compute``. What the overhead is made of in deployment, per message
(two per round: train, evaluate): the SuperNode's fixed 3 s idle poll (1.5 s on
average, not configurable in Flower 1.42), one ``flwr-clientapp`` process start with
its imports (torch, the model), and the server's reply polling.

Usage::

    python benchmarks/bench_deployment.py                  # 2 and 4 sites, 4 rounds, all three modes
    python benchmarks/bench_deployment.py --sites 2 --rounds 3 --modes deploy stock
    python benchmarks/bench_deployment.py --sites 2 --rounds 2 --modes deploy --model medvit_v2_large \\
        --out benchmarks/results/deployment_large_cpu.json      # MedViTV2-large's message goes through

Writes ``benchmarks/results/deployment_cpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medfed.deploy.certs import make_certs  # noqa: E402
from medfed.deploy.processes import free_port  # noqa: E402
from medfed.server.metrics_log import read_metrics  # noqa: E402


def write_site(folder: Path, seed: int, n_train: int) -> None:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", 4), ("test", 8)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 80, size=(n, 28, 28)) + 100 * labels[:, None, None]
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(n, 1).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "breastmnist.npz", **arrays)


def experiment(path: Path, sites: int, rounds: int, data_root: Path | None, model: str = "medvit_v2_nano") -> Path:
    path.write_text(yaml.safe_dump({
        "name": "bench", "seed": 0, "rounds": rounds,
        "data": {"dataset": "breastmnist", "root": str(data_root) if data_root else None, "img_size": 28},
        "model": {"name": model}, "train": {"local_epochs": 1, "batch_size": 16},
        "federation": {"num_sites": sites, "min_sites": sites, "round_timeout_s": 1800},
    }))
    return path


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "FLWR_TELEMETRY_ENABLED": "0", **(extra or {})}


def run_deployment(work: Path, sites: int, rounds: int, extra_env: dict[str, str], model: str) -> Path:
    names = [f"site{i}" for i in range(sites)]
    certs = work / "certs"
    make_certs(certs, "127.0.0.1", names, force=True)
    for i, name in enumerate(names):
        write_site(work / "data" / name, i, 32)
    port = free_port()
    run_dir = work / "run"
    env = environment(extra_env)
    medfed = [sys.executable, "-m", "medfed.cli"]
    procs = []
    try:
        server = subprocess.Popen(
            medfed + ["server", "--config", str(experiment(work / "exp.yaml", sites, rounds, None, model)), "--certs",
                      str(certs), "--address", f"127.0.0.1:{port}", "--run-dir", str(run_dir)],
            env=env, stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(server)
        for name in names:
            procs.append(subprocess.Popen(
                medfed + ["client", "--server", f"127.0.0.1:{port}", "--site", name, "--data",
                          str(work / "data" / name), "--certs", str(certs / "sites" / name), "--device", "cpu"],
                env={**env, "OMP_NUM_THREADS": "1"}, stdout=open(work / f"{name}.log", "wb"),
                stderr=subprocess.STDOUT, start_new_session=True))
        if server.wait(timeout=3600) != 0:
            raise RuntimeError(f"medfed server failed; see {work / 'server.log'}")
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return run_dir


def run_simulation(work: Path, sites: int, rounds: int, model: str) -> Path:
    root = work / "pooled"
    write_site(root, 0, 32 * sites)
    run_dir = work / "sim-run"
    cfg = experiment(work / "sim.yaml", sites, rounds, root, model)
    subprocess.run([sys.executable, "-m", "medfed.cli", "simulate", "--config", str(cfg),
                    "--set", f"output_dir={work}", "--set", "name=sim-run"],
                   env={**environment(), "OMP_NUM_THREADS": "1"}, check=True, timeout=3600,
                   stdout=open(work / "simulate.log", "wb"), stderr=subprocess.STDOUT)
    return run_dir


def per_round(run_dir: Path) -> list[dict]:
    records = read_metrics(run_dir / "metrics.jsonl")
    rows = []
    for record in records:
        if record["event"] != "round":
            continue
        r = record["round"]
        phase_max = {
            phase: max((s.get("time_s", 0.0) for s in records
                        if s["event"] == "site" and s["round"] == r and s["phase"] == phase), default=0.0)
            for phase in ("train", "evaluate")
        }
        compute = phase_max["train"] + phase_max["evaluate"]
        rows.append({"round": r, "wall_s": record["wall_time_s"], "compute_s": compute,
                     "overhead_s": record["wall_time_s"] - compute,
                     "bytes": record["bytes_sent"] + record["bytes_received"]})
    return rows


def summarise(rows: list[dict]) -> dict:
    later = rows[1:] or rows
    return {key: statistics.median(row[key] for row in later) for key in ("wall_s", "compute_s", "overhead_s", "bytes")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["deploy", "stock", "simulate"],
                        choices=["deploy", "stock", "simulate"],
                        help="deploy: medfed's settings; stock: Flower's default polls; simulate: Ray")
    parser.add_argument("--model", default="medvit_v2_nano",
                        help="e.g. medvit_v2_large: a ~430 MB message through the TLS deployment")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "deployment_cpu.json"))
    args = parser.parse_args()

    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "load_avg_at_start": os.getloadavg()},
               "rounds": args.rounds, "model": args.model, "cases": []}
    modes = []
    if "deploy" in args.modes:
        modes.append(("deploy", {}))
    if "stock" in args.modes:
        modes.append(("deploy-stock-polls", {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0", "MEDFED_REPLY_POLL_S": "3"}))
    for sites in args.sites:
        for mode, extra in modes:
            with tempfile.TemporaryDirectory(prefix=f"medfed-bench-{mode}-") as tmp:
                started = time.perf_counter()
                rows = per_round(run_deployment(Path(tmp), sites, args.rounds, extra, args.model))
                results["cases"].append({"mode": mode, "sites": sites, "rounds": rows, "median": summarise(rows),
                                         "total_s": time.perf_counter() - started})
                print(json.dumps(results["cases"][-1]["median"] | {"mode": mode, "sites": sites}), flush=True)
        if "simulate" in args.modes:
            with tempfile.TemporaryDirectory(prefix="medfed-bench-sim-") as tmp:
                started = time.perf_counter()
                rows = per_round(run_simulation(Path(tmp), sites, args.rounds, args.model))
                results["cases"].append({"mode": "simulate", "sites": sites, "rounds": rows,
                                         "median": summarise(rows), "total_s": time.perf_counter() - started})
                print(json.dumps(results["cases"][-1]["median"] | {"mode": "simulate", "sites": sites}), flush=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    print(f"\n{args.model}\n{'mode':<20} {'sites':>5} {'wall s/round':>13} {'compute s':>10} {'overhead s':>11} "
          f"{'MB/round':>9} {'total s':>8}")
    for case in results["cases"]:
        m = case["median"]
        print(f"{case['mode']:<20} {case['sites']:>5} {m['wall_s']:>13.2f} {m['compute_s']:>10.2f} "
              f"{m['overhead_s']:>11.2f} {m['bytes'] / 1e6:>9.1f} {case['total_s']:>8.0f}")
    print(f"\nmedian over rounds 2..{args.rounds}; load average {results['machine']['load_avg_at_start']} at start; "
          f"written to {args.out}")


if __name__ == "__main__":
    main()
