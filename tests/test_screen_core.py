"""Core maths of the perturbation screen against brute force and scipy.

Each function of the screen's core modules (:mod:`fed_de.core.screen_sums`,
:mod:`~fed_de.core.screen_dispersion`, :mod:`~fed_de.core.screen_fit`,
:mod:`~fed_de.core.screen_testing`) is checked on its own: the power-sum series
against cell-by-cell sums, the Newton sums against finite differences of the NB likelihood,
the frozen-control standard error against the 2 x 2 information, Welch's t and the van
Elteren statistic against scipy.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats
from scipy.special import gammaln

from fed_de.core import screen_dispersion as cd
from fed_de.core import screen_fit as cf
from fed_de.core import screen_sums as cs
from fed_de.core import screen_testing as ct


def _counts(rng, n, G, density=0.15):
    X = sp.random(n, G, density=density, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 8, k).astype(float))
    X.data[rng.random(X.nnz) < 0.02] = 40.0  # a few counts above Y_EXACT
    return X


def _nb_loglik(y, mu, alpha):
    r = 1.0 / alpha
    return (gammaln(y + r) - gammaln(r) - gammaln(y + 1) + r * np.log(r / (r + mu))
            + y * np.log(mu / (r + mu)))


def test_cell_design_and_codes():
    X = cs.cell_design([3, 2])
    assert X.shape == (6, 4)
    assert np.allclose(X[:, 0], 1.0)
    levels = np.array([[0, 0], [2, 1], [1, 0]])
    codes = cs.cell_codes(levels, [3, 2])
    assert codes.tolist() == [0, 5, 2]
    assert np.allclose(X[5], [1, 0, 1, 1])
    v = cf.unit_coefficients(X)
    assert np.allclose(X @ v, 1.0)
    assert np.allclose(cf.unit_coefficients(np.eye(3)), 1.0)


@pytest.mark.parametrize("kind,f", [("L", np.log1p), ("T1", lambda t: t / (1 + t)),
                                    ("T2", lambda t: (t / (1 + t)) ** 2),
                                    ("T3", lambda t: (t / (1 + t)) ** 3)])
def test_series_sums_equal_cell_sums(kind, f):
    rng = np.random.default_rng(1)
    sf = np.exp(rng.normal(0, 0.5, 300))
    groups = rng.integers(0, 3, 300)
    mom = cs.sf_moments(sf, groups, 3)
    # z from tiny to just under the radius of the series
    zmax = cs.SERIES_RHO / mom["smax"]
    z = zmax[:, None] * np.geomspace(1e-9, 0.999, 40)[None, :]
    got = cs.series_sums(mom, z, (kind,))[kind]
    want = np.array([[f(sf[groups == d] * zz).sum() for zz in z[d]] for d in range(3)])
    assert np.allclose(got, want, rtol=1e-13, atol=0)


def test_disp_summands_series_equal_dense():
    rng = np.random.default_rng(2)
    n, G, K, D = 400, 30, 3, 2
    X = _counts(rng, n, G)
    sf = np.exp(rng.normal(0, 0.4, n))
    groups = np.where(rng.random(n) < 0.2, -1, rng.integers(0, D, n))
    means = np.exp(rng.normal(-2.5, 1.5, (D, G)))
    log_alpha = rng.normal(-1, 2, (G, K))
    dense = cd.disp_summands(X, sf, groups, means, log_alpha)
    mom = cs.sf_moments(sf, groups, D)
    ser = cs.series_genes(mom, means[:, :, None] * np.exp(log_alpha)[None], means,
                            cs.MIN_MU)
    assert 0 < ser.sum() < G  # both paths used
    mixed = cd.disp_series_summands(mom, means, log_alpha, ser)
    part = cd.disp_summands(X, sf, groups, means, log_alpha, dense=~ser)
    for k in dense:
        assert np.allclose(mixed[k] + part[k], dense[k], rtol=1e-11, atol=1e-12), k


def test_disp_summands_derivatives():
    """ll, d1, d2 are the NB log likelihood (up to alpha-free terms) and its derivatives in
    log alpha; A is the sum of mu / (1 + alpha mu) per group."""
    rng = np.random.default_rng(3)
    n, G, D = 300, 5, 2
    X = _counts(rng, n, G, 0.3)
    sf = np.exp(rng.normal(0, 0.3, n))
    groups = rng.integers(0, D, n)
    means = np.exp(rng.normal(-0.5, 1.0, (D, G)))
    x0 = rng.normal(-1.0, 1.0, G)
    eps = 1e-5
    pts = np.column_stack([x0 - eps, x0, x0 + eps])
    out = cd.disp_summands(X, sf, groups, means, pts)
    Y = X.toarray()
    mu = sf[:, None] * means[groups]
    for g in range(G):
        ll = [_nb_loglik(Y[:, g], mu[:, g], np.exp(x)).sum() for x in pts[g]]
        const = ll[1] - out["ll"][g, 1]
        assert np.allclose(np.array(ll) - const, out["ll"][g], rtol=0, atol=1e-8)
        assert np.isclose(out["d1"][g, 1], (ll[2] - ll[0]) / (2 * eps), rtol=1e-5, atol=1e-6)
        assert np.isclose(out["d2"][g, 1], (ll[2] - 2 * ll[1] + ll[0]) / eps**2, rtol=1e-3,
                          atol=1e-3)
        a = np.exp(x0[g])
        for d in range(D):
            w = mu[groups == d, g] / (1 + a * mu[groups == d, g])
            assert np.isclose(out["A"][g, 1, d], w.sum(), rtol=1e-12)


def test_fit_summands_series_equal_dense_and_score():
    rng = np.random.default_rng(4)
    n, G, P, C = 500, 25, 4, 2
    X = _counts(rng, n, G)
    sf = np.exp(rng.normal(0, 0.4, n))
    q = rng.integers(-1, P + 1, n)
    c = rng.integers(0, C, n)
    b = rng.normal(-2, 1.5, (G, C))
    beta = rng.normal(0, 0.5, (P, G))
    alpha = np.exp(rng.normal(-1, 1, G))
    table = cf.mean_table(np.eye(C), b, beta)
    full = cf.fit_summands(X, sf, q, c, table, alpha, with_w=True)
    code = np.where(q >= 0, q * C + c, -1)
    mom = cs.sf_moments(sf, code, (P + 1) * C)
    flat = table.reshape((P + 1) * C, G)
    ser = cs.series_genes(mom, (flat * alpha)[:, :, None], flat, cs.MIN_MU)
    assert 0 < ser.sum() < G
    mixed = cf.fit_series_summands(mom, table, alpha, ser, with_w=True)
    part = cf.fit_summands(X, sf, q, c, table, alpha, with_w=True, dense=~ser)
    for k in full:
        assert np.allclose(mixed[k] + part[k], full[k], rtol=1e-11, atol=1e-12), k
    # the score of perturbation p at gene g is the derivative of its log likelihood
    Y = X.toarray()
    p, g = 2, 7
    rows = q == p + 1
    mu = sf[rows] * np.exp(b[g, c[rows]] + beta[p, g])
    eps = 1e-6

    def ll(shift):
        return _nb_loglik(Y[rows, g], mu * np.exp(shift), alpha[g]).sum()

    num = (ll(eps) - ll(-eps)) / (2 * eps)
    assert np.isclose(full["u"][p + 1, :, g].sum(), num, rtol=1e-6)
    hess = -(ll(eps) - 2 * ll(0) + ll(-eps)) / eps**2
    assert np.isclose(full["h"][p + 1, :, g].sum(), hess, rtol=1e-4)


def test_frozen_se_is_two_by_two_information():
    """Intercept-only control: var = 1/W_pert + 1/W_control, the (beta, beta) entry of the
    inverse information of (intercept, beta) over control and perturbed cells."""
    wp = np.array([[3.0, 10.0]])  # (P=1, G=2)
    wc = np.array([[5.0], [50.0]])  # packed (G, T=1)
    se = cf.frozen_wald_se(wp[..., None], wc, np.array([1.0]))
    for g in range(2):
        info = np.array([[wc[g, 0] + wp[0, g], wp[0, g]], [wp[0, g], wp[0, g]]])
        assert np.isclose(se[0, g] ** 2, np.linalg.inv(info)[1, 1], rtol=1e-5)


def test_fit_newton_reaches_mle():
    """Control fit and effect by the coupled Newton updates equal a direct 1-D MLE."""
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(5)
    n_c, n_p, alpha = 400, 150, 0.4
    sf = np.exp(rng.normal(0, 0.4, n_c + n_p))
    mu = sf * 0.3 * np.where(np.arange(n_c + n_p) >= n_c, 2.0, 1.0)
    y = rng.negative_binomial(1 / alpha, 1 / (1 + alpha * mu)).astype(float)
    X = sp.csr_matrix(y[:, None])
    q = np.where(np.arange(n_c + n_p) >= n_c, 1, 0)
    c = np.zeros_like(q)
    Xc = np.ones((1, 1))
    b0 = cf.control_start(np.array([[y[:n_c].sum()]]), np.array([sf[:n_c].sum()]), Xc)
    beta = cf.pert_start(np.array([[y[n_c:].sum()]]), np.array([[sf[n_c:].sum()]]), Xc, b0)
    fit = cf.start_control_fit(b0, np.zeros(1, dtype=bool))
    unit = cf.unit_coefficients(Xc)
    for _ in range(6):
        s = cf.fit_summands(X, sf, q, c, cf.mean_table(Xc, fit.b, beta),
                              np.array([alpha]))
        new = cf.control_update(fit, s["ll"].sum(0), s["u"][0].T, s["h"][0].T, Xc,
                                np.ones((1, 1), dtype=bool))
        beta, _ = cf.pert_update(beta, s["u"][1:].sum(1), s["h"][1:].transpose(0, 2, 1),
                                 new.b - fit.b, unit)
        fit = new
    a_hat = minimize_scalar(lambda a: -_nb_loglik(y[:n_c], sf[:n_c] * np.exp(a), alpha).sum(),
                            bounds=(-5, 3), method="bounded", options={"xatol": 1e-12}).x
    b_hat = minimize_scalar(
        lambda t: -_nb_loglik(y[n_c:], sf[n_c:] * np.exp(a_hat + t), alpha).sum(),
        bounds=(-3, 3), method="bounded", options={"xatol": 1e-12}).x
    assert fit.done[0]
    assert np.isclose(fit.b[0, 0], a_hat, atol=1e-7)
    assert np.isclose(beta[0, 0], b_hat, atol=1e-7)


def test_welch_matches_scipy():
    rng = np.random.default_rng(6)
    a, b = rng.normal(0.3, 1, 40), rng.normal(0, 2, 70)
    _, t, _, p = ct.welch_t(a.size, a.sum(), (a * a).sum(), b.size, b.sum(), (b * b).sum())
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert np.isclose(t, ref.statistic, rtol=1e-10)
    assert np.isclose(p, ref.pvalue, rtol=1e-8)


def test_van_elteren_one_stratum_is_mann_whitney_with_ties():
    rng = np.random.default_rng(7)
    G, n_c, n_p = 6, 80, 50
    ctrl = rng.poisson(0.8, (n_c, G)) * np.exp(rng.normal(0, 0.1, (n_c, 1))).round(1)
    pert = rng.poisson(1.2, (n_p, G)) * np.exp(rng.normal(0, 0.1, (n_p, 1))).round(1)
    M = np.vstack([ctrl, pert])
    grp = np.r_[np.zeros(n_c, int), np.ones(n_p, int)]
    rows, cols = np.nonzero(M)
    out = ct.van_elteren_site(M[rows, cols], cols, grp[rows], np.zeros(rows.size, int),
                                np.array([[n_c, n_p]]), G)
    z, p = ct.van_elteren_test(out["u"], out["e"], out["v"])
    for g in range(G):
        ref = stats.mannwhitneyu(pert[:, g], ctrl[:, g], use_continuity=False,
                                 method="asymptotic")
        # out["u"] is U / (N + 1): undo the van Elteren weight to compare U itself
        assert np.isclose(out["u"][0, g] * (n_c + n_p + 1), ref.statistic, rtol=1e-12)
        assert np.isclose(p[0, g], ref.pvalue, rtol=1e-9)


def test_van_elteren_strata_add_up():
    """Two strata at one site = the same two strata at two sites."""
    rng = np.random.default_rng(8)
    G = 4
    M = rng.poisson(1.0, (120, G)).astype(float)
    grp = rng.integers(0, 3, 120)
    strat = rng.integers(0, 2, 120)
    n = np.array([[np.sum((strat == s) & (grp == q)) for q in range(3)] for s in range(2)])
    rows, cols = np.nonzero(M)
    both = ct.van_elteren_site(M[rows, cols], cols, grp[rows], strat[rows], n, G)
    parts = []
    for s in range(2):
        sel = strat[rows] == s
        nn = np.zeros_like(n)
        nn[s] = n[s]
        parts.append(ct.van_elteren_site(M[rows, cols][sel], cols[sel], grp[rows][sel],
                                           strat[rows][sel], nn, G))
    for k in both:
        assert np.allclose(both[k], parts[0][k] + parts[1][k], rtol=1e-13)


def test_expression_filter_rules():
    ctrl_expr = np.array([0.0, 5.0, 50.0])
    ctrl_mean = np.array([0.0, 0.01, 0.5])
    pert_expr = np.array([[3.0, 0.0, 10.0]])
    pert_mean = np.array([[0.1, 0.0, 0.2]])
    tested = ct.expression_filter(ctrl_expr, ctrl_mean, 1000.0, pert_expr, pert_mean,
                                    [100.0])
    # gene 0: no expressing control cell; gene 1: none in the perturbed arm
    assert tested.tolist() == [[False, False, True]]


def test_bh_by_row_leaves_nan_out():
    p = np.array([[0.01, np.nan, 0.04, 0.03], [np.nan, np.nan, 0.5, 0.5]])
    adj = ct.bh_by_row(p)
    assert np.isnan(adj[0, 1]) and np.isnan(adj[1, 0])
    assert np.allclose(adj[0, [0, 2, 3]], [0.03, 0.04, 0.04])
