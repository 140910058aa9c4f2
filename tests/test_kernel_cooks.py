"""Unit tests of :mod:`fed_de.core.cooks` against independent references.

References: the hat matrix ``W^1/2 X (X'WX + ridge)^-1 X' W^1/2`` formed from the full
design (numpy); Cook's distance by its definition, refitting the weighted least squares of
the IRLS working response without each sample in turn (``sum_j w_j (eta_j - eta_j(-i))^2 / p``);
DESeq2's ``robustMethodOfMomentsDisp`` / ``trimmedCellVariance`` (``R/core.R``) written with
``scipy.stats.trim_mean``, against the federated chain (threshold search, trimmed sums,
:func:`cell_trim`, :func:`robust_dispersion`); ``scipy.stats.f`` for the cutoff.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import f as f_dist
from scipy.stats import trim_mean

from fed_de.core import cooks, nb
from fed_de.core import trimmed as tr

LAMBDA = 1e-6 / np.log(2) ** 2


@pytest.fixture(scope="module")
def fitted():
    """NB counts (~ 1 + group + covariate, 16 samples) fitted by a plain IRLS loop to its
    fixed point, means well above DESeq2's 0.5 floor; gene 0 has an outlier."""
    rng = np.random.default_rng(4)
    n, G = 16, 8
    X = np.column_stack([np.ones(n), np.arange(n) % 2, rng.normal(size=n)])
    sf = rng.uniform(0.6, 1.6, n)
    beta = np.column_stack([rng.uniform(2, 6, G), rng.normal(0, 1, G), rng.normal(0, .4, G)])
    alpha = np.exp(rng.uniform(-3, -0.5, G))
    mu = sf[:, None] * np.exp(X @ beta.T)
    y = rng.negative_binomial(1 / alpha, 1 / (1 + alpha * mu)).astype(float)
    y[5, 0] = 40 * mu[5, 0]
    b = np.zeros((G, 3))
    b[:, 0] = np.log(y.mean(axis=0) + 1)
    for _ in range(200):
        m = sf[:, None] * np.exp(X @ b.T)
        w = m / (1 + alpha * m)
        z = np.log(m / sf[:, None]) + (y - m) / m
        b = np.stack([np.linalg.solve(X.T @ (w[:, g, None] * X) + LAMBDA * np.eye(3),
                                      X.T @ (w[:, g] * z[:, g])) for g in range(G)])
    mu = sf[:, None] * np.exp(X @ b.T)
    assert mu.min() > 0.5
    return y, X, mu, alpha, sf


def global_xtwx(X, w):
    """X'WX summed over two sites."""
    first = np.arange(X.shape[0]) < 6
    return nb.gram(X[first], w[first]) + nb.gram(X[~first], w[~first])


def test_hat_diagonals_equal_the_full_hat_matrix(fitted):
    y, X, mu, alpha, _ = fitted
    w = mu / (1 + alpha * mu)
    h = cooks.hat_diagonals(X, w, global_xtwx(X, w))
    for g in range(y.shape[1]):
        sw = np.sqrt(w[:, g])[:, None] * X
        H = sw @ np.linalg.inv(sw.T @ sw + LAMBDA * np.eye(3)) @ sw.T
        np.testing.assert_allclose(h[:, g], np.diag(H), rtol=1e-12)
    np.testing.assert_allclose(h.sum(axis=0), 3.0, rtol=1e-5)  # trace = p (ridge ~1e-6)


def test_cooks_distance_is_the_leave_one_out_change_of_the_fit(fitted):
    y, X, mu, alpha, sf = fitted
    n, p = X.shape
    w = mu / (1 + alpha * mu)
    h = cooks.hat_diagonals(X, w, global_xtwx(X, w))
    d = cooks.cooks_distance(y, mu, alpha, h, p)
    for g in range(y.shape[1]):
        z = np.log(mu[:, g] / sf) + (y[:, g] - mu[:, g]) / mu[:, g]  # working response
        wg = w[:, g]
        full = np.linalg.lstsq(np.sqrt(wg)[:, None] * X, np.sqrt(wg) * z, rcond=None)[0]
        ref = np.empty(n)
        for i in range(n):
            keep = np.arange(n) != i
            loo = np.linalg.lstsq(np.sqrt(wg[keep])[:, None] * X[keep],
                                  np.sqrt(wg[keep]) * z[keep], rcond=None)[0]
            ref[i] = (wg * (X @ (full - loo)) ** 2).sum() / p
        # the ridge (~1e-6) of DESeq2's fit is absent from the plain least squares
        np.testing.assert_allclose(d[:, g], ref, rtol=1e-5, atol=1e-6 * ref.max())
    assert d[5, 0] > cooks.cooks_cutoff(p, n) and np.argmax(d[:, 0]) == 5


def test_cooks_cutoff_is_the_f_quantile():
    for p, m in [(2, 6), (3, 16), (5, 100)]:
        assert cooks.cooks_cutoff(p, m) == pytest.approx(f_dist.ppf(0.99, p, m - p), rel=1e-14)
        assert f_dist.cdf(cooks.cooks_cutoff(p, m), p, m - p) == pytest.approx(0.99, rel=1e-12)


def test_replacement_counts_truncate_like_as_integer():
    tm = np.array([2.5, 10.0, 0.3])
    sf = np.array([1.0, 1.2, 0.79999])
    np.testing.assert_array_equal(cooks.replacement_counts(tm, sf),
                                  [[2, 10, 0], [3, 12, 0], [1, 7, 0]])


def deseq2_robust_dispersion(norm: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """``robustMethodOfMomentsDisp`` with cells of >= 3 samples (``trimmedCellVariance``):
    ``cut(n, c(0, 3.5, 23.5, Inf))`` picks trim 1/3, 1/4, 1/8 and scale 2.04, 1.86, 1.51."""
    levels = [c for c in np.unique(cell) if (cell == c).sum() >= 3]
    var = []
    for c in levels:
        x = norm[cell == c]
        k = 0 if len(x) <= 3.5 else 1 if len(x) <= 23.5 else 2
        trim, scale = (1 / 3, 0.25, 0.125)[k], (2.04, 1.86, 1.51)[k]
        q = trim_mean(x, trim, axis=0)
        var.append(scale * trim_mean((x - q) ** 2, trim, axis=0))
    m = norm.mean(axis=0)
    return np.maximum((np.max(var, axis=0) - m) / m**2, 0.04)


def federated_trimmed_mean(values: np.ndarray, site: np.ndarray, trim: float) -> np.ndarray:
    """R's mean(x, trim) of each column from the counts-only threshold search and the trimmed
    sums of two sites (fed_de.core.trimmed)."""
    n, G = values.shape
    lo, hi = tr.trim_ranks(n, trim)
    k = np.tile([lo - 1, hi], (G, 1))
    search = tr.start(values.mean(axis=0), k, np.array([n, n]), 15, (-2.0, 2.0))
    for _ in range(30):
        counts = np.zeros(search.thresholds.shape)
        for t in range(2):
            counts[:, t] = sum(tr.count_below(values[m], search.thresholds[:, t])
                               for m in (site, ~site))
        search = tr.refine(search, counts)
        if search.done.all():
            break
    parts = [tr.trimmed_parts(values[m], search, search, 0, 1) for m in (site, ~site)]
    tot = {k: parts[0][k] + parts[1][k] for k in parts[0]}
    return tr.trimmed_mean(tot, search, search, 0, 1, lo, hi)


def test_robust_dispersion_equals_deseq2s_trimmed_cell_variance():
    rng = np.random.default_rng(9)
    sizes = [2, 3, 5, 26]  # a cell too small to count, and one of each trim
    cell = np.repeat(np.arange(4), sizes)
    n, G = cell.size, 12
    sf = rng.uniform(0.5, 2, n)
    mean = 10 ** rng.uniform(0, 4, G)
    alpha = np.exp(rng.uniform(-4, 0, G))
    mu = sf[:, None] * mean[None, :] * np.exp(0.5 * cell)[:, None]
    y = rng.negative_binomial(1 / alpha, 1 / (1 + alpha * mu)).astype(float)
    y[n - 1, 0] = 50 * mu[n - 1, 0]  # an outlier the trimming must absorb
    norm = y / sf[:, None]
    site = rng.permutation(n) < n // 3
    cell_var = []
    for c in range(4):
        if sizes[c] < cooks.MIN_REPLICATES_COOKS:
            continue
        trim, scale = cooks.cell_trim(sizes[c])
        x, s = norm[cell == c], site[cell == c]
        q = federated_trimmed_mean(x, s, trim)
        cell_var.append(scale * federated_trimmed_mean((x - q) ** 2, s, trim))
    got = cooks.robust_dispersion(np.column_stack(cell_var), norm.mean(axis=0))
    ref = deseq2_robust_dispersion(norm, cell)
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    assert (got == 0.04).any() and (got > 0.04).any()  # both branches of the floor


def test_robust_dispersion_without_counted_cells_is_nan():
    got = cooks.robust_dispersion(np.zeros((3, 0)), np.ones(3))
    assert np.isnan(got).all()


def test_the_carried_search_keeps_what_its_readers_read():
    """The run state carries a search's fields only where a later step reads them
    (``bulk.cooks._carried``): a search passed through that form every round reaches the same
    trimmed means bit for bit, ties included, and carries fewer values than its dense form."""
    from fed_de.bulk.cooks import _carried, _dense, carried_sizes_match

    rng = np.random.default_rng(3)
    n, G = 14, 40
    values = rng.poisson(rng.uniform(0.3, 30, size=G), size=(n, G)).astype(float)  # ties
    values[:, :3] = 0.0  # all tied
    site = np.arange(n) % 3 == 0
    lo, hi = tr.trim_ranks(n, 0.2)
    k = np.tile([lo - 1, hi], (G, 1))
    first = tr.start(values.mean(axis=0), k, np.array([n, n]), 15, (-2.0, 2.0))
    searches = [first, _carried(first)]
    sizes = []
    for _ in range(30):
        searches[1] = _dense(searches[1])
        counts = np.zeros(searches[0].thresholds.shape)
        for t in range(2):
            counts[:, t] = sum(tr.count_below(values[m], searches[0].thresholds[:, t])
                               for m in (site, ~site))
        searches = [tr.refine(s, counts) for s in searches]
        carried = _carried(searches[1])
        assert carried_sizes_match(carried, 2)
        sizes.append(sum(np.size(v) for v in vars(carried).values()))
        searches[1] = carried
        if searches[0].done.all():
            break
    dense, carried = searches[0], _dense(searches[1])
    assert dense.tie.any() and dense.done.all()
    means = []
    for s in (dense, carried):
        parts = [tr.trimmed_parts(values[m], s, s, 0, 1) for m in (site, ~site)]
        tot = {key: parts[0][key] + parts[1][key] for key in parts[0]}
        means.append(tr.trimmed_mean(tot, s, s, 0, 1, lo, hi))
    np.testing.assert_array_equal(means[0], means[1])
    np.testing.assert_array_equal(means[0], trim_mean(values, 0.2, axis=0))
    assert max(sizes) < sum(np.size(v) for v in vars(dense).values())
