"""Parameters and multiply-accumulates of every MedViTV2 variant.

Counts at 224 px, 3 channels, 1000 classes (the setting the paper and the public code
report), plus every variant at 28 and 64 px, 1 channel, 2 classes (medfed's federations).
MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on one image;
what it does not see is added by hand: neighborhood attention's gather path, which is
not a matmul (``2 * H * W * k**2 * C`` MACs per local block), and, where the counter
does not count ``scaled_dot_product_attention`` (it did not on CPU with torch 2.x), the
attention products of the global blocks (``2 * H * W * N_kv * C``, ``N_kv`` the pooled
keys) and of local blocks whose window covers the map (``2 * (H * W)**2 * C``).

Usage::

    python benchmarks/count_params.py            # prints a table, writes benchmarks/results/model_size.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from medfed.models import create_model, list_models
from medfed.models.neighborhood_attention import clamp_window
from medfed.models.medvitv2 import EfficientSelfAttention, LocalFeaturePerception, kv_reduction

RESULTS = Path(__file__).parent / "results"


def _counter_sees_sdpa() -> bool:
    """Whether FlopCounterMode counts ``scaled_dot_product_attention`` on this machine."""
    q = torch.randn(1, 1, 4, 8)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    return counter.get_total_flops() > 0


def _attention_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Score (q.k) and weighting (p.v) MACs of the attention that FlopCounterMode misses."""
    macs, hooks = [0], []
    sdpa_counted = _counter_sees_sdpa()

    def local(block: LocalFeaturePerception, _inp, out: torch.Tensor) -> None:
        _, chs, h, w = out.shape
        if block.attn.kernel_size >= max(h, w):  # a window covering the map is full attention (SDPA)
            macs[0] += 0 if sdpa_counted else 2 * (h * w) ** 2 * chs
        else:
            (rows, cols), _ = clamp_window(h, w, block.attn.kernel_size, block.attn.dilation)
            macs[0] += 2 * h * w * rows * cols * chs

    def global_(attention: EfficientSelfAttention, inp: tuple, _out: torch.Tensor) -> None:
        _, chs, h, w = inp[0].shape
        r = kv_reduction(attention.sr_ratio, min(h, w))
        keys = -(-h // r) * -(-w // r) if r > 1 else h * w
        macs[0] += 0 if sdpa_counted else 2 * h * w * keys * chs

    for module in model.modules():
        if isinstance(module, LocalFeaturePerception):
            hooks.append(module.register_forward_hook(local))
        elif isinstance(module, EfficientSelfAttention):
            hooks.append(module.register_forward_hook(global_))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return macs[0]


def measure(name: str, img_size: int, in_chans: int, num_classes: int) -> dict:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size).eval()
    x = torch.randn(1, in_chans, img_size, img_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    macs = counter.get_total_flops() // 2 + _attention_macs(model, x)
    return {
        "model": name, "img_size": img_size, "in_chans": in_chans, "num_classes": num_classes,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "gmacs": round(macs / 1e9, 4),
        "bytes_per_round_mb": round(sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "model_size.json"))
    args = parser.parse_args()
    rows = [measure(name, 224, 3, 1000) for name in list_models()]
    rows += [measure(name, size, 1, 2) for size in (28, 64) for name in list_models()]
    print(f"{'model':18} {'px':>4} {'ch':>3} {'classes':>7} {'params (M)':>10} {'GMACs':>8} {'MB/round':>9}")
    for r in rows:
        print(f"{r['model']:18} {r['img_size']:4d} {r['in_chans']:3d} {r['num_classes']:7d} "
              f"{r['params_m']:10.3f} {r['gmacs']:8.4f} {r['bytes_per_round_mb']:9.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
