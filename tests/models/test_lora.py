"""FairLoRA's group adapters: soft group weights, the initial S and the forward formula."""

import pytest
import torch
from torch import nn

from medfed.models import create_model
from medfed.models.lora import GroupLoRA, GroupLoRAModel, group_weights, initial_singular_values


def test_group_weights_put_0_7_on_the_own_group_and_spread_the_rest():
    pi = group_weights(torch.tensor([0, 2, -1]), num_groups=3)
    expected = torch.tensor([[0.7, 0.15, 0.15], [0.15, 0.15, 0.7], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(pi, expected)
    torch.testing.assert_close(group_weights(torch.tensor([0, -1]), num_groups=1), torch.ones(2, 1))
    with pytest.raises(ValueError, match="out of range for 2 groups"):
        group_weights(torch.tensor([2]), num_groups=2)


def test_initial_singular_values_share_the_first_half_and_shift_the_second():
    S = initial_singular_values(num_groups=2, rank=4)
    torch.testing.assert_close(S[:, :2], torch.tensor([[0.5, 0.1], [0.5, 0.1]]))
    torch.testing.assert_close(S[:, 2:], torch.tensor([[0.1, 0.02], [0.02, 0.1]]))


def test_adapter_output_is_x_A_diag_piS_B_times_alpha_over_r():
    # Prepare
    torch.manual_seed(0)
    adapter = GroupLoRA(in_features=3, out_features=2, rank=2, num_groups=2, alpha=4.0)
    with torch.no_grad():
        adapter.A.copy_(torch.randn(3, 2))
    x = torch.randn(2, 5, 3)  # batch of 2, 5 tokens
    pi = torch.tensor([[0.7, 0.3], [0.3, 0.7]])
    # Execute
    out = adapter(x, pi)
    # Assert: per sample n, Delta W_n = A diag(pi_n^T S) B * alpha / r.
    for n in range(2):
        delta_w = adapter.A @ torch.diag(pi[n] @ adapter.S) @ adapter.B * (4.0 / 2)
        torch.testing.assert_close(out[n], x[n] @ delta_w)


def test_model_with_zero_A_matches_the_backbone_and_trains_only_adapters_and_head():
    # Prepare
    torch.manual_seed(0)
    backbone = create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=28).eval()
    images = torch.randn(2, 1, 28, 28)
    expected = backbone(images)
    # Execute
    model = GroupLoRAModel(backbone, num_groups=2, rank=4)
    model.train()
    out = model(images, torch.tensor([0, 1]))
    # Assert: A starts at 0, so the adapted model starts as the backbone.
    torch.testing.assert_close(out, expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.") or n.startswith("backbone.head.") for n in trainable)
    kan = [k for k in model.adapters if "kan" in k]
    attention = [k for k in model.adapters if k.endswith(("qkv", "proj", "__q", "kv"))]
    assert kan and attention and "head" not in model.adapters
    assert not model.backbone.training  # frozen BatchNorm keeps its statistics


def test_adapters_change_the_output_per_group_once_trained():
    # Prepare
    torch.manual_seed(0)
    # (rank 4: with rank 2 both halves of S have one entry, the same for every group.)
    model = GroupLoRAModel(nn.Sequential(nn.Linear(4, 2)), num_groups=2, rank=4, trainable=())
    for adapter in model.adapters.values():
        nn.init.normal_(adapter.A)
    x = torch.randn(1, 4)
    # Execute
    group_0, group_1 = model(x, torch.tensor([0])), model(x, torch.tensor([1]))
    # Assert
    assert not torch.allclose(group_0, group_1)
    with pytest.raises(RuntimeError, match="not its backbone directly"):
        model.backbone(x)
