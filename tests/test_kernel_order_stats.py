"""Unit tests of :mod:`fed_de.core.order_stats` (order statistics and trimmed means from sums).

References: ``numpy.sort`` of the pooled values for the k-th smallest value, and
``scipy.stats.trim_mean`` for R's ``mean(x, trim)`` (both cut ``floor(n * trim)`` values at
each end). The values are spread over three "sites" of unequal size, with zeros and ties.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import trim_mean

from fed_de.core import order_stats as os_

K = 15  # thresholds per round


def site_masks(n: int, seed: int) -> list[np.ndarray]:
    site = np.random.default_rng(seed).choice(3, size=n, p=[0.2, 0.3, 0.5])
    site[:3] = [0, 1, 2]
    return [site == s for s in range(3)]


def normalised_counts(n: int, G: int, seed: int) -> np.ndarray:
    """Counts / size factors over 1e-3 .. 1e6, with zeros and exact ties."""
    rng = np.random.default_rng(seed)
    sf = rng.uniform(0.5, 2.0, n)
    sf[1::4] = sf[0]  # equal size factors: equal counts give tied values
    mean = 10 ** rng.uniform(-1, 5, G)
    counts = rng.negative_binomial(2, 2 / (2 + mean[None, :] * sf[:, None]))
    counts[:, 0] = 0
    counts[: n // 2, 1] = 0
    counts[:, 2] = rng.integers(0, 3, n)  # few distinct values: many ties
    return counts / sf[:, None]


def search(x: np.ndarray, ranks: np.ndarray, masks, thresholds=None, rounds: int = 40):
    """The multi-way search over sites until every target is known; (state, rounds)."""
    G, T = ranks.shape
    thr = os_.first_thresholds(G, T, K) if thresholds is None else thresholds
    state = None
    for r in range(rounds):
        tot = None
        for m in masks:
            s = os_.interval_sums(x[m], thr)
            tot = s if tot is None else {k: tot[k] + v for k, v in s.items()}
        state = os_.refine(thr, tot, ranks, state)
        thr = state["thresholds"]
        if state["done"].all():
            return state, r + 1
    return state, rounds


@pytest.mark.parametrize("n", [5, 17, 40])
def test_search_finds_every_order_statistic(n):
    x = normalised_counts(n, 12, seed=n)
    ranks = np.broadcast_to(np.array([1, (n + 1) // 2, n - 1, n]), (12, 4))
    state, rounds = search(x, ranks, site_masks(n, n))
    assert state["done"].all()
    assert rounds <= 10  # the docstring: about 8 for K = 15
    expect = np.sort(x, axis=0)[ranks[0] - 1].T
    np.testing.assert_allclose(state["value"], expect, rtol=1e-12, atol=0)


def test_search_from_scaled_thresholds():
    n = 30
    x = normalised_counts(n, 10, seed=3)
    ranks = np.broadcast_to(np.array([4, 27]), (10, 2))
    center = x.mean(axis=0)
    thr = os_.scaled_thresholds(center, 2, K, -3.0, 2.0)
    state, _ = search(x, ranks, site_masks(n, 3), thresholds=thr)
    assert state["done"].all()
    np.testing.assert_allclose(state["value"], np.sort(x, axis=0)[ranks[0] - 1].T, rtol=1e-12)


def test_trim_ranks_are_r_mean_trim():
    for n in (3, 4, 5, 8, 23, 24, 30):
        for trim in (1 / 3, 0.25, 0.2, 0.125):
            lo, hi = os_.trim_ranks(n, trim)
            cut = int(np.floor(n * trim))
            assert (lo, hi) == (cut + 1, n - cut)


@pytest.mark.parametrize("n, trim", [(3, 1 / 3), (5, 0.25), (8, 0.2), (24, 0.125),
                                     (30, 0.125), (23, 0.25), (40, 0.2)])
def test_trimmed_mean_from_sums_equals_trim_mean(n, trim):
    G = 10
    x = normalised_counts(n, G, seed=n)
    lo, hi = os_.trim_ranks(n, trim)
    ranks = np.broadcast_to(np.array([lo, hi]), (G, 2))
    masks = site_masks(n, n + 1)
    state, _ = search(x, ranks, masks)
    v_lo, v_hi = state["value"][:, 0], state["value"][:, 1]
    parts = None
    for m in masks:
        s = os_.trimmed_sum_parts(x[m], v_lo, v_hi)
        parts = s if parts is None else {k: parts[k] + v for k, v in s.items()}
    got = os_.trimmed_mean(parts, v_lo, v_hi, lo, hi)
    np.testing.assert_allclose(got, trim_mean(x, trim, axis=0), rtol=1e-12, atol=1e-300)
