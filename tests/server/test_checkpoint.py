"""Tests for medfed.server.checkpoint: bit-exact round trips, atomic writes, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from medfed import _io as io_module
from medfed.server import checkpoint as checkpoint_module
from medfed.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_round,
    load_arrays,
    load_checkpoint,
    save_arrays,
    save_checkpoint,
)


def _model_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "stem.conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "head.bias": rng.standard_normal(5),  # float64
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),  # 0-d
        # Non-contiguous input (a transposed view).
        "proj.weight": rng.standard_normal((3, 6)).astype(np.float32).T,
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _assert_same_arrays(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert actual[key].shape == value.shape, key
        # Compare the raw bytes: bit-exact, NaN payloads and signed zeros included.
        assert np.ascontiguousarray(actual[key]).tobytes() == np.ascontiguousarray(value).tobytes(), key


def _save_example(path: Path, server_round: int = 3) -> tuple[dict, dict, dict]:
    arrays = _model_arrays()
    strategy_state = {"m_t.0": np.full((2, 2), -0.0), "v_t.0": np.array([np.nan, np.inf, 1e-300])}
    state = {"rng": {"state": 2**100 + 5, "pos": 3}, "history": [{"round": 1, "acc": 0.1 + 0.2}], "none": None}
    save_checkpoint(path, server_round=server_round, arrays=arrays, strategy_state=strategy_state, state=state)
    return arrays, strategy_state, state


def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "checkpoint.safetensors"
    arrays, strategy_state, state = _save_example(path)

    # Execute
    loaded = load_checkpoint(path)

    # Assert
    assert isinstance(loaded, Checkpoint)
    assert loaded.server_round == 3
    _assert_same_arrays(loaded.arrays, arrays)
    _assert_same_arrays(loaded.strategy_state, strategy_state)
    assert loaded.state == state
    assert loaded.state["history"][0]["acc"] == 0.1 + 0.2  # floats survive JSON exactly
    assert not list(tmp_path.glob(".*.tmp"))
    assert checkpoint_round(path) == 3  # from the metadata alone


def test_checkpoint_round_names_a_damaged_checkpoint_as_loading_does(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    _save_example(path)
    path.write_bytes(path.read_bytes()[:12])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint_round(path)


def test_checkpoint_with_empty_strategy_state(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "checkpoint.safetensors"
    arrays = {"w": np.arange(3, dtype=np.float32)}

    # Execute
    save_checkpoint(path, server_round=0, arrays=arrays, strategy_state={}, state={})
    loaded = load_checkpoint(path)

    # Assert
    assert loaded.server_round == 0
    assert loaded.strategy_state == {}
    assert loaded.state == {}
    _assert_same_arrays(loaded.arrays, arrays)


def test_overwrite_replaces_previous_checkpoint(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "checkpoint.safetensors"
    _save_example(path, server_round=1)

    # Execute
    save_checkpoint(path, server_round=2, arrays={"w": np.ones(2)}, strategy_state={}, state={"k": 1})

    # Assert
    loaded = load_checkpoint(path)
    assert loaded.server_round == 2
    assert list(loaded.arrays) == ["w"]
    assert loaded.state == {"k": 1}


def test_failed_write_keeps_old_checkpoint_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a good checkpoint, then a writer that dies half-way through the new file.
    path = tmp_path / "checkpoint.safetensors"
    arrays, _, _ = _save_example(path, server_round=4)
    old_bytes = path.read_bytes()

    def dying_fsync(descriptor):
        os.ftruncate(descriptor, 20)  # leave a truncated temporary file behind, as a crash would
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(io_module.os, "fsync", dying_fsync)

    # Execute
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, server_round=5, arrays={"w": np.ones(3)}, strategy_state={}, state={})

    # Assert
    assert path.read_bytes() == old_bytes
    assert load_checkpoint(path).server_round == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]


def test_failed_replace_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    path = tmp_path / "model.safetensors"
    save_arrays(path, {"w": np.zeros(2)})

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.os, "replace", failing_replace)

    # Execute
    with pytest.raises(OSError, match="disk full"):
        save_arrays(path, {"w": np.ones(2)})

    # Assert
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    np.testing.assert_array_equal(load_arrays(path)["w"], np.zeros(2))


def test_missing_checkpoint_error_names_path(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "nope" / "checkpoint.safetensors"

    # Execute / Assert
    with pytest.raises(CheckpointError, match=r"^No checkpoint at .*nope.checkpoint\.safetensors: "):
        load_checkpoint(path)


@pytest.mark.parametrize("keep_bytes", [0, 5, 12, -3])
def test_truncated_checkpoint_error(tmp_path: Path, keep_bytes: int) -> None:
    # Prepare
    path = tmp_path / "checkpoint.safetensors"
    _save_example(path)
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])

    # Execute / Assert
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "truncated or corrupt" in message
    assert "restore it from a backup, or start the run afresh in a new folder" in message


def test_garbage_file_error(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"\xff" * 64)

    # Execute / Assert
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_wrong_format_version_error(tmp_path: Path) -> None:
    # Prepare: a file that claims a future format version.
    path = tmp_path / "checkpoint.safetensors"
    metadata = {"format": "medfed.checkpoint", "format_version": "99", "server_round": "1", "state": "{}"}
    save_file({"model/w": np.zeros(2)}, str(path), metadata=metadata)

    # Execute / Assert
    with pytest.raises(CheckpointError, match=r"format version '99'.*reads version 1"):
        load_checkpoint(path)


def test_model_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "model.safetensors"
    save_arrays(path, {"w": np.zeros(2)})

    # Execute / Assert
    with pytest.raises(CheckpointError, match="not a medfed checkpoint"):
        load_checkpoint(path)


def test_damaged_state_metadata_error(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "checkpoint.safetensors"
    metadata = {"format": "medfed.checkpoint", "format_version": "1", "server_round": "1", "state": "{not json"}
    save_file({"model/w": np.zeros(2)}, str(path), metadata=metadata)

    # Execute / Assert
    with pytest.raises(CheckpointError, match="damaged metadata"):
        load_checkpoint(path)


@pytest.mark.parametrize("server_round", [-1, 1.5, True, "2"])
def test_invalid_server_round(tmp_path: Path, server_round) -> None:
    with pytest.raises(CheckpointError, match="'server_round' .* must be an int >= 0"):
        save_checkpoint(
            tmp_path / "c.safetensors", server_round=server_round, arrays={}, strategy_state={}, state={}
        )
    assert not list(tmp_path.iterdir())


def test_state_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        save_checkpoint(
            tmp_path / "c.safetensors", server_round=1, arrays={}, strategy_state={}, state={"a": {1, 2}}
        )
    assert not list(tmp_path.iterdir())


def test_state_is_standard_json_with_nan_as_null(tmp_path: Path) -> None:
    # Prepare: a diverged round's loss in the metrics history.
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, server_round=1, arrays={}, strategy_state={},
                    state={"history": [{"round": 1, "loss": float("nan"), "acc": 0.5}]})
    # Execute
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        text = handle.metadata()["state"]
    # Assert: a reader that refuses NaN (JavaScript's JSON.parse, R's jsonlite) reads it.
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the state")) == {
        "history": [{"round": 1, "loss": None, "acc": 0.5}]}
    assert load_checkpoint(path).state["history"][0]["loss"] is None


def test_unstorable_dtype_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"Array 'names' .* dtype <U1"):
        save_arrays(tmp_path / "m.safetensors", {"names": np.array(["a", "b"])})
    assert not list(tmp_path.iterdir())


def test_save_arrays_round_trip_with_plain_keys(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "model.safetensors"
    arrays = _model_arrays()
    arrays["big_endian"] = np.arange(4, dtype=">f4")

    # Execute
    save_arrays(path, arrays)
    loaded = load_arrays(path)

    # Assert: keys are stored unprefixed; values equal (big-endian comes back native).
    assert sorted(loaded) == sorted(arrays)
    np.testing.assert_array_equal(loaded["big_endian"], np.arange(4, dtype=np.float32))
    assert loaded["big_endian"].dtype == np.dtype("<f4")
    del arrays["big_endian"], loaded["big_endian"]
    _assert_same_arrays(loaded, arrays)
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_length])
    assert "stem.conv.weight" in header


def test_load_arrays_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"^No model file at "):
        load_arrays(tmp_path / "model.safetensors")


def test_written_files_get_the_mode_open_would_give_them(tmp_path: Path) -> None:
    # mkstemp's private 0600 kept colleagues on a shared server from reading a run's model.
    import os

    from medfed._io import write_bytes_atomic

    previous = os.umask(0o027)
    try:
        write_bytes_atomic(tmp_path / "model.safetensors", b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o640


def _flip_one_bit_in_the_arrays(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    data[8 + header_length + 5] ^= 0x01  # a bit of the first stored array, layout untouched
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_weights_is_refused_not_loaded(tmp_path: Path) -> None:
    # Prepare: a checkpoint and a model file, each with one bit of its arrays flipped
    # (a failing disk): safetensors' own checks see a well-formed file.
    checkpoint_path, model_path = tmp_path / "checkpoint.safetensors", tmp_path / "model.safetensors"
    _save_example(checkpoint_path, server_round=4)
    save_arrays(model_path, _model_arrays())
    for path in (checkpoint_path, model_path):
        _flip_one_bit_in_the_arrays(path)

    # Execute / Assert
    with pytest.raises(CheckpointError, match=r"checkpoint .* is damaged: its arrays no longer match the checksum"):
        load_checkpoint(checkpoint_path)
    with pytest.raises(CheckpointError, match=r"model file .* is damaged: .*restore it from a backup"):
        load_arrays(model_path)
    assert checkpoint_round(checkpoint_path) == 4  # the header alone is intact and still readable


def test_files_without_a_checksum_still_load(tmp_path: Path) -> None:
    # Written before checksums existed, or by another safetensors tool.
    path = tmp_path / "model.safetensors"
    save_file({"w": np.arange(3, dtype=np.float32)}, str(path), metadata={"sha256": "another tool's, of the file"})
    np.testing.assert_array_equal(load_arrays(path)["w"], np.arange(3, dtype=np.float32))


def test_the_checksum_tells_a_0d_array_from_a_1_element_one():
    assert checkpoint_module._arrays_digest({"x": np.array(1.0)}) != checkpoint_module._arrays_digest(
        {"x": np.array([1.0])})
