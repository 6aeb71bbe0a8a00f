"""How weights travel: packed into one array, optionally in lower precision.

**Packing.** Flower 1.42 sends every :class:`~flwr.app.Array` of a message as its own
object (plus one object per 5 MB chunk), and its SuperLink handles each object in a
separate request with its own database writes, run-status check and (with node
authentication) signature check. A MedViTV2 state dict has hundreds of arrays, so a
round moved thousands of small objects and spent about a minute in that bookkeeping on
a 2-core machine for 1.4 M parameters. :func:`to_wire` therefore packs a record's
arrays into a single uint8 array (a JSON manifest of names, dtypes, shapes and byte
counts, then the arrays' serialized bytes, back to back); :func:`from_wire` unpacks it,
bit for bit. A record that is not packed passes through unchanged.

**Lower precision** (``federation.transfer_dtype``).

The server's global model and every site's model stay float32; only the float32 arrays
of a message travel as float16 or bfloat16 (half the bytes) and are widened back to
float32 on arrival. Other arrays (BatchNorm's int64 ``num_batches_tracked``, ...)
travel unchanged. Rounding is to nearest (torch's ``Tensor.to``). Flower's ``Array``
serialises NumPy arrays, and NumPy has no bfloat16: a bfloat16 array travels as its
16-bit patterns (a uint16 ``.npy`` payload) under the dtype name ``"bfloat16"``.

The ServerApp wraps its Grid (:class:`medfed.server.transfer.TransferGrid`); the
ClientApp decodes what it receives and encodes what it sends.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

__all__ = ["PACKED_KEY", "TRANSFER_DTYPES", "decode_arrays", "encode_arrays", "from_wire", "numpy_arrays",
           "numpy_from_wire", "pack_arrays", "to_wire", "unpack_arrays"]

#: The values of ``federation.transfer_dtype``.
TRANSFER_DTYPES = ("float32", "float16", "bfloat16")
_BFLOAT16 = "bfloat16"


def _narrow(values: np.ndarray, dtype: str) -> tuple[str, np.ndarray]:
    """A float32 array in the transfer ``dtype``: (dtype name on the wire, payload array)."""
    if values.dtype != np.float32 or dtype == "float32":
        return str(values.dtype), values
    tensor = torch.from_numpy(np.asarray(values, order="C"))
    if dtype == "float16":
        return "float16", tensor.to(torch.float16).numpy()
    return _BFLOAT16, tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _widen(values: np.ndarray, dtype: str) -> np.ndarray:
    """The inverse of :func:`_narrow`: a float16 or bfloat16 payload as float32."""
    if dtype == "float16":
        return values.astype(np.float32)
    if dtype == _BFLOAT16:
        return torch.from_numpy(np.asarray(values, order="C").view(np.int16)).view(torch.bfloat16).float().numpy()
    return values


def _encode(array: Array, dtype: str) -> Array:
    if array.dtype != "float32":
        return array
    name, payload = _narrow(_numpy(array), dtype)
    encoded = Array(payload)
    return encoded if name == encoded.dtype else Array(dtype=name, shape=encoded.shape, stype=encoded.stype,
                                                       data=encoded.data)


def _decode(array: Array) -> Array:
    if array.dtype not in ("float16", _BFLOAT16):
        return array
    return Array(_widen(_numpy(array), array.dtype))


def encode_arrays(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """``record`` with its float32 arrays in ``dtype`` for the wire (``record`` itself for float32).

    Parameters
    ----------
    record : ArrayRecord
        Arrays about to be sent.
    dtype : {"float32", "float16", "bfloat16"}
        The transfer dtype.

    Returns
    -------
    ArrayRecord
        A new record (same keys, same order), or ``record`` when ``dtype`` is float32.
    """
    _check_dtype(dtype, "encode_arrays")
    if dtype == "float32":
        return record
    return ArrayRecord({key: _encode(array, dtype) for key, array in record.items()})


def decode_arrays(record: ArrayRecord) -> ArrayRecord:
    """``record`` with float16 and bfloat16 arrays widened to float32 (``record`` itself when none are)."""
    if not any(array.dtype in ("float16", _BFLOAT16) for array in record.values()):
        return record
    return ArrayRecord({key: _decode(array) for key, array in record.items()})


def _check_dtype(dtype: str, caller: str) -> None:
    if dtype not in TRANSFER_DTYPES:
        raise ValueError(f"The 'dtype' parameter of {caller} must be one of {TRANSFER_DTYPES}. Got {dtype!r}.")


#: The single key of a packed ArrayRecord.
PACKED_KEY = "medfed.packed-arrays"
_LENGTH_BYTES = 8  # little-endian uint64: the manifest's length


def pack_arrays(record: ArrayRecord) -> ArrayRecord:
    """``record``'s arrays as one uint8 array under :data:`PACKED_KEY` (lossless).

    Layout: the manifest's byte length (uint64, little-endian), the manifest (JSON: a list
    of ``[name, dtype, shape, stype, nbytes]`` in the record's order), then each array's
    serialized bytes (``Array.data``) in that order.
    """
    return _pack([(key, a.dtype, list(a.shape), a.stype, [a.data]) for key, a in record.items()])


def _pack(entries: list[tuple[str, str, list[int], str, list]]) -> ArrayRecord:
    """Pack ``(name, dtype, shape, stype, [byte chunks])`` entries (see :func:`pack_arrays`)."""
    manifest = json.dumps([[key, dtype, shape, stype, sum(memoryview(c).nbytes for c in chunks)]
                           for key, dtype, shape, stype, chunks in entries]).encode()
    parts = [len(manifest).to_bytes(_LENGTH_BYTES, "little"), manifest,
             *(chunk for *_, chunks in entries for chunk in chunks)]
    size = sum(memoryview(part).nbytes for part in parts)
    # The .npy bytes that Array(np.frombuffer(blob, np.uint8)) would hold, joined in one
    # copy: going through NumPy would copy the whole model twice more (a model of
    # medvit_v2_large is 426 MB).
    npy_header = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy_header, {"descr": "|u1", "fortran_order": False, "shape": (size,)})
    data = b"".join([npy_header.getvalue(), *parts])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(size,), stype=SType.NUMPY, data=data)})


def _manifest(record: ArrayRecord) -> list[tuple[str, str, tuple[int, ...], str, memoryview]]:
    """The ``(name, dtype, shape, stype, serialized bytes)`` of each array that :func:`_pack` packed.

    Raises
    ------
    ValueError
        If the packed bytes do not hold a well-formed manifest and exactly the bytes it lists.
    """
    outer = record[PACKED_KEY]
    # A view of the message's own bytes: np.load (Array.numpy) would copy the whole model.
    packed = _npy_values(outer.dtype, outer.shape, outer.stype, outer.data, copy=False)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"Packed arrays are malformed (a {packed.dtype} array of shape {packed.shape}, "
                         "expected 1-d uint8).")
    blob = memoryview(packed)
    try:
        size = int.from_bytes(blob[:_LENGTH_BYTES], "little")
        entries, offset = [], _LENGTH_BYTES + size
        for key, dtype, shape, stype, nbytes in json.loads(bytes(blob[_LENGTH_BYTES:offset])):
            if not (isinstance(nbytes, int) and 0 <= nbytes <= len(blob) - offset):
                raise ValueError(f"array {key!r} claims {nbytes} bytes, {len(blob) - offset} are left")
            entry = (str(key), str(dtype), tuple(shape), str(stype), blob[offset:offset + nbytes])
            _check_npy(*entry)
            entries.append(entry)
            offset += nbytes
    # JSONDecodeError is a ValueError; a manifest of huge numbers or deep nesting raises the last two.
    except (ValueError, TypeError, UnicodeDecodeError, OverflowError, RecursionError) as error:
        raise ValueError(f"Packed arrays are malformed ({error}); the sender is not a medfed site of this "
                         "version, or the message was damaged.") from None
    if offset != len(blob):
        raise ValueError(f"Packed arrays are malformed ({len(blob) - offset} bytes after the last array).")
    return entries


def _check_npy(key: str, dtype_name: str, shape: tuple, stype: str, data: memoryview) -> None:
    """Raise ValueError unless ``data`` is the ``.npy`` serialisation of a ``shape`` array of
    ``dtype_name``: a sender's damaged or hostile entry stops here, not in the maths later."""
    if stype != SType.NUMPY:
        raise ValueError(f"array {key!r} is serialised as {stype!r}, not as a NumPy array")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"array {key!r} has the shape {list(shape)}")
    dtype = np.dtype(_payload_dtype(dtype_name))  # TypeError for a name NumPy does not know
    layout = _npy_layout(data)
    if layout is None or not _holds(data, layout, dtype, shape):
        raise ValueError(f"array {key!r} does not hold the .npy bytes of a {dtype_name} array of shape {shape}")


def _is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED_KEY]


def unpack_arrays(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord that :func:`pack_arrays` packed (``record`` itself when it is not packed).

    Raises
    ------
    ValueError
        If the packed bytes do not hold a well-formed manifest and exactly the bytes it lists.
    """
    if not _is_packed(record):
        return record
    unpacked = ArrayRecord()  # filled item by item: ArrayRecord(dict) would build every Array again
    for key, dtype, shape, stype, data in _manifest(record):
        unpacked[key] = Array(dtype=dtype, shape=shape, stype=stype, data=bytes(data))
    return unpacked


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{key: array.numpy()}`` of ``record``, read without NumPy's ``.npy`` header parser.

    ``Array.numpy()`` is ``np.load``, which reads each array's header as Python source
    (``ast.literal_eval``: about 40 us an array). A model has hundreds of arrays, and the
    server and every site convert each message's record more than once: that was most
    of the in-process engine's cost per round beyond training. Bytes that this reader
    does not know for certain (Fortran order, a dtype or shape other than the Array's
    own, no ``.npy`` header of version 1-3) go through ``Array.numpy()``. Each array is a
    writable copy, as from ``np.load``.
    """
    return {key: _numpy(array) for key, array in record.items()}


_NPY_MAGIC = b"\x93NUMPY"


def _numpy(array: Array) -> np.ndarray:
    return _npy_values(array.dtype, array.shape, array.stype, array.data)


def _payload_dtype(dtype_name: str) -> str:
    return "<u2" if dtype_name == _BFLOAT16 else dtype_name  # bfloat16 travels as its bit patterns


def _npy_layout(data: memoryview) -> tuple[int, bytes] | None:
    """(offset of the values, header text) of ``.npy`` bytes; None when they are not ``.npy``."""
    if len(data) < 10 or data[:6] != _NPY_MAGIC or data[6] not in (1, 2, 3):
        return None
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    return (end, bytes(data[start:end])) if end <= len(data) else None


def _holds(data: memoryview, layout: tuple[int, bytes], dtype: np.dtype, shape: tuple[int, ...]) -> bool:
    """Whether ``.npy`` bytes with this ``layout`` (:func:`_npy_layout`) hold exactly a
    ``shape`` array of ``dtype``: the shape their header names, the bytes it takes."""
    return (not dtype.hasobject and f"'shape': {shape!r}".encode() in layout[1]
            and len(data) - layout[0] == math.prod(shape) * dtype.itemsize)


def _npy_values(dtype_name: str, shape: tuple[int, ...], stype: str, data: bytes | memoryview, *,
                copy: bool = True) -> np.ndarray:
    """The array that the ``.npy`` bytes ``data`` of an Array with these fields hold: a
    writable copy, or with ``copy=False`` a read-only view of ``data`` where it can be."""
    data = memoryview(data)
    layout = _npy_layout(data) if stype == SType.NUMPY else None
    try:
        dtype = np.dtype(_payload_dtype(dtype_name))
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        layout = None
    if (layout is None or not _holds(data, layout, dtype, shape)
            or b"'fortran_order': False" not in layout[1] or f"'descr': '{dtype.str}'".encode() not in layout[1]):
        return Array(dtype=dtype_name, shape=tuple(shape), stype=stype, data=bytes(data)).numpy()
    values = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=layout[0]).reshape(shape)
    return values.copy() if copy else values


def to_wire(arrays: ArrayRecord | Mapping[str, torch.Tensor | np.ndarray], dtype: str) -> ArrayRecord:
    """``arrays`` as they travel: float32 arrays in ``dtype`` (:func:`encode_arrays`), then packed.

    Parameters
    ----------
    arrays : ArrayRecord or Mapping[str, torch.Tensor | np.ndarray]
        A record, or a state dict of tensors or arrays, which is packed without first
        becoming Flower Arrays (a site's reply: ``ArrayRecord(state_dict)`` serialises
        each array through ``np.save``: about half the time of a site's packing, and a
        second copy of the model; ``benchmarks/bench_transfer.py``).
    dtype : {"float32", "float16", "bfloat16"}
        The transfer dtype.

    Returns
    -------
    ArrayRecord
        One uint8 array under :data:`PACKED_KEY`; :func:`from_wire` and
        :func:`numpy_from_wire` give back the arrays with their values (a state dict's in C order).
    """
    if isinstance(arrays, ArrayRecord):
        return pack_arrays(encode_arrays(arrays, dtype))
    _check_dtype(dtype, "to_wire")
    entries = []
    for key, value in arrays.items():
        values = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        name, payload = _narrow(np.asarray(values, order="C"), dtype)  # asarray keeps a 0-d array 0-d
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(payload))
        entries.append((key, name, list(payload.shape), SType.NUMPY, [header.getvalue(), payload]))
    return _pack(entries)


def from_wire(record: ArrayRecord) -> ArrayRecord:
    """The inverse of :func:`to_wire`: unpacked, and widened back to float32."""
    return decode_arrays(unpack_arrays(record))


def numpy_from_wire(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``numpy_arrays(from_wire(record))``, without building a Flower Array per array on the way.

    What a site does with the global model it receives: each array is read from the
    packed bytes, and widened to float32 where it travelled in float16 or bfloat16.
    """
    if not _is_packed(record):
        return {key: _widen(values, record[key].dtype) for key, values in numpy_arrays(record).items()}
    return {key: _widen(_npy_values(dtype, shape, stype, data), dtype)
            for key, dtype, shape, stype, data in _manifest(record)}
