"""``python -m benchmarks``: the attention, model, federation and communication benchmarks
in one command, with the machine described, JSON in ``benchmarks/results/`` and the
tables in ``docs/performance.md``.

Modes::

    python -m benchmarks --quick     # CPU (800 s on 2 quiet cores; 47 min under load 6-17)
    python -m benchmarks --gpu       # one CUDA GPU, under 8 minutes
    python -m benchmarks --smoke --results-dir /tmp/r --docs /tmp/p.md   # seconds: checks the harness

Each benchmark writes ``<results-dir>/<name>_<cpu|cuda>.json``; the run writes
``<results-dir>/run_<mode>.json`` (machine, per-benchmark status and wall time) and
replaces its own block (between ``<!-- BEGIN mode -->`` and ``<!-- END mode -->``) of
the docs file (``docs/performance.md`` only when the results go to ``benchmarks/results``,
whose JSON its blocks cite), leaving the rest, hand-written, untouched. A benchmark that fails is
recorded as failed and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "docs" / "performance.md"
MODES = ("quick", "gpu", "smoke")


@dataclass
class Step:
    """One benchmark of a mode: its module, its arguments (without ``--out``) and its JSON name."""

    name: str
    module: str
    argv: list[str] = field(default_factory=list)
    json_name: str = ""


def plan(mode: str) -> list[Step]:
    """The benchmarks a mode runs, in order, with their arguments."""
    if mode == "quick":
        return [
            Step("attention", "bench_attention", ["--sizes", "7", "14", "21", "28", "56", "--batch", "8",
                                                  "--threads", "1", "--repeats", "3", "--case-budget", "5"],
                 "attention_cpu.json"),
            Step("models", "bench_models", ["--device", "cpu", "--variants", "nano", "tiny", "--sizes", "28", "64",
                                            "224", "--warmup", "1", "--steps", "3", "--case-budget", "8"],
                 "models_cpu.json"),
            Step("federation", "bench_federation", ["--preset", "default", "--repeats", "2"], "federation_cpu.json"),
            Step("communication", "bench_communication", ["--device", "cpu"], "communication_cpu.json"),
        ]
    if mode == "gpu":
        # Models last: its cases are the longest and the least predictable (torch.compile, the
        # large variant at 224 px), so a lease that runs out cuts those, not the federation.
        return [
            Step("attention", "bench_attention", ["--device", "cuda", "--sizes", "7", "14", "28", "42", "56",
                                                  "--batch", "16", "--repeats", "20", "--case-budget", "3"],
                 "attention_cuda.json"),
            Step("federation", "bench_federation", ["--device", "cuda", "--paths", "plain", "inprocess", "--model",
                                                    "medvit_v2_tiny", "--img-size", "64", "--sites", "4", "--rounds",
                                                    "3", "--epochs", "1", "--batch-size", "32"],
                 "federation_cuda.json"),
            Step("communication", "bench_communication", ["--device", "cuda", "--rounds", "3"],
                 "communication_cuda.json"),
            Step("models", "bench_models", ["--device", "cuda", "--variants", *("nano", "tiny", "small", "base",
                                                                              "large"),
                                            "--sizes", "28", "64", "224", "--knobs", "--knob-variants", "tiny",
                                            "--warmup", "3", "--steps", "10", "--case-budget", "2"],
                 "models_cuda.json"),
        ]
    if mode == "smoke":
        return [
            Step("attention", "bench_attention", ["--sizes", "8", "--dilated-size", "0", "--batch", "1", "--repeats",
                                                  "1", "--methods", "gather_fwd", "dense_fwd_bwd", "--in-process"],
                 "attention_cpu.json"),
            Step("models", "bench_models", ["--device", "cpu", "--variants", "nano", "--resnets", "--sizes", "28",
                                            "--modes", "infer", "--batch", "2", "--warmup", "1", "--steps", "1",
                                            "--in-process"],
                 "models_cpu.json"),
            Step("communication", "bench_communication", ["--device", "cpu", "--bytes-only", "--variants", "nano"],
                 "communication_cpu.json"),
        ]
    raise ValueError(f"Unknown benchmark mode {mode!r}; expected one of {MODES}.")


def describe_machine() -> dict:
    """CPU model, cores, memory, GPU and the versions that decide the figures."""
    info: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "revision": _revision(),
                  "platform": platform.platform(),
                  "python": platform.python_version(), "cpu_cores": os.cpu_count(), "cpu_model": _cpu_model(),
                  "load_avg_1m": os.getloadavg()[0]}
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError):
        pass
    import torch

    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{properties.major}.{properties.minor}"
    else:
        info["gpu"] = None
    for package in ("flwr", "natten", "ray", "torchvision"):
        try:
            module = __import__(package)
            info[package] = getattr(module, "__version__", "unknown")
        except Exception as error:  # noqa: BLE001 - a missing package is a fact to report
            info[package] = f"unavailable ({type(error).__name__})"
    try:
        import natten

        info["natten_cuda_kernels"] = bool(getattr(natten, "HAS_LIBNATTEN", False))
    except Exception:  # noqa: BLE001
        info["natten_cuda_kernels"] = False
    return info


def _revision() -> str | None:
    """The checkout's commit, ``-dirty`` when tracked files have changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(mode: str, results_dir: Path, docs: Path | None, only: list[str] | None = None) -> dict:
    """Run a mode's benchmarks; write the run JSON and the docs block; return the run record."""
    import importlib

    results_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if mode == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("python -m benchmarks --gpu needs a CUDA device; this machine has none.")
    record = {"mode": mode, "machine": describe_machine(), "benchmarks": {}, "command": f"python -m benchmarks --{mode}"}
    previous_path = results_dir / f"run_{mode}.json"
    previous = json.loads(previous_path.read_text()) if only and previous_path.exists() else {"benchmarks": {}}
    started = time.perf_counter()
    for step in plan(mode):
        if only and step.name not in only:
            if step.name in previous["benchmarks"]:  # keep the earlier run's result of this benchmark
                record["benchmarks"][step.name] = {**previous["benchmarks"][step.name], "from_earlier_run": True}
            continue
        out = results_dir / step.json_name
        print(f"\n=== {step.name}: python -m benchmarks.{step.module} {' '.join(step.argv)} --out {out}", flush=True)
        step_started = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{step.module}")
            module.main([*step.argv, "--out", str(out)])
            status = {"ok": True}
        except Exception as error:  # noqa: BLE001 - one failed benchmark must not lose the others
            traceback.print_exc()
            status = {"ok": False, "error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
        record["benchmarks"][step.name] = {**status, "json": out.name, "argv": step.argv,
                                           "wall_time_s": time.perf_counter() - step_started}
        # Written after every step: a run stopped by a time limit keeps what it measured.
        (results_dir / f"run_{mode}.json").write_text(json.dumps(record, indent=2) + "\n")
        if mode == "gpu":
            # The next step's subprocesses (federations) see the device's free memory: this
            # process's cached blocks would shrink it, and change what fits on the device.
            import torch

            torch.cuda.empty_cache()
    record["wall_time_s"] = time.perf_counter() - started
    record["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    (results_dir / f"run_{mode}.json").write_text(json.dumps(record, indent=2) + "\n")
    if docs is not None:
        from benchmarks._report import write_block

        write_block(docs, mode, record, results_dir)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    for mode in MODES:
        group.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode)
    parser.add_argument("--only", nargs="+", default=None, help="run only these benchmarks (attention, models, ...)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"Markdown file whose block is rewritten (default {DOCS.relative_to(REPO)} when the "
                        "results go to benchmarks/results; with --smoke or another --results-dir: none unless given)")
    args = parser.parse_args(argv)
    # The docs' blocks cite benchmarks/results/*.json: results written elsewhere must not replace them.
    to_repo = args.mode != "smoke" and args.results_dir.resolve() == RESULTS.resolve()
    docs = args.docs if args.docs is not None or not to_repo else DOCS
    record = run(args.mode, args.results_dir, docs, args.only)
    failed = [name for name, status in record["benchmarks"].items() if not status["ok"]]
    print(f"\n{args.mode}: {len(record['benchmarks']) - len(failed)} benchmark(s) ok, failed: {failed or 'none'}; "
          f"{record['wall_time_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
