"""What a site pays to send and receive a model's weights (``medfed.transfer``): peak memory and time.

Two ways, for each variant, on its float32 state dict (224 px, 3 channels, 2 classes):

- ``record``: through Flower Arrays, as a site did before stop 19: the reply is
  ``to_wire(ArrayRecord(state_dict))`` (each array serialised by ``np.save``, then
  packed), the global model is read with ``numpy_arrays(from_wire(message))``;
- ``direct``: what the ClientApp does now: ``to_wire(state_dict)`` packs the tensors'
  bytes directly, ``numpy_from_wire(message)`` reads the arrays from the packed bytes.

Memory: the peak of Python-tracked memory (``tracemalloc``: bytes objects and NumPy
buffers) above the state dict while packing, and above the received message while
reading (a site holds the message it received); timing-free, so independent of the
machine's load. Time: the best of ``--repeats`` runs (the least disturbed on a shared
machine), without tracemalloc.

    python benchmarks/bench_transfer.py [--variants nano large] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path


def _peak_mb(function) -> float:  # noqa: ANN001 - a call without arguments
    tracemalloc.start()
    result = function()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    return peak / 2**20


def _best_ms(function, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def measure(variant: str, repeats: int) -> dict:
    import torch
    from flwr.app import ArrayRecord

    from medfed.models import create_model
    from medfed.transfer import from_wire, numpy_arrays, numpy_from_wire, to_wire

    torch.manual_seed(0)
    model = create_model(f"medvit_v2_{variant}", num_classes=2, in_chans=3, img_size=224)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    del model
    model_mb = sum(value.numel() * value.element_size() for value in state.values()) / 2**20
    message = to_wire(state, "float32")
    paths = {
        "record": (lambda: to_wire(ArrayRecord(state), "float32"), lambda: numpy_arrays(from_wire(message))),
        "direct": (lambda: to_wire(state, "float32"), lambda: numpy_from_wire(message)),
    }
    row = {"variant": variant, "arrays": len(state), "model_mb": model_mb}
    for path, (pack, read) in paths.items():
        row[f"{path}_pack_peak_x"] = _peak_mb(pack) / model_mb
        row[f"{path}_read_peak_x"] = _peak_mb(read) / model_mb
        row[f"{path}_pack_ms"] = _best_ms(pack, repeats)
        row[f"{path}_read_ms"] = _best_ms(read, repeats)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["nano", "large"])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per measurement; the best is kept")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transfer_cpu.json")
    args = parser.parse_args(argv)
    rows = [measure(v, args.repeats) for v in args.variants]
    print(f"{'variant':<8} {'arrays':>6} {'model MiB':>9} {'path':<7} {'pack ms':>8} {'pack peak':>10} "
          f"{'read ms':>8} {'read peak':>10}")
    for r in rows:
        for path in ("record", "direct"):
            print(f"{r['variant']:<8} {r['arrays']:>6} {r['model_mb']:>9.1f} {path:<7} {r[f'{path}_pack_ms']:>8.1f} "
                  f"{r[f'{path}_pack_peak_x']:>9.2f}x {r[f'{path}_read_ms']:>8.1f} {r[f'{path}_read_peak_x']:>9.2f}x")
    args.out.write_text(json.dumps({
        "benchmark": "transfer", "repeats": args.repeats,
        "measure": "float32 transfer of a 224 px, 3-channel, 2-class state dict; peaks are tracemalloc peaks in "
                   "multiples of the model's bytes; times the best of the repeats",
        "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
