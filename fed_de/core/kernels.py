"""Compiled loops (numba) of the hot spots, each giving the same numbers as the numpy
expressions it replaced.

- :func:`index_tables`: the surrogate's sorted and thinned tables of evaluated points
  (:func:`fed_de.core.disp_surrogate.index`).
- :func:`surrogate_values`: node lookup and the confluent Hermite interpolant of
  :func:`fed_de.core.disp_surrogate.surrogate`, one gene at a time. The aggregator's replay
  of R's dispersion loop evaluates the surrogate ~50 times a step over thousands of genes;
  as array expressions that was ~200 numpy operations a call on small arrays.
- :func:`nearest_gap`: each proposed point's distance to the nearest evaluated one
  (the dispersion search's choice of points to evaluate).
- :func:`refine_brackets`: the Cook's threshold searches' brackets, a round at a time
  (:func:`fed_de.core.trimmed.refine`).
- :func:`irls_weights`, :func:`irls_response`: an IRLS iteration's per-sample terms
  (:func:`fed_de.core.nb.irls_summands`) in two passes around numpy's exp and logarithms.
- :func:`count_below`: the Cook's search's counts of values below thresholds
  (:func:`fed_de.core.trimmed.count_below`), without a genes x samples x thresholds table.
- :func:`trigamma_values`: psi' by recurrence and asymptotic series (arithmetic only), one
  element at a time instead of numpy passes over temporaries.
- :func:`disp_likelihood_sums`: the per-sample terms of the dispersion log likelihood and
  its two derivatives (:func:`fed_de.core.nb.disp_summands_at`) in one pass over a block,
  summed over samples in sample order as numpy's reduction over the first axis does.

Every operation is the one the array form did, in the same order, on the same float64
values: no fused multiply-add (``fastmath`` off), no transcendental function (those stay in
numpy and scipy, whose implementations differ from the C library's in the last bits), NaN
where the array form gave NaN, ``np.fmin`` / ``np.fmax`` read as "ignore NaN", a stable
sort with NaN last. ``error_model="numpy"``: a division by zero gives inf or NaN, as
numpy's does, instead of raising. Numba is imported when a kernel is first used (~0.3 CPU s
once per process); compiled code is cached beside this module (or in the user's cache
directory), so only the first process after an install compiles (~3 s): :func:`warm` does
that up front (the container image runs it when it is built). Where neither is writable,
each process compiles what it uses (:func:`_compiled`).

The ring arithmetic of secure aggregation (:mod:`fed_de.secagg`) is here too:
:func:`to_limbs`, :func:`ring_add`, :func:`ring_sub`, :func:`ring_add_masks`,
:func:`from_limbs` and :func:`pack_fields` work on
``(limbs, n)`` uint64 words, exactly, so any correct order of operations gives the same
words.

Loops that should run in SIMD lanes are written over one-dimensional arrays (a row, one
limb's words): indexing a two-dimensional array inside the innermost loop kept LLVM from
vectorising it (the mask addition ran ~5x slower that way).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_OPTIONS = {"nogil": True, "error_model": "numpy"}


def _compiled(fn):
    """``numba.njit`` with :data:`_OPTIONS`, the compiled code cached beside this module or in
    the user's cache directory; where neither is writable (a read-only install and home, as
    in a hardened container), numba refuses to cache, and the kernel is compiled in each
    process instead."""
    try:
        return njit(cache=True, **_OPTIONS)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(cache=False, **_OPTIONS)(fn)


@_compiled
def _read(row: np.ndarray, i: int) -> float:
    """``row`` padded (a NaN column on either side): index ``i`` clipped to ``[-1, width]``."""
    width = row.shape[0] - 2
    if i < -1:
        i = -1
    elif i > width:
        i = width
    return row[i + 1]


@_compiled
def _fpick(a: float, b: float, larger: bool) -> float:
    """``np.fmax`` (``larger``) or ``np.fmin`` of two floats: NaN ignored, ``a`` on a tie."""
    if np.isnan(a):
        return b
    if np.isnan(b):
        return a
    return a if (a >= b if larger else a <= b) else b


@_compiled
def _before(a: float, b: float) -> bool:
    """numpy's sort order: NaN after everything, inf included."""
    return a < b or (np.isnan(b) and not np.isnan(a))


@_compiled
def _stable_order(keys, order) -> None:
    """``order`` := the indices of ``keys`` in numpy's stable ascending order (NaN last), by
    insertion: the arrays here hold a handful of values."""
    for j in range(keys.shape[0]):
        order[j] = j
    for j in range(1, keys.shape[0]):
        k = j
        while k > 0 and _before(keys[order[k]], keys[order[k - 1]]):
            order[k], order[k - 1] = order[k - 1], order[k]
            k -= 1


@_compiled
def surrogate_values(ax, af, ag, ah, n_all, tx, tf, tg, th, rows, x, m: int, sep: float):
    """For the genes ``rows`` of the index: the surrogate's ``f, g, h`` at ``x`` (one point
    per row), error estimates ``ef, eg``, ``dist`` and ``outside`` (see
    :func:`fed_de.core.disp_surrogate.surrogate`), before the prior; ``7 x rows``.

    ``a*`` / ``t*``: the index's padded arrays of all points and of the thinned ones
    (``x, f, g, h``, genes x (width + 2)); ``n_all``: each gene's number of points; ``m``:
    nodes per value; ``sep``: the nodes' separation from the nearest one.
    """
    G = x.shape[0]
    out = np.empty((7, G))
    n = 3 * m
    zx, zf, zg, zh = np.empty(m), np.empty(m), np.empty(m), np.empty(m)
    d = np.empty(m)
    order = np.empty(m, dtype=np.int64)
    s, prev, col, coef, c = (np.empty(n), np.empty(n), np.empty(n), np.empty(n),
                             np.empty(n))
    res = np.empty((3, 2))  # (f, g) with 0, 1, 2 nodes dropped
    for q in range(G):
        gi, xi = rows[q], x[q]
        rax, rtx = ax[gi], tx[gi]
        # the nearest evaluated point
        pos = 0
        for j in range(rax.shape[0]):
            if rax[j] < xi:
                pos += 1
        dl = abs(_read(rax, pos - 1) - xi)
        dr = abs(_read(rax, pos) - xi)
        near = _fpick(dl, dr, False)
        first = pos - 1 if near == dl else pos
        dist = np.inf if np.isnan(near) else near
        has0 = n_all[gi] > 0
        for j in range(m):
            zx[j] = zf[j] = zg[j] = zh[j] = np.nan
        zx[0], zf[0] = _read(rax, first), _read(af[gi], first)
        zg[0], zh[0] = _read(ag[gi], first), _read(ah[gi], first)
        count = 1 if has0 else 0
        x0 = zx[0]
        # thinned points on either side in turn
        left = -1
        for j in range(rtx.shape[0]):
            if rtx[j] < xi:
                left += 1
        right = left + 1
        last_left = False
        for _ in range(1, m):
            for _skip in range(3):
                if abs(_read(rtx, left) - x0) < sep:
                    left -= 1
                if abs(_read(rtx, right) - x0) < sep:
                    right += 1
            has_l = np.isfinite(_read(rtx, left))
            has_r = np.isfinite(_read(rtx, right))
            use_left = has_l and (not has_r or not last_left)
            if (has_l or has_r) and has0:
                k = left if use_left else right
                zx[count], zf[count] = _read(rtx, k), _read(tf[gi], k)
                zg[count], zh[count] = _read(tg[gi], k), _read(th[gi], k)
                count += 1
                last_left = use_left
                if use_left:
                    left -= 1
                else:
                    right += 1
        # nodes by distance to x, nearest first (stable; NaN last)
        for j in range(m):
            d[j] = abs(zx[j] - xi) if j < count else np.inf
        _stable_order(d, order)
        lo, hi = _read(rax, 0), _read(rax, n_all[gi] - 1)
        outside = _fpick(_fpick(lo - xi, xi - hi, True), 0.0, True) if has0 else np.inf
        base = zf[order[0]] if count > 0 else 0.0
        # confluent Hermite interpolant in Newton form: each node three times
        for i in range(n):
            s[i] = zx[order[i // 3]]
            prev[i] = zf[order[i // 3]] - base
        coef[0] = prev[0]
        for j in range(1, n):
            for i in range(j, n):
                col[i] = (prev[i] - prev[i - 1]) / (s[i] - s[i - j])
            if j <= 2:
                for i in range(j, n):
                    if i % 3 >= j:
                        col[i] = zg[order[i // 3]] if j == 1 else 0.5 * zh[order[i // 3]]
            coef[j] = col[j]
            for i in range(j, n):
                prev[i] = col[i]
        h = 0.0
        for drop in range(3):
            lim = 3 * (count - drop)
            for i in range(n):
                c[i] = coef[i] if i < lim else 0.0
            p, dp, d2p = c[n - 1], 0.0, 0.0
            for i in range(n - 2, -1, -1):
                t = xi - s[i]
                d2p = d2p * t + 2.0 * dp
                dp = dp * t + p
                p = p * t + c[i]
            res[drop, 0], res[drop, 1] = p, dp
            if drop == 0:
                h = d2p
        f, g = res[0, 0], res[0, 1]
        f1, g1, f2, g2 = res[1, 0], res[1, 1], res[2, 0], res[2, 1]
        if count > 2:
            ef = _fpick(abs(f - f1), abs(f1 - f2), True)
            eg = _fpick(abs(g - g1), abs(g1 - g2), True)
        elif count == 2:
            ef, eg = abs(f - f1), abs(g - g1)
        else:
            ef, eg = np.inf, np.inf
        if dist == 0:
            ef, eg = 0.0, 0.0
        out[0, q], out[1, q], out[2, q] = f + base, g, h
        out[3, q], out[4, q], out[5, q], out[6, q] = ef, eg, dist, outside
    return out


@_compiled
def count_below(x, genes, thresholds):
    """Per gene of ``genes`` (columns of ``x``, samples x all genes), the number of values
    strictly below each of its thresholds (``thresholds``: one row per entry of ``genes``,
    K columns); float counts, ``len(genes) x K``."""
    out = np.zeros(thresholds.shape)
    for i in range(x.shape[0]):
        _count_row(x[i], genes, thresholds, out)
    return out


@_compiled
def _count_row(row, genes, thresholds, out):
    """Add one sample's comparisons to :func:`count_below`'s counts: ``+ 1.0`` or
    ``+ 0.0``, no branch (the comparisons fall at random; a branch per comparison cost more
    than the comparisons)."""
    G, K = thresholds.shape
    for q in range(G):
        v = row[genes[q]]
        for k in range(K):
            out[q, k] += np.float64(v < thresholds[q, k])


@_compiled
def disp_likelihood_sums(y, mu, l1, r, log_r, lgamma_r, digamma_r, trigamma_r, lg, dg, tg,
                         index, out_ll, out_dl, out_d2l, alpha, w, dw):
    """Sums over samples (rows) of a samples x pairs block, per pair (column): DESeq2's
    ``ll_part`` terms ``lgamma(y+r) - lgamma(r) - y log(mu+r) - r log(1 + mu/r)`` and their
    first two derivatives in ``r`` (see :func:`fed_de.core.nb._disp_block`).

    ``l1 = log1p(mu / r)`` per element; ``r, log_r, lgamma_r, digamma_r, trigamma_r`` per
    pair; ``lg, dg, tg``: lgamma, digamma, trigamma of ``y + r``, read at ``index`` (samples
    x pairs) in these flat tables. Each column is summed in sample order, starting from its
    first row. Also the weights ``w = mu / (1 + alpha mu)`` and ``dw = -alpha w^2`` per
    element (``alpha`` per pair), for the Cox-Reid sums.
    """
    n, P = y.shape
    for i in range(n):
        for p in range(P):
            yv, m, a1, rp = y[i, p], mu[i, p], l1[i, p], r[p]
            t = yv + rp
            inv = 1.0 / (m + rp)
            j = index[i, p]
            ll = lg[j] - lgamma_r[p]
            ll -= (log_r[p] + a1) * yv
            ll -= rp * a1
            dl = dg[j] - digamma_r[p]
            dl -= a1
            dl -= t * inv
            dl += 1.0
            d2 = tg[j] - trigamma_r[p]
            d2 -= inv
            d2 -= (m - yv) * inv * inv
            d2 += 1.0 / rp
            if i == 0:
                out_ll[p], out_dl[p], out_d2l[p] = ll, dl, d2
            else:
                out_ll[p] += ll
                out_dl[p] += dl
                out_d2l[p] += d2
            wt = alpha[p] * m
            wt += 1.0
            wt = m / wt
            w[i, p] = wt
            dw[i, p] = (-alpha[p] * wt) * wt


@_compiled
def trigamma_values(x, out):
    """psi'(x) of each ``x > 0`` (:func:`fed_de.core.nb.trigamma`): below 8 the recurrence
    ``psi'(x) = 1/x^2 + psi'(x + 1)`` adds its terms from zero, the asymptotic series
    through ``z^-11`` is taken at the shifted ``z >= 8``, then the terms are added to it."""
    for i in range(x.size):
        z = x[i]
        acc, small = 0.0, z < 8.0
        while z < 8.0:
            acc = acc + 1.0 / (z * z)
            z = z + 1.0
        inv = 1.0 / z
        inv2 = inv * inv
        s = inv2 * 5.0
        s /= 66.0
        s = (1.0 / 30.0 - s) * inv2
        s = (1.0 / 42.0 - s) * inv2
        s = (1.0 / 30.0 - s) * inv2
        s = (1.0 / 6.0 - s) * (inv * inv2)
        inv += 0.5 * inv2
        inv += s
        out[i] = inv + acc if small else inv


@_compiled
def nearest_gap(a, b, todo, out):
    """For the genes ``todo``: each ``a`` point's distance to the nearest ``b`` point (genes
    x m and genes x w, NaN-padded), written into ``out``; NaN points are ignored, and a
    point with no ``b`` point keeps ``inf`` (``np.fmin`` reduced from ``inf``)."""
    for gi in todo:
        for i in range(a.shape[1]):
            best = np.inf
            for j in range(b.shape[1]):
                d = abs(a[gi, i] - b[gi, j])
                if d < best:
                    best = d
            out[gi, i] = best


# -- ring arithmetic of secure aggregation (fed_de.secagg): (limbs, n) uint64 words, limb 0
# least significant; exact, so any correct order of operations gives the same words
_ONE = np.uint64(1)
_ZERO = np.uint64(0)
_LO32 = np.uint64(0xFFFFFFFF)


@_compiled
def ring_add(acc, b):
    """``acc += b mod 2**(64 limbs)``, in place (limb by limb, each a loop over the values
    that the compiler vectorises, with the carries kept per value)."""
    limbs, n = acc.shape
    carry = np.zeros(n, dtype=np.uint64)
    for k in range(limbs):
        for j in range(n):
            s = acc[k, j] + carry[j]
            c = s < carry[j]
            t = s + b[k, j]
            acc[k, j] = t
            carry[j] = np.uint64(c | (t < s))


@_compiled
def ring_sub(acc, b):
    """``acc -= b mod 2**(64 limbs)``, in place."""
    limbs, n = acc.shape
    borrow = np.zeros(n, dtype=np.uint64)
    for k in range(limbs):
        for j in range(n):
            a, v = acc[k, j], b[k, j]
            d = a - v
            acc[k, j] = d - borrow[j]
            borrow[j] = np.uint64((a < v) | (d < borrow[j]))


@_compiled
def _carry_into(a, carry):
    """``a += carry`` on one limb's words, ``carry`` then the wraps (0 or 1) per value."""
    for j in range(a.size):
        a[j], carry[j] = _wrapping_add(a[j], _ZERO, carry[j])


@_compiled
def _add_four(a, m0, m1, m2, m3, f0, f1, f2, f3, carry):
    """``a += (m0 ^ f0) + ... + (m3 ^ f3)`` on one limb's words, the wraps counted into
    ``carry``: four keystreams a pass over ``a`` (``f``: 0, or all ones to complement)."""
    for j in range(a.size):
        s, c = _wrapping_add(a[j], carry[j], m0[j] ^ f0)
        s, c = _wrapping_add(s, c, m1[j] ^ f1)
        s, c = _wrapping_add(s, c, m2[j] ^ f2)
        a[j], carry[j] = _wrapping_add(s, c, m3[j] ^ f3)


@njit(inline="always", **_OPTIONS)
def _wrapping_add(s, c, v):
    """``s + v`` modulo ``2**64``, and the wrap count ``c`` plus one if it wrapped. Inlined
    into its callers by numba (``inline="always"``): as a call, the loops around it ran at
    half the speed."""
    s += v
    return s, c + np.uint64(s < v)


@_compiled
def _add_one(a, m, f, carry):
    """``a += m ^ f`` on one limb's words, the wraps counted into ``carry``."""
    for j in range(a.size):
        a[j], carry[j] = _wrapping_add(a[j], carry[j], m[j] ^ f)


@_compiled
def ring_add_masks(acc, start: int, masks, n_plus: int):
    """``acc[:, start:start + n] += sum(masks[:n_plus]) - sum(masks[n_plus:])``, in place:
    ``masks`` is ``(d, limbs, n)``, one keystream's words per mask.

    Subtraction is addition of the complement (``-m = ~m + 1``, the ``+ 1`` entering limb
    0). Each limb's words are summed modulo ``2**64`` with the number of wraps counted per
    value; that count (at most ``d + 1``) is the carry into the next limb. The loops run over
    one limb's words at a time, four keystreams a pass (one-dimensional loops, which the
    compiler vectorises: indexing the two-dimensional arrays inside them kept it from doing
    so, ~5x slower).
    """
    d, limbs, n = masks.shape
    carry = np.full(n, np.uint64(d - n_plus))
    flip = np.zeros(d, dtype=np.uint64)
    for i in range(n_plus, d):
        flip[i] = ~np.uint64(0)
    for k in range(limbs):
        a = acc[k, start:start + n]
        _carry_into(a, carry)
        i = 0
        while i + 4 <= d:
            _add_four(a, masks[i, k], masks[i + 1, k], masks[i + 2, k], masks[i + 3, k],
                      flip[i], flip[i + 1], flip[i + 2], flip[i + 3], carry)
            i += 4
        while i < d:
            _add_one(a, masks[i, k], flip[i], carry)
            i += 1


_WORD_BLOCK = 4096  # values per block of the encoding and decoding loops (scratch in cache)


@_compiled
def from_limbs(v, frac_bits: int, out):
    """Float64 values of ring words ``v`` (limbs, n) read in two's complement, scaled by
    ``2**-frac_bits``: the magnitude's 32-bit chunks, most significant first, summed with
    Knuth's TwoSum and the errors added at the end (within ``2**-52`` relative). Each step
    runs over a block of :data:`_WORD_BLOCK` values (the magnitude limb by limb, then the sum
    chunk by chunk): loops the compiler vectorises, on scratch arrays that stay in cache."""
    limbs, n = v.shape
    size = max(1, min(n, _WORD_BLOCK))
    neg = np.empty(size, dtype=np.bool_)
    mag = np.empty((limbs, size), dtype=np.uint64)
    borrow = np.empty(size, dtype=np.uint64)
    total, comp = np.empty(size), np.empty(size)
    for start in range(0, n, size):
        m = min(size, n - start)
        for j in range(m):
            neg[j] = (v[limbs - 1, start + j] >> np.uint64(63)) == _ONE
            borrow[j], total[j], comp[j] = _ZERO, 0.0, 0.0
        for k in range(limbs):  # the magnitude: 0 - v for a negative value
            _magnitude_words(v[k, start:start + m], neg, borrow, mag[k])
        for q in range(2 * limbs - 1, -1, -1):  # an exact power of two: the product is ldexp's
            _two_sum_chunks(mag[q // 2, :m], q % 2 == 1, math.ldexp(1.0, 32 * q - frac_bits),
                            total, comp)
        for j in range(m):
            t = total[j] + comp[j]
            out[start + j] = -t if neg[j] else t


@_compiled
def _magnitude_words(words, neg, borrow, row):
    """One limb of the magnitude: ``0 - v`` with the borrow per value where ``neg``."""
    for j in range(words.size):
        w = words[j]
        d = _ZERO - w
        m = d - borrow[j]
        out_borrow = np.uint64((w != _ZERO) | (d < borrow[j]))
        row[j] = m if neg[j] else w
        borrow[j] = out_borrow if neg[j] else _ZERO


@_compiled
def _two_sum_chunks(words, high: bool, scale: float, total, comp):
    """Add each value's high (or low) 32-bit chunk times ``scale`` to ``total`` by TwoSum,
    its rounding error to ``comp``."""
    for j in range(words.size):
        word = words[j]
        chunk = (word >> np.uint64(32)) if high else (word & _LO32)
        term = np.float64(chunk) * scale
        t = total[j]
        s = t + term
        bb = s - t
        comp[j] += (t - (s - bb)) + (term - bb)
        total[j] = s


_MASK52 = np.uint64((1 << 52) - 1)
_HIDDEN = np.uint64(1 << 52)


@_compiled
def to_limbs(bits, neg, out):
    """Integral float64 magnitudes (``bits``: their IEEE words, ``a.view(uint64)``; none
    subnormal) with signs ``neg`` as words of the ring, two's complement, in ``out`` (limbs,
    n): ``a = M 2**s`` with ``M`` the 53-bit integer mantissa (hidden bit set) and ``s`` the
    unbiased exponent minus 52; limb ``k`` holds ``M`` shifted by ``s - 64 k`` (nothing
    where every bit leaves the word); a negative value is ``~v + 1`` (xor with all ones, the
    carry run through the limbs). One limb at a time over a block of :data:`_WORD_BLOCK`
    values (:func:`_limb_words`), the carries kept per value: loops the compiler vectorises."""
    limbs, n = out.shape
    size = max(1, min(n, _WORD_BLOCK))
    carry = np.empty(size, dtype=np.uint64)
    for start in range(0, n, size):
        m = min(size, n - start)
        for j in range(m):
            carry[j] = np.uint64(neg[start + j])
        for k in range(limbs):
            _limb_words(bits[start:start + m], neg[start:start + m], k, out[k, start:start + m],
                        carry)


@_compiled
def _limb_words(bits, neg, k: int, row, carry):
    """Limb ``k`` of :func:`to_limbs` into ``row``; ``carry`` in and out (selects, not
    branches: signs and exponents vary at random)."""
    for j in range(bits.size):
        w = bits[j]
        mant = ((w & _MASK52) | _HIDDEN) * np.uint64(w != _ZERO)
        t = np.int64((w >> np.uint64(52)) & np.uint64(0x7FF)) - 1075 - 64 * k
        left = mant << np.uint64(t & 63)
        right = mant >> np.uint64((-t) & 63)
        v = left * np.uint64((t >= 0) & (t < 64)) + right * np.uint64((t < 0) & (t > -64))
        c = carry[j]
        v = (v ^ (_ZERO - np.uint64(neg[j]))) + c
        carry[j] = c & np.uint64(v == _ZERO)
        row[j] = v


@_compiled
def pack_fields(flat, limit: float, bits: int, out) -> int:
    """Non-negative integer counts ``flat`` (float64) packed ``64 // bits`` to a word of
    ``out`` (zeroed here), field ``j`` of a word in bits ``[j * bits, (j + 1) * bits)``.
    Returns -1, or the index of the first value that is not an integer in ``[0, limit)``
    (then ``out`` is not to be used)."""
    per = 64 // bits
    for q in range(out.shape[0]):
        out[q] = _ZERO
    for j in range(flat.shape[0]):
        v = flat[j]
        if not (v >= 0.0 and v < limit and v == math.floor(v)):
            return j
        out[j // per] |= np.uint64(v) << np.uint64((j % per) * bits)
    return -1


@_compiled
def index_tables(mx, mf, mg, mh, sep: float):
    """The surrogate's index of evaluated points (genes x M, NaN where a gene has none):
    each gene's points sorted by ``x`` (stable, NaN last), and the thinned ones, kept
    greedily in sorted order when at least ``sep`` above the last kept; both as ``(4, genes,
    width + 2)`` tables of ``x, f, g, h`` with a NaN column on either side and NaN past each
    gene's count. Returns ``(all, thin, n_all, n_thin)``."""
    G, M = mx.shape
    src = (mx, mf, mg, mh)
    tab = np.full((4, G, M + 2), np.nan)
    n_all = np.zeros(G, dtype=np.int64)
    n_thin = np.zeros(G, dtype=np.int64)
    kept = np.empty((G, M), dtype=np.int64)
    order = np.empty(M, dtype=np.int64)
    key = np.empty(M)
    for gi in range(G):
        for j in range(M):  # NaN sorts as +inf: tied with an infinite point, in place
            key[j] = np.inf if np.isnan(mx[gi, j]) else mx[gi, j]
        _stable_order(key, order)
        last = -np.inf
        for j in range(M):
            v = mx[gi, order[j]]
            if not np.isfinite(v):
                continue
            for q in range(4):
                tab[q, gi, n_all[gi] + 1] = src[q][gi, order[j]]
            n_all[gi] += 1
            if v - last >= sep:
                kept[gi, n_thin[gi]] = order[j]
                n_thin[gi] += 1
                last = v
    width = 0
    for gi in range(G):
        width = max(width, n_thin[gi])
    thin = np.full((4, G, width + 2), np.nan)
    for gi in range(G):
        for j in range(n_thin[gi]):
            for q in range(4):
                thin[q, gi, j + 1] = src[q][gi, kept[gi, j]]
    return tab, thin, n_all, n_thin


@_compiled
def refine_brackets(thr, k, counts, done, tie, lo, hi, n_lo, n_hi, tau, tie_width: float,
                    tiny: float):
    """One round of the Cook's threshold searches (:func:`fed_de.core.trimmed.refine`), in
    place on ``lo, hi, n_lo, n_hi, tau, done, tie`` (genes x targets; ``thr`` and ``counts``
    genes x targets x K): an open target whose count equals ``k`` at a threshold is found
    there (the first such); else its bracket narrows to the thresholds around rank ``k``, and
    closes as a tie when it is narrower than ``tie_width`` (relative) or ends at ``tiny``."""
    G, T, K = thr.shape
    for gi in range(G):
        for t in range(T):
            if done[gi, t]:
                continue
            want = k[gi, t]
            j, first = 0, -1
            for q in range(K):
                c = counts[gi, t, q]
                if c == want and first < 0:
                    first = q
                if c < want:
                    j += 1
            if first >= 0:
                tau[gi, t] = thr[gi, t, first]
                done[gi, t] = True
                continue
            if j > 0:
                lo[gi, t], n_lo[gi, t] = thr[gi, t, j - 1], counts[gi, t, j - 1]
            if j < K:
                hi[gi, t], n_hi[gi, t] = thr[gi, t, j], counts[gi, t, j]
            h, lw = hi[gi, t], lo[gi, t]
            if np.isfinite(h) and ((h - lw <= tie_width * h) or (h <= tiny)):
                tie[gi, t] = True
                done[gi, t] = True


@_compiled
def irls_weights(ex, y, sf, alpha, r, min_mu: float, mu, w, v, a_z, a_r, a_q):
    """First pass of :func:`fed_de.core.nb.irls_summands` over a samples x genes block, from
    ``ex = exp(X beta)``: the floored means ``mu = max(sf ex, min_mu)``, the IRLS weights
    ``w = mu / (1 + alpha mu)``, the pseudo-score's derivative weights ``v`` (``mu (1 + alpha
    y) / (1 + alpha mu)^2``, ``w`` where the mean is floored), and the arguments of the
    logarithms that follow: ``mu / sf``, ``mu + 1/alpha`` and ``mu / (1/alpha)``."""
    n, g = ex.shape
    for i in range(n):
        for j in range(g):
            raw = ex[i, j] * sf[i]
            m = raw if (raw >= min_mu or raw != raw) else min_mu
            denom = alpha[j] * m
            denom += 1.0
            wt = m / denom
            mu[i, j], w[i, j] = m, wt
            if raw > min_mu:
                vv = alpha[j] * y[i, j]
                vv += 1.0
                vv *= wt
                v[i, j] = vv / denom
            else:
                v[i, j] = wt
            a_z[i, j] = m / sf[i]
            a_r[i, j] = m + r[j]
            a_q[i, j] = m / r[j]


@_compiled
def irls_response(y, mu, w, r, log_z, log_mu, log_mr, log1p_q, z, logp):
    """Second pass: the weighted working response ``z = (log(mu / sf) + (y - mu) / mu) w``
    and, per gene, ``sum_i y (log mu - log(mu + r)) - r log1p(mu / r)`` summed over samples
    in sample order (numpy's reduction over the first axis of a C-ordered block)."""
    n, g = y.shape
    for i in range(n):
        for j in range(g):
            m = mu[i, j]
            zz = log_z[i, j] + (y[i, j] - m) / m
            z[i, j] = zz * w[i, j]
            t = (log_mu[i, j] - log_mr[i, j]) * y[i, j] - log1p_q[i, j] * r[j]
            if i == 0:
                logp[j] = t
            else:
                logp[j] += t


def warm() -> None:
    """Compile every kernel for the argument types fed_de passes (or load them from the
    cache beside this module). A container image runs this once when it is built, so that
    no task of a plan spends seconds compiling: each task is a fresh process."""
    f, i, u = np.float64, np.int64, np.uint64
    m2, v1 = np.zeros((2, 4), dtype=f), np.zeros(4, dtype=f)
    rows = np.arange(2, dtype=i)
    surrogate_values(m2, m2, m2, m2, rows, m2, m2, m2, m2, rows, np.zeros(2), 5, 0.05)
    count_below(m2, rows, np.zeros((2, 3)))
    index = np.zeros((2, 4), dtype=i)
    disp_likelihood_sums(m2, m2, m2, v1, v1, v1, v1, v1, v1, v1, v1, index, v1, v1.copy(),
                         v1.copy(), v1, m2.copy(), m2.copy())
    nearest_gap(m2, m2, rows, m2.copy())
    trigamma_values(v1, v1.copy())
    words = np.zeros((3, 4), dtype=u)
    ring_add(words, words.copy())
    ring_sub(words, words.copy())
    ring_add_masks(words, 0, np.zeros((2, 3, 4), dtype=u), 1)
    from_limbs(words, 96, v1.copy())
    to_limbs(np.zeros(4, dtype=u), np.zeros(4, dtype=np.bool_), words)
    pack_fields(v1, 2.0, 32, np.zeros(2, dtype=u))
    index_tables(m2, m2, m2, m2, 0.05)
    irls_weights(m2, m2, v1[:2], v1, v1, 0.5, *(m2.copy() for _ in range(6)))
    irls_response(m2, m2, m2, v1, m2, m2, m2, m2, m2.copy(), v1.copy())
    flags = np.zeros((2, 4), dtype=np.bool_)
    refine_brackets(np.zeros((2, 4, 3)), m2, np.zeros((2, 4, 3)), flags, flags.copy(), m2.copy(),
                    m2.copy(), m2.copy(), m2.copy(), m2.copy(), 1e-9, 1e-300)
