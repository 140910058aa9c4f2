"""Exact trimmed means from counts (fed_de.core.trimmed) against R's ``mean(x, trim)``.

Reference: the sorted values of ranks ``lo..hi`` averaged (R's definition), computed on the
pooled values; the federated search sees only counts below thresholds summed over sites.
"""

from __future__ import annotations

import numpy as np
import pytest

from fed_de.core import trimmed as tr


def r_trimmed_mean(x: np.ndarray, trim: float) -> np.ndarray:
    n = x.shape[0]
    lo, hi = tr.trim_ranks(n, trim)
    return np.sort(x, axis=0)[lo - 1:hi].mean(axis=0)


def federated_trimmed_mean(parts: list[np.ndarray], trim: float, K: int = 15,
                           rounds: int = 40):
    n = sum(p.shape[0] for p in parts)
    G = parts[0].shape[1]
    lo, hi = tr.trim_ranks(n, trim)
    k = np.tile([lo - 1, hi], (G, 1))
    center = np.concatenate(parts).mean(axis=0)
    s = tr.start(center, k, np.array([n, n]), K, (-2.0, 2.0))
    used = 0
    while not s.done.all() and used < rounds:
        counts = np.zeros(s.thresholds.shape)
        for t in range(2):
            counts[:, t] = sum(tr.count_below(p, s.thresholds[:, t]) for p in parts)
        s = tr.refine(s, counts)
        used += 1
    summed = {}
    for p in parts:
        for key, v in tr.trimmed_parts(p, s, s, 0, 1).items():
            summed[key] = summed.get(key, 0.0) + v
    return tr.trimmed_mean(summed, s, s, 0, 1, lo, hi), used, s


@pytest.mark.parametrize("trim", [0.2, 1 / 3, 0.25, 0.125])
def test_equals_r_mean_trim_with_zeros_and_ties(trim):
    rng = np.random.default_rng(1)
    G, n = 400, 23
    x = rng.negative_binomial(2, 0.3, size=(n, G)) / rng.uniform(0.5, 2.0, size=(n, 1))
    x[:, :50] = np.round(x[:, :50])  # many exact ties
    x[:, 50:80] = 0.0  # all zero
    x[:12, 80:100] = 0.0  # half zero: the lower boundary inside the zero block
    x[:, 100:110] = 7.0  # one repeated value
    parts = [x[:5], x[5:14], x[14:]]
    got, rounds, s = federated_trimmed_mean(parts, trim)
    np.testing.assert_allclose(got, r_trimmed_mean(x, trim), rtol=1e-13, atol=1e-300)
    assert s.done.all() and rounds <= 12


def test_separated_boundaries_reveal_no_value():
    """With distinct values the search stops at a threshold strictly between the values on
    either side of each boundary rank; no tie bracket is summed."""
    rng = np.random.default_rng(2)
    x = rng.gamma(2.0, 50.0, size=(30, 200))
    got, rounds, s = federated_trimmed_mean([x[:10], x[10:]], 0.2)
    np.testing.assert_allclose(got, r_trimmed_mean(x, 0.2), rtol=1e-13)
    assert not s.tie.any()
    srt = np.sort(x, axis=0)
    lo, hi = tr.trim_ranks(30, 0.2)
    for t, k in ((0, lo - 1), (1, hi)):
        assert (srt[k - 1] < s.tau[:, t]).all() and (s.tau[:, t] <= srt[k]).all()
    assert rounds <= 8


def test_site_split_does_not_matter():
    rng = np.random.default_rng(3)
    x = rng.poisson(3.0, size=(17, 100)).astype(float) / 1.3
    a, _, _ = federated_trimmed_mean([x], 0.25)
    b, _, _ = federated_trimmed_mean([x[:3], x[3:9], x[9:]], 0.25)
    np.testing.assert_allclose(a, b, rtol=1e-14)


def test_a_known_shared_value_closes_its_tie_at_once():
    """Squared errors of zero counts all equal q**2, which the aggregator knows: thresholds
    around it close that tie in the first round, and the trimmed mean stays exact."""
    rng = np.random.default_rng(4)
    n, G = 30, 300
    x = rng.poisson(0.4, size=(n, G)) / rng.uniform(0.6, 1.6, size=(n, 1))
    lo, hi = tr.trim_ranks(n, 0.125)
    q = r_trimmed_mean(x, 0.125)
    e = (x - q) ** 2
    k = np.tile([lo - 1, hi], (G, 1))
    s = tr.start(e.mean(axis=0), k, np.array([n, n]), 15, (-3.0, 2.0),
                 known=np.column_stack([q ** 2, q ** 2]))
    counts = np.stack([tr.count_below(e, s.thresholds[:, t]) for t in range(2)], axis=1)
    s = tr.refine(s, counts)
    zeros_at_boundary = np.array([(np.sort(e[:, g])[lo - 1] == q[g] ** 2) for g in range(G)])
    assert zeros_at_boundary.sum() > 30 and s.done[zeros_at_boundary, 0].all()
    while not s.done.all():
        counts = np.stack([tr.count_below(e, s.thresholds[:, t]) for t in range(2)], axis=1)
        s = tr.refine(s, counts)
    got = tr.trimmed_mean(tr.trimmed_parts(e, s, s, 0, 1), s, s, 0, 1, lo, hi)
    np.testing.assert_allclose(got, r_trimmed_mean(e, 0.125), rtol=1e-12)


def test_refining_in_blocks_gives_the_search_of_one_block(monkeypatch):
    """The aggregator's refinement proposing next thresholds 7 open targets at a time ends
    in the same search, round after round, as one block of every target (ties and zeros
    included)."""
    rng = np.random.default_rng(4)
    parts = [rng.poisson(rng.gamma(1.0, 20.0, 40), (n, 40)).astype(float) for n in (9, 14)]
    parts[0][:, 3] = 5.0  # a tie
    whole = federated_trimmed_mean(parts, 0.2)
    monkeypatch.setattr(tr, "REFINE_BLOCK", 7)
    blocks = federated_trimmed_mean(parts, 0.2)
    np.testing.assert_array_equal(blocks[0], whole[0])
    assert blocks[1] == whole[1]
    for name in ("lo", "hi", "tau", "done", "tie", "thresholds"):
        np.testing.assert_array_equal(getattr(blocks[2], name), getattr(whole[2], name))
