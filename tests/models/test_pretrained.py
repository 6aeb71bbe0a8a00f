"""model.init_from: loading a medfed checkpoint into a freshly built model."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from medfed.models import create_model
from medfed.models.pretrained import PretrainedError, load_pretrained


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
    with pytest.raises(PretrainedError, match="does not fit this model: it has 'head.weight'"):
        load_pretrained(model, tmp_path / "model.safetensors")
