"""Unit tests of :mod:`fed_de.core.dispersion` with the search of :mod:`fed_de.core.optim1d`.

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
from fed_de.core import nb, optim1d

RADIUS = 3.0  # the pipeline's first trust radius (fed_de.bulk.dispersions.RADIUS)
MAP_ROUNDS_DEFAULT = 3  # the pipeline's MAP rounds (DESeq2Options.map_rounds at 987cf22)


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


def search(state, y, mu, X, lo, hi, prior=None, rounds: int = 40):
    """optim1d rounds until every gene is done; (state, rounds used)."""
    for r in range(rounds):
        if state.done.all():
            return state, r
        points = optim1d.propose(state, lo, hi)
        f, g, h = evaluate(y, mu, X, points, prior)
        state = optim1d.update(state, points, f, g, h, lo, hi)
    return state, rounds


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


@pytest.fixture(scope="module")
def genewise(data):
    y, mu, X, alpha_hat, max_disp = data
    lo, hi = disp.log_bounds(max_disp)
    points = disp.initial_points(alpha_hat, max_disp)
    f, g, h = evaluate(y, mu, X, points)
    state = optim1d.start(points, f, g, h, radius=RADIUS, lo=lo, hi=hi)
    state, rounds = search(state, y, mu, X, lo, hi)
    return state, rounds, (f[:, 0], g[:, 0], h[:, 0])


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


def test_initial_points_are_the_start_spread_and_anchors():
    alpha_hat = np.array([1e-8, 0.05, 3.0, 20.0])
    lo, hi = disp.log_bounds(14.0)
    assert (lo, hi) == (np.log(1e-9), np.log(14.0))
    pts = disp.initial_points(alpha_hat, 14.0)
    x0 = np.log(alpha_hat)
    expect = np.column_stack([x0, x0 - 1.5, x0 + 1.5, np.full(4, lo), np.full(4, np.log(1e-2)),
                              np.full(4, hi)])
    np.testing.assert_allclose(pts, np.clip(expect, lo, hi), rtol=1e-15)


def test_genewise_search_finds_the_cox_reid_profile_maximum(data, genewise):
    y, mu, X, _, max_disp = data
    state, rounds, _ = genewise
    lo, hi = disp.log_bounds(max_disp)
    assert state.done.all()
    # measured 11, the Poisson gene crawling along its flat profile; the others are within
    # 1.2e-6 after 4 rounds (the pipeline's count)
    assert rounds <= 12
    ref = np.array([scipy_argmax(y[:, g], mu[:, g], X, lo, hi) for g in range(y.shape[1])])
    # below alpha ~ 1e-6 the profile is flat to within the rounding of the log pmf (1e-6):
    # no optimum is defined there; DESeq2 leaves such genes out of the trend (< 100 minDisp)
    tiny = ref < np.log(1e-6)
    np.testing.assert_array_equal(tiny, state.x < np.log(1e-6))
    assert tiny.sum() == 3 and state.x[0] < np.log(1e-6)  # the Poisson gene among them
    np.testing.assert_allclose(state.x[~tiny], ref[~tiny], rtol=0, atol=1e-6)
    assert state.x[1] == hi  # the nearly empty gene: maxDisp
    for g in np.flatnonzero(~tiny):  # f is the profile up to a per-gene constant
        pts = state.x[g] + np.array([0.0, -0.3, 0.2])
        f, _, _ = evaluate(y[:, [g]], mu[:, [g]], X, pts[None])
        direct = np.array([profile(t, y[:, g], mu[:, g], X) for t in pts])
        assert f[0, 0] == state.f[g]
        np.testing.assert_allclose(f[0] - f[0, 0], direct - direct[0], rtol=1e-9, atol=1e-9)


def map_prior(data):
    y = data[0]
    rng = np.random.default_rng(5)
    return disp.Prior(mean=np.log(rng.uniform(0.05, 0.4, y.shape[1])), var=0.25)


def test_map_search_finds_the_posterior_maximum(data, genewise):
    y, mu, X, _, max_disp = data
    state, _, _ = genewise
    lo, hi = disp.log_bounds(max_disp)
    prior = map_prior(data)
    skip = np.zeros(y.shape[1], dtype=bool)
    skip[3] = True
    start = disp.map_start(state, prior, skip, max_disp)
    # the posterior at the gene-wise optimum needs no round
    np.testing.assert_allclose(start.f - state.f, norm.logpdf(state.x, prior.mean, 0.5)
                               - norm.logpdf(prior.mean, prior.mean, 0.5), atol=1e-9)
    final, rounds = search(start, y, mu, X, lo, hi, prior)
    assert final.done.all()
    ref = np.array([scipy_argmax(y[:, g], mu[:, g], X, lo, hi, prior.mean[g], prior.var)
                    for g in range(y.shape[1])])
    ok = ~skip
    np.testing.assert_allclose(final.x[ok], ref[ok], rtol=0, atol=1e-6)
    assert final.x[3] == state.x[3]  # skipped genes never move
    # measured: 6 rounds (5 leave 1.6e-6), for the genes starting from a gene-wise optimum
    # near the lower bound, ~16 log units below their MAP
    assert rounds <= 8


@pytest.mark.xfail(strict=True, reason="from a gene-wise optimum far below the MAP (at the "
                   "lower bound), 3 rounds leave log(alpha) 1.27 off (see report)")
def test_map_search_converges_within_the_pipeline_rounds(data, genewise):
    y, mu, X, _, max_disp = data
    state, _, _ = genewise
    lo, hi = disp.log_bounds(max_disp)
    prior = map_prior(data)
    start = disp.map_start(state, prior, np.zeros(y.shape[1], dtype=bool), max_disp)
    final, _ = search(start, y, mu, X, lo, hi, prior, rounds=MAP_ROUNDS_DEFAULT)
    ref = scipy_argmax(y[:, 0], mu[:, 0], X, lo, hi, prior.mean[0], prior.var)
    assert abs(final.x[0] - ref) < 1e-6


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


def test_genewise_estimates_follow_deseq2s_rules(data, genewise):
    """DESeq2's line search on the same objective, gene by gene, with R's rules after it."""
    y, mu, X, alpha_hat, max_disp = data
    state, _, (f0, g0, h0) = genewise
    lo, hi = disp.log_bounds(max_disp)
    assert lo == LOG_1E_9
    skip = np.zeros(y.shape[1], dtype=bool)
    est = disp.genewise_estimates(state, f0, g0, h0, alpha_hat, skip, max_disp)
    outcomes = set()
    for g in range(y.shape[1]):
        def lp(t, g=g):
            return profile(t, y[:, g], mu[:, g], X)

        def dlp(t, g=g):
            return (lp(t + 1e-6) - lp(t - 1e-6)) / 2e-6

        a, it, l0, l1 = fit_disp(lp, dlp, np.log(alpha_hat[g]))
        if l1 < l0 + abs(l0) / 1e6 or it == 1:
            # noIncrease (R keeps the rough estimate); it == 1: R would then refit on a grid
            # where alpha_init > 1e-7, which fed_de does not (the start is kept)
            outcomes.add("start")
            assert est[g] == alpha_hat[g]
        elif it == 100:
            # R refits on a grid (fitDispGrid): an approximation of the exact optimum
            outcomes.add("grid")
            ref = scipy_argmax(y[:, g], mu[:, g], X, lo, hi)
            assert (est[g] < 1e-6) if ref < np.log(1e-6) else abs(np.log(est[g]) - ref) < 1e-6
        else:  # the line search converged: equal to its tolerance (a gain below 1e-6)
            outcomes.add("converged")
            assert abs(np.log(est[g]) - np.log(np.clip(np.exp(a), 1e-8, max_disp))) < 0.05
    assert {"grid", "converged"} <= outcomes


def test_genewise_no_increase_rule_on_a_constructed_case():
    start_f = np.full(7, -100.0)
    f = start_f + np.array([0.5e-4, 2e-4, 1.0, 1.0, 1.0, 1.0, 1.0])  # |start_f| / 1e6 = 1e-4
    x = np.log(np.array([0.2, 0.3, 0.4, 50.0, 1e-12, 0.5, 0.6]))
    search = optim1d.Search(x=x, f=f, g=np.zeros(7), h=-np.ones(7), radius=np.ones(7),
                            done=np.ones(7, dtype=bool))
    start_g = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-4])  # gene 6: flat start
    start_h = -np.ones(7)
    alpha_init = np.full(7, 0.1)
    skip = np.zeros(7, dtype=bool)
    skip[5] = True
    est = disp.genewise_estimates(search, start_f, start_g, start_h, alpha_init, skip, 14.0)
    np.testing.assert_array_equal(est[[0, 6]], [0.1, 0.1])  # no increase; stops at start
    np.testing.assert_allclose(est[[1, 2]], [0.3, 0.4], rtol=1e-14)
    assert est[3] == 14.0 and est[4] == 1e-8 and np.isnan(est[5])


def test_final_dispersions_outlier_rule():
    var_log = 0.5
    fit = np.full(6, 0.1)
    cut = 0.1 * np.exp(2 * np.sqrt(var_log))  # DESeq2: log(gene) > log(fit) + 2 sd
    gene = np.array([cut * 1.0001, cut * 0.9999, 1e-8, np.nan, 3.0, 0.2])
    map_x = np.log(np.array([0.11, 0.12, 0.09, 0.1, 1e-12, 100.0]))
    skip = np.array([False, False, False, True, False, False])
    d_map, outlier, final = disp.final_dispersions(map_x, gene, fit, var_log, skip, 14.0)
    np.testing.assert_array_equal(outlier, [True, False, False, False, True, False])
    np.testing.assert_allclose(d_map[[0, 1, 2]], [0.11, 0.12, 0.09], rtol=1e-14)
    assert np.isnan(d_map[3]) and d_map[4] == 1e-8 and d_map[5] == 14.0
    np.testing.assert_array_equal(final[[0, 4]], gene[[0, 4]])  # outliers keep gene-wise
    np.testing.assert_array_equal(final[[1, 2, 5]], d_map[[1, 2, 5]])
