"""Stored tensor dtypes as numpy arrays, without torch: what ``mix`` computes with.

``mix`` only averages, casts and copies, which numpy does as fast as torch, and importing torch
costs about a second, as much as mixing a 600 MB model. numpy has no bfloat16, so a BF16 tensor is
held as its raw ``uint16`` bits: widening to fp32 puts them in the high half of a ``uint32``
(exact), and narrowing rounds to nearest-even on the dropped 16 bits, as torch's
``.to(torch.bfloat16)`` does (tested bit for bit against torch, NaN aside: mix refuses NaN).
"""

from __future__ import annotations

import numpy as np

# safetensors dtype code -> numpy dtype of the stored bits (BF16: raw uint16)
STORED = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
# dtype code <-> the names used in configs and options (torch's names without "torch.")
NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
CODES = {name: code for code, name in NAMES.items()}
_EXPONENT = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}
_MAGNITUDE = {"F16": 0x7FFF, "BF16": 0x7FFF, "F32": 0x7FFFFFFF, "F64": 0x7FFFFFFFFFFFFFFF}  # all bits but the sign


def stored_dtype(code: str) -> np.dtype:
    """The numpy dtype a tensor of safetensors dtype ``code`` is read as (little-endian)."""
    return np.dtype(STORED[code]).newbyteorder("<")


def to_float32(values: np.ndarray, code: str) -> np.ndarray:
    """Stored values of dtype ``code`` as a new float32 array."""
    if code == "BF16":
        return (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return values.astype(np.float32)


def from_float32(values: np.ndarray, code: str) -> np.ndarray:
    """float32 values stored as dtype ``code`` (BF16: round to nearest even, like torch).

    The BF16 rounding works in place on one uint32 temporary (bits + 0x7FFF + the kept part's
    lowest bit, then the high half): a third of the time of the textbook expression, which
    allocates a new array per operation.
    """
    if code == "BF16":
        bits = values.astype(np.float32, copy=False).view(np.uint32)
        rounded = bits >> np.uint32(16)
        rounded &= np.uint32(1)
        rounded += np.uint32(0x7FFF)
        rounded += bits
        rounded >>= np.uint32(16)
        return rounded.astype(np.uint16)
    return values.astype(STORED[code])


def finite(values: np.ndarray, code: str) -> bool:
    """Whether stored values of dtype ``code`` hold no NaN or infinity (integer dtypes always do)."""
    if code not in _EXPONENT:
        return True
    return finite_bits(values.view(_EXPONENT[code][0]), code)


def finite_bits(bits: np.ndarray, code: str) -> bool:
    """Whether float bits of dtype ``code`` (as unsigned integers) hold no NaN or infinity.

    NaN and infinity are the values whose exponent bits are all ones, i.e. whose magnitude bits
    (all but the sign) are at least the exponent mask: one masking pass and one max reduction.
    """
    if bits.size == 0:
        return True
    kind, mask = _EXPONENT[code]
    magnitude = np.bitwise_and(bits, kind(_MAGNITUDE[code]))
    return bool(magnitude.max() < kind(mask))
