"""Exact 2-D (dilated) neighborhood attention, with or without NATTEN's CUDA kernels.

Neighborhood attention restricts each query to the ``k x k`` keys around it:

- A. Hassani, S. Walton, J. Li, S. Li, H. Shi, "Neighborhood Attention Transformer",
  CVPR 2023, https://arxiv.org/abs/2204.07143
- A. Hassani, H. Shi, "Dilated Neighborhood Attention Transformer", 2022,
  https://arxiv.org/abs/2209.15001

Border semantics (identical to NATTEN's): per axis, positions are split into
``dilation`` groups by ``index % dilation``. Within its group a query's window holds
``kernel_size`` consecutive group members centred on the query, shifted inward at the
borders of the group (never zero-padded). Every query therefore attends to exactly
``kernel_size**2`` keys, which requires ``kernel_size * dilation <= H`` and ``<= W``.
Kernel and dilation may differ per axis (``(rows, columns)``, as in NATTEN); a kernel
equal to its axis's length covers the axis, even when that length is even (NATTEN
wants odd kernels): that is how :class:`NeighborhoodAttention2D` treats a map narrower
than its window on one axis only.

Backends (all exact: the same keys, the same softmax; they differ by rounding only)
-------------------------------------------------------------------------------------
``gather``
    PyTorch, every device and dtype: loops over the ``k*k`` window offsets, gathering
    one shifted copy of the keys or values at a time, so that its memory is linear in
    ``H * W * k**2`` (the attention probabilities) plus a few ``[B, H*W, heads, dim]``
    buffers. Hand-written backward (first order only). Half-precision inputs are
    computed in float32.
``dense``
    :func:`torch.nn.functional.scaled_dot_product_attention` over all ``H*W`` keys
    with the neighborhood as a boolean mask (built once per shape and device). Few,
    large kernels instead of ``2 k**2`` small ones, but quadratic in ``H*W``: the mask
    is ``(H*W)**2`` bytes, and a kernel without mask support (CPU, float64) builds the
    ``[B, heads, H*W, H*W]`` scores. Autograd gives the backward.
``natten``
    NATTEN's fused CUDA kernels (``cutlass-fna``, ``hopper-fna``, ``blackwell-fna``),
    where NATTEN was built with them and they accept the inputs.
``flex``
    NATTEN's ``flex-fna`` backend (PyTorch FlexAttention). Uncompiled it builds the full
    score matrix; on CPU it has no backward. Only when asked for.

Which backend ``"auto"`` picks
------------------------------
Decided by ``benchmarks/bench_attention.py`` (tables in ``docs/performance.md``); the
first matching row wins. ``P = H * W``; "scores" is ``B * heads * P**2 * 4`` bytes.

========  ==============================================  ========  =====================================
device    condition                                       backend   evidence
========  ==============================================  ========  =====================================
any       NATTEN fused kernels accept the inputs, k odd    natten    NATTEN's own kernels (none built here)
          and > 1 on both axes
CPU       P <= 441 (maps up to 21 x 21) and scores         dense     measured on 2 shared CPU cores
          <= 256 MiB                                                 (docs/performance.md), two runs:
                                                                     dense 3-14x faster forward and
                                                                     3x or more with backward on 7-21
                                                                     px maps
CPU       otherwise                                        gather    28 x 28: inconsistent across runs
                                                                     (dense took 0.06-2.9x gather's
                                                                     time); 56 x 56: gather 1.6-2.6x
                                                                     faster in both runs
CUDA      P <= 3136 (maps up to 56 x 56) and scores        dense     measured on an H200 (batch 16,
          <= 1/4 of the device's memory                              ``python -m benchmarks --gpu``):
                                                                     dense took 0.03-0.68x gather's time
                                                                     forward and 0.04-0.66x with backward
                                                                     on 7-56 px maps, dilation 1 and 2;
                                                                     NATTEN flex (uncompiled) 1.2-4.6x
CUDA      otherwise                                        gather    not measured: MedViTV2's maps are
                                                                     at most 56 x 56 at 224 px
========  ==============================================  ========  =====================================

A user forces a backend with the ``implementation`` argument, with
:func:`use_attention_backend` (a context manager, e.g. around a whole model) or with
the environment variable ``MEDFED_ATTENTION_BACKEND`` (``gather``, ``dense``,
``natten``, ``flex`` or ``auto``; also seen by Ray's worker processes). The argument
wins over the context manager, which wins over the variable.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from medfed.errors import MedfedError

__all__ = [
    "BACKENDS",
    "AttentionBackendError",
    "NeighborhoodAttention2D",
    "clamp_window",
    "natten_kernel_backend",
    "neighborhood_attention",
    "neighborhood_indices",
    "select_backend",
    "use_attention_backend",
]

logger = logging.getLogger(__name__)

Implementation = Literal["auto", "gather", "dense", "natten", "flex", "torch"]
#: The exact implementations :func:`neighborhood_attention` can run.
BACKENDS = ("gather", "dense", "natten", "flex")
_CHOICES = ("auto", *BACKENDS, "torch")  # "torch": the earlier name of "gather"
ENV_VAR = "MEDFED_ATTENTION_BACKEND"
# The auto rule's limits (see the module docstring's table).
_CPU_DENSE_MAX_POSITIONS = 21 * 21
_CPU_DENSE_MAX_SCORE_BYTES = 256 * 2**20
_CUDA_DENSE_MAX_POSITIONS = 56 * 56
_CUDA_DENSE_MAX_MEMORY_FRACTION = 0.25
_forced_backend: str | None = None

# NATTEN backends that run fused CUDA kernels (flex-fna is excluded: on CPU it has no
# backward, and uncompiled it materialises the full score matrix).
_NATTEN_KERNEL_BACKENDS = ("blackwell-fna", "hopper-fna", "cutlass-fna")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


class AttentionBackendError(MedfedError):
    """The requested attention backend is unknown or cannot run on these inputs.

    The backend is a user setting (``MEDFED_ATTENTION_BACKEND``, ``implementation``,
    :func:`use_attention_backend`), so the CLI prints this as one line, not a traceback.
    """


# --------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------


def _check_positive_int(value: object, name: str, caller: str, odd: bool = False) -> None:
    """Raise ValueError unless ``value`` is an int >= 1 (and odd when ``odd``)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < 1 or (odd and value % 2 == 0):
        kind = "an odd int >= 1" if odd else "an int >= 1"
        raise ValueError(f"The {name!r} parameter of {caller} must be {kind}. Got {value!r} instead.")


#: A window's size or dilation per axis: ``(rows, columns)``.
Pair = tuple[int, int]


def _per_axis(value: object, name: str, caller: str) -> Pair:
    """``value`` (one int for both axes, or ``(rows, columns)``) as a pair of ints >= 1."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(one, int) and not isinstance(one, bool) and one >= 1 for one in pair):
        raise ValueError(
            f"The {name!r} parameter of {caller} must be an int >= 1, or one per axis (rows, columns), each an "
            f"int >= 1. Got {value!r} instead."
        )
    return pair[0], pair[1]


def neighborhood_indices(
    length: int, kernel_size: int, dilation: int = 1, device: torch.device | str | None = None
) -> Tensor:
    """Key positions seen by each query position along one axis.

    Parameters
    ----------
    length : int
        Number of positions on the axis; ``kernel_size * dilation <= length``.
    kernel_size : int
        Odd window size (keys per query on this axis), or ``length`` (even or odd) for a
        window covering the axis.
    dilation : int, default 1
        Step between the keys of a window.
    device : torch.device or str, optional
        Device of the returned tensor (CPU when None).

    Returns
    -------
    Tensor
        int64 ``[length, kernel_size]``, increasing along each row: row ``i`` holds the
        positions that query ``i`` attends to.
    """
    caller = "neighborhood_indices"
    _check_positive_int(length, "length", caller)
    # An even kernel only as the whole axis (``kernel_size == length``, dilation 1), as in neighborhood_attention.
    _check_positive_int(kernel_size, "kernel_size", caller, odd=(kernel_size, dilation) != (length, 1))
    _check_positive_int(dilation, "dilation", caller)
    if kernel_size * dilation > length:
        raise ValueError(
            f"neighborhood_indices needs kernel_size * dilation <= length. Got {kernel_size} * {dilation} > {length}."
        )
    return _neighborhood_indices(length, kernel_size, dilation, torch.device(device or "cpu"))


def _neighborhood_indices(length: int, kernel_size: int, dilation: int, device: torch.device) -> Tensor:
    position = torch.arange(length, device=device)
    group = position % dilation
    group_size = (length - group + dilation - 1) // dilation  # members of the query's group
    rank = position // dilation  # position of the query within its group
    # Centre the window on the query, then shift it inward so it stays inside the group.
    start = torch.minimum((rank - kernel_size // 2).clamp(min=0), group_size - kernel_size)
    offsets = torch.arange(kernel_size, device=device)
    return group[:, None] + dilation * (start[:, None] + offsets[None, :])


@functools.lru_cache(maxsize=64)
def _window_table(height: int, width: int, kernel: Pair, dilation: Pair, device: torch.device) -> Tensor:
    """Flat key index per (window offset, flat query): int64 ``[kh*kw, H*W]``, row-major offsets."""
    rows = _neighborhood_indices(height, kernel[0], dilation[0], device)  # [H, kh]
    cols = _neighborhood_indices(width, kernel[1], dilation[1], device)  # [W, kw]
    flat = rows.t()[:, None, :, None] * width + cols.t()[None, :, None, :]  # [kh, kw, H, W]
    return flat.reshape(kernel[0] * kernel[1], height * width).contiguous()


def clamp_window(height: int, width: int, kernel_size: int, dilation: int) -> tuple[Pair, Pair]:
    """The window a ``kernel_size`` window with ``dilation`` becomes on a ``height x width`` map, per axis.

    Parameters
    ----------
    height, width : int
        Feature-map size in positions.
    kernel_size : int
        Requested odd window size.
    dilation : int
        Requested dilation.

    Returns
    -------
    tuple of (int, int)
        ``((kernel_rows, kernel_columns), (dilation_rows, dilation_columns))``. An axis
        no longer than ``kernel_size`` is covered whole (kernel = its length, dilation
        1: NATTEN's semantics of a window as large as the axis); on a longer axis the
        kernel stays and the dilation is the largest ``<= dilation`` with
        ``kernel * dilation <= length``. For example kernel 7 with dilation 2 on a
        4 x 20 map gives ``((4, 7), (1, 2))``: each query sees its whole column of 4
        and 7 positions of its row. (A map no larger than the window on both axes is
        full attention, which :class:`NeighborhoodAttention2D` computes directly.)
    """
    caller = "clamp_window"
    _check_positive_int(height, "height", caller)
    _check_positive_int(width, "width", caller)
    _check_positive_int(kernel_size, "kernel_size", caller, odd=True)
    _check_positive_int(dilation, "dilation", caller)

    def axis(length: int) -> tuple[int, int]:
        if length <= kernel_size:
            return length, 1
        return kernel_size, max(1, min(dilation, length // kernel_size))

    (kernel_rows, dilation_rows), (kernel_cols, dilation_cols) = axis(height), axis(width)
    return (kernel_rows, kernel_cols), (dilation_rows, dilation_cols)


# --------------------------------------------------------------------------------------
# NATTEN dispatch
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _natten() -> ModuleType | None:
    """NATTEN if it imports and was built with its CUDA kernels, else None (imported lazily)."""
    try:
        import natten
        from natten.backends import get_compatible_backends  # noqa: F401  (checked here once)
    except Exception as error:  # any failure must leave medfed usable
        logger.debug("NATTEN is unavailable (%s); using the PyTorch neighborhood attention.", error)
        return None
    if not getattr(natten, "HAS_LIBNATTEN", False):
        logger.debug("NATTEN %s has no CUDA kernels; using the PyTorch neighborhood attention.", natten.__version__)
        return None
    return natten


def natten_kernel_backend(query: Tensor, key: Tensor, value: Tensor) -> str | None:
    """Name of the fused NATTEN backend that would run these tensors, or None.

    Parameters
    ----------
    query, key, value : Tensor
        ``[B, H, W, heads, dim]`` inputs of :func:`neighborhood_attention`.

    Returns
    -------
    str or None
        ``"blackwell-fna"``, ``"hopper-fna"`` or ``"cutlass-fna"`` when the tensors are
        on CUDA, NATTEN was built with its kernels and one of them accepts the inputs
        (dtype, head dim, compute capability); None otherwise.
    """
    if not query.is_cuda:
        return None
    natten = _natten()
    if natten is None:
        return None
    from natten.backends import get_compatible_backends

    try:
        compatible = get_compatible_backends(query, key, value, torch_compile=False)
    except Exception as error:  # NATTEN's checks may raise on inputs it rejects
        logger.debug("NATTEN rejected the inputs (%s); using the PyTorch neighborhood attention.", error)
        return None
    return next((name for name in _NATTEN_KERNEL_BACKENDS if name in compatible), None)


def _why_no_natten(query: Tensor, kernel: tuple[int, int]) -> str:
    """The first reason NATTEN's fused kernels cannot run these inputs, in words."""
    if not _natten_takes(kernel):
        return f"NATTEN's kernels need odd kernel sizes >= 3, got {kernel}"
    if not query.is_cuda:
        return f"NATTEN's kernels need CUDA tensors, got {query.device}"
    if _natten() is None:
        return ("NATTEN is missing or was built without its CUDA kernels (docs/performance.md, "
                "\"NATTEN's CUDA kernels\", says how to build them)")
    return f"none of NATTEN's kernels accepts {query.dtype} tensors of head dim {query.shape[-1]} on this GPU"


# --------------------------------------------------------------------------------------
# PyTorch implementation
# --------------------------------------------------------------------------------------


def _autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """Keep autocast from recasting the loop's float32 maths to half precision."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _forward_offsets(q: Tensor, k: Tensor, v: Tensor, table: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Output ``[B, P, heads, dim]`` and probabilities ``[k*k, B, P, heads]``."""
    batch, positions, heads, _ = q.shape
    scores = q.new_empty(table.shape[0], batch, positions, heads)
    scaled_query = q * scale
    for offset, keys_at in enumerate(table):
        torch.linalg.vecdot(scaled_query, k.index_select(1, keys_at), out=scores[offset])
    probs = scores.softmax(dim=0)
    out = torch.zeros_like(q)
    for offset, keys_at in enumerate(table):
        out.addcmul_(probs[offset].unsqueeze(-1), v.index_select(1, keys_at))
    return out, probs


def _backward_offsets(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    probs: Tensor,
    out: Tensor,
    scale: float,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of query, key and value (None where not needed), same layout as the inputs."""
    need_q, need_k, need_v = needs_grad
    grad_q = grad_k = grad_v = None
    if need_v:
        grad_v = torch.zeros_like(v)
        for offset, keys_at in enumerate(table):
            grad_v.index_add_(1, keys_at, probs[offset].unsqueeze(-1) * grad_out)
    if need_q or need_k:
        grad_probs = torch.empty_like(probs)
        for offset, keys_at in enumerate(table):
            torch.linalg.vecdot(grad_out, v.index_select(1, keys_at), out=grad_probs[offset])
        # Softmax backward: d(score_j) = p_j (d(p_j) - sum_i p_i d(p_i)), and the sum equals <grad_out, out>.
        grad_scores = probs * (grad_probs - torch.linalg.vecdot(grad_out, out)) * scale
        del grad_probs
        if need_q:
            grad_q = torch.zeros_like(q)
            for offset, keys_at in enumerate(table):
                grad_q.addcmul_(grad_scores[offset].unsqueeze(-1), k.index_select(1, keys_at))
        if need_k:
            grad_k = torch.zeros_like(k)
            for offset, keys_at in enumerate(table):
                grad_k.index_add_(1, keys_at, grad_scores[offset].unsqueeze(-1) * q)
    return grad_q, grad_k, grad_v


class _NeighborhoodAttentionFunction(torch.autograd.Function):
    """Neighborhood attention over flat positions, one window offset at a time.

    Inputs ``[B, P, heads, dim]`` (P = H*W) and the window table ``[k*k, P]``. Scores and
    probabilities are kept as ``[k*k, B, P, heads]`` so that each offset is one contiguous
    slab; the backward pass gets the inputs, the table, the probabilities and the output,
    not the ``[k*k, B, P, heads]`` scores.
    """

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, table: Tensor, scale: float) -> Tensor:
        # Half-precision inputs are computed in float32: k*k accumulations in bf16 lose digits.
        compute_dtype = torch.float32 if query.dtype in _HALF_DTYPES else query.dtype
        q, k, v = (t.to(compute_dtype) for t in (query, key, value))
        with _autocast_disabled(q.device):
            out, probs = _forward_offsets(q, k, v, table, scale)
        ctx.save_for_backward(query, key, value, table, probs, out)
        ctx.scale = scale
        return out.to(query.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        query, key, value, table, probs, out = ctx.saved_tensors
        q, k, v, grad = (t.to(probs.dtype) for t in (query, key, value, grad_out))
        with _autocast_disabled(q.device):
            grads = _backward_offsets(grad, q, k, v, table, probs, out, ctx.scale, ctx.needs_input_grad[:3])
        grads = tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (query, key, value)))
        return (*grads, None, None)


def _torch_neighborhood_attention(query: Tensor, key: Tensor, value: Tensor, kernel: Pair, dilation: Pair) -> Tensor:
    batch, height, width, heads, dim = query.shape
    table = _window_table(height, width, kernel, dilation, query.device)
    flat = [t.reshape(batch, height * width, heads, dim) for t in (query, key, value)]
    out = _NeighborhoodAttentionFunction.apply(*flat, table, dim**-0.5)
    return out.reshape(batch, height, width, heads, dim)


# --------------------------------------------------------------------------------------
# Dense (masked scaled_dot_product_attention) and NATTEN flex
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _neighborhood_mask(height: int, width: int, kernel: Pair, dilation: Pair, device: torch.device) -> Tensor:
    """Boolean ``[P, P]`` mask, True where query (row) may attend to key (column)."""
    table = _window_table(height, width, kernel, dilation, device)  # [kh*kw, P]
    positions = height * width
    mask = torch.zeros(positions, positions, dtype=torch.bool, device=device)
    return mask.scatter_(1, table.t(), True)


def _dense_neighborhood_attention(query: Tensor, key: Tensor, value: Tensor, kernel: Pair, dilation: Pair) -> Tensor:
    batch, height, width, heads, dim = query.shape
    mask = _neighborhood_mask(height, width, kernel, dilation, query.device)
    q, k, v = (t.reshape(batch, height * width, heads, dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale: dim ** -0.5
    return out.transpose(1, 2).reshape(batch, height, width, heads, dim)


@functools.lru_cache(maxsize=1)
def _natten_package() -> ModuleType | None:
    """NATTEN, with or without its CUDA kernels (for flex-fna), or None."""
    try:
        import natten
    except Exception as error:  # any failure must leave medfed usable
        logger.debug("NATTEN is unavailable (%s).", error)
        return None
    return natten


def _flex_neighborhood_attention(query: Tensor, key: Tensor, value: Tensor, kernel: Pair, dilation: Pair) -> Tensor:
    natten = _natten_package()
    if natten is None:
        raise AttentionBackendError(
            "neighborhood_attention(implementation='flex') needs NATTEN (pip install natten==0.21.7)."
        )
    if not query.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise AttentionBackendError(
            "neighborhood_attention(implementation='flex') has no backward on CPU (FlexAttention); "
            "use 'gather' or 'dense' for training on CPU."
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns on every uncompiled call
        return natten.na2d(query, key, value, kernel_size=kernel, dilation=dilation, backend="flex-fna")


# --------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------


def _check_backend_name(name: object, where: str) -> str:
    if name not in _CHOICES:
        raise AttentionBackendError(
            f"The {where} must be a str among {{{', '.join(repr(c) for c in _CHOICES[:-1])}}}. "
            f"Got {name!r} instead."
        )
    return "gather" if name == "torch" else str(name)


@contextlib.contextmanager
def use_attention_backend(name: str) -> Iterator[None]:
    """Run every :func:`neighborhood_attention` call in the block with backend ``name``.

    Parameters
    ----------
    name : str
        ``"gather"``, ``"dense"``, ``"natten"``, ``"flex"`` or ``"auto"`` (the rule).

    Examples
    --------
    >>> with use_attention_backend("dense"):  # doctest: +SKIP
    ...     logits = model(images)
    """
    global _forced_backend
    name = _check_backend_name(name, "'name' parameter of use_attention_backend")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


def _dense_fits(query: Tensor) -> bool:
    batch, height, width, heads, _ = query.shape
    positions = height * width
    score_bytes = batch * heads * positions * positions * 4
    if query.is_cuda:
        if positions > _CUDA_DENSE_MAX_POSITIONS:
            return False
        total = torch.cuda.get_device_properties(query.device).total_memory
        return score_bytes <= _CUDA_DENSE_MAX_MEMORY_FRACTION * total
    return positions <= _CPU_DENSE_MAX_POSITIONS and score_bytes <= _CPU_DENSE_MAX_SCORE_BYTES


def select_backend(
    query: Tensor, key: Tensor, value: Tensor, kernel_size: int | Pair, dilation: int | Pair = 1
) -> str:
    """The backend ``"auto"`` runs for these inputs (the module docstring's table).

    Parameters
    ----------
    query, key, value : Tensor
        ``[B, H, W, heads, dim]`` inputs of :func:`neighborhood_attention`.
    kernel_size, dilation : int or (int, int)
        The window.

    Returns
    -------
    str
        One of :data:`BACKENDS` except ``"flex"`` (never chosen automatically).
    """
    if _natten_takes(_per_axis(kernel_size, "kernel_size", "select_backend")) and \
            natten_kernel_backend(query, key, value) is not None:
        return "natten"
    return "dense" if _dense_fits(query) else "gather"


def _natten_takes(kernel: Pair) -> bool:
    """NATTEN rejects kernel 1 (the query alone, i.e. out = value) and wants odd kernels."""
    return all(k > 1 and k % 2 == 1 for k in kernel)


def _requested_backend(implementation: str) -> str:
    name = _check_backend_name(implementation, "'implementation' parameter of neighborhood_attention")
    if name != "auto":
        return name
    if _forced_backend is not None:
        return _forced_backend
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        return _check_backend_name(from_env, f"environment variable {ENV_VAR}")
    return "auto"


# --------------------------------------------------------------------------------------
# Public function and module
# --------------------------------------------------------------------------------------


def _validate(query: Tensor, key: Tensor, value: Tensor, kernel_size: object, dilation: object) -> tuple[Pair, Pair]:
    """Check the inputs; return the window per axis."""
    caller = "neighborhood_attention"
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, Tensor):
            raise ValueError(
                f"The {name!r} argument of {caller} must be a Tensor. Got {type(tensor).__name__} instead."
            )
    if query.dim() != 5 or query.shape[-1] == 0:
        raise ValueError(
            f"{caller} expects [B, H, W, heads, dim] (5-D, dim >= 1) tensors. "
            f"Got a query of shape {tuple(query.shape)}."
        )
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            f"{caller} expects query, key and value of the same shape. Got {tuple(query.shape)}, "
            f"{tuple(key.shape)} and {tuple(value.shape)}."
        )
    if key.device != query.device or value.device != query.device:
        raise ValueError(
            f"{caller} expects query, key and value on one device. "
            f"Got {query.device}, {key.device} and {value.device}."
        )
    if not query.is_floating_point() or key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"{caller} expects query, key and value of one floating dtype. "
            f"Got {query.dtype}, {key.dtype} and {value.dtype}."
        )
    kernel = _per_axis(kernel_size, "kernel_size", caller)
    dilations = _per_axis(dilation, "dilation", caller)
    height, width = query.shape[1:3]
    for k, d, length, axis in zip(kernel, dilations, (height, width), ("rows", "columns")):
        if k % 2 == 0 and not (k == length and d == 1):  # an even kernel only as a whole axis
            raise ValueError(
                f"The 'kernel_size' parameter of {caller} must be an odd int >= 1. Got {kernel_size!r} instead."
            )
        if k * d > length:
            raise ValueError(
                f"{caller} needs kernel_size * dilation <= H and <= W. Got {k} * {d} = {k * d} for a {height} x "
                f"{width} map ({axis}); reduce them (see clamp_window)."
            )
    return kernel, dilations


def neighborhood_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: int | Pair,
    dilation: int | Pair = 1,
    *,
    implementation: Implementation = "auto",
) -> Tensor:
    """2-D dilated neighborhood attention, exact and NATTEN-compatible.

    Parameters
    ----------
    query, key, value : Tensor
        ``[B, H, W, heads, dim]``, same shape, device and floating dtype.
    kernel_size : int or (int, int)
        Odd window size, one for both axes or ``(rows, columns)``; each query attends
        to ``kernel_size**2`` keys (``rows * columns``). A kernel equal to its axis's
        length covers that axis and may be even.
    dilation : int or (int, int), default 1
        Step between window members; ``kernel_size * dilation <= H`` (and ``<= W``) per axis.
    implementation : {"auto", "gather", "dense", "natten", "flex"}, default "auto"
        The backend (module docstring). "auto" follows :func:`use_attention_backend`
        or ``MEDFED_ATTENTION_BACKEND`` when set, else :func:`select_backend`;
        "torch" is accepted as the earlier name of "gather". "natten" requires the
        fused kernels.

    Returns
    -------
    Tensor
        ``[B, H, W, heads, dim]``: ``softmax(q . k / sqrt(dim)) @ v`` over each window.

    Raises
    ------
    AttentionBackendError
        The backend (argument, :func:`use_attention_backend` or ``MEDFED_ATTENTION_BACKEND``)
        is unknown, or cannot run these inputs ("natten" without its CUDA kernels, "flex"
        without NATTEN or for training on CPU).
    ValueError
        Malformed inputs (shapes, devices, dtypes, window larger than the map).
    """
    kernel, dilations = _validate(query, key, value, kernel_size, dilation)
    backend = _requested_backend(implementation)
    if backend == "auto":
        backend = select_backend(query, key, value, kernel, dilations)
    if backend == "natten":
        kernels = natten_kernel_backend(query, key, value) if _natten_takes(kernel) else None
        if kernels is None:
            raise AttentionBackendError(f"neighborhood_attention(implementation='natten') cannot run here: "
                                        f"{_why_no_natten(query, kernel)}; use implementation='auto'.")
        return _natten().na2d(query, key, value, kernel_size=kernel, dilation=dilations, backend=kernels)
    if backend == "dense":
        return _dense_neighborhood_attention(query, key, value, kernel, dilations)
    if backend == "flex":
        return _flex_neighborhood_attention(query, key, value, kernel, dilations)
    return _torch_neighborhood_attention(query, key, value, kernel, dilations)


def _full_attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Every position attends to every position: ``[B, H, W, heads, dim]`` in and out."""
    batch, height, width, heads, dim = query.shape
    q, k, v = (t.reshape(batch, height * width, heads, dim).transpose(1, 2) for t in (query, key, value))
    out = nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, height, width, heads, dim)


class NeighborhoodAttention2D(nn.Module):
    """Multi-head 2-D dilated neighborhood self-attention on channels-last maps.

    Where the window covers the whole map (``kernel_size >= max(H, W)``), every query
    attends to every key: NATTEN's semantics for such a window, computed as plain full
    attention. Otherwise the window is clamped to the map per axis at forward time
    (:func:`clamp_window`): an axis no longer than the kernel is covered whole, and the
    dilation shrinks on an axis shorter than ``kernel_size * dilation``. (Clamping both
    axes to the shorter one left a 2 x 10 map with a 1 x 1 window: each query saw itself
    alone.) There is no relative position bias (NATTEN dropped it in 0.20).

    Parameters
    ----------
    dim : int
        Channels ``C`` of the input and output; divisible by ``num_heads``.
    num_heads : int
        Attention heads; each has ``dim // num_heads`` channels.
    kernel_size : int, default 7
        Odd window size before clamping.
    dilation : int, default 1
        Dilation before clamping.
    qkv_bias : bool, default True
        Bias in the query/key/value projection.
    proj_drop : float, default 0.0
        Dropout probability after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        caller = "NeighborhoodAttention2D"
        _check_positive_int(dim, "dim", caller)
        _check_positive_int(num_heads, "num_heads", caller)
        if dim % num_heads != 0:
            raise ValueError(
                f"The 'dim' parameter of {caller} must be divisible by num_heads={num_heads}. Got {dim} instead."
            )
        _check_positive_int(kernel_size, "kernel_size", caller, odd=True)
        _check_positive_int(dilation, "dilation", caller)
        if not 0.0 <= proj_drop < 1.0:
            raise ValueError(
                f"The 'proj_drop' parameter of {caller} must be a float in the range [0, 1). Got {proj_drop!r} instead."
            )
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """Attend within each position's neighborhood.

        Parameters
        ----------
        x : Tensor
            ``[B, H, W, C]`` with ``C == dim``.

        Returns
        -------
        Tensor
            ``[B, H, W, C]``.
        """
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                f"NeighborhoodAttention2D expects a [B, H, W, {self.dim}] input. Got shape {tuple(x.shape)}."
            )
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height, width, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(dim=3)
        if self.kernel_size >= max(height, width):
            # The window covers the map: NATTEN's semantics give full attention, which
            # is what a shrunken kernel would not (a 2 x 2 map would clamp to kernel 1).
            out = _full_attention(query, key, value)
        else:
            kernel, dilation = clamp_window(height, width, self.kernel_size, self.dilation)
            out = neighborhood_attention(query, key, value, kernel, dilation)
        return self.proj_drop(self.proj(out.reshape(batch, height, width, self.dim)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}"
        )
