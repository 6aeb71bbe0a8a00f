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

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

__all__ = ["PACKED_KEY", "TRANSFER_DTYPES", "decode_arrays", "encode_arrays", "from_wire", "numpy_arrays", "pack_arrays",
           "to_wire", "unpack_arrays"]

#: The values of ``federation.transfer_dtype``.
TRANSFER_DTYPES = ("float32", "float16", "bfloat16")
_BFLOAT16 = "bfloat16"


def _encode(array: Array, dtype: str) -> Array:
    if array.dtype != "float32":
        return array
    values = torch.from_numpy(np.ascontiguousarray(array.numpy()))
    if dtype == "float16":
        return Array(values.to(torch.float16).numpy())
    bits = Array(values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    return Array(dtype=_BFLOAT16, shape=bits.shape, stype=bits.stype, data=bits.data)


def _decode(array: Array) -> Array:
    if array.dtype == "float16":
        return Array(array.numpy().astype(np.float32))
    if array.dtype == _BFLOAT16:
        bits = torch.from_numpy(np.ascontiguousarray(array.numpy()).view(np.int16))
        return Array(bits.view(torch.bfloat16).to(torch.float32).numpy())
    return array


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
    if dtype not in TRANSFER_DTYPES:
        raise ValueError(f"The 'dtype' parameter of encode_arrays must be one of {TRANSFER_DTYPES}. Got {dtype!r}.")
    if dtype == "float32":
        return record
    return ArrayRecord({key: _encode(array, dtype) for key, array in record.items()})


def decode_arrays(record: ArrayRecord) -> ArrayRecord:
    """``record`` with float16 and bfloat16 arrays widened to float32 (``record`` itself when none are)."""
    if not any(array.dtype in ("float16", _BFLOAT16) for array in record.values()):
        return record
    return ArrayRecord({key: _decode(array) for key, array in record.items()})


#: The single key of a packed ArrayRecord.
PACKED_KEY = "medfed.packed-arrays"
_LENGTH_BYTES = 8  # little-endian uint64: the manifest's length


def pack_arrays(record: ArrayRecord) -> ArrayRecord:
    """``record``'s arrays as one uint8 array under :data:`PACKED_KEY` (lossless).

    Layout: the manifest's byte length (uint64, little-endian), the manifest (JSON: a list
    of ``[name, dtype, shape, stype, nbytes]`` in the record's order), then each array's
    serialized bytes (``Array.data``) in that order.
    """
    manifest = json.dumps([[key, a.dtype, list(a.shape), a.stype, len(a.data)] for key, a in record.items()]).encode()
    parts = [len(manifest).to_bytes(_LENGTH_BYTES, "little"), manifest, *(a.data for a in record.values())]
    size = sum(len(part) for part in parts)
    # The .npy bytes that Array(np.frombuffer(blob, np.uint8)) would hold, joined in one
    # copy: going through NumPy would copy the whole model twice more (a model of
    # medvit_v2_large is 426 MB).
    npy_header = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy_header, {"descr": "|u1", "fortran_order": False, "shape": (size,)})
    data = b"".join([npy_header.getvalue(), *parts])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(size,), stype=SType.NUMPY, data=data)})


def unpack_arrays(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord that :func:`pack_arrays` packed (``record`` itself when it is not packed).

    Raises
    ------
    ValueError
        If the packed bytes do not hold a well-formed manifest and exactly the bytes it lists.
    """
    if list(record.keys()) != [PACKED_KEY]:
        return record
    packed = record[PACKED_KEY].numpy()
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"Packed arrays are malformed (a {packed.dtype} array of shape {packed.shape}, "
                         "expected 1-d uint8).")
    blob = memoryview(packed)  # no .tobytes() copy of the whole model; each slice below copies its array once
    try:
        size = int.from_bytes(blob[:_LENGTH_BYTES], "little")
        manifest = json.loads(bytes(blob[_LENGTH_BYTES:_LENGTH_BYTES + size]))
        arrays, offset = {}, _LENGTH_BYTES + size
        for key, dtype, shape, stype, nbytes in manifest:
            if not (isinstance(nbytes, int) and 0 <= nbytes <= len(blob) - offset):
                raise ValueError(f"array {key!r} claims {nbytes} bytes, {len(blob) - offset} are left")
            arrays[str(key)] = Array(dtype=str(dtype), shape=tuple(int(d) for d in shape), stype=str(stype),
                                     data=bytes(blob[offset:offset + nbytes]))
            offset += nbytes
    except (ValueError, TypeError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"Packed arrays are malformed ({error}); the sender is not a medfed site of this "
                         "version, or the message was damaged.") from None
    if offset != len(blob):
        raise ValueError(f"Packed arrays are malformed ({len(blob) - offset} bytes after the last array).")
    return ArrayRecord(arrays)


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{key: array.numpy()}`` of ``record``, read without NumPy's ``.npy`` header parser.

    ``Array.numpy()`` is ``np.load``, which reads each array's header as Python source
    (``ast.literal_eval``: about 40 us an array). A model has hundreds of arrays, and the
    server and every site convert each message's record more than once: that was most
    of the in-process engine's cost per round beyond training. Headers that this reader
    does not know for certain (Fortran order, a dtype other than the Array's own, another
    format version) go through ``Array.numpy()``. Each array is a writable copy, as from
    ``np.load``.
    """
    return {key: _numpy(array) for key, array in record.items()}


_NPY_MAGIC = b"\x93NUMPY"


def _numpy(array: Array) -> np.ndarray:
    data = array.data
    if array.stype != SType.NUMPY or data[:6] != _NPY_MAGIC or data[6] not in (1, 2, 3):
        return array.numpy()
    start = 10 if data[6] == 1 else 12
    header = data[start:start + int.from_bytes(data[8:start], "little")]
    try:
        dtype = np.dtype(array.dtype)
    except TypeError:
        return array.numpy()
    if dtype.hasobject or b"'fortran_order': False" not in header or f"'descr': '{dtype.str}'".encode() not in header:
        return array.numpy()
    shape = tuple(int(d) for d in array.shape)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(data, dtype=dtype, count=count, offset=start + len(header)).reshape(shape).copy()


def to_wire(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """``record`` as it travels: float32 arrays in ``dtype`` (:func:`encode_arrays`), then packed."""
    return pack_arrays(encode_arrays(record, dtype))


def from_wire(record: ArrayRecord) -> ArrayRecord:
    """The inverse of :func:`to_wire`: unpacked, and widened back to float32."""
    return decode_arrays(unpack_arrays(record))
