"""The masking arithmetic of fed_de.secagg against exact integer arithmetic.

``_add_masks`` adds and subtracts AES-128-CTR masks, the carries counted limb by limb in one
compiled pass; here every result is checked against Python integers computed from the
keystream read as its docstring says.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fed_de import secagg as sa


def _ints(words: np.ndarray) -> list[int]:
    """Ring elements of ``(limbs, n)`` uint64 words, limb 0 lowest."""
    limbs, n = words.shape
    return [sum(int(words[k, i]) << (64 * k) for k in range(limbs)) for i in range(n)]


def _reference_masks(key: bytes, limbs: int, n: int, chunk: int) -> list[int]:
    """The mask of every value: the keystream's words fill, chunk by chunk of values, the
    chunk's limbs in order (the documented layout)."""
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    words = np.frombuffer(enc.update(bytes(8 * limbs * n)), dtype="<u8")
    out, pos = [], 0
    for start in range(0, n, chunk):
        nc = min(chunk, n - start)
        block = words[pos:pos + limbs * nc].reshape(limbs, nc)
        out.extend(_ints(block))
        pos += limbs * nc
    return out


@pytest.mark.parametrize("limbs", [1, 2, 3])
@pytest.mark.parametrize(("n_plus", "n_minus"), [(2, 0), (0, 2), (1, 1), (4, 4), (3, 5), (2, 3),
                                               (6, 3), (0, 1)])
def test_masks_add_exactly(monkeypatch, limbs, n_plus, n_minus):
    monkeypatch.setattr(sa, "_MASK_CHUNK", 7)  # several chunks, the last one short
    rng = np.random.default_rng(limbs * 100 + n_plus * 10 + n_minus)
    n = 23
    acc = rng.integers(0, 2**64, size=(limbs, n), dtype=np.uint64, endpoint=False)
    acc[:, :4] = np.uint64(2**64 - 1)  # carries through every limb
    acc[:, 4:6] = 0  # borrows through every limb
    start = _ints(acc)
    keys = [os.urandom(16) for _ in range(n_plus + n_minus)]
    sa._add_masks(acc, keys[:n_plus], keys[n_plus:])
    masks = [_reference_masks(k, limbs, n, 7) for k in keys]
    ring = 2 ** (64 * limbs)
    expected = [(v + sum(m[i] for m in masks[:n_plus]) - sum(m[i] for m in masks[n_plus:]))
                % ring for i, v in enumerate(start)]
    assert _ints(acc) == expected


def test_pair_masks_cancel_over_default_chunks():
    """A value masked + by one member of each pair and - by the other comes back unchanged,
    across the default chunk size (a message longer than one chunk)."""
    rng = np.random.default_rng(3)
    n = sa._MASK_CHUNK + 11
    v = rng.integers(0, 2**64, size=(3, n), dtype=np.uint64, endpoint=False)
    keys = [os.urandom(16) for _ in range(8)]
    a, b = v.copy(), np.zeros_like(v)
    sa._add_masks(a, keys[:5], keys[5:])
    sa._add_masks(b, keys[5:], keys[:5])
    sa._iadd(a, b)
    np.testing.assert_array_equal(a, v)
    assert not np.array_equal(b, 0)


def test_mask_keys_differ_by_address():
    seed = os.urandom(32)
    base = sa._mask_key(seed, 0, 1, "x")
    assert len(base) == 16
    assert len({base, sa._mask_key(seed, 1, 1, "x"), sa._mask_key(seed, 0, 2, "x"),
                sa._mask_key(seed, 0, 1, "y"), sa._mask_key(os.urandom(32), 0, 1, "x")}) == 5


@pytest.mark.parametrize("fmt", [sa.FixedPoint(), sa.NARROW, sa.FixedPoint(limbs=1, frac_bits=20)])
def test_encoding_is_exact_twos_complement(fmt):
    """Every encoded value is round-half-even(x * 2**f) in two's complement mod 2**K, for
    both signs and mantissas on either side of a limb boundary."""
    from fractions import Fraction

    rng = np.random.default_rng(fmt.limbs)
    top = fmt.max_abs(20) / 4
    x = np.concatenate([rng.normal(size=500) * top / 1e3, rng.normal(size=200) * 1e-3,
                        np.ldexp(1.0, np.arange(-fmt.frac_bits - 2, 20)),
                        [0.0, -0.0, 0.5 * 2.0**-fmt.frac_bits, 1.5 * 2.0**-fmt.frac_bits]])
    x = np.concatenate([x, -x])
    words = fmt.encode(x, 20)
    ring = 2 ** fmt.ring_bits
    expected = [round(Fraction(v) * 2**fmt.frac_bits) % ring for v in x]
    assert _ints(words.reshape(fmt.limbs, -1)) == expected
