"""model.init_from: loading a medfed checkpoint into a freshly built model."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from medfed.models import create_model
from medfed.models.pretrained import PretrainedError, load_pretrained, state_dict_misfit


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_loads_a_run_folders_model_including_counters_stored_with_shape_1(tmp_path):
    # Prepare: a federated run's model.safetensors stores 0-d counters as shape (1,).
    torch.manual_seed(0)
    source = create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=28)
    arrays = {k: (v.reshape(1) if v.ndim == 0 else v) for k, v in _state(source).items()}
    save_file(arrays, str(tmp_path / "model.safetensors"))
    torch.manual_seed(1)
    target = create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=28)
    # Execute
    load_pretrained(target, tmp_path)  # the run folder
    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(_state(target).values(), _state(source).values()))


def test_a_missing_or_unfitting_checkpoint_is_a_one_line_error(tmp_path):
    model = create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=28)
    with pytest.raises(PretrainedError, match="no checkpoint at"):
        load_pretrained(model, tmp_path)
    other = create_model("medvit_v2_nano", num_classes=3, in_chans=1, img_size=28)
    save_file(_state(other), str(tmp_path / "model.safetensors"))
    with pytest.raises(PretrainedError, match="do not fit this model: their 'head.weight' has shape"):
        load_pretrained(model, tmp_path / "model.safetensors")


def test_state_dict_misfit_names_the_first_missing_unexpected_or_reshaped_key():
    own = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "n": torch.zeros((), dtype=torch.long)}
    stored_by_a_run = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "n": torch.zeros(1)}  # (1,) for 0-d
    assert state_dict_misfit(own, stored_by_a_run) is None
    assert state_dict_misfit(own, {"a": torch.zeros(2, 3)}) == "they lack 'b' and 1 more"
    assert state_dict_misfit(own, {**own, "c": torch.zeros(1)}) == "they hold 'c', which the model has not"
    assert state_dict_misfit(own, {**own, "a": torch.zeros(3, 3)}) == "their 'a' has shape (3, 3), the model's (2, 3)"
