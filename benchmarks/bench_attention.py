"""Speed and peak memory of 2-D neighborhood attention: each backend of medfed's
:func:`~medfed.models.neighborhood_attention.neighborhood_attention` (gather, dense,
NATTEN flex, NATTEN fused kernels), and which one its ``auto`` rule picks.

On CPU every (map size, dilation, method) case runs in its own subprocess, so that peak
memory is measured honestly (on CUDA, ``--in-process`` is the default: a CUDA context
per case would cost seconds, and CUDA peak memory is measured per case anyway):

- CPU: the growth of the process's peak resident set size (``ru_maxrss``) during the
  first full run of the case, after imports, input creation and a warm-up on a tiny map.
  It counts every page the run made resident, allocator slack included. glibc serves
  large blocks with mmap and unmaps them when freed, so earlier frees cannot hide them;
  it can undercount by the few MB that imports and the warm-up freed and the run reused.
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated before the run
  (tensors only, not the caching allocator's reserve or the CUDA context).

Time is the median wall time of ``--repeats`` runs after that first (memory) run (fewer
once a case's timed runs exceed ``--case-budget`` seconds); CUDA runs are synchronised.
Methods (``_fwd``: forward under ``no_grad``; ``_fwd_bwd``: forward and backward into
q, k and v), each ``neighborhood_attention(..., implementation=BACKEND)``:

- ``gather``: the exact PyTorch gather path (every device).
- ``dense``: ``scaled_dot_product_attention`` with the neighborhood as a boolean mask.
- ``flex``: NATTEN's ``flex-fna`` (uncompiled FlexAttention; no backward on CPU).
- ``natten`` (CUDA only): NATTEN's fused kernels, when NATTEN was built with them
  (reported as unavailable otherwise).

Each row also says which backend the ``auto`` rule picks for its inputs.

Usage::

    python benchmarks/bench_attention.py                      # CPU, sizes 7 14 21 28 56
    python benchmarks/bench_attention.py --device cuda --batch 16 --out benchmarks/results/attention_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CPU_METHODS = ("gather_fwd", "gather_fwd_bwd", "dense_fwd", "dense_fwd_bwd", "flex_fwd")
CUDA_METHODS = CPU_METHODS + ("flex_fwd_bwd", "natten_fwd", "natten_fwd_bwd")
# (numerator, denominator) pairs of the ratio columns: every backend against gather.
RATIOS = {m: ("gather_fwd_bwd" if m.endswith("_bwd") else "gather_fwd") for m in CUDA_METHODS if not m.startswith("gather")}


# --------------------------------------------------------------------------------------
# Worker: one case in a fresh process
# --------------------------------------------------------------------------------------


def _attention_fn(method: str, kernel_size: int, dilation: int):
    """A callable (q, k, v) -> out for ``method``, and whether it back-propagates."""
    from medfed.models.neighborhood_attention import BACKENDS, neighborhood_attention

    backend, _, passes = method.partition("_")
    if backend not in BACKENDS or passes not in ("fwd", "fwd_bwd"):
        raise ValueError(f"Unknown benchmark method {method!r}; expected one of {CUDA_METHODS}.")

    def attend(q, k, v):
        return neighborhood_attention(q, k, v, kernel_size, dilation, implementation=backend)

    return attend, passes == "fwd_bwd"


def run_case(case: dict) -> dict:
    """Time one case and measure its peak memory; runs inside the worker process."""
    import resource

    import torch

    from medfed.models.neighborhood_attention import select_backend

    if case["threads"] > 0:
        torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    kernel_size, dilation = case["kernel_size"], case["dilation"]
    fn, backward = _attention_fn(case["method"], kernel_size, dilation)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def make_inputs(size: int):
        generator = torch.Generator().manual_seed(0)
        shape = (case["batch"], size, size, case["heads"], case["dim"])
        tensors = [torch.randn(shape, generator=generator).to(device) for _ in range(3)]
        return [t.requires_grad_(backward) for t in tensors], torch.randn(shape, generator=generator).to(device)

    def step(inputs, grad_out, wait: bool = True) -> None:
        for t in inputs:
            t.grad = None
        if backward:
            fn(*inputs).backward(grad_out)
        else:
            with torch.no_grad():
                fn(*inputs)
        if wait:
            sync()

    # Warm up every code path on the smallest legal map, so that lazily loaded code and
    # one-off buffers are not counted as the case's memory.
    step(*make_inputs(kernel_size * dilation))
    inputs, grad_out = make_inputs(case["size"])
    auto_picks = select_backend(*inputs, kernel_size, dilation)
    sync()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(inputs, grad_out)
        peak_bytes = torch.cuda.max_memory_allocated(device) - before
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(inputs, grad_out)
        peak_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # KiB on Linux

    # A GPU step can take a fraction of a millisecond: one step per host-timed sample would
    # mostly measure the launch and the synchronisation, so a sample there runs enough
    # steps back to back for about 20 ms, and reports their mean.
    inner = 1
    if device.type == "cuda":
        start = time.perf_counter()
        step(inputs, grad_out)
        inner = max(1, min(1000, int(0.02 / max(time.perf_counter() - start, 1e-6))))
    times: list[float] = []
    while len(times) < case["repeats"] and (not times or sum(times) * inner < case["case_budget_s"]):
        start = time.perf_counter()
        for _ in range(inner):
            step(inputs, grad_out, wait=False)
        sync()
        times.append((time.perf_counter() - start) / inner)
    return {
        "steps_per_sample": inner,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_bytes": peak_bytes,
        "threads": torch.get_num_threads(),
        "auto_picks": auto_picks,
    }


def _worker_main(case_json: str) -> None:
    case = json.loads(case_json)
    try:
        result = {"ok": True, **run_case(case)}
    except Exception as error:  # reported as a row of the table, not a crash of the sweep
        result = {"ok": False, "error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def _run_here(case: dict) -> dict:
    """Run one case in this process (CUDA: peak memory is per case anyway)."""
    try:
        return {"ok": True, **run_case(case)}
    except Exception as error:  # reported as a row of the table, not a crash of the sweep
        return {"ok": False, "error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}


def _run_in_subprocess(case: dict, timeout_s: float) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(case)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"worker exited with {done.returncode}: {tail[:300]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def _environment(device: str) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    try:
        import natten

        info["natten"] = natten.__version__
        info["natten_has_libnatten"] = bool(getattr(natten, "HAS_LIBNATTEN", False))
    except Exception as error:
        info["natten"] = f"unavailable ({error})"
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _format_table(rows: list[dict]) -> str:
    header = (
        f"{'size':>7} {'dil':>3}  {'method':<20} {'median ms':>10} {'peak MiB':>9}"
        f" {'time/gather':>11} {'mem/gather':>10} {'auto picks':>10}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        size = f"{row['size']}x{row['size']}"
        if not row["ok"]:
            lines.append(f"{size:>7} {row['dilation']:>3}  {row['method']:<20} unavailable: {row['error']}")
            continue
        time_ratio = f"{row['time_ratio']:.2f}" if row.get("time_ratio") is not None else ""
        mem_ratio = f"{row['memory_ratio']:.2f}" if row.get("memory_ratio") is not None else ""
        lines.append(
            f"{size:>7} {row['dilation']:>3}  {row['method']:<20} {row['median_s'] * 1e3:>10.2f}"
            f" {row['peak_bytes'] / 2**20:>9.1f} {time_ratio:>11} {mem_ratio:>10} {row.get('auto_picks', ''):>10}"
        )
    return "\n".join(lines)


def _add_ratios(rows: list[dict]) -> None:
    """Ratio of each method's time and memory to the gather path with the same passes."""
    by_key = {(r["size"], r["dilation"], r["method"]): r for r in rows}
    for row in rows:
        base = by_key.get((row["size"], row["dilation"], RATIOS.get(row["method"], "")))
        if not (row["ok"] and base and base["ok"]):
            continue
        row["time_ratio"] = row["median_s"] / base["median_s"]
        row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] > 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[7, 14, 21, 28, 56], help="square map sizes")
    parser.add_argument("--dilated-size", type=int, default=56, help="size also run with --dilation (0: none)")
    parser.add_argument("--dilation", type=int, default=2, help="dilation of the extra case")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32, help="channels per head")
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case, after the memory run")
    parser.add_argument(
        "--case-budget", type=float, default=15.0, help="stop repeating a case once its timed runs exceed this (s)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the methods (default: all)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    parser.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                        help="run the cases in this process (default: on CUDA only)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/attention_<device>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker_main(args.worker)
        return 0

    methods = args.methods or list(CUDA_METHODS if args.device == "cuda" else CPU_METHODS)
    out = args.out or Path(__file__).parent / "results" / f"attention_{args.device}.json"
    windows = [(size, 1) for size in args.sizes]
    if args.dilated_size:
        windows.append((args.dilated_size, args.dilation))

    rows = []
    started = time.perf_counter()
    for size, dilation in windows:
        for method in methods:
            case = {
                "size": size,
                "dilation": dilation,
                "method": method,
                "device": args.device,
                "batch": args.batch,
                "heads": args.heads,
                "dim": args.dim,
                "kernel_size": args.kernel_size,
                "repeats": args.repeats,
                "case_budget_s": args.case_budget,
                "threads": args.threads,
            }
            in_process = args.device == "cuda" if args.in_process is None else args.in_process
            result = _run_here(case) if in_process else _run_in_subprocess(case, args.timeout)
            rows.append({**case, **result})
            status = f"{result['median_s'] * 1e3:.1f} ms" if result["ok"] else result["error"]
            print(f"  {size}x{size} d={dilation} {method}: {status}", file=sys.stderr, flush=True)
    _add_ratios(rows)

    print(
        f"\nNeighborhood attention on {args.device}: batch {args.batch}, {args.heads} heads, dim {args.dim}, "
        f"kernel {args.kernel_size}; median of up to {args.repeats} runs; peak MiB = "
        + ("growth of peak RSS during one run" if args.device == "cpu" else "peak CUDA tensor memory of one run")
    )
    print(_format_table(rows))
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "environment": _environment(args.device),
        "memory_measure": (
            "growth of ru_maxrss (peak resident set) during one run, "
            + ("in this one process (a lower bound)" if args.in_process else "in a fresh process after a tiny-map warm-up")
            if args.device == "cpu"
            else "torch.cuda.max_memory_allocated during one run minus memory allocated before it"
        ),
        "time_measure": (
            f"median wall time of up to {args.repeats} runs after the memory run "
            f"(fewer once a case's timed runs exceed {args.case_budget} s)"
            + ("; on CUDA each run is the mean of enough back-to-back steps for ~20 ms" if args.device == "cuda" else "")
        ),
        "results": rows,
        "wall_time_s": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
