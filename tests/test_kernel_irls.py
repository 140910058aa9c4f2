"""Unit tests of :mod:`fed_de.core.irls` (the aggregator-side IRLS update).

References: a plain numpy port of DESeq2's ``fitBeta`` (``src/DESeq2.cpp``), one gene at a
time: ridge-penalised IRLS with means floored at 0.5, the deviance rule (1e-8, relative) and
``|beta| > 30`` as divergence; its fixed point is found by iterating the same map until it
stops moving. ``tests/data/kernels/irls_unfinished.csv`` (made by ``make_irls_unfinished.R``,
DESeq2 1.38.3) holds genes whose fitBeta does not finish (betaIter = 100). Every round sums
the site sums of two "sites", as the aggregator does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import nbinom

from fed_de.core import nb
from fed_de.core.irls import LARGE_BETA, N_CANDIDATES, IRLSFit, irls_update, start_irls
from tests.conftest import DATA

LAMBDA = 1e-6 / np.log(2) ** 2  # DESeq2's ridge on the natural-log scale
MAX_ROUNDS = 40


# -- reference: DESeq2's fitBeta, one gene -----------------------------------------------------
def irls_map(y, X, sf, alpha, beta):
    """One fitBeta iteration from ``beta``: the next beta and the floored means it starts from."""
    mu = np.maximum(sf * np.exp(X @ beta), 0.5)
    w = mu / (1 + alpha * mu)
    z = np.log(mu / sf) + (y - mu) / mu
    A = X.T @ (w[:, None] * X) + LAMBDA * np.eye(X.shape[1])
    return np.linalg.solve(A, X.T @ (w * z))


def deviance(y, X, sf, alpha, beta):
    mu = np.maximum(sf * np.exp(X @ beta), 0.5)
    r = 1 / alpha
    return -2 * nbinom.logpmf(y, r, r / (r + mu)).sum()


def fit_beta(y, X, sf, alpha, beta, maxit: int = 100, tol: float = 1e-8):
    """DESeq2's fitBeta loop for one gene: (beta, status, iterations)."""
    dev_old = 0.0
    for t in range(maxit):
        beta = irls_map(y, X, sf, alpha, beta)
        if (np.abs(beta) > 30).any():
            return beta, "diverged", t + 1
        dev = deviance(y, X, sf, alpha, beta)
        if t > 0 and abs(dev - dev_old) / (abs(dev) + 0.1) < tol:
            return beta, "converged", t + 1
        dev_old = dev
    return beta, "maxit", maxit


def fixed_point(y, X, sf, alpha, beta, maxit: int = 5000):
    """Iterate fitBeta's map until it stops moving (None if it does not)."""
    for _ in range(maxit):
        nxt = irls_map(y, X, sf, alpha, beta)
        if np.abs(nxt - beta).max() < 1e-14 * (1 + np.abs(beta).max()):
            return nxt
        beta = nxt
    return None


def deseq2_starts(y, X, sf):
    """DESeq2's IRLS start (least squares of log(normalised + 0.1)) and fed_de's second start
    (least squares of the log of the linear fit, floored at 0.1), per gene."""
    norm = y / sf[:, None]
    b0 = np.linalg.lstsq(X, np.log(norm + 0.1), rcond=None)[0].T
    lin = X @ np.linalg.lstsq(X, norm, rcond=None)[0]
    return b0, np.linalg.lstsq(X, np.log(np.maximum(lin, 0.1)), rcond=None)[0].T


# -- federated rounds ----------------------------------------------------------------------------
def site_sums(fit: IRLSFit, y, X, sf, alpha, site: np.ndarray) -> dict:
    """The aggregator's input: each candidate's IRLS sums, summed over two sites."""
    out = {}
    for part in (site, ~site):
        for k in range(fit.candidates.shape[1]):
            s = nb.irls_summands(y[part], X[part], sf[part], fit.candidates[:, k], alpha)
            for key, v in s.items():
                out.setdefault(key, [0.0] * fit.candidates.shape[1])[k] += v
    return {key: np.stack(v, axis=1) for key, v in out.items()}


def run(fit: IRLSFit, y, X, sf, alpha, rounds: int = MAX_ROUNDS, seed: int = 0):
    """Rounds of :func:`irls_update` until every gene stops; (fit, rounds used)."""
    site = np.random.default_rng(seed).permutation(y.shape[0]) < y.shape[0] // 2
    for r in range(rounds):
        s = site_sums(fit, y, X, sf, alpha, site)
        fit = irls_update(fit, s["xtwx"], s["xtwz"], s["deviance"], X.shape[1])
        if fit.stopped.all():
            return fit, r + 1
    return fit, rounds


@pytest.fixture(scope="module")
def simulated():
    """NB counts, ``~ 1 + group + covariate``, 12 samples, 40 genes (one with a level of
    zeros, one with a single non-zero count)."""
    rng = np.random.default_rng(0)
    n, G = 12, 40
    X = np.column_stack([np.ones(n), np.arange(n) % 2, rng.normal(size=n)])
    sf = rng.uniform(0.5, 2, n)
    beta = np.column_stack([rng.uniform(-1, 7, G), rng.normal(0, 1.5, G),
                            rng.normal(0, 0.5, G)])
    alpha = np.exp(rng.uniform(-5, 1, G))
    mu = sf[:, None] * np.exp(X @ beta.T)
    y = rng.negative_binomial(1 / alpha, 1 / (1 + alpha * mu)).astype(float)
    y[X[:, 1] == 1, 0] = 0
    y[:, 1] = 0
    y[3, 1] = 5
    return y, X, sf, alpha


def test_rounds_reach_the_fixed_point_of_deseq2_irls(simulated):
    y, X, sf, alpha = simulated
    b0, b_alt = deseq2_starts(y, X, sf)
    fit, rounds = run(start_irls(b0, np.zeros(y.shape[1], dtype=bool), b_alt), y, X, sf, alpha)
    assert fit.converged.all() and not fit.diverged.any()
    assert rounds <= 30  # measured: 26 (gene 9: slow linear convergence, 26 iterates)
    ref = np.array([fixed_point(y[:, g], X, sf, alpha[g], b0[g]) for g in range(y.shape[1])])
    # stop rule: the next IRLS step is below 1e-8, so the accepted beta is within
    # |step| / (1 - contraction) of the fixed point: 1.4e-8 measured
    np.testing.assert_allclose(fit.beta, ref, rtol=0, atol=2e-8)
    assert np.abs(fit.resid).max() < 1e-8
    # DESeq2's own deviance rule stops earlier (up to 9e-4 away here): the fixed point is
    # the one well-defined answer, and DESeq2 converges to it
    deseq2 = [fit_beta(y[:, g], X, sf, alpha[g], b0[g]) for g in range(y.shape[1])]
    assert all(status == "converged" for _, status, _ in deseq2)
    assert np.abs(np.array([b for b, _, _ in deseq2]) - ref).max() < 2e-3


def test_xtwx_at_the_accepted_beta(simulated):
    y, X, sf, alpha = simulated
    b0, b_alt = deseq2_starts(y, X, sf)
    fit, _ = run(start_irls(b0, np.zeros(y.shape[1], dtype=bool), b_alt), y, X, sf, alpha)
    for g in range(y.shape[1]):
        mu = np.maximum(sf * np.exp(X @ fit.beta[g]), 0.5)
        w = mu / (1 + alpha[g] * mu)
        np.testing.assert_allclose(nb.unpack(fit.xtwx_acc[g], 3), X.T @ (w[:, None] * X),
                                   rtol=1e-12)


@pytest.fixture(scope="module")
def unfinished():
    """Genes whose fitBeta diverges at its first iterate, with R's answers (optim)."""
    ref = pd.read_csv(DATA / "kernels" / "irls_unfinished.csv", index_col=0)
    samples = pd.read_csv(DATA / "kernels" / "irls_unfinished_samples.csv", index_col=0)
    level = samples["level"].to_numpy()
    X = np.column_stack([np.ones(len(level)), level == 1, level == 2]).astype(float)
    y = ref[list(samples.index)].to_numpy(dtype=float).T
    return y, X, samples["size_factor"].to_numpy(), ref["alpha"].to_numpy(), ref


def test_diverging_genes_stop_as_diverged_and_never_move(unfinished):
    y1, X, sf, alpha1, ref = unfinished
    assert (ref["betaIter"] == 100).all()  # R: fitBeta did not finish
    # ordinary genes of the same design beside them
    rng = np.random.default_rng(1)
    mu = np.exp(rng.uniform(1, 5, 5))[None] * sf[:, None]
    alpha2 = np.full(5, 0.1)
    y = np.column_stack([y1, rng.negative_binomial(10, 10 / (10 + mu))]).astype(float)
    alpha = np.concatenate([alpha1, alpha2])
    b0, _ = deseq2_starts(y, X, sf)
    status = [fit_beta(y[:, g], X, sf, alpha[g], b0[g]) for g in range(y.shape[1])]
    assert [s[1:] for s in status[:4]] == [("diverged", 1)] * 4
    # DESeq2's start alone: the first round is fitBeta's first iteration
    fit, _ = run(start_irls(b0, np.zeros(y.shape[1], dtype=bool)), y, X, sf, alpha, rounds=1)
    assert fit.diverged[:4].all() and fit.stopped[:4].all() and not fit.converged[:4].any()
    frozen = {k: np.copy(getattr(fit, k)) for k in ("beta", "candidates", "accepted")}
    fit, _ = run(fit, y, X, sf, alpha)
    for key, value in frozen.items():
        np.testing.assert_array_equal(getattr(fit, key)[:4], value[:4])
    assert fit.converged[4:].all()
    ref_fp = [fixed_point(y[:, g], X, sf, alpha[g], b0[g]) for g in range(4, y.shape[1])]
    np.testing.assert_allclose(fit.beta[4:], np.array(ref_fp), atol=2e-8)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the NaN sums below
def test_frozen_genes_never_move_whatever_the_sums():
    rng = np.random.default_rng(2)
    G, K, p = 5, N_CANDIDATES, 3
    frozen = np.array([True, False, True, False, False])
    fit = start_irls(rng.normal(size=(G, p)), frozen, rng.normal(size=(G, p)))
    assert (fit.beta[frozen] == 0).all() and (fit.candidates[frozen] == 0).all()
    for _ in range(3):
        xtwx = nb.pack(np.eye(p) * rng.uniform(1, 5, (G, K, 1, 1)))
        xtwz, dev = rng.normal(size=(G, K, p)), rng.uniform(10, 20, (G, K))
        xtwx[frozen], xtwz[frozen], dev[frozen] = np.nan, np.nan, np.nan  # garbage
        fit = irls_update(fit, xtwx, xtwz, dev, p)
        assert (fit.beta[frozen] == 0).all() and (fit.candidates[frozen] == 0).all()
        assert (fit.accepted[frozen] == 0).all()
        assert fit.stopped[frozen].all() and fit.converged[frozen].all()
        assert not fit.diverged[frozen].any()
        assert np.isfinite(fit.candidates).all()


@pytest.mark.xfail(strict=True, reason="IRLS accelerated from the linear-fit start converges "
                   "where DESeq2's fitBeta diverges; DESeq2 then uses optim (see report)")
def test_genes_deseq2_irls_cannot_finish_are_not_reported_converged(unfinished):
    """DESeq2 refits these genes with optim: the IRLS must hand them to the fallback (or end
    at optim's answer), not report the floored IRLS fixed point as converged."""
    y, X, sf, alpha, ref = unfinished
    b0, b_alt = deseq2_starts(y, X, sf)
    # the final fit's starts in the pipeline: the linear-fit start, then DESeq2's
    fit, _ = run(start_irls(b_alt, np.zeros(y.shape[1], dtype=bool), b0), y, X, sf, alpha,
                 rounds=8)
    r_beta = ref[["beta_0", "beta_1", "beta_2"]].to_numpy()
    at_r = np.abs(fit.beta - r_beta).max(axis=1) < 0.05  # R's optim is loose on flat axes
    assert (~fit.converged | at_r).all()


def test_candidates_stay_where_the_sites_can_evaluate_them():
    """An accelerated candidate far beyond DESeq2's divergence bound (Newton with a nearly
    singular observed information) is proposed at the bound: its means stay finite at the
    sites (an overflowing candidate once stopped a whole run at their range check)."""
    rng = np.random.default_rng(3)
    G, K, p = 4, N_CANDIDATES, 2
    fit = start_irls(rng.normal(size=(G, p)), np.zeros(G, dtype=bool), rng.normal(size=(G, p)))
    xtwx = nb.pack(np.eye(p) * rng.uniform(1, 5, (G, K, 1, 1)))
    xtwz = rng.normal(size=(G, K, p))
    dev = rng.uniform(10, 20, (G, K))
    obs = nb.pack(np.eye(p) * 1e-12 * np.ones((G, K, 1, 1)))  # Newton step ~1e12
    fit = irls_update(fit, xtwx, xtwz, dev, p, obs)
    assert not fit.stopped.any()
    assert np.abs(fit.candidates).max() == LARGE_BETA
    X = np.column_stack([np.ones(6), np.arange(6) % 2])
    s = nb.irls_summands(np.ones((6, G)), X, np.ones(6), fit.candidates[:, 2],
                         np.full(G, 0.1))
    assert all(np.isfinite(v).all() for v in s.values())
