"""Tests of medfed.models.neighborhood_attention against NATTEN and a dense masked reference."""

from __future__ import annotations

import importlib
import types
import warnings

import pytest
import torch

from medfed.errors import MedfedError
from medfed.models.neighborhood_attention import (
    AttentionBackendError,
    NeighborhoodAttention2D,
    clamp_window,
    natten_kernel_backend,
    neighborhood_attention,
    neighborhood_indices,
    select_backend,
    use_attention_backend,
)

# By module path: medfed.models re-exports the function under the module's own name.
na_module = importlib.import_module("medfed.models.neighborhood_attention")


def _qkv(shape, *, seed: int, dtype=torch.float32, requires_grad: bool = False, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=generator, dtype=dtype).to(device).requires_grad_(requires_grad)
        for _ in range(3)
    )


def _pair(value):
    return tuple(value) if isinstance(value, tuple) else (value, value)


def _window_members(length: int, kernel_size: int, dilation: int, position: int) -> list[int]:
    """Positions seen by ``position`` on one axis, from the definition (independent of the module)."""
    group = list(range(position % dilation, length, dilation))
    rank = group.index(position)
    start = rank - kernel_size // 2
    start = max(0, min(start, len(group) - kernel_size))  # shift inward at the borders
    return group[start : start + kernel_size]


def _dense_reference(query, key, value, kernel_size: int, dilation: int):
    """Full softmax attention with every key outside the neighbourhood masked out."""
    batch, height, width, heads, dim = query.shape
    (kernel_rows, kernel_cols), (dilation_rows, dilation_cols) = _pair(kernel_size), _pair(dilation)
    mask = torch.zeros(height * width, height * width, dtype=torch.bool)
    for row in range(height):
        rows = _window_members(height, kernel_rows, dilation_rows, row)
        for col in range(width):
            cols = _window_members(width, kernel_cols, dilation_cols, col)
            for key_row in rows:
                for key_col in cols:
                    mask[row * width + col, key_row * width + key_col] = True
    q, k, v = (t.reshape(batch, height * width, heads, dim).transpose(1, 2) for t in (query, key, value))
    scores = (q @ k.transpose(-1, -2)) * dim**-0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (probs @ v).transpose(1, 2).reshape(batch, height, width, heads, dim)


# --------------------------------------------------------------------------------------
# (a) forward equals NATTEN's flex-fna backend
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def natten_flex_na2d():
    """natten.na2d restricted to the flex-fna backend; a skip only when NATTEN is not installed.

    NATTEN is a pinned dependency, so anything else that stops its probe (a changed
    signature, a torch upgrade) fails here instead of skipping the only comparison with it.
    """
    natten = pytest.importorskip("natten")

    def na2d(q, k, v, kernel_size, dilation):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex warns that it runs uncompiled on CPU
            return natten.na2d(q, k, v, kernel_size=kernel_size, dilation=dilation, backend="flex-fna")

    probe = torch.zeros(1, 4, 4, 1, 8)
    try:
        na2d(probe, probe, probe, 3, 1)
    except Exception as error:  # noqa: BLE001 - named in the failure
        pytest.fail(f"NATTEN {natten.__version__}'s flex-fna backend no longer runs on CPU: {type(error).__name__}: {error}")
    return na2d


# (H, W, kernel, dilation): squares and non-squares from 7 to 56, every kernel * dilation <= min(H, W).
NATTEN_CASES = [
    (7, 7, 3, 1),
    (7, 7, 7, 1),
    (7, 7, 3, 2),
    (7, 12, 5, 1),
    (12, 7, 3, 2),
    (14, 14, 7, 2),
    (13, 21, 3, 4),
    (21, 13, 5, 2),
    (28, 28, 7, 4),
    (28, 17, 5, 3),
    (42, 56, 7, 3),
    (56, 56, 7, 1),
    (56, 56, 5, 4),
    (56, 30, 7, 4),
    (7, 12, (3, 5), (2, 1)),  # a window per axis, as NATTEN takes it
    (12, 9, (5, 3), (2, 3)),
]


@pytest.mark.parametrize(("height", "width", "kernel_size", "dilation"), NATTEN_CASES)
def test_forward_matches_natten_flex(natten_flex_na2d, height, width, kernel_size, dilation):
    # Prepare: one sample on large maps (uncompiled flex attention builds the full score matrix).
    batch = 1 if height * width > 1000 else 2
    query, key, value = _qkv((batch, height, width, 2, 8), seed=height * 100 + width + sum(_pair(kernel_size)) + sum(_pair(dilation)))

    # Execute
    ours = neighborhood_attention(query, key, value, kernel_size, dilation)
    expected = natten_flex_na2d(query, key, value, kernel_size, dilation)

    # Assert
    assert ours.shape == expected.shape == query.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# (b) forward and gradients equal a dense masked reference (float64)
# --------------------------------------------------------------------------------------

DENSE_CASES = [
    (5, 5, 3, 1),
    (7, 9, 3, 2),
    (9, 6, 5, 1),
    (12, 10, 3, 3),
    (11, 7, 7, 1),
    (8, 8, 1, 4),
    (10, 14, 5, 2),
    (7, 12, (3, 5), (2, 1)),
    (2, 9, (2, 3), (1, 2)),  # an even kernel covering its whole axis
    (9, 4, (5, 4), (1, 1)),
]


@pytest.mark.parametrize(("height", "width", "kernel_size", "dilation"), DENSE_CASES)
def test_forward_and_gradients_match_dense_reference(height, width, kernel_size, dilation):
    # Prepare
    shape = (2, height, width, 2, 4)
    ours_inputs = _qkv(shape, seed=sum(_pair(dilation)) * 1000 + height, dtype=torch.float64, requires_grad=True)
    reference_inputs = tuple(t.detach().clone().requires_grad_(True) for t in ours_inputs)
    grad_weights = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    # Execute
    ours = neighborhood_attention(*ours_inputs, kernel_size, dilation)
    reference = _dense_reference(*reference_inputs, kernel_size, dilation)
    ours_grads = torch.autograd.grad((ours * grad_weights).sum(), ours_inputs)
    reference_grads = torch.autograd.grad((reference * grad_weights).sum(), reference_inputs)

    # Assert
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-10)
    for name, got, expected in zip("qkv", ours_grads, reference_grads):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10, msg=f"gradient of {name}")


@pytest.mark.parametrize("wanted", ["query", "key", "value"])
def test_gradient_of_one_input_only(wanted):
    # Prepare
    names = ("query", "key", "value")
    inputs = _qkv((1, 6, 7, 2, 4), seed=3, dtype=torch.float64)
    for name, tensor in zip(names, inputs):
        tensor.requires_grad_(name == wanted)
    reference_inputs = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    index = names.index(wanted)

    # Execute
    (grad,) = torch.autograd.grad(neighborhood_attention(*inputs, 3, 2).pow(2).sum(), inputs[index])
    reference_grads = torch.autograd.grad(_dense_reference(*reference_inputs, 3, 2).pow(2).sum(), reference_inputs)

    # Assert
    torch.testing.assert_close(grad, reference_grads[index], atol=1e-12, rtol=1e-10)


def test_bfloat16_close_to_float32():
    # Prepare
    inputs = _qkv((1, 9, 9, 2, 16), seed=5)

    # Execute
    full = neighborhood_attention(*inputs, 5, 1)
    half = neighborhood_attention(*(t.bfloat16() for t in inputs), 5, 1)

    # Assert
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=3e-2, rtol=0)


# --------------------------------------------------------------------------------------
# (b') every backend that runs on CPU equals the reference, forward and backward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["gather", "dense"])
@pytest.mark.parametrize(("height", "width", "kernel_size", "dilation"), [(7, 9, 3, 2), (12, 10, 3, 3), (11, 7, 7, 1)])
def test_each_cpu_backend_matches_dense_reference_forward_and_backward(backend, height, width, kernel_size, dilation):
    # Prepare
    shape = (2, height, width, 2, 4)
    inputs = _qkv(shape, seed=height + 10 * dilation, dtype=torch.float64, requires_grad=True)
    reference_inputs = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    grad_weights = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    # Execute
    ours = neighborhood_attention(*inputs, kernel_size, dilation, implementation=backend)
    reference = _dense_reference(*reference_inputs, kernel_size, dilation)
    ours_grads = torch.autograd.grad((ours * grad_weights).sum(), inputs)
    reference_grads = torch.autograd.grad((reference * grad_weights).sum(), reference_inputs)

    # Assert
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-10)
    for name, got, expected in zip("qkv", ours_grads, reference_grads):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10, msg=f"gradient of {name}")


def test_dense_backend_in_float32_and_bfloat16_is_close_to_the_reference():
    # Prepare
    inputs = _qkv((2, 9, 9, 2, 16), seed=11)
    reference = _dense_reference(*(t.double() for t in inputs), 5, 1)

    # Execute
    full = neighborhood_attention(*inputs, 5, 1, implementation="dense")
    half = neighborhood_attention(*(t.bfloat16() for t in inputs), 5, 1, implementation="dense")

    # Assert
    torch.testing.assert_close(full.double(), reference, atol=1e-5, rtol=0)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), reference, atol=3e-2, rtol=0)


def test_flex_backend_forward_matches_reference_and_refuses_backward_on_cpu(natten_flex_na2d):
    # Prepare
    inputs = _qkv((2, 9, 8, 2, 8), seed=4)
    trainable = _qkv((2, 9, 8, 2, 8), seed=4, requires_grad=True)

    # Execute
    out = neighborhood_attention(*inputs, 3, 2, implementation="flex")

    # Assert
    torch.testing.assert_close(out.double(), _dense_reference(*(t.double() for t in inputs), 3, 2), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="'flex'.* no backward on CPU"):
        neighborhood_attention(*trainable, 3, 2, implementation="flex")


def test_auto_rule_on_cpu_is_dense_on_small_maps_and_gather_on_large_ones():
    # Prepare
    small = torch.zeros(4, 16, 16, 2, 8)
    large = torch.zeros(4, 28, 28, 2, 8)
    huge_batch = torch.zeros(2048, 16, 16, 2, 8)  # scores would take 2048*2*256*256*4 B = 1 GiB

    # Execute / Assert
    assert select_backend(small, small, small, 7) == "dense"
    assert select_backend(large, large, large, 7) == "gather"
    assert select_backend(huge_batch, huge_batch, huge_batch, 7) == "gather"


def test_a_forced_backend_wins_over_the_rule_and_the_argument_over_both(monkeypatch):
    # Prepare: record which implementation runs.
    calls = []
    monkeypatch.setattr(na_module, "_dense_neighborhood_attention", lambda *a: calls.append("dense") or a[0])
    monkeypatch.setattr(na_module, "_torch_neighborhood_attention", lambda *a: calls.append("gather") or a[0])
    small = _qkv((1, 7, 7, 1, 4), seed=0)

    # Execute
    neighborhood_attention(*small, 3)  # the rule: dense on a 7 x 7 map on CPU
    with use_attention_backend("gather"):
        neighborhood_attention(*small, 3)
        neighborhood_attention(*small, 3, implementation="dense")
    monkeypatch.setenv("MEDFED_ATTENTION_BACKEND", "gather")
    neighborhood_attention(*small, 3)
    with use_attention_backend("dense"):
        neighborhood_attention(*small, 3)
    monkeypatch.setenv("MEDFED_ATTENTION_BACKEND", "fastest")

    # Assert
    assert calls == ["dense", "gather", "dense", "gather", "dense"]
    with pytest.raises(ValueError, match="environment variable MEDFED_ATTENTION_BACKEND must be .* Got 'fastest'"):
        neighborhood_attention(*small, 3)
    with pytest.raises(ValueError, match="'name' parameter of use_attention_backend"):
        with use_attention_backend("fast"):
            pass


# --------------------------------------------------------------------------------------
# (c) windows: exactly k*k keys, shifted inward at the borders
# --------------------------------------------------------------------------------------


def test_indices_hand_computed_dilated():
    # Prepare: L=7, d=2 -> groups {0, 2, 4, 6} and {1, 3, 5}; windows of 3 group members.
    expected = torch.tensor(
        [
            [0, 2, 4],  # 0: rank 0 of the even group, window shifted right
            [1, 3, 5],  # 1: the odd group has exactly 3 members
            [0, 2, 4],  # 2: centred
            [1, 3, 5],
            [2, 4, 6],  # 4: centred
            [1, 3, 5],
            [2, 4, 6],  # 6: last even member, window shifted left
        ]
    )

    # Execute
    table = neighborhood_indices(7, 3, 2)

    # Assert
    assert torch.equal(table, expected)


def test_indices_hand_computed_plain():
    # Prepare
    expected = torch.tensor([[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]])

    # Execute
    table = neighborhood_indices(5, 3, 1)

    # Assert
    assert torch.equal(table, expected)


def test_indices_match_definition_for_all_small_axes():
    # Prepare: every legal (length, kernel, dilation) with length <= 20.
    cases = [
        (length, kernel_size, dilation)
        for length in range(1, 21)
        for kernel_size in range(1, length + 1, 2)
        for dilation in range(1, length // kernel_size + 1)
    ]

    for length, kernel_size, dilation in cases:
        # Execute
        table = neighborhood_indices(length, kernel_size, dilation).tolist()

        # Assert
        expected = [_window_members(length, kernel_size, dilation, position) for position in range(length)]
        assert table == expected, (length, kernel_size, dilation)


@pytest.mark.parametrize(("height", "width", "kernel_size", "dilation"), [(7, 7, 3, 1), (9, 8, 3, 2), (6, 11, 5, 1)])
def test_every_query_sees_exactly_its_window(height, width, kernel_size, dilation):
    # Prepare: zero queries give uniform attention; one-hot values reveal which keys were used.
    positions = height * width
    query = torch.zeros(1, height, width, 1, positions, dtype=torch.float64)
    key = torch.randn(1, height, width, 1, positions, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    value = torch.eye(positions, dtype=torch.float64).reshape(1, height, width, 1, positions)

    # Execute
    weights = neighborhood_attention(query, key, value, kernel_size, dilation).reshape(positions, positions)

    # Assert
    seen = weights > 0
    assert torch.all(seen.sum(dim=1) == kernel_size**2)
    torch.testing.assert_close(weights[seen], torch.full((positions * kernel_size**2,), kernel_size**-2.0, dtype=torch.float64))
    for row in range(height):
        for col in range(width):
            expected = {
                r * width + c
                for r in _window_members(height, kernel_size, dilation, row)
                for c in _window_members(width, kernel_size, dilation, col)
            }
            assert set(seen[row * width + col].nonzero().flatten().tolist()) == expected


def test_corner_window_is_shifted_inward():
    # Prepare: on a 9 x 9 map with k=3, d=2 the corner (0, 0) sees rows and columns {0, 2, 4}.
    positions = 81
    query = torch.zeros(1, 9, 9, 1, positions)
    value = torch.eye(positions).reshape(1, 9, 9, 1, positions)

    # Execute
    weights = neighborhood_attention(query, query, value, 3, 2).reshape(positions, positions)

    # Assert
    expected = sorted(r * 9 + c for r in (0, 2, 4) for c in (0, 2, 4))
    assert weights[0].nonzero().flatten().tolist() == expected


# --------------------------------------------------------------------------------------
# (d) module and clamping
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "kernel_size", "dilation", "expected"),
    [
        (1, 1, 7, 1, ((1, 1), (1, 1))),
        (2, 2, 7, 3, ((2, 2), (1, 1))),
        (4, 4, 7, 1, ((4, 4), (1, 1))),
        (7, 7, 7, 2, ((7, 7), (1, 1))),
        (14, 28, 7, 4, ((7, 7), (2, 4))),
        (5, 9, 7, 1, ((5, 7), (1, 1))),
        (2, 10, 7, 1, ((2, 7), (1, 1))),
        (56, 56, 7, 8, ((7, 7), (8, 8))),
        (28, 28, 3, 9, ((3, 3), (9, 9))),
        (28, 28, 3, 10, ((3, 3), (9, 9))),
    ],
)
def test_clamp_window(height, width, kernel_size, dilation, expected):
    assert clamp_window(height, width, kernel_size, dilation) == expected


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (4, 4), (7, 7), (5, 9)])
def test_module_forward_backward_on_small_maps(size):
    # Prepare
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(dim=16, num_heads=2, kernel_size=7, dilation=2)
    x = torch.randn(2, *size, 16, requires_grad=True)

    # Execute
    out = module(x)
    out.sum().backward()

    # Assert
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("size", [(2, 10), (10, 2), (4, 20), (5, 12)])
def test_a_map_narrower_than_the_window_on_one_axis_keeps_its_window_on_the_other(size):
    # The window was clamped to the shorter side: on a 2 x 10 map each query saw itself alone,
    # and the query and key projections got no gradient.
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=7, dilation=1).double()
    x = torch.randn(2, *size, 8, dtype=torch.float64)
    # Execute
    out = module(x)
    out.pow(2).sum().backward()
    # Assert: the reference with the short axis covered whole, the long one at kernel 7.
    q, k, v = module.qkv(x).reshape(2, *size, 3, 2, 4).unbind(3)
    window = (min(size[0], 7), min(size[1], 7))
    expected = module.proj(_dense_reference(q, k, v, window, 1).reshape(2, *size, 8))
    torch.testing.assert_close(out, expected)
    queries = module.qkv.weight.grad[:8]
    assert queries.abs().max() > 1e-3


def test_module_on_single_position_returns_projected_value():
    # Prepare: a 1 x 1 map attends only to itself, so attention returns the value part of qkv.
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(dim=8, num_heads=2)
    x = torch.randn(3, 1, 1, 8)

    # Execute
    out = module(x)

    # Assert
    value = torch.nn.functional.linear(x, module.qkv.weight[16:], module.qkv.bias[16:])
    torch.testing.assert_close(out, module.proj(value))


def test_module_matches_function():
    # Prepare
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(dim=12, num_heads=3, kernel_size=3, dilation=2)
    x = torch.randn(2, 8, 6, 12)

    # Execute
    out = module(x)

    # Assert
    q, k, v = module.qkv(x).reshape(2, 8, 6, 3, 3, 4).unbind(3)
    expected = module.proj(neighborhood_attention(q, k, v, 3, 2).reshape(2, 8, 6, 12))
    torch.testing.assert_close(out, expected)


def test_module_repr_shows_window():
    assert "kernel_size=5, dilation=3" in repr(NeighborhoodAttention2D(8, 2, kernel_size=5, dilation=3))


# --------------------------------------------------------------------------------------
# (e) errors
# --------------------------------------------------------------------------------------

_GOOD = torch.zeros(1, 7, 7, 1, 4)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(1, 7, 7, 4), torch.zeros(1, 7, 7, 4), torch.zeros(1, 7, 7, 4), 3, 1), "5-D"),
        ((_GOOD, torch.zeros(1, 7, 6, 1, 4), _GOOD, 3, 1), "same shape"),
        ((_GOOD, _GOOD, _GOOD.double(), 3, 1), "floating dtype"),
        ((_GOOD.long(), _GOOD.long(), _GOOD.long(), 3, 1), "floating dtype"),
        ((_GOOD, _GOOD, _GOOD, 4, 1), "'kernel_size' parameter .* odd int >= 1. Got 4"),
        ((_GOOD, _GOOD, _GOOD, 0, 1), "'kernel_size' parameter"),
        ((_GOOD, _GOOD, _GOOD, 3.0, 1), "'kernel_size' parameter"),
        ((_GOOD, _GOOD, _GOOD, 3, 0), "'dilation' parameter .* int >= 1. Got 0"),
        ((_GOOD, _GOOD, _GOOD, 5, 2), r"kernel_size \* dilation <= H and <= W. Got 5 \* 2 = 10 for a 7 x 7"),
        ((torch.zeros(1, 20, 6, 1, 4),) * 3 + (7, 1), "for a 20 x 6 map"),
        (("q", _GOOD, _GOOD, 3, 1), "'query' argument .* must be a Tensor"),
    ],
)
def test_function_rejects_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(*args)


def test_unknown_implementation_rejected():
    with pytest.raises(ValueError, match="'implementation' parameter"):
        neighborhood_attention(_GOOD, _GOOD, _GOOD, 3, implementation="cuda")


def test_natten_implementation_refused_on_cpu_with_the_reason():
    with pytest.raises(ValueError, match="implementation='natten'.*need CUDA tensors, got cpu"):
        neighborhood_attention(_GOOD, _GOOD, _GOOD, 3, implementation="natten")
    with pytest.raises(ValueError, match=r"implementation='natten'.*need odd kernel sizes >= 3, got \(1, 1\)"):
        neighborhood_attention(_GOOD, _GOOD, _GOOD, 1, implementation="natten")


def test_backend_errors_are_one_line_medfed_errors(monkeypatch):
    # A backend is a user setting: the CLI must print these as one line (MedfedError),
    # while callers catching ValueError keep working.
    trainable = _qkv((1, 6, 6, 1, 4), seed=0, requires_grad=True)
    monkeypatch.setenv("MEDFED_ATTENTION_BACKEND", "fastest")
    with pytest.raises(AttentionBackendError, match="environment variable MEDFED_ATTENTION_BACKEND must be"):
        neighborhood_attention(_GOOD, _GOOD, _GOOD, 3)
    monkeypatch.setenv("MEDFED_ATTENTION_BACKEND", "natten")
    with pytest.raises(AttentionBackendError, match="implementation='natten'.*need CUDA tensors, got cpu"):
        neighborhood_attention(_GOOD, _GOOD, _GOOD, 3)
    monkeypatch.setenv("MEDFED_ATTENTION_BACKEND", "flex")
    monkeypatch.setattr(na_module, "_natten_package", lambda: None)
    with pytest.raises(AttentionBackendError, match="'flex'.* needs NATTEN"):
        neighborhood_attention(_GOOD, _GOOD, _GOOD, 3)
    monkeypatch.setattr(na_module, "_natten_package", lambda: types.SimpleNamespace())  # NATTEN without kernels
    with pytest.raises(AttentionBackendError, match="'flex'.* no backward on CPU") as caught:
        neighborhood_attention(*trainable, 3)
    assert isinstance(caught.value, MedfedError) and isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 10, "num_heads": 4}, "'dim' parameter of NeighborhoodAttention2D must be divisible by num_heads=4"),
        ({"dim": 8, "num_heads": 2, "kernel_size": 6}, "'kernel_size' parameter of NeighborhoodAttention2D"),
        ({"dim": 8, "num_heads": 2, "dilation": 0}, "'dilation' parameter of NeighborhoodAttention2D"),
        ({"dim": 8, "num_heads": 0}, "'num_heads' parameter"),
        ({"dim": 8, "num_heads": 2, "proj_drop": 1.0}, "'proj_drop' parameter"),
    ],
)
def test_module_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeighborhoodAttention2D(**kwargs)


def test_module_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"expects a \[B, H, W, 8\] input. Got shape \(1, 4, 4, 6\)"):
        NeighborhoodAttention2D(8, 2)(torch.zeros(1, 4, 4, 6))


@pytest.mark.parametrize(
    ("args", "match"),
    [((0, 4, 3, 1), "'height' parameter"), ((4, 4, 2, 1), "'kernel_size' parameter"), ((4, 4, 3, 0), "'dilation'")],
)
def test_clamp_window_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        clamp_window(*args)


def test_an_even_kernel_is_only_the_whole_axis():
    assert neighborhood_indices(2, 2).tolist() == [[0, 1], [0, 1]]
    with pytest.raises(ValueError, match="'kernel_size' parameter of neighborhood_indices must be an odd int"):
        neighborhood_indices(4, 2)


def test_indices_reject_window_larger_than_axis():
    with pytest.raises(ValueError, match=r"kernel_size \* dilation <= length. Got 3 \* 3 > 8"):
        neighborhood_indices(8, 3, 3)


# --------------------------------------------------------------------------------------
# NATTEN dispatch
# --------------------------------------------------------------------------------------


def test_cpu_tensors_never_use_natten_kernels():
    assert natten_kernel_backend(_GOOD, _GOOD, _GOOD) is None


def test_dispatch_calls_natten_when_kernels_accept(monkeypatch):
    # Prepare: pretend NATTEN's kernels accept the inputs and record the call.
    calls = []

    def fake_na2d(q, k, v, **kwargs):
        calls.append(kwargs)
        return torch.full_like(q, 5.0)

    monkeypatch.setattr(na_module, "natten_kernel_backend", lambda q, k, v: "cutlass-fna")
    monkeypatch.setattr(na_module, "_natten", lambda: types.SimpleNamespace(na2d=fake_na2d))
    query, key, value = _qkv((1, 7, 7, 1, 4), seed=0)

    # Execute
    dispatched = neighborhood_attention(query, key, value, 3, 2)
    single = neighborhood_attention(query, key, value, 1, 2)  # NATTEN rejects kernel 1
    forced_torch = neighborhood_attention(query, key, value, 3, 2, implementation="torch")

    # Assert
    assert calls == [{"kernel_size": (3, 3), "dilation": (2, 2), "backend": "cutlass-fna"}]
    assert torch.all(dispatched == 5.0)
    torch.testing.assert_close(single, value)
    torch.testing.assert_close(forced_torch, _dense_reference(query, key, value, 3, 2), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------
# CUDA (run only where a GPU is present)
# --------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
def test_cuda_torch_path_matches_cpu():
    # Prepare
    cpu_inputs = _qkv((2, 14, 12, 2, 16), seed=11, requires_grad=True)
    cuda_inputs = tuple(t.detach().cuda().requires_grad_(True) for t in cpu_inputs)

    # Execute
    cpu_out = neighborhood_attention(*cpu_inputs, 5, 2, implementation="torch")
    cuda_out = neighborhood_attention(*cuda_inputs, 5, 2, implementation="torch")
    cpu_out.pow(2).sum().backward()
    cuda_out.pow(2).sum().backward()

    # Assert
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, atol=1e-5, rtol=1e-5)
    for cpu_t, cuda_t in zip(cpu_inputs, cuda_inputs):
        torch.testing.assert_close(cuda_t.grad.cpu(), cpu_t.grad, atol=1e-4, rtol=1e-4)


@cuda_only
def test_cuda_natten_kernels_match_torch_path():
    # Prepare
    inputs = _qkv((2, 14, 12, 2, 32), seed=12, device="cuda", requires_grad=True)
    if natten_kernel_backend(*inputs) is None:
        pytest.skip("NATTEN was not built with CUDA kernels that accept these inputs")
    torch_inputs = tuple(t.detach().clone().requires_grad_(True) for t in inputs)

    # Execute
    natten_out = neighborhood_attention(*inputs, 5, 2, implementation="natten")
    torch_out = neighborhood_attention(*torch_inputs, 5, 2, implementation="torch")
    natten_out.pow(2).sum().backward()
    torch_out.pow(2).sum().backward()

    # Assert
    torch.testing.assert_close(natten_out, torch_out, atol=1e-4, rtol=1e-4)
    for natten_t, torch_t in zip(inputs, torch_inputs):
        torch.testing.assert_close(natten_t.grad, torch_t.grad, atol=1e-3, rtol=1e-3)
