"""Lower-precision weight transfer (``federation.transfer_dtype``).

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

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = ["TRANSFER_DTYPES", "decode_arrays", "encode_arrays"]

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
