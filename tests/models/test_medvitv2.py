"""MedViTV2: every variant builds and runs; the small-input and dilation logic hold."""

import pytest
import torch

from medfed.models import MedViTV2, create_model, list_models
from medfed.models.kan import KANFeedForward, RSWAFBasis
from medfed.models.medvitv2 import GlobalFeaturePerception, LocalFeaturePerception, dilation_schedule


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_runs_on_a_small_input(name):
    model = create_model(name, num_classes=3, in_chans=1, img_size=32).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("img_size", [28, 32, 64, 128, 224])
@pytest.mark.parametrize("in_chans,num_classes", [(1, 2), (3, 14)])
def test_nano_accepts_medmnist_sizes_channels_and_class_counts(img_size, in_chans, num_classes):
    model = create_model("medvit_v2_nano", num_classes=num_classes, in_chans=in_chans, img_size=img_size).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, in_chans, img_size, img_size))
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
    side = max(2, -(-img_size // 32))  # ceil: stride 32 overall, odd maps pooled with ceil_mode; never below 2
    assert features.shape == (1, 128, side, side)
    assert pooled.shape == (1, 128)
    assert logits.shape == (1, num_classes)


def test_every_parameter_receives_a_gradient():
    # Prepare: the public code builds layers it never calls; this model must not.
    torch.manual_seed(0)
    model = create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=64)
    # Execute
    model(torch.randn(2, 1, 64, 64)).sum().backward()
    # Assert
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_dilation_schedule_at_224_follows_dinat():
    # Maps are 56, 28, 14, 7 px; local blocks alternate 1 and map // 7.
    assert dilation_schedule(224, (2, 2, 6, 1)) == [[1, 8], [1, 1], [1, 2, 1, 1, 2, 1], [1]]
    assert dilation_schedule(64, (2, 2, 3, 1)) == [[1, 2], [1, 1], [1, 1, 1], [1]]


def test_local_blocks_get_the_scheduled_dilation():
    model = create_model("medvit_v2_tiny", num_classes=2, img_size=224)
    stage1 = [b.attn.dilation for b in model.stages[0]]
    stage3 = [b.attn.dilation for b in model.stages[2] if isinstance(b, LocalFeaturePerception)]
    assert stage1 == [1, 8]
    assert stage3 == [1, 2, 1, 2]


def test_block_pattern_per_stage():
    model = create_model("medvit_v2_small", num_classes=2, img_size=224)
    kinds = [["L" if isinstance(b, LocalFeaturePerception) else "G" for b in s] for s in model.stages]
    assert kinds == [["L", "L"], ["L", "G"], ["L", "L", "G", "L", "L", "G"], ["G", "G"]]


def test_global_block_splits_channels_three_to_one():
    block = GlobalFeaturePerception(64, 128, stride=2, sr_ratio=4, head_dim=32)
    assert block.mhsa.q.in_features == 96
    assert block.mhca.body[0].in_channels == 32
    out = block(torch.randn(2, 64, 9, 9))
    assert out.shape == (2, 128, 5, 5)


def test_rswaf_basis_matches_its_formula():
    basis = RSWAFBasis(-2.0, 2.0, num_grids=5, width=1.0)  # grid -2..2 step 1
    x = torch.tensor([0.0, 0.5])
    expected = torch.stack([1 - torch.tanh(x - g) ** 2 for g in (-2.0, -1.0, 0.0, 1.0, 2.0)], dim=-1)
    assert torch.allclose(basis(x), expected)
    assert basis(torch.tensor([0.0]))[0, 2] == 1.0


def test_kan_feed_forward_acts_per_pixel_without_mixing_space():
    # A reshape instead of a permute would leak one pixel's channels into others.
    torch.manual_seed(0)
    kan = KANFeedForward([8, 16, 8])
    x = torch.randn(1, 8, 3, 4)
    y = kan(x)
    x2 = x.clone()
    x2[0, :, 1, 2] += 1.0
    changed = (kan(x2) - y).abs().sum(dim=1)[0] > 0
    assert changed[1, 2] and changed.sum() == 1


def test_create_model_rejects_unknown_names_and_bad_sizes():
    with pytest.raises(ValueError, match="Unknown model 'medvit_v3'"):
        create_model("medvit_v3", num_classes=2)
    with pytest.raises(ValueError, match="positive num_classes"):
        create_model("medvit_v2_nano", num_classes=0)


def test_stage_three_depth_must_repeat_its_pattern():
    with pytest.raises(ValueError, match="multiple of 3"):
        MedViTV2(depths=(1, 1, 4, 1))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"depths": (2, 0, 3, 1)}, r"depths must be >= 1. Got \[2, 0, 3, 1\]"),
    ({"depths": (2, 2, 3, 0)}, r"depths must be >= 1"),
    ({"drop_path_rate": 1.0}, r"drop_path_rate is a probability in \[0, 1\). Got 1.0"),
    ({"drop_path_rate": -0.1}, r"drop_path_rate is a probability"),
])
def test_empty_stages_and_a_certain_drop_are_refused_by_name(kwargs, match):
    # (2, 0, 3, 1) was an IndexError, (2, 2, 3, 0) failed only in forward, and drop_path_rate=1 gave NaN.
    with pytest.raises(ValueError, match=match):
        MedViTV2(**kwargs)


def _collapsed_weights(name: str, img_size: int, in_chans: int) -> list[str]:
    """Weight tensors whose gradient norm is below 1e-5 of the median (fused q/k/v split)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=in_chans, img_size=img_size, drop_path_rate=0.0)
    x, y = torch.randn(4, in_chans, img_size, img_size), torch.randint(0, 3, (4,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    norms = {}
    for n, p in model.named_parameters():
        if p.dim() < 2:
            continue
        parts = 3 if n.endswith("qkv.weight") else 2 if n.endswith(".kv.weight") else 1
        for i, g in enumerate(p.grad.chunk(parts, dim=0)):
            norms[f"{n}[{i}]"] = g.norm().item()
    median = torch.tensor(list(norms.values())).median().item()
    return [n for n, v in norms.items() if v < 1e-5 * median]


@pytest.mark.parametrize("name", ["medvit_v2_nano", "medvit_v2_tiny"])
@pytest.mark.parametrize("img_size", [28, 64])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_no_attention_weight_is_starved_of_gradient_at_small_inputs(name, img_size, in_chans):
    # Before the fix, at 28 px the global blocks pooled keys to a single one and the
    # stage-3 local blocks shrank to kernel 1: their query/key weights got ~1e-16 of
    # the median gradient (10 tensors in nano, 16 in tiny).
    assert _collapsed_weights(name, img_size, in_chans) == []


def test_feature_maps_stop_at_two_by_two():
    model = create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=28).eval()
    sizes, x = [], model.stem(torch.randn(1, 1, 28, 28))
    for stage in model.stages:
        x = stage(x)
        sizes.append(x.shape[-1])
    assert sizes == [7, 4, 2, 2]


def test_keys_and_values_are_pooled_only_down_to_about_seven_by_seven():
    from medfed.models.medvitv2 import kv_reduction

    assert [kv_reduction(r, s) for r, s in zip((8, 4, 2, 1), (56, 28, 14, 7))] == [8, 4, 2, 1]  # the paper at 224 px
    assert [kv_reduction(r, s) for r, s in zip((8, 4, 2, 1), (16, 8, 4, 2))] == [2, 1, 1, 1]  # 64 px
    assert [kv_reduction(r, s) for r, s in zip((8, 4, 2, 1), (7, 4, 2, 2))] == [1, 1, 1, 1]  # 28 px
    model = create_model("medvit_v2_tiny", num_classes=2, img_size=64)
    global_ratios = [b.mhsa.sr_ratio for s in model.stages for b in s if isinstance(b, GlobalFeaturePerception)]
    assert global_ratios == [1, 1, 1, 1]  # stage 1 has no global block; stages 2-4 maps 8, 4, 2


def test_a_window_covering_the_map_is_full_attention():
    # NATTEN's semantics: a window as large as the map lets every query see every key.
    from medfed.models.neighborhood_attention import NeighborhoodAttention2D

    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=7).eval()
    x = torch.randn(2, 3, 3, 8)
    q, k, v = attn.qkv(x).reshape(2, 9, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # scale 1/sqrt(4)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 3, 3, 8))
    assert torch.allclose(attn(x), expected, atol=1e-6)
