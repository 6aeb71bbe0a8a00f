"""MedViTV2: a hierarchical vision transformer with KAN feed-forwards and
dilated neighborhood attention.

Paper: Manzari et al., "MedViTV2: Medical Image Classification with
KAN-Integrated Transformers and Dilated Neighborhood Attention", 2025
(arXiv:2502.13693). Re-implemented from the paper and checked against the public
code. As in the public code: the block pattern, widths, the 3-unit squeeze-excite
of the locality feed-forward, and the KAN (8 RSWAF bumps of width 0.33 on [-2, 2],
from the FasterKAN copy the public code vendors). Differences, on purpose:

* **Dilation** is used as the paper describes (the public code passes none). The
  schedule is DiNAT's: within a stage, local blocks alternate dilation 1 and
  ``max(1, map_size // kernel)``. At 224 px that is 1, 8 in stage 1, 1 in stage 2
  (its only local block) and 1, 2, 1, 2 in stage 3.
* **Small inputs** (the public code needs >= 112 px): where the 7 x 7 window covers a
  feature map, local attention is full attention over the map (NATTEN's semantics for
  such a window); global blocks pool keys/values only down to about 7 x 7
  (:func:`kv_reduction`: the paper's 8, 4, 2, 1 at 224 px, no pooling at 28 px); and
  maps are not down-sampled below 2 x 2 (:data:`MIN_MAP_SIZE`). Without these, at
  28 px (maps 7, 4, 2, 1) every global block attended to a single pooled key and the
  stage-3 local blocks to the query alone, so their query/key weights got no gradient.
* **Key/value pooling** is 2-D average pooling of the map; the public code pools the
  flattened token sequence in 1-D (``AvgPool1d(sr**2)``), which mixes rows.
* **Tensors are permuted**, never reshaped, between ``[B, C, H, W]`` and
  channels-last (the public code scrambles channels and space there).
* **Global blocks carry no unused locality feed-forward** (0.98 / 2.75 / 6.14 /
  10.87 M never-called parameters in the public T / S / B / L).
* **Local feed-forward residual and drop-path**: ``x + drop_path(LFFN(BN(x)))``, the
  standard pre-norm residual with stochastic depth on both branches; the public code
  adds the feed-forward's own inner residual (``x + BN(x) + LFFN(BN(x))``) and no
  drop-path on that branch. Global blocks use one drop-path rate for their three
  branches, where the public code scales it by 0.75 and 0.25 on the two attentions.
* **Initialisation**: truncated normal (std 0.02) for linear layers, Kaiming
  (fan-out) for convolutions, as in timm's conv-transformer hybrids; the public code
  uses std 0.02 everywhere. The squeeze-excite bottleneck's bias starts at 1 so its
  three ReLU units start alive.
* NATTEN >= 0.20 has no relative position bias, so neither has this model.

Layout: stem (four 3x3 conv-BN-ReLU, stride 4 overall), four stages whose first
block starts with a patch embedding (stage 1 keeps the stem's resolution; stages 2-4:
AvgPool 2 + 1x1 conv + BN, halving the map down to ``MIN_MAP_SIZE``), then BatchNorm,
global average pooling and a linear classifier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._registry import register_model
from .kan import KANFeedForward
from .neighborhood_attention import NeighborhoodAttention2D

__all__ = [
    "MedViTV2",
    "LocalFeaturePerception",
    "GlobalFeaturePerception",
    "dilation_schedule",
    "kv_reduction",
    "medvit_v2_nano",
    "medvit_v2_tiny",
    "medvit_v2_small",
    "medvit_v2_base",
    "medvit_v2_large",
]


def _make_divisible(value: float, divisor: int) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never below 90 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU(nn.Sequential):
    """3x3 convolution, BatchNorm, ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )


#: Maps are not down-sampled below this side: on a 1 x 1 map attention has a single
#: key, so its queries and keys get no gradient (the last stage at 28 px input).
MIN_MAP_SIZE = 2


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability ``p``
    during training, scaling the kept ones by ``1 / (1 - p)``.

    Shapes: ``[B, ...]`` -> ``[B, ...]``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Down-sampling and channel change: AvgPool 2 (if stride 2), 1x1 conv, BN.

    Odd maps are pooled with ``ceil_mode`` so that a 7x7 map becomes 4x4, not 3x3.
    A map whose side is already :data:`MIN_MAP_SIZE` or less is not pooled (at 28 px
    the last stage keeps a 2 x 2 map instead of a 1 x 1 one).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.pool = (
            nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) if stride == 2 else nn.Identity()
        )
        if stride == 2 or in_chs != out_chs:
            self.proj = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs))
        else:
            self.proj = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) > MIN_MAP_SIZE:
            x = self.pool(x)
        return self.proj(x)


class SqueezeExcite(nn.Module):
    """Channel gating: global pool, 1x1 reduce to ``hidden``, ReLU, 1x1 expand, hard sigmoid.

    Args:
        chs: Gated channels.
        hidden: Width of the bottleneck.
    """

    def __init__(self, chs: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(chs, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, chs, 1),
            nn.Hardsigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class LocalityFeedForward(nn.Module):
    """LocalViT's feed-forward: 1x1 expand, depthwise kxk, squeeze-excite, 1x1.

    Args:
        chs: Input and output channels.
        kernel_size: Depthwise kernel (7 in stage 1, 3 after, per the paper).
        expand_ratio: Hidden width as a multiple of ``chs``.
    """

    def __init__(self, chs: int, kernel_size: int = 3, expand_ratio: int = 3) -> None:
        super().__init__()
        hidden = chs * expand_ratio
        self.body = nn.Sequential(
            nn.Conv2d(chs, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.Hardswish(inplace=True),
            nn.Conv2d(hidden, hidden, kernel_size, 1, kernel_size // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.Hardswish(inplace=True),
            # The public code's SE(hidden, reduction=chs): expand_ratio (3) hidden units.
            SqueezeExcite(hidden, expand_ratio),
            nn.Conv2d(hidden, chs, 1, bias=False),
            nn.BatchNorm2d(chs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class LocalFeaturePerception(nn.Module):
    """LFP block: dilated neighborhood attention, then a locality feed-forward.

    ``x = embed(x); x = x + NA(BN(x)); x = x + LFFN(BN(x))`` on ``[B, C, H, W]``.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: 2 to down-sample (first block of a stage), else 1.
        kernel_size: Neighborhood size (odd); clamped to small maps at run time.
        dilation: Neighborhood dilation; clamped likewise.
        head_dim: Channels per attention head.
        ffn_kernel_size: Depthwise kernel of the feed-forward.
        drop_path: Stochastic-depth rate of both residual branches.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        kernel_size: int = 7,
        dilation: int = 1,
        head_dim: int = 32,
        ffn_kernel_size: int = 3,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if out_chs % head_dim:
            raise ValueError(f"LocalFeaturePerception needs out_chs divisible by head_dim={head_dim}. Got {out_chs}.")
        self.patch_embed = PatchEmbed(in_chs, out_chs, stride)
        self.norm1 = nn.BatchNorm2d(out_chs)
        self.attn = NeighborhoodAttention2D(out_chs, out_chs // head_dim, kernel_size, dilation)
        self.norm2 = nn.BatchNorm2d(out_chs)
        self.ffn = LocalityFeedForward(out_chs, ffn_kernel_size)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        attn = self.attn(self.norm1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.drop_path(attn)
        return x + self.drop_path(self.ffn(self.norm2(x)))


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values are spatially reduced.

    Keys and values come from the map average-pooled by :func:`kv_reduction`, which
    makes global attention affordable on early, large maps (at 224 px: 8, 4, 2, 1 as in
    the paper) and never pools a map below about 7 x 7 (at 28 px no pooling at all:
    pooling a 4 x 4 map by 4 would leave one key, and attention over one key gives its
    queries and keys no gradient). ``sr_ratio`` is the factor planned for the model's
    input size; at run time it is capped for the actual map.

    Shapes: ``[B, C, H, W]`` -> ``[B, C, H, W]``.
    """

    def __init__(self, chs: int, head_dim: int = 32, sr_ratio: int = 1) -> None:
        super().__init__()
        self.num_heads = max(1, chs // head_dim)
        self.scale = (chs // self.num_heads) ** -0.5
        self.q = nn.Linear(chs, chs)
        self.kv = nn.Linear(chs, 2 * chs)
        self.proj = nn.Linear(chs, chs)
        self.sr_ratio = sr_ratio
        self.sr_norm = nn.BatchNorm2d(chs) if sr_ratio > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        q = self.q(x.flatten(2).transpose(1, 2)).view(b, h * w, heads, -1).transpose(1, 2)
        r = kv_reduction(self.sr_ratio, min(h, w))
        kv_map = self.sr_norm(nn.functional.avg_pool2d(x, r, r, ceil_mode=True)) if r > 1 else x
        kv = self.kv(kv_map.flatten(2).transpose(1, 2))
        k, v = kv.view(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return out.transpose(1, 2).reshape(b, c, h, w)


class MultiHeadConvAttention(nn.Module):
    """Multi-head convolutional attention: grouped 3x3 conv (a group per head), BN, ReLU, 1x1."""

    def __init__(self, chs: int, head_dim: int = 32) -> None:
        super().__init__()
        groups = max(1, chs // head_dim)
        self.body = nn.Sequential(
            nn.Conv2d(chs, chs, 3, 1, 1, groups=groups, bias=False),
            nn.BatchNorm2d(chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(chs, chs, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class GlobalFeaturePerception(nn.Module):
    """GFP block: efficient self-attention on ~75 % of the channels, convolutional
    attention on the rest, concatenation, then a KAN feed-forward.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: 2 to down-sample (first block of a stage), else 1.
        sr_ratio: Spatial reduction of keys/values (8, 4, 2, 1 for stages 1-4 at 224 px).
        head_dim: Channels per head, both attentions.
        mix_ratio: Share of channels on the self-attention path.
        kan_grids: RSWAF grid points of the KAN.
        drop_path: Stochastic-depth rate of the residual branches.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        sr_ratio: int = 1,
        head_dim: int = 32,
        mix_ratio: float = 0.75,
        kan_grids: int = 8,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        mhsa_chs = _make_divisible(out_chs * mix_ratio, head_dim)
        mhca_chs = out_chs - mhsa_chs
        if mhca_chs <= 0:
            raise ValueError(
                f"GlobalFeaturePerception with out_chs={out_chs}, head_dim={head_dim} leaves no channels for "
                "convolutional attention: use more channels or a smaller head_dim."
            )
        self.patch_embed = PatchEmbed(in_chs, mhsa_chs, stride)
        self.norm1 = nn.BatchNorm2d(mhsa_chs)
        self.mhsa = EfficientSelfAttention(mhsa_chs, head_dim, sr_ratio)
        self.projection = PatchEmbed(mhsa_chs, mhca_chs)
        self.mhca = MultiHeadConvAttention(mhca_chs, head_dim)
        self.norm2 = nn.BatchNorm2d(out_chs)
        self.kan = KANFeedForward([out_chs, 2 * out_chs, out_chs], kan_grids)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.drop_path(self.mhsa(self.norm1(x)))
        conv = self.projection(x)
        conv = conv + self.drop_path(self.mhca(conv))
        x = torch.cat([x, conv], dim=1)
        return x + self.drop_path(self.kan(self.norm2(x)))


def kv_reduction(sr_ratio: int, map_size: int) -> int:
    """Pooling factor of a global block's keys and values on a ``map_size`` map.

    ``min(sr_ratio, max(1, map_size // 7))``: the paper's ratios (8, 4, 2, 1) at 224 px,
    where they pool every stage's map to 7 x 7; smaller maps are pooled only down to
    about 7 x 7, never to a handful of keys.
    """
    return min(sr_ratio, max(1, map_size // 7))


def _stage_blocks(stage: int, depth: int) -> list[str]:
    """Block types of a stage, per the paper: L = LFP, G = GFP."""
    if stage == 0:
        return ["L"] * depth
    if stage == 1:
        return ["L"] * (depth - 1) + ["G"]
    if stage == 2:
        if depth % 3:
            raise ValueError(f"Stage 3 of MedViTV2 repeats [LFP, LFP, GFP]: its depth must be a multiple of 3. Got {depth}.")
        return ["L", "L", "G"] * (depth // 3)
    return ["G"] * depth


def _feature_map_sizes(img_size: int) -> list[int]:
    """Side of each stage's feature map: stem stride 4, then strides 1, 2, 2, 2 (ceil),
    never below :data:`MIN_MAP_SIZE` (e.g. 7, 4, 2, 2 at 28 px; 56, 28, 14, 7 at 224 px)."""
    size = math.ceil(math.ceil(img_size / 2) / 2)
    sizes = []
    for stride in (1, 2, 2, 2):
        if size > MIN_MAP_SIZE:
            size = math.ceil(size / stride)
        sizes.append(size)
    return sizes


def dilation_schedule(img_size: int, depths: Sequence[int], kernel_size: int = 7) -> list[list[int]]:
    """DiNAT-style dilations for the local blocks of each stage.

    Local blocks alternate dilation 1 (dense local context) and the largest
    dilation whose dilated window still fits the stage's feature map,
    ``max(1, map_size // kernel_size)``, so that kernel x dilation approaches
    the map size. At 224 px: ``[[1, 8], [1, 1], [1, 2, 1, 1, 2, 1], [1]]`` (stage 2
    has one local block, so it keeps dilation 1).

    Returns:
        One list per stage with one dilation per block (1 for global blocks).
    """
    schedule = []
    for stage, (depth, size) in enumerate(zip(depths, _feature_map_sizes(img_size))):
        sparse = max(1, size // kernel_size)
        local_index = 0
        dilations = []
        for kind in _stage_blocks(stage, depth):
            if kind == "L":
                dilations.append(1 if local_index % 2 == 0 else sparse)
                local_index += 1
            else:
                dilations.append(1)
        schedule.append(dilations)
    return schedule


class MedViTV2(nn.Module):
    """MedViTV2 classifier.

    Args:
        num_classes: Outputs of the classifier (classes, or labels for multi-label).
        in_chans: Input channels (1 for grey-scale, 3 for colour).
        img_size: Input side in pixels the dilation schedule and the global blocks'
            key/value pooling are planned for; other sizes still run (kernel and
            dilation are clamped). It is part of a checkpoint's identity: a global
            block planned to pool (at 224 px) has a BatchNorm (``sr_norm``) that one
            planned for 28 px has not, so their state dicts differ.
        depths: Blocks per stage.
        dims: Channels per stage.
        stem_chs: Channels of the four stem convolutions.
        head_dim: Channels per attention head.
        kernel_size: Neighborhood attention kernel.
        dilations: Per-stage, per-block dilations; ``None`` uses
            :func:`dilation_schedule`.
        sr_ratios: Spatial reduction of the global blocks' keys/values per stage at
            224 px; capped for smaller maps by :func:`kv_reduction`.
        drop_path_rate: Stochastic depth, linearly increasing to this rate.

    Shapes:
        ``forward``: ``[B, in_chans, H, W]`` -> ``[B, num_classes]``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        depths: Sequence[int] = (2, 2, 6, 1),
        dims: Sequence[int] = (64, 128, 192, 384),
        stem_chs: Sequence[int] = (64, 32, 64, 64),
        head_dim: int = 32,
        kernel_size: int = 7,
        dilations: Sequence[Sequence[int]] | None = None,
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"MedViTV2 has four stages: depths and dims need 4 entries. Got {list(depths)}, {list(dims)}.")
        if min(depths) < 1:
            raise ValueError(f"MedViTV2's stages need at least one block each: depths must be >= 1. Got {list(depths)}.")
        if not 0.0 <= drop_path_rate < 1.0:
            # At 1 the deepest block would drop every sample and divide by 1 - 1 = 0 (NaN).
            raise ValueError(f"drop_path_rate is a probability in [0, 1). Got {drop_path_rate}.")
        self.num_classes = num_classes
        self.num_features = dims[-1]
        dilations = dilations if dilations is not None else dilation_schedule(img_size, depths, kernel_size)
        s0, s1, s2, s3 = stem_chs
        self.stem = nn.Sequential(
            ConvBNReLU(in_chans, s0, 2), ConvBNReLU(s0, s1), ConvBNReLU(s1, s2), ConvBNReLU(s2, s3, 2)
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        map_sizes = _feature_map_sizes(img_size)
        stages, in_chs, block_id = [], s3, 0
        for stage, (depth, dim) in enumerate(zip(depths, dims)):
            blocks = []
            for i, kind in enumerate(_stage_blocks(stage, depth)):
                stride = 2 if (i == 0 and stage > 0) else 1
                if kind == "L":
                    block = LocalFeaturePerception(
                        in_chs, dim, stride, kernel_size, dilations[stage][i], head_dim,
                        ffn_kernel_size=7 if stage == 0 else 3, drop_path=rates[block_id],
                    )
                else:
                    block = GlobalFeaturePerception(
                        in_chs, dim, stride, kv_reduction(sr_ratios[stage], map_sizes[stage]), head_dim,
                        drop_path=rates[block_id],
                    )
                blocks.append(block)
                in_chs, block_id = dim, block_id + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W]`` -> feature map ``[B, dims[-1], h, w]``: ``H/32`` and ``W/32``
        (ceil), but never below ``MIN_MAP_SIZE`` (2 x 2 at 28 px)."""
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> pooled features ``[B, dims[-1]]`` or logits ``[B, num_classes]``."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier, e.g. for a new label set."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)
        _init_weights(self.head)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, SqueezeExcite):
        # Applied after its convolutions (``apply`` visits children first). With three
        # ReLU units, zero biases leave all three dead at init about one time in eight
        # (the gate is then constant and never learns); a bias of 1 starts them alive.
        nn.init.ones_(module.gate[1].bias)


# Variants. ``nano`` is medfed's own: sized for CPU federations at 28-64 px.
_VARIANTS: dict[str, dict] = {
    "nano": dict(depths=(2, 2, 3, 1), dims=(32, 64, 96, 128), stem_chs=(32, 16, 32, 32), head_dim=16, drop_path_rate=0.05),
    "tiny": dict(depths=(2, 2, 6, 1), dims=(64, 128, 192, 384), drop_path_rate=0.1),
    "small": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), drop_path_rate=0.1),
    "base": dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), drop_path_rate=0.2),
    "large": dict(depths=(2, 2, 6, 2), dims=(96, 256, 512, 1024), drop_path_rate=0.2),
}


def _create(variant: str, **kwargs) -> MedViTV2:
    return MedViTV2(**{**_VARIANTS[variant], **kwargs})


@register_model
def medvit_v2_nano(**kwargs) -> MedViTV2:
    """MedViTV2-nano (medfed's own): depths 2-2-3-1, dims 32-64-96-128, head dim 16;
    1.37 M parameters at 28 px with 2 classes, for CPU federations at 28-64 px."""
    return _create("nano", **kwargs)


@register_model
def medvit_v2_tiny(**kwargs) -> MedViTV2:
    """MedViTV2-T: depths 2-2-6-1, dims 64-128-192-384."""
    return _create("tiny", **kwargs)


@register_model
def medvit_v2_small(**kwargs) -> MedViTV2:
    """MedViTV2-S: depths 2-2-6-2, dims 64-128-256-512."""
    return _create("small", **kwargs)


@register_model
def medvit_v2_base(**kwargs) -> MedViTV2:
    """MedViTV2-B: depths 2-2-6-2, dims 96-192-384-768."""
    return _create("base", **kwargs)


@register_model
def medvit_v2_large(**kwargs) -> MedViTV2:
    """MedViTV2-L: depths 2-2-6-2, dims 96-256-512-1024."""
    return _create("large", **kwargs)
