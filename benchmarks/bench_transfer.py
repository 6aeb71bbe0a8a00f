"""Peak memory of packing and unpacking a model's weights for the wire (``medfed.transfer``).

For each variant: the bytes of its state dict as Flower arrays, then the peak of
Python-tracked memory (``tracemalloc``: bytes objects and NumPy buffers) above that
while ``to_wire`` packs it, and while ``from_wire(...).to_torch_state_dict()`` unpacks
it with the packed message still held (as a site holds the message it received).
Timing-free: the figures do not depend on the machine's load.

    python benchmarks/bench_transfer_memory.py [--variants nano large]
"""

from __future__ import annotations

import argparse
import json
import tracemalloc
from pathlib import Path


def measure(variant: str) -> dict:
    from flwr.app import ArrayRecord

    from medfed.models import create_model
    from medfed.transfer import from_wire, to_wire

    model = create_model(f"medvit_v2_{variant}", num_classes=2, in_chans=3, img_size=224)
    record = ArrayRecord(model.state_dict())
    del model
    model_bytes = sum(len(array.data) for array in record.values())
    tracemalloc.start()
    wire = to_wire(record, "float32")
    _, pack_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    state = from_wire(wire).to_torch_state_dict()
    _, unpack_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del state
    return {"variant": variant, "model_mb": model_bytes / 2**20, "pack_peak_mb": pack_peak / 2**20,
            "pack_peak_x": pack_peak / model_bytes, "unpack_peak_mb": unpack_peak / 2**20,
            "unpack_peak_x": unpack_peak / model_bytes}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["nano", "large"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transfer_memory_cpu.json")
    args = parser.parse_args(argv)
    rows = [measure(v) for v in args.variants]
    print(f"{'variant':<8} {'model MB':>9} {'pack peak MB':>13} {'x model':>8} {'unpack peak MB':>15} {'x model':>8}")
    for r in rows:
        print(f"{r['variant']:<8} {r['model_mb']:>9.1f} {r['pack_peak_mb']:>13.1f} {r['pack_peak_x']:>8.2f} "
              f"{r['unpack_peak_mb']:>15.1f} {r['unpack_peak_x']:>8.2f}")
    args.out.write_text(json.dumps({"benchmark": "transfer_memory", "measure": "tracemalloc peak above the record, "
                                    "float32 transfer, 224 px, 3 channels, 2 classes", "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
