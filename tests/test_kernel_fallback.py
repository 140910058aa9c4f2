"""Unit tests of :mod:`fed_de.core.fallback` (DESeq2's optim refit as rounds of sums).

References: ``scipy.optimize.minimize`` (L-BFGS-B, DESeq2's box of 30 on the log2 scale) on
the ridge-penalised NB log likelihood written with ``scipy.stats.nbinom.logpmf`` (means not
floored, as ``fitNbinomGLMsOptim``); R's optim answers (DESeq2 1.38.3) in
``tests/data/kernels/irls_unfinished.csv``; central finite differences for the site sums'
gradient and information. Every round sums the site sums of two "sites".
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize
from scipy.stats import nbinom

from fed_de.core import nb
from fed_de.core.fallback import BOX, FallbackFit, fallback_sums, fallback_update, start_fallback
from tests.conftest import DATA

LAMBDA = 1e-6 / np.log(2) ** 2


def penalised_loglik(beta, y, X, sf, alpha) -> float:
    """Ridge-penalised NB log likelihood of one gene (DESeq2's optim objective, negated)."""
    mu = sf * np.exp(X @ beta)
    r = 1 / alpha
    return nbinom.logpmf(y, r, r / (r + mu)).sum() - 0.5 * LAMBDA * (beta @ beta)


def penalised_score(beta, y, X, sf, alpha) -> np.ndarray:
    mu = sf * np.exp(X @ beta)
    return ((y - mu) / (1 + alpha * mu)) @ X - LAMBDA * beta


def scipy_optimum(y, X, sf, alpha, start) -> np.ndarray:
    res = minimize(lambda b: -penalised_loglik(b, y, X, sf, alpha), start,
                   jac=lambda b: -penalised_score(b, y, X, sf, alpha), method="L-BFGS-B",
                   bounds=[(-BOX, BOX)] * X.shape[1],
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000})
    return res.x


def run(fb: FallbackFit, y, X, sf, alpha, rounds: int = 60):
    """Rounds of :func:`fallback_update` until no gene is active; (fit, rounds used)."""
    site = np.arange(y.shape[0]) % 2 == 0
    p = X.shape[1]
    for r in range(rounds):
        tot = None
        for part in (site, ~site):
            s = fallback_sums(y[part], X[part], sf[part], alpha, fb.candidates)
            tot = s if tot is None else {k: tot[k] + v for k, v in s.items()}
        fb = fallback_update(fb, tot["loglik"], tot["grad"], tot["info"], p)
        if not fb.active.any():
            return fb, r + 1
    return fb, rounds


@pytest.fixture(scope="module")
def genes():
    """R's unfinished genes (a level of zeros under a large dispersion) and ordinary NB
    genes of the same 3-level design."""
    ref = pd.read_csv(DATA / "kernels" / "irls_unfinished.csv", index_col=0)
    samples = pd.read_csv(DATA / "kernels" / "irls_unfinished_samples.csv", index_col=0)
    level = samples["level"].to_numpy()
    sf = samples["size_factor"].to_numpy()
    X = np.column_stack([np.ones(len(level)), level == 1, level == 2]).astype(float)
    rng = np.random.default_rng(3)
    mu = (np.exp(rng.uniform(0, 5, 6))[None] * sf[:, None]
          * np.exp(X @ rng.normal(0, 1, (3, 6))))
    alpha2 = np.exp(rng.uniform(-3, 0.5, 6))
    y2 = rng.negative_binomial(1 / alpha2, 1 / (1 + alpha2 * mu))
    y = np.column_stack([ref[list(samples.index)].to_numpy().T, y2]).astype(float)
    alpha = np.concatenate([ref["alpha"].to_numpy(), alpha2])
    start = np.linalg.lstsq(X, np.log(y / sf[:, None] + 0.1), rcond=None)[0].T
    return y, X, sf, alpha, np.clip(start, -BOX, BOX), ref


def test_rounds_reach_the_penalised_likelihood_maximum(genes):
    y, X, sf, alpha, start, ref = genes
    G = y.shape[1]
    fb = start_fallback(start, np.zeros(G, bool), np.ones(G, bool), np.zeros(G, bool),
                        np.zeros(G, bool))
    assert fb.active.all() and fb.refitted.all()
    fb, rounds = run(fb, y, X, sf, alpha)
    assert not fb.active.any()
    assert rounds <= 20  # measured: 16 from DESeq2's IRLS start
    for g in range(G):
        args = (y[:, g], X, sf, alpha[g])
        opt = scipy_optimum(*args, start[g])
        # scipy stops ~1e-6 short along the flat axis of a level of zeros (curvature ~1e-5);
        # the rounds end at a zero gradient
        np.testing.assert_allclose(fb.beta[g], opt, rtol=0, atol=5e-6)
        assert penalised_loglik(fb.beta[g], *args) >= penalised_loglik(opt, *args) - 1e-12
        assert np.abs(penalised_score(fb.beta[g], *args)).max() < 1e-9
        np.testing.assert_allclose(fb.f[g], penalised_loglik(fb.beta[g], *args), rtol=1e-12)
    # R's optim (L-BFGS-B, default tolerances) agrees to its own precision
    r_beta = ref[["beta_0", "beta_1", "beta_2"]].to_numpy()
    np.testing.assert_allclose(fb.beta[:4], r_beta, rtol=0, atol=2e-2)


def test_inactive_genes_never_move(genes):
    y, X, sf, alpha, start, _ = genes
    G = y.shape[1]
    diverged = np.arange(G) % 2 == 0
    converged = np.arange(G) % 3 == 0
    fb = start_fallback(start, converged, diverged, np.zeros(G, bool), np.zeros(G, bool))
    np.testing.assert_array_equal(fb.active, diverged & ~converged)
    fb2, _ = run(fb, y, X, sf, alpha, rounds=3)
    idle = ~fb.active
    np.testing.assert_array_equal(fb2.beta[idle], start[idle])
    np.testing.assert_array_equal(fb2.candidates[idle],
                                  np.repeat(start[idle][:, None], 2, axis=1))
    assert not fb2.refitted[idle].any()


def test_site_sums_match_the_likelihood_and_its_derivatives(genes):
    y, X, sf, alpha, start, _ = genes
    G, p = start.shape
    cands = np.stack([start, start + 0.3], axis=1)
    s = fallback_sums(y, X, sf, alpha, cands)
    h = 1e-5
    for g in range(G):
        for k in range(2):
            b = cands[g, k]
            r = 1 / alpha[g]

            def ll(beta, g=g, r=r):
                mu = sf * np.exp(X @ beta)
                return nbinom.logpmf(y[:, g], r, r / (r + mu)).sum()

            def grad(beta, g=g):
                return np.array([(ll(beta + h * e) - ll(beta - h * e)) / (2 * h)
                                 for e in np.eye(p)])

            np.testing.assert_allclose(s["loglik"][g, k], ll(b), rtol=1e-12)
            np.testing.assert_allclose(s["grad"][g, k], grad(b), rtol=1e-5, atol=1e-5)
            info = -np.array([(grad(b + 1e-3 * e) - grad(b - 1e-3 * e)) / 2e-3
                              for e in np.eye(p)])
            np.testing.assert_allclose(nb.unpack(s["info"][g, k], p), info, rtol=1e-4,
                                       atol=1e-3)


@pytest.mark.xfail(strict=True, reason="projected Newton stalls off the optimum when a box "
                   "bound is active (see report)")
def test_box_bound_active_reaches_the_constrained_maximum():
    """A level of zeros beside levels of ~1e6 counts: the zero level's coefficient is held at
    the box (-30 log2); the other coefficients must reach their conditional optimum."""
    samples = pd.read_csv(DATA / "kernels" / "irls_unfinished_samples.csv", index_col=0)
    level = samples["level"].to_numpy()
    sf = samples["size_factor"].to_numpy()
    X = np.column_stack([np.ones(len(level)), level == 1, level == 2]).astype(float)
    y = np.where(level == 2, 0.0, np.round(1e6 * sf))[:, None]
    alpha = np.array([0.05])
    start = np.linalg.lstsq(X, np.log(y / sf[:, None] + 0.1), rcond=None)[0].T
    fb = start_fallback(start, np.zeros(1, bool), np.ones(1, bool), np.zeros(1, bool),
                        np.zeros(1, bool))
    fb, _ = run(fb, y, X, sf, alpha, rounds=60)
    opt = scipy_optimum(y[:, 0], X, sf, alpha[0], start[0])
    assert opt[2] == -BOX  # the bound is active at the optimum
    # KKT: zero gradient along the free coefficients
    assert np.abs(penalised_score(fb.beta[0], y[:, 0], X, sf, alpha[0])[:2]).max() < 1e-8
    np.testing.assert_allclose(fb.beta[0], opt, rtol=0, atol=1e-6)
