"""Unit tests of :mod:`fed_de.core.dispersion` (DESeq2's rules around the dispersion searches;
the searches themselves: tests/test_disp_path.py and tests/test_optim1d_bracket.py).

References: the Cox-Reid adjusted profile likelihood written out per sample
(``scipy.stats.nbinom.logpmf`` and ``numpy.linalg.slogdet`` of X'WX) and maximised by
``scipy.optimize.minimize_scalar`` (bounded, xatol 1e-10); ``scipy.stats.norm.logpdf`` for the
log-normal prior; a Python port of DESeq2's line search (``fitDisp``, ``src/DESeq2.cpp``) and
of the rules of ``estimateDispersionsGeneEst`` / ``estimateDispersionsMAP`` (``R/core.R``).
Every round sums the site sums of two "sites".
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import nbinom, norm

from fed_de.core import dispersion as disp
from fed_de.core import nb


def profile(theta, y, mu, X, mean=None, var=None) -> float:
    """Cox-Reid adjusted log likelihood of one gene at log(alpha) = theta, per sample (plus
    the log-normal prior, up to a constant, when ``mean`` is given)."""
    a = np.exp(theta)
    r = 1 / a
    w = mu / (1 + a * mu)
    f = nbinom.logpmf(y, r, r / (r + mu)).sum() - 0.5 * np.linalg.slogdet(X.T @ (w[:, None] * X))[1]
    if mean is not None:
        f += norm.logpdf(theta, mean, np.sqrt(var))
    return f


def scipy_argmax(y, mu, X, lo, hi, mean=None, var=None) -> float:
    res = minimize_scalar(lambda t: -profile(t, y, mu, X, mean, var), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-10})
    return res.x


def evaluate(y, mu, X, points, prior=None):
    """Objective, gradient, curvature at ``points`` from the sums of two sites."""
    site = np.arange(y.shape[0]) % 3 == 0
    tot = None
    for part in (site, ~site):
        s = nb.disp_summands(y[part], mu[part], X[part], points)
        tot = s if tot is None else {k: tot[k] + v for k, v in s.items()}
    return disp.objective(tot["ll"], tot["d1"], tot["d2"], tot["A"], tot["A1"], tot["A2"],
                          points, X.shape[1], prior)


@pytest.fixture(scope="module")
def data():
    """NB counts (~ 1 + group + covariate, 14 samples) with fixed means; gene 0 is Poisson
    (optimum at the lower bound), gene 1 nearly empty, gene 2 very overdispersed."""
    rng = np.random.default_rng(11)
    n, G = 14, 24
    X = np.column_stack([np.ones(n), np.arange(n) % 2, rng.normal(size=n)])
    sf = rng.uniform(0.6, 1.6, n)
    beta = np.column_stack([rng.uniform(0, 6, G), rng.normal(0, 1, G), rng.normal(0, .3, G)])
    alpha = np.exp(rng.uniform(-4, 0.5, G))
    alpha[2] = 6.0
    mu = np.maximum(sf[:, None] * np.exp(X @ beta.T), 0.5)
    y = rng.negative_binomial(1 / alpha, 1 / (1 + alpha * mu)).astype(float)
    y[:, 0] = rng.poisson(mu[:, 0])
    y[:, 1] = 0.0
    y[4, 1] = 1.0
    mu[:, 1] = np.maximum(mu[:, 1] * 0 + 1 / n, 0.5)
    max_disp = max(10.0, n)
    alpha_hat = np.clip(alpha * np.exp(rng.normal(0, 0.7, G)), 1e-8, max_disp)
    return y, mu, X, alpha_hat, max_disp


def test_prior_adds_the_log_normal_term():
    rng = np.random.default_rng(0)
    G, K = 4, 3
    ll, d1, d2 = rng.normal(-50, 5, (G, K)), rng.normal(0, 2, (G, K)), -rng.uniform(1, 3, (G, K))
    X = np.column_stack([np.ones(6), np.arange(6) % 2])
    w = rng.uniform(0.5, 3, (6, G, K))
    A, A1, A2 = nb.gram(X, w), nb.gram(X, -0.3 * w), nb.gram(X, 0.1 * w)
    points = rng.normal(-2, 1, (G, K))
    prior = disp.Prior(mean=rng.normal(-2, 0.5, G), var=0.3)
    f0, g0, h0 = disp.objective(ll, d1, d2, A, A1, A2, points, 2)
    f1, g1, h1 = disp.objective(ll, d1, d2, A, A1, A2, points, 2, prior)
    m, sd = prior.mean[:, None], np.sqrt(prior.var)
    np.testing.assert_allclose(f1 - f0, norm.logpdf(points, m, sd) - norm.logpdf(m, m, sd),
                               rtol=1e-12, atol=1e-12)
    step = 1e-5
    dlog = (norm.logpdf(points + step, m, sd) - norm.logpdf(points - step, m, sd)) / (2 * step)
    np.testing.assert_allclose(g1 - g0, dlog, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(h1 - h0, -1 / prior.var, rtol=1e-12)


def map_prior(data):
    y = data[0]
    rng = np.random.default_rng(5)
    return disp.Prior(mean=np.log(rng.uniform(0.05, 0.4, y.shape[1])), var=0.25)


# -- DESeq2's line search (fitDisp) and its rules --------------------------------------------------
LOG_1E_9 = float(np.log(1e-9))  # DESeq2's min_log_alpha: log(minDisp / 10)


def fit_disp(lp, dlp, a, kappa_0=1.0, tol=1e-6, maxit=100, min_log_alpha=LOG_1E_9):
    """DESeq2's ``fitDisp`` line search for one gene: (log alpha, iterations, initial and
    last log posterior)."""
    eps = 1e-4
    l0 = lp_ = lp(a)
    d = dlp(a)
    kappa, accepted, it = kappa_0, 0, 0
    for _ in range(maxit):
        it += 1
        if a + kappa * d < -30:
            kappa = (-30 - a) / d
        if a + kappa * d > 10:
            kappa = (10 - a) / d
        if -lp(a + kappa * d) <= -lp_ - kappa * eps * d * d:
            accepted += 1
            a = a + kappa * d
            new = lp(a)
            change = new - lp_
            lp_ = new
            if change < tol or a < min_log_alpha:
                break
            d = dlp(a)
            kappa = min(kappa * 1.1, kappa_0)
            if accepted % 5 == 0:
                kappa /= 2
        else:
            kappa /= 2
    return a, it, l0, lp_


def test_stops_at_start_is_deseq2s_one_step_line_search():
    """On quadratics the second-order prediction of the first step is exact: DESeq2 ends
    after its first step (iter == 1) exactly where :func:`deseq2_stops_at_start` says."""
    rng = np.random.default_rng(3)
    g0 = np.concatenate([10 ** rng.uniform(-5, 0.5, 300) * rng.choice([-1, 1], 300),
                         [1e-4, 1e-3, 0.0999, 0.5]])
    h0 = np.concatenate([-10 ** rng.uniform(-2, 0.5, 300), [-1.0, -1.99, -1.9999, -1.99999]])
    ends = []
    for g, h in zip(g0, h0, strict=True):
        _, it, _, _ = fit_disp(lambda a, g=g, h=h: g * a + 0.5 * h * a * a,
                               lambda a, g=g, h=h: g + h * a, 0.0)
        ends.append(it == 1)
    ends = np.array(ends)
    assert 20 < ends.sum() < len(ends) - 20  # both outcomes are exercised
    np.testing.assert_array_equal(disp.deseq2_stops_at_start(g0, h0), ends)


def test_genewise_no_increase_rule_on_a_constructed_case():
    start_f = np.full(7, -100.0)
    f = start_f + np.array([0.5e-4, 2e-4, 1.0, 1.0, 1.0, 1.0, 1.0])  # |start_f| / 1e6 = 1e-4
    x = np.log(np.array([0.2, 0.3, 0.4, 50.0, 1e-12, 0.5, 0.6]))
    start_g = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-4])  # gene 6: flat start
    start_h = -np.ones(7)
    alpha_init = np.full(7, 0.1)
    skip = np.zeros(7, dtype=bool)
    skip[5] = True
    est = disp.genewise_estimates(x, f, start_f, start_g, start_h, alpha_init, skip, 14.0)
    np.testing.assert_array_equal(est[[0, 6]], [0.1, 0.1])  # no increase; stops at start
    np.testing.assert_allclose(est[[1, 2]], [0.3, 0.4], rtol=1e-14)
    assert est[3] == 14.0 and est[4] == 1e-8 and np.isnan(est[5])


def test_final_dispersions_outlier_rule():
    var_log = 0.5
    fit = np.full(6, 0.1)
    cut = 0.1 * np.exp(2 * np.sqrt(var_log))  # DESeq2: log(gene) > log(fit) + 2 sd
    gene = np.array([cut * 1.0001, cut * 0.9999, 1e-8, np.nan, 3.0, 0.2])
    disp_map = np.array([0.11, 0.12, 0.09, 0.1, 1e-12, 100.0])
    skip = np.array([False, False, False, True, False, False])
    d_map, outlier, final = disp.final_dispersions(disp_map, gene, fit, var_log, skip, 14.0)
    np.testing.assert_array_equal(outlier, [True, False, False, False, True, False])
    np.testing.assert_allclose(d_map[[0, 1, 2]], [0.11, 0.12, 0.09], rtol=1e-14)
    assert np.isnan(d_map[3]) and d_map[4] == 1e-8 and d_map[5] == 14.0
    np.testing.assert_array_equal(final[[0, 4]], gene[[0, 4]])  # outliers keep gene-wise
    np.testing.assert_array_equal(final[[1, 2, 5]], d_map[[1, 2, 5]])
