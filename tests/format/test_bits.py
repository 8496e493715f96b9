"""Packed activation bits: round trip, the spec's bit order, pad bits."""

from __future__ import annotations

import numpy as np
import pytest

from ntrace.format.bits import pack, packed_length, pad_bits_clear, unpack


@pytest.mark.parametrize("n", [1, 7, 8, 9, 50, 64, 180])
def test_round_trip(n: int) -> None:
    states = np.random.default_rng(n).random((3, 5, n)) > 0.5
    packed = pack(states)
    assert packed.shape == (3, 5, packed_length(n)) and packed.dtype == np.uint8
    assert np.array_equal(unpack(packed, n), states)
    assert pad_bits_clear(packed, n)


def test_bit_order_is_lsb_first() -> None:
    states = np.zeros(10, dtype=bool)
    states[[0, 3, 9]] = True
    # unit j in byte j // 8 at bit j % 8 from the least significant bit (spec §7)
    assert pack(states).tolist() == [0b00001001, 0b00000010]


def test_pad_bits_detected() -> None:
    packed = pack(np.ones(10, dtype=bool))
    assert pad_bits_clear(packed, 10)
    packed[-1] |= 0b10000000
    assert not pad_bits_clear(packed, 10)
