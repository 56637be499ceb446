"""Grey levels: the converter's one rule for storing grey values at 8 or 16 bits.

DICOM pixels (records/dicom.py) and PNG/JPEG pixels (records/images.py) both end here,
so an image gives the same stored values whichever file it came in.
"""
from __future__ import annotations

import numpy as np


def to_bit_depth(values: np.ndarray, stored_top: int, bit_depth: int, transformed: bool = False) -> np.ndarray:
    """Grey values as uint8 (bit_depth 8) or uint16 (bit_depth 16).

    `stored_top` is the largest value the source's depth can hold (255 for 8-bit data,
    4095 for 12-bit, 65535 for 16-bit). Untransformed integer data whose stored range fits
    the output's is mapped range to range, so white stays white: kept exactly at equal
    depth, 8-bit data x 257 and 12-bit x 65535/4095 in 16 bits. Anything else (values a
    transform produced, or a stored range wider than the output's, as 16-bit data in 8
    bits) is stretched linearly from its minimum to its maximum.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, not {bit_depth}")
    top = 255 if bit_depth == 8 else 65535
    out_type = np.uint8 if bit_depth == 8 else np.uint16
    if (
        not transformed
        and np.issubdtype(values.dtype, np.integer)
        and values.size
        and values.min() >= 0
        and values.max() <= stored_top <= top
    ):
        if stored_top == top:
            return values.astype(out_type)
        return np.round(values * (top / stored_top)).astype(out_type)
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    scale = top / (high - low) if high > low else 0.0
    return np.round((values - low) * scale).astype(out_type)
