"""Tests for medfed._io: the standard JSON every run output is written in, output folder checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed._io import OutputFolderError, check_output_folder, json_text


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


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("a" * 300 + "/run", "the name " + "a" * 27 + "... is 300 bytes long, and its file system allows 255"),
        # Under a folder that does not exist yet, every lookup answers "no such file" first.
        ("missing/" + "b" * 256, "the name " + "b" * 27 + "... is 256 bytes long, and its file system allows 255"),
        ("/".join(["c" * 200] * 25), "its path is "),
    ],
)
def test_an_output_folder_name_too_long_for_the_file_system_is_one_line(
    tmp_path: Path, relative: str, message: str
) -> None:
    folder = tmp_path / relative

    with pytest.raises(OutputFolderError) as info:
        check_output_folder(folder, "output_dir")

    text = str(info.value)
    assert text.startswith(f"The output folder {str(folder)[:97]}... cannot be made: {message}")
    assert text.endswith("; give a shorter one (output_dir).") and "\n" not in text


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write_of_that_file(tmp_path) -> None:
    # SIGKILL mid-write left .checkpoint.safetensors.x.tmp (2.7 MB) for good.
    import os
    import time

    from medfed._io import STALE_TEMPORARY_S, write_bytes_atomic

    stale = tmp_path / ".checkpoint.safetensors.abc123.tmp"
    live = tmp_path / ".checkpoint.safetensors.def456.tmp"  # a writer at work now
    other = tmp_path / ".model.safetensors.abc123.tmp"  # another file's: not this write's business
    for leftover in (stale, live, other):
        leftover.write_bytes(b"half")
    old = time.time() - STALE_TEMPORARY_S - 5
    for leftover in (stale, other):
        os.utime(leftover, (old, old))
    write_bytes_atomic(tmp_path / "checkpoint.safetensors", b"whole")
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == b"whole"
    assert not stale.exists() and live.exists() and other.exists()
