"""apeglm's own optimiser, emulated on pooled data: the reference that shows fed_de's apeglm
posterior is R's.

R's ``lfcShrink(type="apeglm")`` (apeglm ``method="nbinomCR"``) does not find the exact
posterior mode: it runs L-BFGS (RcppNumerical 0.4-0, LBFGS++ of 2019) on the negative log
posterior divided by its value at zero, from ``(0.1, -0.1, ...)``, stopping when the scaled
objective changes by less than 1e-8 relative; then it differentiates the analytic gradient
numerically (``optimHess``, steps 1e-3) for the posterior SD. The early stop leaves R's "mode"
off by up to ~1e-3 of the LFC for ordinary genes and more for genes with very large counts
(the scaling constant grows with the counts). :mod:`fed_de.core.apeglm` finds the exact mode
from sums; this module replays R's path, so that a test can show that the posterior is the same
(agreement with R to ~1e-12) and how far R's stop is from the exact mode.

Pooled only (the optimiser's path needs tens of sequential evaluations): not for federation.
A port kept for exact agreement with R: apeglm ``R/apeglm.R`` (``nbinomCppRoutine``),
``R/alternateOptim.R`` (``optimNbinomHess``), ``src/nbinomGLM.cpp``; RcppNumerical 0.4-0
``inst/include/optimization/{wrapper.h,LBFGS.h,LBFGS/LineSearchBacktracking.h}``; R's
``optimHess``.
"""

from __future__ import annotations

import numpy as np

from fed_de.core.apeglm import NO_SHRINK_SCALE

__all__ = ["lbfgs_r", "apeglm_r_gene", "apeglm_r"]


def _neg_log_post(beta, x, y, size, off, sigma2, S2, shrink, cnst):
    """apeglm's scaled negative log posterior and its gradient (``optimFun::f_grad``)."""
    xb = x @ beta
    e = np.exp(xb + off)
    a = y + size
    b = e + size
    c = y - a * e / b
    d = y * xb - a * np.log(b)
    no = np.ones(beta.size, bool)
    no[shrink] = False
    neg_prior = np.sum(beta[no] ** 2 / (2.0 * sigma2)) + np.log1p(beta[shrink] ** 2 / S2)
    d_prior = np.where(no, beta / sigma2, 0.0)
    d_prior[shrink] = 2.0 * beta[shrink] / (S2 + beta[shrink] ** 2)
    f = -d.sum() / cnst + neg_prior / cnst + 10.0
    g = -(x.T @ c) / cnst + d_prior / cnst
    return f, g


def lbfgs_r(fun, x0: np.ndarray, eps_g: float = 1e-8, eps_f: float = 1e-8, maxit: int = 300,
            m: int = 6, max_linesearch: int = 100, ftol: float = 1e-4, wolfe: float = 0.9
            ) -> np.ndarray:
    """RcppNumerical 0.4-0's ``optim_lbfgs``: LBFGS++ with a backtracking line search under the
    weak Wolfe conditions, stopping on ``|g| <= eps_g max(|x|, 1)``, on a relative change of
    the objective below ``eps_f`` (``past = 1``) or after ``maxit`` iterations."""
    x = np.array(x0, dtype=float)
    n = x.size
    fx, g = fun(x)
    if np.linalg.norm(g) <= eps_g * max(np.linalg.norm(x), 1.0):
        return x
    S, Y = np.zeros((n, m)), np.zeros((n, m))
    ys_hist, alpha = np.zeros(m), np.zeros(m)
    drt = -g
    step = 1.0 / np.linalg.norm(drt)
    f_past = fx
    k, end = 1, 0
    while True:
        xp, gp = x.copy(), g.copy()
        fx_init, dg_init = fx, g @ drt
        for _ in range(max_linesearch):
            x = xp + step * drt
            fx, g = fun(x)
            if fx > fx_init + step * ftol * dg_init:
                width = 0.5
            elif g @ drt < wolfe * dg_init:
                width = 2.1
            else:
                break
            step *= width
        if np.linalg.norm(g) <= eps_g * max(np.linalg.norm(x), 1.0):
            return x
        if abs((f_past - fx) / fx) < eps_f:
            return x
        f_past = fx
        if k >= maxit:
            return x
        S[:, end], Y[:, end] = x - xp, g - gp
        ys, yy = Y[:, end] @ S[:, end], Y[:, end] @ Y[:, end]
        ys_hist[end] = ys
        drt = -g.copy()
        bound = min(m, k)
        end = (end + 1) % m
        j = end
        for _ in range(bound):
            j = (j + m - 1) % m
            alpha[j] = S[:, j] @ drt / ys_hist[j]
            drt -= alpha[j] * Y[:, j]
        drt *= ys / yy
        for _ in range(bound):
            b = Y[:, j] @ drt / ys_hist[j]
            drt += (alpha[j] - b) * S[:, j]
            j = (j + 1) % m
        step = 1.0
        k += 1


def apeglm_r_gene(y: np.ndarray, X: np.ndarray, log_sf: np.ndarray, alpha: float, shrink: int,
                  scale: float, no_shrink_scale: float = NO_SHRINK_SCALE
                  ) -> tuple[np.ndarray, np.ndarray, bool]:
    """One gene as apeglm's ``nbinomCR`` fits it: ``(map, sd, converged)``, natural log.

    ``converged`` is False where the two L-BFGS runs (from ``(0.1, -0.1, ...)`` and
    ``(-0.1, 0.1, ...)``) differ by more than 0.01: apeglm then refits the gene with R's
    ``optim`` (BFGS), which is not replayed here.
    """
    size = 1.0 / alpha
    p = X.shape[1]
    cnst = float(np.sum((y + size) * np.log(size + np.exp(log_sf))))  # objective at beta = 0
    cnst = cnst if cnst > 1 else 1.0
    s2, S2 = no_shrink_scale**2, scale**2

    def scaled(b):
        return _neg_log_post(b, X, y, size, log_sf, s2, S2, shrink, cnst)

    b1 = lbfgs_r(scaled, np.resize([0.1, -0.1], p))
    b2 = lbfgs_r(scaled, np.resize([-0.1, 0.1], p))
    converged = bool(np.max(np.abs(b1 - b2)) <= 0.01)
    H = np.zeros((p, p))  # optimHess: central differences of the unscaled gradient, ndeps 1e-3
    for i in range(p):
        d = np.zeros(p)
        d[i] = 1e-3
        gp = _neg_log_post(b1 + d, X, y, size, log_sf, s2, S2, shrink, 1.0)[1]
        gm = _neg_log_post(b1 - d, X, y, size, log_sf, s2, S2, shrink, 1.0)[1]
        H[i] = (gp - gm) / 2e-3
    H = 0.5 * (H + H.T)
    var = np.diag(np.linalg.inv(H))
    sd = np.where(var > 0, np.sqrt(np.abs(var)), np.nan)
    return b1, sd, converged


def apeglm_r(y: np.ndarray, X: np.ndarray, log_sf: np.ndarray, alpha: np.ndarray, shrink: int,
             scale: float) -> dict:
    """:func:`apeglm_r_gene` for every gene (counts samples x genes): ``map``, ``sd`` (genes x
    p, natural log, NaN for all-zero genes) and ``converged``."""
    G, p = y.shape[1], X.shape[1]
    out = {"map": np.full((G, p), np.nan), "sd": np.full((G, p), np.nan),
           "converged": np.zeros(G, bool)}
    for g in range(G):
        if not (y[:, g] > 0).any():
            continue
        b, s, c = apeglm_r_gene(y[:, g].astype(float), X, log_sf, float(alpha[g]), shrink, scale)
        out["map"][g], out["sd"][g], out["converged"][g] = b, s, c
    return out
