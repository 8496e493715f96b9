"""Bit packing of 0/1 activation states along the last (neuron) axis.

Bit order (spec 'Packed activations'): neuron ``j`` lives in byte ``j // 8`` at bit
``j % 8`` counted from the least significant bit; pad bits of the last byte are zero.
"""

from __future__ import annotations

import numpy as np


def packed_length(n: int) -> int:
    """Bytes needed for ``n`` bits."""
    return (n + 7) // 8


def pack(states: np.ndarray) -> np.ndarray:
    """Pack a boolean (or 0/1) array along its last axis into uint8, LSB first."""
    return np.packbits(np.asarray(states, dtype=bool), axis=-1, bitorder="little")


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack`: a boolean array whose last axis has length ``n``."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=n, bitorder="little")
    return bits.astype(bool)


def pad_bits_clear(packed: np.ndarray, n: int) -> bool:
    """True when every pad bit past ``n`` in the last byte is zero (a validation rule)."""
    rem = n % 8
    if rem == 0 or packed.shape[-1] == 0:
        return True
    mask = np.uint8((0xFF << rem) & 0xFF)
    return not bool(np.any(packed[..., -1] & mask))
