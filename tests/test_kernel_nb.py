"""Unit tests of :mod:`fed_de.core.nb` against independent references.

References: per-sample formulas written out one gene and one sample at a time (numpy loops),
``scipy.stats.nbinom.logpmf`` for the NB log likelihood, ``scipy.special.polygamma`` for the
trigamma function, ``numpy.linalg.slogdet`` for the Cox-Reid term, and Richardson-extrapolated
central finite differences in ``log(alpha)`` for every derivative. Additivity: the summands of
the samples split between two "sites" add up to those of the pooled samples.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import gammaln, polygamma
from scipy.stats import nbinom

from fed_de.core import nb


def simulate(seed: int, n: int = 10, G: int = 6):
    """NB counts for a design with an intercept, a two-level factor and a covariate."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), np.arange(n) % 2, rng.normal(size=n)])
    sf = rng.uniform(0.5, 2.0, n)
    beta = np.column_stack([rng.uniform(-1, 6, G), rng.normal(0, 1, G), rng.normal(0, 0.3, G)])
    alpha = np.exp(rng.uniform(-4, 0.5, G))
    mu = sf[:, None] * np.exp(X @ beta.T)
    y = rng.negative_binomial(1 / alpha, 1 / (1 + alpha * mu)).astype(float)
    y[:, 0] = 0.0  # a gene with no counts: every mean floors at 0.5
    return y, X, sf, beta, alpha


def logpmf(y, mu, alpha):
    """log NB(y; mean mu, dispersion alpha) from scipy (size 1/alpha)."""
    r = 1.0 / alpha
    return nbinom.logpmf(y, r, r / (r + mu))


def fd_derivatives(f, x: float, h: float = 3e-2) -> tuple[float, float]:
    """First and second derivative of a scalar function by Richardson-extrapolated central
    differences (error O(h^4); h large enough that the rounding of scipy's log pmf, ~1e-10
    where 1/alpha is large, stays below 1e-7 in the second derivative)."""
    def d1(s):
        return (f(x + s) - f(x - s)) / (2 * s)

    def d2(s):
        return (f(x + s) - 2 * f(x) + f(x - s)) / s**2

    return (4 * d1(h / 2) - d1(h)) / 3, (4 * d2(h / 2) - d2(h)) / 3


def test_trigamma_matches_polygamma():
    x = np.concatenate([np.logspace(-8, 8, 400), [7.999999, 8.0, 8.000001, 0.5, 1.0, 2.5]])
    got = nb.trigamma(x.reshape(-1, 2)).ravel()
    ref = polygamma(1, x)
    # the asymptotic series stops at the x^-11 term: its error is below the first omitted
    # term, 691/2730 z^-13, largest at z = 8 (3.5e-12 relative; the docstring says ~1e-12)
    z = np.where(x < 8, x + np.ceil(8 - x), x)
    bound = 691 / 2730 * z**-13 / polygamma(1, z) + 1e-14
    assert (np.abs(got / ref - 1) <= bound).all()
    np.testing.assert_allclose(got, ref, rtol=3.5e-12, atol=0)
    exact_8 = np.pi**2 / 6 - sum(1 / k**2 for k in range(1, 8))  # psi'(8) in closed form
    np.testing.assert_allclose(nb.trigamma(np.array([8.0])), exact_8, rtol=3.5e-12)


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(0)
    for p in (1, 2, 4):
        B = rng.normal(size=(3, 5, p, p))
        S = B + np.swapaxes(B, -1, -2)
        v = nb.pack(S)
        assert v.shape == (3, 5, nb.n_packed(p)) and nb.n_packed(p) == p * (p + 1) // 2
        np.testing.assert_array_equal(nb.unpack(v, p), S)
        np.testing.assert_array_equal(nb.pack(nb.unpack(v, p)), v)


def test_gram_is_xt_w_x():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(7, 3))
    w = rng.uniform(0.1, 2.0, size=(7, 4, 2))  # samples x genes x points
    got = nb.unpack(nb.gram(X, w), 3)
    for g in range(4):
        for k in range(2):
            np.testing.assert_allclose(got[g, k], X.T @ np.diag(w[:, g, k]) @ X, rtol=1e-13)


def test_ridge_is_deseq2_lambda_on_the_natural_scale():
    # DESeq2: lambda = 1e-6 on log2 coefficients; beta_log2 = beta / ln 2
    np.testing.assert_allclose(nb.ridge(3), np.full(3, 1e-6 / np.log(2) ** 2), rtol=1e-15)


def test_irls_summands_match_per_sample_formulas():
    y, X, sf, beta, alpha = simulate(2)
    rng = np.random.default_rng(2)
    b = beta + rng.normal(0, 0.2, beta.shape)  # away from the truth, some means below 0.5
    b[1, 0] = -3.0
    got = nb.irls_summands(y, X, sf, b, alpha)
    n, p = X.shape
    for g in range(y.shape[1]):
        xtwx, xtwz, dev = np.zeros((p, p)), np.zeros(p), 0.0
        for i in range(n):
            mu = max(sf[i] * np.exp(X[i] @ b[g]), 0.5)
            w = mu / (1 + alpha[g] * mu)
            z = np.log(mu / sf[i]) + (y[i, g] - mu) / mu
            xtwx += w * np.outer(X[i], X[i])
            xtwz += w * z * X[i]
            dev += -2 * logpmf(y[i, g], mu, alpha[g])
        np.testing.assert_allclose(nb.unpack(got["xtwx"][g], p), xtwx, rtol=1e-12)
        np.testing.assert_allclose(got["xtwz"][g], xtwz, rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(got["deviance"][g], dev, rtol=1e-11)


def test_deviance_precomputed_parts_change_nothing():
    y, X, sf, beta, alpha = simulate(3)
    mu = nb.fitted_mu(X, beta, sf, 0.5)
    plain = nb.irls_summands(y, X, sf, beta, alpha)["deviance"]
    pre = nb.irls_summands(y, X, sf, beta, alpha, 0.5, gammaln(y + 1).sum(axis=0),
                           nb.nb_lgamma_ratio(y, alpha))["deviance"]
    np.testing.assert_array_equal(plain, pre)
    np.testing.assert_allclose(plain, -2 * logpmf(y, mu, alpha).sum(axis=0), rtol=1e-12)


def test_fitted_mu_floors_and_solve_ridge():
    y, X, sf, beta, alpha = simulate(4)
    b = beta.copy()
    b[2, 0] = -5.0
    mu = nb.fitted_mu(X, b, sf, 0.5)
    np.testing.assert_allclose(mu, np.maximum(sf[:, None] * np.exp(X @ b.T), 0.5), rtol=1e-15)
    assert (mu[:, 2] == 0.5).any()
    A = nb.gram(X, mu / (1 + alpha * mu))
    rhs = np.random.default_rng(4).normal(size=(y.shape[1], 3))
    lam = nb.ridge(3)
    got = nb.solve_ridge(A, rhs, lam)
    for g in range(y.shape[1]):
        M = nb.unpack(A[g], 3) + np.diag(lam)
        np.testing.assert_allclose(M @ got[g], rhs[g], rtol=1e-10, atol=1e-10)
        inv = np.linalg.inv(M)
        np.testing.assert_allclose(nb.wald_covariance(A, lam)[g],
                                   inv @ nb.unpack(A[g], 3) @ inv, rtol=1e-10)


def ll_part(y, mu, theta):
    """DESeq2's ``ll_part`` (log likelihood without the lgamma(y + 1) and y log(mu) terms)
    from scipy's log pmf, for one gene at log(alpha) = theta."""
    return float((logpmf(y, mu, np.exp(theta)) + gammaln(y + 1) - y * np.log(mu)).sum())


def xtwx(X, mu, theta):
    """X' diag(mu / (1 + alpha mu)) X for one gene, per sample."""
    w = mu / (1 + np.exp(theta) * mu)
    return sum(w[i] * np.outer(X[i], X[i]) for i in range(X.shape[0]))


@pytest.fixture(scope="module")
def disp_case():
    y, X, sf, beta, alpha = simulate(5)
    mu = nb.fitted_mu(X, beta, sf, 0.5)
    # points from the Poisson limit to very large dispersions
    points = np.log(alpha)[:, None] + np.array([-6.0, -1.0, 0.0, 2.0])[None, :]
    return y, X, mu, points, nb.disp_summands(y, mu, X, points)


def test_disp_summands_ll_and_derivatives(disp_case):
    y, X, mu, points, got = disp_case
    for g in range(y.shape[1]):
        for k, theta in enumerate(points[g]):
            def f(t, g=g):
                return ll_part(y[:, g], mu[:, g], t)

            d1, d2 = fd_derivatives(f, theta)
            np.testing.assert_allclose(got["ll"][g, k], f(theta), rtol=1e-11, atol=1e-9)
            scale = abs(d1) + abs(d2) + 1.0
            assert abs(got["d1"][g, k] - d1) < 1e-8 * scale
            assert abs(got["d2"][g, k] - d2) < 1e-6 * scale


def test_disp_summands_xtwx_and_derivatives(disp_case):
    y, X, mu, points, got = disp_case
    p = X.shape[1]
    for g in range(y.shape[1]):
        for k, theta in enumerate(points[g]):
            A = xtwx(X, mu[:, g], theta)
            np.testing.assert_allclose(nb.unpack(got["A"][g, k], p), A, rtol=1e-12)
            h = 1e-3
            A_p, A_m = xtwx(X, mu[:, g], theta + h), xtwx(X, mu[:, g], theta - h)
            A_p2, A_m2 = xtwx(X, mu[:, g], theta + h / 2), xtwx(X, mu[:, g], theta - h / 2)
            A1 = (4 * (A_p2 - A_m2) / h - (A_p - A_m) / (2 * h)) / 3
            A2 = (4 * (A_p2 - 2 * A + A_m2) / (h / 2) ** 2 - (A_p - 2 * A + A_m) / h**2) / 3
            tol = 1e-7 * np.abs(A).max()
            np.testing.assert_allclose(nb.unpack(got["A1"][g, k], p), A1, atol=tol)
            np.testing.assert_allclose(nb.unpack(got["A2"][g, k], p), A2, atol=10 * tol)


def test_cox_reid_is_half_log_det_and_its_derivatives(disp_case):
    y, X, mu, points, got = disp_case
    p = X.shape[1]
    cr, cr1, cr2 = nb.cox_reid(got["A"], got["A1"], got["A2"], p)
    for g in range(y.shape[1]):
        for k, theta in enumerate(points[g]):
            def f(t, g=g):
                return -0.5 * np.linalg.slogdet(xtwx(X, mu[:, g], t))[1]

            d1, d2 = fd_derivatives(f, theta)
            np.testing.assert_allclose(cr[g, k], f(theta), rtol=1e-12, atol=1e-12)
            assert abs(cr1[g, k] - d1) < 1e-8 * (abs(d1) + 1)
            assert abs(cr2[g, k] - d2) < 1e-6 * (abs(d2) + 1)


def test_cox_reid_of_a_singular_matrix_is_nan():
    A = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]])  # [[1,1],[1,1]] singular, second fine
    cr, d1, d2 = nb.cox_reid(A, np.zeros_like(A), np.zeros_like(A), 2)
    assert np.isnan(cr[0]) and np.isfinite(cr[1])
    np.testing.assert_allclose(cr[1], -0.5 * np.log(2.0), rtol=1e-14)


def test_summands_of_two_sites_add_up_to_the_pooled_ones():
    y, X, sf, beta, alpha = simulate(6, n=13)
    site = np.random.default_rng(6).permutation(13) < 5
    parts = [(y[m], X[m], sf[m]) for m in (site, ~site)]
    pooled = nb.irls_summands(y, X, sf, beta, alpha)
    split = [nb.irls_summands(yy, XX, ss, beta, alpha) for yy, XX, ss in parts]
    for key, value in pooled.items():
        np.testing.assert_allclose(split[0][key] + split[1][key], value, rtol=1e-12,
                                   atol=1e-10)
    mu = nb.fitted_mu(X, beta, sf, 0.5)
    points = np.log(alpha)[:, None] + np.array([-1.0, 0.0, 1.0])[None, :]
    pooled = nb.disp_summands(y, mu, X, points)
    split = [nb.disp_summands(y[m], mu[m], X[m], points) for m in (site, ~site)]
    for key, value in pooled.items():
        np.testing.assert_allclose(split[0][key] + split[1][key], value, rtol=1e-11,
                                   atol=1e-9)


def test_disp_summands_at_scattered_pairs_match_the_dense_sums():
    """Pairs in any order, a different number per gene: each is its gene's dense column; the
    result does not depend on how the pairs are cut into blocks (sums run in sample order)."""
    y, X, sf, beta, alpha = simulate(7, n=9, G=5)
    mu = nb.fitted_mu(X, beta, sf, 0.5)
    rng = np.random.default_rng(7)
    genes = np.array([3, 0, 3, 1, 4, 3, 0, 2, 4, 4, 1])
    points = np.log(alpha[genes]) + rng.uniform(-3, 3, genes.size)
    got = nb.disp_summands_at(y, mu, X, genes, points)
    for i, (g, theta) in enumerate(zip(genes, points, strict=True)):
        np.testing.assert_allclose(got["ll"][i], ll_part(y[:, g], mu[:, g], theta),
                                   rtol=1e-11, atol=1e-9)
        np.testing.assert_allclose(nb.unpack(got["A"][i], 3), xtwx(X, mu[:, g], theta),
                                   rtol=1e-12)
        one = nb.disp_summands(y[:, [g]], mu[:, [g]], X, np.array([[theta]]))
        for key, value in one.items():
            _same(key, value[0, 0], got[key][i])
    for block in (2 * 9, 3 * 9, 10**6):  # blocks of 2 and 3 pairs (last one widened), one
        other = nb.disp_summands_at(y, mu, X, genes, points, block=block)
        for key, value in got.items():
            _same(key, other[key], value)


def _same(key, a, b):
    """Sums over samples are the same numbers; the Grams come from BLAS, whose kernels may
    add in another order for another number of rows."""
    if key in ("ll", "d1", "d2"):
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=0)


def test_disp_summands_at_no_pair_and_one_pair():
    y, X, sf, beta, alpha = simulate(8, n=6, G=3)
    mu = nb.fitted_mu(X, beta, sf, 0.5)
    none = nb.disp_summands_at(y, mu, X, np.array([], dtype=int), np.array([]))
    assert none["ll"].shape == (0,) and none["A"].shape == (0, 6)
    one = nb.disp_summands_at(y, mu, X, np.array([2]), np.array([-1.0]))
    np.testing.assert_allclose(one["ll"][0], ll_part(y[:, 2], mu[:, 2], -1.0), rtol=1e-11)


@pytest.mark.parametrize("share", [0.0, 1.01])
def test_tabulated_special_functions_give_the_same_numbers(monkeypatch, share):
    """lgamma/digamma/trigamma once per distinct count (share 1.01: always; 0: never) are the
    numbers of the per-sample evaluation, ties and zeros included."""
    y, X, sf, beta, alpha = simulate(9, n=40, G=7)
    y[::3, 2] = y[0, 2]  # many ties
    y[:, 4] = 0.5 * np.round(y[:, 4] / 5.0)  # non-integer values with ties
    mu = nb.fitted_mu(X, beta, sf, 0.5)
    genes = np.repeat(np.arange(7), 3)
    points = np.log(alpha[genes]) + np.tile([-2.0, 0.0, 3.0], 7)
    monkeypatch.setattr(nb, "DISTINCT_MAX", 0.5)
    plain = nb.disp_summands_at(y, mu, X, genes, points, block=40 * 4)
    monkeypatch.setattr(nb, "DISTINCT_MAX", share)
    got = nb.disp_summands_at(y, mu, X, genes, points, block=40 * 4)
    for key, value in plain.items():
        np.testing.assert_array_equal(got[key], value)  # same blocks: even the Grams
    np.testing.assert_allclose(got["ll"][6], ll_part(y[:, 2], mu[:, 2], points[6]), rtol=1e-11)
