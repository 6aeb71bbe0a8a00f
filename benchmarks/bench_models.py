"""Training and inference speed and peak memory of every MedViTV2 variant, next to
torchvision's ResNet-18 and ResNet-50 at the same input and batch size.

A case is (model, image size, mode, precision knobs). ``train``: forward, cross-entropy,
backward and an AdamW step on a fixed random batch (3 channels, 2 classes; the model's
speed does not depend on the pixel values); ``infer``: forward under ``no_grad`` in
eval mode. Time: median images/s over timed steps after warm-up steps (CUDA
synchronised). Peak memory:

- CPU: growth of the process's peak resident set (``ru_maxrss``) during the case, each
  case in a fresh subprocess (after imports and model construction, so it counts
  activations, gradients and optimiser state, not the interpreter);
- CUDA: ``torch.cuda.max_memory_allocated`` during the case minus what was allocated
  before it (cases run in this process: a CUDA context per case would cost seconds).

Knobs (each a column of the JSON, measured as separate rows where asked):
``precision`` (``float32`` or ``bfloat16`` autocast; by default what medfed's ``auto``
trains in at each size, ``--precision`` forces one), ``channels_last`` and ``compile``
(``torch.compile`` of the model; the compile time is reported apart, not in images/s).

Usage::

    python benchmarks/bench_models.py                                 # CPU: nano, tiny, ResNets at 28/64/224
    python benchmarks/bench_models.py --device cuda --variants nano tiny small base large --knobs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MEDVIT = ("nano", "tiny", "small", "base", "large")
RESNETS = ("resnet18", "resnet50")
# Batch per image size: the same for every model at that size.
CPU_BATCH = {28: 32, 64: 16, 224: 4}
CUDA_BATCH = {28: 128, 64: 128, 224: 32}


# --------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------
def build_model(name: str, img_size: int):
    """MedViTV2 variant (``nano`` ... ``large``) or torchvision ResNet, 3 channels, 2 classes."""
    if name in RESNETS:
        import torchvision  # benchmarks may import torchvision; medfed does not need it

        return getattr(torchvision.models, name)(num_classes=2)
    from medfed.models import create_model

    return create_model(f"medvit_v2_{name}", num_classes=2, in_chans=3, img_size=img_size)


def run_case(case: dict) -> dict:
    """Measure one case in this process; returns images/s, step times and peak memory."""
    import contextlib
    import resource

    import torch

    if case["threads"] > 0:
        torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    if device.type == "cuda":
        torch._dynamo.reset()  # cases share one process on CUDA: no earlier case's compiled graph (and its model) stays
    torch.manual_seed(0)
    model = build_model(case["model"], case["img_size"]).to(device)
    memory_format = torch.channels_last if case["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.randn(case["batch"], 3, case["img_size"], case["img_size"], device=device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 2, (case["batch"],), device=device)
    train = case["mode"] == "train"
    model.train(train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    runner = model
    compile_s = None
    if case["compile"]:
        runner = torch.compile(model)

    def autocast():
        if case["precision"] == "bfloat16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> None:
        if train:
            with autocast():
                loss = torch.nn.functional.cross_entropy(runner(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad(), autocast():
                runner(images)
        sync()

    if case["compile"]:
        started = time.perf_counter()
        step()  # compiles
        compile_s = time.perf_counter() - started
    if device.type == "cuda":
        # Cases share one process on CUDA: what an earlier case left (a compiled graph
        # holding its model) must not count in this one's absolute peak.
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(case["warmup"]):
        step()
    if device.type == "cuda":
        # All that is live at the peak (weights, gradients, optimizer state, activations):
        # a compiled row has made its gradients and AdamW state before the reset, the others
        # during the warm-up, so a difference to "before" would not compare the rows.
        peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        peak_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_rss) * 1024  # KiB on Linux
    times: list[float] = []
    while len(times) < case["steps"] and (not times or sum(times) < case["case_budget_s"]):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {
        "images_per_s": case["batch"] / median,
        "median_step_s": median,
        "steps_timed": len(times),
        "peak_bytes": peak_bytes,
        "compile_s": compile_s,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "threads": torch.get_num_threads(),
    }


def _run_here(case: dict) -> dict:
    try:
        return {"ok": True, **run_case(case)}
    except Exception as error:  # a row of the table, not a crash of the sweep (e.g. out of memory)
        message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - best effort after a failed case
            pass
        return {"ok": False, "error": message}


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
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------
def plan_cases(args: argparse.Namespace) -> list[dict]:
    """Every case of a sweep, in the order they run."""
    batches = dict(CPU_BATCH if args.device == "cpu" else CUDA_BATCH)
    if args.batch:
        batches = {size: args.batch for size in args.sizes}

    def default_precision(size: int) -> str:
        """--precision, or what medfed's ``auto`` trains in at this size on this device."""
        from medfed.client.task import AUTO_BFLOAT16_MIN_SIDE

        if args.precision:
            return args.precision
        return "bfloat16" if args.device == "cuda" and size >= AUTO_BFLOAT16_MIN_SIDE else "float32"

    base = {"device": args.device, "threads": args.threads, "warmup": args.warmup, "steps": args.steps,
            "case_budget_s": args.case_budget}
    cases = []
    for size in args.sizes:
        for model in [*args.variants, *args.resnets]:
            for mode in args.modes:
                cases.append({**base, "model": model, "img_size": size, "batch": batches[size], "mode": mode,
                              "precision": default_precision(size), "channels_last": False, "compile": False})
    if args.knobs:
        # Each knob alone against the default row, at the smallest size.
        size = min(args.sizes)
        for model in args.knob_variants or args.variants[:2]:
            for knob in ({"precision": "float32"}, {"precision": "bfloat16"}, {"channels_last": True},
                         {"compile": True}):
                row = {**base, "model": model, "img_size": size, "batch": batches[size], "mode": "train",
                       "precision": default_precision(size), "channels_last": False, "compile": False, **knob}
                if row not in cases:
                    cases.append(row)
    return cases


def _format_table(rows: list[dict]) -> str:
    header = (f"{'model':<10} {'px':>4} {'batch':>5} {'mode':<6} {'precision':<9} {'cl':>2} {'cmp':>3}"
              f" {'images/s':>10} {'peak MiB':>9} {'params M':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        prefix = (f"{r['model']:<10} {r['img_size']:>4} {r['batch']:>5} {r['mode']:<6} {r['precision']:<9}"
                  f" {'y' if r['channels_last'] else '-':>2} {'y' if r['compile'] else '-':>3}")
        if not r["ok"]:
            lines.append(f"{prefix} unavailable: {r['error']}")
            continue
        lines.append(f"{prefix} {r['images_per_s']:>10.1f} {r['peak_bytes'] / 2**20:>9.1f} {r['params_m']:>8.2f}")
    return "\n".join(lines)


def _write_report(out: Path, args: argparse.Namespace, in_process: bool, rows: list[dict], planned: int,
                  wall_time_s: float) -> None:
    """The sweep's JSON so far, replaced atomically (a sweep cut off keeps its last complete file)."""
    report = {
        "benchmark": "models",
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "memory_measure": ("torch.cuda.max_memory_allocated during the warm-up steps (weights, gradients, "
                           "optimizer state and activations)" if args.device == "cuda" else
                           "growth of ru_maxrss during warm-up steps, in a fresh process after model construction "
                           "(a lower bound)" if not in_process else "growth of ru_maxrss (in one process: lower bound)"),
        "results": rows,
        "cases_planned": planned,
        "complete": len(rows) == planned,
        "wall_time_s": wall_time_s,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--variants", nargs="+", choices=MEDVIT, default=None,
                        help="MedViTV2 variants (default: nano tiny on CPU, all on CUDA)")
    parser.add_argument("--resnets", nargs="*", choices=RESNETS, default=list(RESNETS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64, 224])
    parser.add_argument("--modes", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    parser.add_argument("--batch", type=int, default=0, help="one batch size for every size (0: per-size defaults)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default=None,
                        help="precision of every row (default: what medfed's precision 'auto' trains in: "
                        "bfloat16 on CUDA from 224 px, float32 otherwise)")
    parser.add_argument("--knobs", action="store_true",
                        help="also measure precision, channels-last and torch.compile one at a time")
    parser.add_argument("--knob-variants", nargs="+", choices=MEDVIT, default=None,
                        help="variants the knobs are measured on (default: the first two of --variants)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (fewer past --case-budget)")
    parser.add_argument("--case-budget", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per CPU case")
    parser.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                        help="run the cases in this process (default: on CUDA only)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/models_<device>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(_run_here(json.loads(args.worker))))
        return 0
    if args.variants is None:
        args.variants = ["nano", "tiny"] if args.device == "cpu" else list(MEDVIT)
    in_process = args.device == "cuda" if args.in_process is None else args.in_process
    out = args.out or Path(__file__).parent / "results" / f"models_{args.device}.json"

    rows = []
    started = time.perf_counter()
    cases = plan_cases(args)
    for case in cases:
        result = _run_here(case) if in_process else _run_in_subprocess(case, args.timeout)
        rows.append({**case, **result})
        status = f"{result['images_per_s']:.1f} images/s" if result["ok"] else result["error"]
        print(f"  {case['model']} {case['img_size']}px {case['mode']} {case['precision']}"
              f"{' cl' if case['channels_last'] else ''}{' compile' if case['compile'] else ''}: {status}",
              file=sys.stderr, flush=True)
        # After every case: a sweep stopped by a time limit (a GPU lease) keeps what it measured.
        _write_report(out, args, in_process, rows, len(cases), time.perf_counter() - started)
    print(f"\nModels on {args.device}: images/s = batch / median step time; peak MiB = "
          + ("growth of peak RSS during the case" if args.device == "cpu" else "peak CUDA tensor memory of the case"))
    print(_format_table(rows))
    print(f"\nWrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
