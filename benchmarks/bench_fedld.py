"""How long FedLD's server step takes for a real model: MedViTV2 state dicts, 10 sites.

For every floating-point tensor of the model's state dict, ``m`` random updates (float32,
one per site) go through :func:`medfed.strategies.fedld.principal_gradient_aggregate`
(the Gram-matrix route: ``m x m``, never ``d x d``); the same updates through a plain
mean give the FedAvg baseline. Updates are generated per tensor, so memory stays at
``m x`` the largest tensor. Generation time is not counted.

Usage::

    python benchmarks/bench_fedld.py                       # medvit_v2_large, 10 sites
    python benchmarks/bench_fedld.py --model medvit_v2_nano --sites 4
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from medfed.models import create_model
from medfed.strategies.fedld import principal_gradient_aggregate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medvit_v2_large")
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fedld_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    state = create_model(args.model, num_classes=2, in_chans=3, img_size=args.img_size).state_dict()
    shapes = [tuple(v.shape) for v in state.values() if v.is_floating_point()]
    del state
    rng = np.random.default_rng(0)
    total = {"fedld": 0.0, "mean": 0.0}
    params = 0
    for shape in shapes:
        updates = [rng.standard_normal(shape, dtype=np.float32) for _ in range(args.sites)]
        params += int(np.prod(shape))
        start = time.perf_counter()
        principal_gradient_aggregate(updates, first_round=False)
        total["fedld"] += time.perf_counter() - start
        start = time.perf_counter()
        np.mean(np.stack(updates), axis=0)
        total["mean"] += time.perf_counter() - start
    result = {
        "model": args.model, "float_parameters": params, "tensors": len(shapes), "sites": args.sites,
        "fedld_s": round(total["fedld"], 2), "mean_s": round(total["mean"], 2),
        "ratio": round(total["fedld"] / max(total["mean"], 1e-9), 1),
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "time": datetime.now(timezone.utc).isoformat(),
    }
    print(f"{'model':<18}{'params':>12}{'sites':>7}{'FedLD s':>10}{'mean s':>9}{'ratio':>7}")
    print(f"{args.model:<18}{params:>12,}{args.sites:>7}{result['fedld_s']:>10}{result['mean_s']:>9}{result['ratio']:>7}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
