"""Tests for medfed._io.json_text: the standard JSON every run output is written in."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed._io import json_text


def test_non_finite_numbers_become_null_at_any_depth_and_numpy_values_become_json() -> None:
    value = {"auc": math.nan, "loss": np.float32("inf"), "per_group": [{"acc": -math.inf}],
             "confusion": np.array([[1, 2], [3, 4]], dtype=np.int64), "hist": np.array([0.5, np.nan]),
             "count": np.int64(7), "flag": np.bool_(True), "pair": (1, None), "path": Path("runs/a")}

    text = json_text(value, indent=2)

    def refuse(constant: str) -> None:  # as JavaScript's JSON.parse does
        raise ValueError(constant)
    assert json.loads(text, parse_constant=refuse) == {
        "auc": None, "loss": None, "per_group": [{"acc": None}], "confusion": [[1, 2], [3, 4]],
        "hist": [0.5, None], "count": 7, "flag": True, "pair": [1, None], "path": "runs/a",
    }


def test_a_value_without_a_json_form_is_a_type_error_naming_its_type() -> None:
    with pytest.raises(TypeError, match="Tensor is not JSON serialisable"):
        json_text({"weights": torch.zeros(2)})
