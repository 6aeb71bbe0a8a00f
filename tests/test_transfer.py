"""How weights travel: packing (one array per message, bit for bit), lower precision (the
codec with hand-computed roundings) and a federation that sends bfloat16 (half the bytes,
weights close to the float32 run's)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from medfed.server.checkpoint import load_arrays
from medfed.simulation.local import run_local
from medfed.transfer import (
    PACKED_KEY,
    decode_arrays,
    encode_arrays,
    from_wire,
    numpy_arrays,
    numpy_from_wire,
    pack_arrays,
    to_wire,
    unpack_arrays,
)


def _record() -> ArrayRecord:
    return ArrayRecord({
        "w": Array(np.array([1.0, 1.0 + 2.0**-9, 1.0 + 3 * 2.0**-9, -2.5, 65504.0], dtype=np.float32)),
        "count": Array(np.array(7, dtype=np.int64)),
    })


def test_float16_halves_float_arrays_and_round_trips_representable_values():
    # Execute
    wire = encode_arrays(_record(), "float16")
    back = decode_arrays(wire)
    # Assert: all five values are float16 numbers (10-bit mantissa).
    assert wire["w"].dtype == "float16" and wire["count"].dtype == "int64"
    assert back["w"].dtype == "float32"
    np.testing.assert_array_equal(back["w"].numpy(), _record()["w"].numpy())
    assert back["count"].numpy() == 7


def test_bfloat16_rounds_to_nearest_even_with_7_mantissa_bits():
    # Execute
    wire = encode_arrays(_record(), "bfloat16")
    back = decode_arrays(wire)
    # Assert: the bfloat16 step at 1 is 2^-7, so 1 + 2^-9 (a quarter step) rounds down to 1
    # and 1 + 3 * 2^-9 (three quarters) up to 1 + 2^-7; 65504 = 2^16 - 32 rounds up to 2^16
    # (the step below 2^16 is 2^8).
    assert wire["w"].dtype == "bfloat16" and wire["w"].shape == (5,)
    expected = np.array([1.0, 1.0, 1.0 + 2.0**-7, -2.5, 65536.0], dtype=np.float32)
    np.testing.assert_array_equal(back["w"].numpy(), expected)
    assert len(wire["w"].data) < len(_record()["w"].data)


def test_float32_is_sent_as_is_and_unknown_dtypes_are_refused():
    record = _record()
    assert encode_arrays(record, "float32") is record
    assert decode_arrays(record) is record
    with pytest.raises(ValueError, match="'dtype' parameter of encode_arrays"):
        encode_arrays(record, "int8")


def test_packing_sends_one_array_and_gives_back_every_array_bit_for_bit():
    # Prepare: float32, int64 scalar, a 0-d and an empty array, a bfloat16 pattern array.
    record = ArrayRecord({
        **_record(), "empty": Array(np.zeros((0, 3), dtype=np.float32)),
        "scalar": Array(np.array(2.5, dtype=np.float64)),
    })
    # Execute
    wire = to_wire(record, "float32")
    back = from_wire(wire)
    half = from_wire(to_wire(record, "bfloat16"))
    # Assert
    assert list(wire.keys()) == [PACKED_KEY] and wire[PACKED_KEY].dtype == "uint8"
    assert list(back.keys()) == list(record.keys())
    for key, array in record.items():
        assert (back[key].dtype, back[key].shape, back[key].data) == (array.dtype, array.shape, array.data)
    assert half["w"].dtype == "float32" and half["count"].numpy() == 7
    plain = _record()
    assert unpack_arrays(plain) is plain  # a record that is not packed passes through


def test_the_packed_array_is_what_flower_itself_would_serialise():
    # pack_arrays writes the .npy bytes itself (one copy of the model, not three).
    packed = pack_arrays(_record())[PACKED_KEY]
    reference = Array(packed.numpy())
    assert (packed.dtype, packed.shape, packed.stype, packed.data) == (
        reference.dtype, reference.shape, reference.stype, reference.data)


def test_a_packed_array_of_another_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="Packed arrays are malformed.*expected 1-d uint8"):
        unpack_arrays(ArrayRecord({PACKED_KEY: Array(np.zeros((2, 3), dtype=np.float32))}))


@pytest.mark.parametrize("damage", [
    lambda blob: blob[:-3],                                   # truncated
    lambda blob: blob + b"xyz",                               # trailing bytes
    lambda blob: (10**9).to_bytes(8, "little") + blob[8:],    # manifest longer than the message
    lambda blob: blob[:8] + b"{" + blob[9:],                  # manifest not JSON
])
def test_damaged_packed_arrays_are_a_clear_error(damage):
    # Prepare
    blob = pack_arrays(_record())[PACKED_KEY].numpy().tobytes()
    damaged = ArrayRecord({PACKED_KEY: Array(np.frombuffer(damage(blob), dtype=np.uint8))})
    # Execute / Assert
    with pytest.raises(ValueError, match="Packed arrays are malformed"):
        unpack_arrays(damaged)


def _round_bytes(run_dir) -> list[int]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["bytes_sent"] + r["bytes_received"] for r in lines if r["event"] == "site" and r.get("phase") == "train"]


def test_a_bfloat16_federation_sends_half_the_bytes_and_ends_near_the_float32_weights(tiny_root, tiny_config, tmp_path):
    # Prepare
    full = run_local(tiny_config(tiny_root, tmp_path / "fp32", rounds=1))
    # Execute
    half = run_local(tiny_config(tiny_root, tmp_path / "bf16", rounds=1,
                                 federation={"num_sites": 3, "partition": "iid", "transfer_dtype": "bfloat16"}))
    # Assert
    full_bytes, half_bytes = _round_bytes(full), _round_bytes(half)
    assert len(full_bytes) == len(half_bytes) == 3
    assert all(0.45 < h / f < 0.55 for h, f in zip(half_bytes, full_bytes))
    full_weights, half_weights = load_arrays(full / "model.safetensors"), load_arrays(half / "model.safetensors")
    assert {k: v.dtype for k, v in half_weights.items()} == {k: v.dtype for k, v in full_weights.items()}
    differences = [np.abs(half_weights[k] - full_weights[k]).max() for k in full_weights
                   if full_weights[k].dtype == np.float32]
    assert 0 < max(differences) < 0.05


def test_the_server_packs_a_model_shared_by_its_messages_once(monkeypatch):
    # Prepare: three sites' messages carrying one RecordDict, as Flower's strategies send them.
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp

    import medfed.server.transfer as transfer_module
    from medfed.simulation.local import LocalGrid

    grid = transfer_module.TransferGrid(LocalGrid(ClientApp(), [{}, {}, {}], run_config={}), "float32")
    content = RecordDict({"arrays": _record(), "config": ConfigRecord({"server-round": 1})})
    messages = [Message(content, node, MessageType.TRAIN) for node in grid.get_node_ids()]
    calls = []
    monkeypatch.setattr(transfer_module, "to_wire", lambda record, dtype: calls.append(1) or to_wire(record, dtype))
    # Execute
    encoded = grid._encode(messages)
    # Assert: one pack, every message carries it, the strategy's record is untouched.
    assert len(calls) == 1
    assert all(list(m.content["arrays"].keys()) == [PACKED_KEY] for m in encoded)
    assert list(content["arrays"].keys()) == ["w", "count"]


def test_numpy_arrays_reads_what_array_numpy_reads_without_numpys_header_parser(monkeypatch):
    # np.load parses each .npy header as Python source: most of the in-process engine's
    # cost per round beyond training. The fast reader must give the same arrays.
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord

    from medfed.transfer import numpy_arrays

    record = ArrayRecord({
        "weight": Array(np.arange(12, dtype=np.float32).reshape(3, 4)),
        "fortran": Array(np.asfortranarray(np.arange(6.0).reshape(2, 3))),  # falls back to np.load
        "transposed": Array(torch.arange(6, dtype=torch.float32).reshape(2, 3).t()),  # Fortran order too
        "flag": Array(np.array(True)), "count": Array(np.array([1, 2], dtype=np.int64)),
        "empty": Array(np.zeros(0, np.uint8)), "scalar": Array(np.array(3.5, dtype=np.float32)),
    })
    expected = {key: array.numpy() for key, array in record.items()}
    loads = []
    original = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(1) or original(*a, **k))
    got = numpy_arrays(record)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert np.array_equal(got[key], value) and got[key].flags.writeable, key
    assert len(loads) == 2  # only the two Fortran-ordered arrays went through np.load


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_state_dict_travels_as_its_arraysrecord_would_and_arrives_as_the_same_arrays(dtype):
    # A site packs its state dict directly, and reads the global model straight from the
    # packed bytes; both must give what the ArrayRecord path gives, value for value.
    import torch

    state = {
        "conv": torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4).to(memory_format=torch.channels_last),
        "transposed": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),  # Fortran-ordered
        "strided": torch.arange(36, dtype=torch.float32).reshape(6, 6)[::2, 1:4],  # neither C nor Fortran
        "scalar": torch.tensor(1.0 + 2.0**-9),  # 0-d float32: stays 0-d in every dtype
        "count": torch.tensor(7), "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False]),
    }
    reference = numpy_arrays(from_wire(to_wire(ArrayRecord({k: Array(v.numpy()) for k, v in state.items()}), dtype)))
    # Execute
    wire = to_wire(state, dtype)
    direct, via_record = numpy_from_wire(wire), numpy_arrays(from_wire(wire))
    # Assert
    assert list(wire.keys()) == [PACKED_KEY]
    for got in (direct, via_record):
        assert list(got) == list(state)
        for key, value in reference.items():
            assert (got[key].dtype, got[key].shape) == (value.dtype, value.shape), key
            assert np.array_equal(got[key], value) and got[key].flags.writeable, key
    assert direct["scalar"].shape == () and direct["count"].dtype == np.int64
    if dtype == "float32":
        assert all(np.array_equal(direct[k], v.numpy()) for k, v in state.items())


def test_numpy_from_wire_reads_a_record_that_is_not_packed_and_widens_it():
    half = encode_arrays(_record(), "bfloat16")
    got = numpy_from_wire(half)
    assert got["w"].dtype == np.float32 and got["count"] == 7
    np.testing.assert_array_equal(got["w"], decode_arrays(half)["w"].numpy())
    with pytest.raises(ValueError, match="'dtype' parameter of to_wire"):
        to_wire({"w": np.zeros(2, np.float32)}, "int8")


def _packed(manifest: str, payload: bytes) -> ArrayRecord:
    text = manifest.encode()
    blob = len(text).to_bytes(8, "little") + text + payload
    return ArrayRecord({PACKED_KEY: Array(np.frombuffer(blob, dtype=np.uint8))})


_TWO = Array(np.zeros(2, np.float32)).data  # the .npy bytes of a (2,) float32 array


@pytest.mark.parametrize("manifest, payload", [
    ('[["a", "float32", [1e400], "numpy.ndarray", 0]]', b""),                  # a shape JSON cannot hold in an int
    ("[" * 100_000 + "]" * 100_000, b""),                                      # nesting deeper than Python recurses
    ('[["a", "float32", [1], "numpy.ndarray", 6]]', b"\x93NUMPY"),            # a header cut short
    ('[["a", "float32", [2], "numpy.ndarray", 0]]', b""),                      # no bytes at all
    (f'[["a", "float32", [2], "torch", {len(_TWO)}]]', _TWO),                  # another serialisation
    (f'[["a", "float32", [1099511627776, 1099511627776], "numpy.ndarray", {len(_TWO)}]]', _TWO),  # a huge shape
    (f'[["a", "float32", [-1], "numpy.ndarray", {len(_TWO)}]]', _TWO),         # a negative dimension
    (f'[["a", "float32", [1, 2], "numpy.ndarray", {len(_TWO)}]]', _TWO),       # another shape than its header's
    (f'[["a", "float64", [2], "numpy.ndarray", {len(_TWO)}]]', _TWO),          # too few bytes for its dtype
    (f'[["a", "object", [2], "numpy.ndarray", {len(_TWO)}]]', _TWO),           # objects would need pickle
])
def test_a_damaged_or_hostile_manifest_entry_is_a_clear_error_on_both_read_paths(manifest, payload):
    record = _packed(manifest, payload)
    with pytest.raises(ValueError, match="Packed arrays are malformed"):
        unpack_arrays(record)
    with pytest.raises(ValueError, match="Packed arrays are malformed"):
        numpy_from_wire(record)


def test_a_well_formed_handmade_entry_reads_back():
    # The same helper with a correct entry: the cases above fail for their damage alone.
    record = _packed(f'[["a", "float32", [2], "numpy.ndarray", {len(_TWO)}]]', _TWO)
    assert numpy_from_wire(record)["a"].tolist() == [0.0, 0.0]
    assert from_wire(record)["a"].shape == (2,)


def test_an_entry_with_bytes_beyond_its_npy_data_is_refused_even_when_the_manifest_counts_them():
    # Prepare: a packed state dict whose first entry gets 4 bytes more, with its declared size
    # raised to match: the manifest and the message agree, the header names the right shape,
    # so only the rule "exactly the .npy bytes of its shape and dtype" can refuse it.
    blob = to_wire({"w": np.arange(3, dtype=np.float32), "count": np.array(7, np.int64)},
                   "float32")[PACKED_KEY].numpy().tobytes()
    size = int.from_bytes(blob[:8], "little")
    manifest, payload = json.loads(blob[8:8 + size]), blob[8 + size:]
    first = manifest[0][4]
    manifest[0][4] += 4
    record = _packed(json.dumps(manifest), payload[:first] + b"\0\0\0\0" + payload[first:])
    # the same rebuild without the extra bytes reads back: the test fails for them alone
    manifest[0][4] -= 4
    assert numpy_from_wire(_packed(json.dumps(manifest), payload))["w"].tolist() == [0.0, 1.0, 2.0]

    # Execute / Assert
    with pytest.raises(ValueError, match="array 'w' does not hold the .npy bytes of a float32 array"):
        unpack_arrays(record)
    with pytest.raises(ValueError, match="array 'w' does not hold the .npy bytes of a float32 array"):
        numpy_from_wire(record)
