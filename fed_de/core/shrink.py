"""Log fold change shrinkage from per-gene sums: apeglm's adaptive Cauchy prior and DESeq2's
normal prior, with posterior summaries of the Laplace approximation.

Everything here is pure numpy; genes are the leading (batch) dimension of every per-gene array.
A site holds counts as samples x genes (as in :mod:`fed_de.core.nb`); what it computes are sums
over its samples, so "pooled" is one site and a federation sums the sites' outputs.

apeglm (``lfcShrink(type="apeglm")``, apeglm's ``method="nbinomCR"``)
    Posterior of the coefficients ``beta`` (natural log) of an NB GLM with offsets
    ``log(size factors)`` and fixed dispersions: a Cauchy prior of scale ``S`` on the shrunk
    coefficient, ``N(0, 15^2)`` on every other one. ``S = min(sqrt(A), 1)`` with ``A`` the
    Efron-Morris estimate of the spread of the true effects from the MLEs and their standard
    errors (:func:`apeglm_prior`). The exact posterior mode is found from the MLE by Newton-type
    steps with the prior handled exactly and a line search spread over rounds; the likelihood
    part is a sum over samples (:func:`nb_loglik_grad_hess`, site side;
    :func:`penalised_newton_step`, aggregator side). The posterior SD comes from the Hessian at
    the mode (apeglm's Laplace approximation). R's apeglm stops its optimiser early; its path
    is replayed in :mod:`fed_de.core.apeglm_r` for comparison.

normal (``lfcShrink(type="normal")``, DESeq2's 2014 ``betaPrior``)
    A zero-mean normal prior on every non-intercept coefficient, with variances matched to an
    upper quantile of the MLEs (:func:`normal_prior_var`), and the ridge-penalised IRLS of
    DESeq2's ``fitBeta`` with ``lambda = 1 / betaPriorVar``, either replayed round by round
    (:func:`fed_de.core.nb.irls_summands`, :func:`ridge_irls_update`: R's path, ~15-25 rounds)
    or solved by Newton's method on its fixed point (:func:`ridge_fixed_point_summands`,
    :func:`ridge_newton_step`: 4-5 rounds from the MLE); standard errors :func:`ridge_se`.
    Contrasts use DESeq2's expanded model matrix (:func:`expanded_design`,
    :func:`expanded_prior_var`).

Posterior summaries (:func:`posterior_summaries`): mean (= mode under the Laplace
approximation), SD, local false sign rate, s-value, P(|LFC| > t), credible intervals.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr, ndtri

from fed_de.core import nb

__all__ = [
    "NO_SHRINK_SCALE",
    "r_uniroot",
    "apeglm_prior_var",
    "apeglm_prior",
    "nb_loglik_grad_hess",
    "log_prior",
    "newton_init",
    "surrogate_step",
    "penalised_newton_step",
    "posterior_sd",
    "relevel_transform",
    "svalue",
    "posterior_summaries",
    "wtd_quantile",
    "normal_prior_var",
    "expanded_design",
    "expanded_map",
    "expanded_prior_var",
    "ridge_lambda",
    "ridge_irls_start",
    "ridge_irls_update",
    "ridge_se",
    "ridge_fixed_point_summands",
    "ridge_newton_init",
    "ridge_newton_step",
    "ridge_irls_pooled",
]

LN2 = nb.LN2
LOG2E = 1.0 / LN2
#: apeglm's ``prior.no.shrink.scale``: sd of the normal prior on the coefficients not shrunk.
NO_SHRINK_SCALE = 15.0
#: DESeq2's prior variance for the intercept (and the "no prior" ridge is 1 / 1e6).
WIDE_PRIOR_VAR = 1e6
_EPS = float(np.finfo(float).eps)


# ----------------------------------------------------------------------------------------------
# apeglm: the adaptive prior scale (aggregator, no data round)
# ----------------------------------------------------------------------------------------------
def r_uniroot(f, lower: float, upper: float, tol: float = _EPS**0.25,
              maxiter: int = 1000) -> float:
    """Root of ``f`` in ``[lower, upper]`` exactly as R's ``uniroot`` finds it.

    A port kept for exact agreement with R: Brent's zero finder as in R's ``R_zeroin2``
    (``src/library/stats/src/zeroin.c``), with ``uniroot``'s defaults (``tol =
    .Machine$double.eps^0.25``, 1000 iterations). The tolerance is loose (~1.2e-4 absolute), so
    a more accurate root would not be R's root.
    """
    a, b = float(lower), float(upper)
    fa, fb = f(a), f(b)
    if fa == 0.0:
        return a
    if fb == 0.0:
        return b
    if fa * fb > 0:
        raise ValueError("f() values at the end points are not of opposite sign")
    c, fc = a, fa
    for _ in range(maxiter + 1):
        prev_step = b - a
        if abs(fc) < abs(fb):  # b must be the best approximation so far
            a, b, c = b, c, b
            fa, fb, fc = fb, fc, fb
        tol_act = 2.0 * _EPS * abs(b) + tol / 2.0
        new_step = (c - b) / 2.0
        if abs(new_step) <= tol_act or fb == 0.0:
            return b
        if abs(prev_step) >= tol_act and abs(fa) > abs(fb):  # try interpolation
            cb = c - b
            if a == c:  # linear
                t1 = fb / fa
                p = cb * t1
                q = 1.0 - t1
            else:  # inverse quadratic
                q = fa / fc
                t1 = fb / fc
                t2 = fb / fa
                p = t2 * (cb * q * (q - t1) - (b - a) * (t1 - 1.0))
                q = (q - 1.0) * (t1 - 1.0) * (t2 - 1.0)
            if p > 0:
                q = -q
            else:
                p = -p
            if p < (0.75 * cb * q - abs(tol_act * q) / 2.0) and p < abs(prev_step * q / 2.0):
                new_step = p / q
        if abs(new_step) < tol_act:
            new_step = tol_act if new_step > 0 else -tol_act
        a, fa = b, fb
        b += new_step
        fb = f(b)
        if (fb > 0 and fc > 0) or (fb < 0 and fc < 0):
            c, fc = a, fa
    return b


def apeglm_prior_var(mle: np.ndarray, se: np.ndarray, min_var: float = 1e-6,
                     max_var: float = 400.0) -> float:
    """Variance ``A`` of the true effects behind MLEs with unequal standard errors.

    A port kept for exact agreement with R: apeglm's ``priorVar`` (``R/priorVar.R``), the
    Efron & Morris (1975) estimator, the fixed point ``A = sum((X^2 - D) I) / sum(I)`` with
    ``I = 1 / (2 (A + D)^2)``, ``D = se^2``, found by R's ``uniroot`` on ``[min_var, max_var]``
    (``min_var`` is returned when the fixed-point map is already below it there).

    Parameters
    ----------
    mle, se
        Per-gene MLE of the coefficient to shrink and its standard error, natural-log scale
        (DESeq2 passes ``log(2) * (log2FoldChange, lfcSE)``). Genes with a NaN MLE are left out.
    """
    mle = np.asarray(mle, dtype=float)
    keep = ~np.isnan(mle)
    X = mle[keep]
    D = np.asarray(se, dtype=float)[keep] ** 2
    S = X * X

    def objective(A: float) -> float:
        # math.fsum: R's sum() accumulates in extended precision
        w = 1.0 / (2.0 * (A + D) ** 2)
        return math.fsum((S - D) * w) / math.fsum(w) - A

    if objective(min_var) < 0:
        return float(min_var)
    return r_uniroot(objective, min_var, max_var)


def apeglm_prior(mle: np.ndarray, se: np.ndarray, multiplier: float = 1.0) -> float:
    """Scale of apeglm's adaptive Cauchy prior: ``min(multiplier * sqrt(A), 1)``.

    ``A`` is :func:`apeglm_prior_var` of the natural-log MLEs and standard errors of the
    coefficient to shrink (apeglm's ``mle`` argument, ``prior.control$prior.scale``).
    """
    return float(min(multiplier * math.sqrt(apeglm_prior_var(mle, se)), 1.0))


# ----------------------------------------------------------------------------------------------
# apeglm: site side
# ----------------------------------------------------------------------------------------------
def nb_loglik_grad_hess(y: np.ndarray, X: np.ndarray, log_sf: np.ndarray, beta: np.ndarray,
                        alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NB log likelihood, its gradient and Hessian in ``beta``, summed over a site's samples.

    The means are not floored (apeglm does not floor them, unlike DESeq2's IRLS).

    Parameters
    ----------
    y
        Counts, samples x genes.
    X
        Design matrix, samples x p.
    log_sf
        Offsets: log size factors ``(samples,)`` or log normalisation factors
        ``(samples, genes)``.
    beta
        Coefficients (natural log) at which to evaluate: ``(genes, p)``, or ``(genes, K, p)``
        for K candidate points per gene.
    alpha
        Dispersions ``(genes,)``: variance ``mu + alpha mu^2``.

    Returns
    -------
    ll : ``(genes,)`` or ``(genes, K)``
        ``sum_i y_i log mu_i - (y_i + 1/alpha) log(1 + alpha mu_i)``: the NB log likelihood up
        to terms free of ``beta``.
    grad : ``(genes, [K,] p)``
        ``X^T (y - mu) / (1 + alpha mu)``.
    hess : ``(genes, [K,] T)``
        Packed upper triangle (:func:`fed_de.core.nb.pack`) of the Hessian
        ``-X^T diag(mu (1 + alpha y) / (1 + alpha mu)^2) X`` (negative semi-definite).
    """
    beta = np.asarray(beta, dtype=float)
    single = beta.ndim == 2
    if single:
        beta = beta[:, None, :]
    G, K, p = beta.shape
    off = np.asarray(log_sf, dtype=float)
    if G > nb.GENE_CHUNK:  # bound the samples x genes x K temporaries
        parts = [nb_loglik_grad_hess(y[:, sl], X, off if off.ndim == 1 else off[:, sl],
                                     beta[sl], np.asarray(alpha)[sl])
                 for sl in (slice(i, i + nb.GENE_CHUNK) for i in range(0, G, nb.GENE_CHUNK))]
        out = tuple(np.concatenate([q[i] for q in parts]) for i in range(3))
        return tuple(o[:, 0] for o in out) if single else out
    off = off[:, None, None] if off.ndim == 1 else off[:, :, None]
    eta = np.einsum("ip,gkp->igk", X, beta) + off  # samples x genes x K
    mu = np.exp(np.clip(eta, -700.0, 700.0))
    yk = np.asarray(y, dtype=float)[:, :, None]
    a = np.asarray(alpha, dtype=float)[None, :, None]
    am1 = 1.0 + a * mu
    ll = (yk * eta - (yk + 1.0 / a) * np.log1p(a * mu)).sum(axis=0)
    r = (yk - mu) / am1
    grad = np.einsum("igk,ip->gkp", r, X)
    w = mu * (1.0 + a * yk) / (am1 * am1)
    hess = -nb.gram(X, w)  # (G, K, T)
    if single:
        return ll[:, 0], grad[:, 0], hess[:, 0]
    return ll, grad, hess


# ----------------------------------------------------------------------------------------------
# apeglm: aggregator side (prior, Newton steps, Laplace SD)
# ----------------------------------------------------------------------------------------------
def log_prior(beta: np.ndarray, shrink: int, scale: float,
              no_shrink_scale: float = NO_SHRINK_SCALE):
    """apeglm's log prior, its gradient and the diagonal of its Hessian (constants dropped).

    ``-sum_{k != shrink} beta_k^2 / (2 sigma^2) - log(1 + beta_s^2 / S^2)``, for ``beta`` of
    shape ``(..., p)``. Returns ``(lp (...), grad (..., p), hess_diag (..., p))``.
    """
    beta = np.asarray(beta, dtype=float)
    s2, S2 = no_shrink_scale**2, scale**2
    b = beta[..., shrink]
    lp = -0.5 * (beta * beta).sum(axis=-1) / s2 + 0.5 * b * b / s2 - np.log1p(b * b / S2)
    grad = -beta / s2
    grad[..., shrink] = -2.0 * b / (S2 + b * b)
    hdiag = np.full(beta.shape, -1.0 / s2)
    hdiag[..., shrink] = -2.0 * (S2 - b * b) / (S2 + b * b) ** 2
    return lp, grad, hdiag


#: Relative size of rounding noise in a log posterior summed over samples and sites.
NOISE = 1e-12
#: Step lengths tried per round along the step of :func:`surrogate_step` (the first round
#: from :func:`newton_init` with ``xtwx`` tries 1, 1/2 and 0: the start itself).
NEWTON_STEPS = (1.0, 0.5, 0.25)


def newton_init(beta0: np.ndarray, active: np.ndarray | None = None,
                xtwx: np.ndarray | None = None, shrink: int | None = None,
                scale: float | None = None, no_shrink_scale: float = NO_SHRINK_SCALE) -> dict:
    """Start of the posterior-mode search from ``beta0`` (the MLE).

    Without ``xtwx`` the first round only evaluates ``beta0``. With ``xtwx``, the packed
    ``X^T W X`` of the fit that produced ``beta0`` (the last IRLS round's sums; Fisher
    information of the likelihood there), the aggregator proposes a first step at no data
    cost: :func:`surrogate_step` with a zero likelihood gradient (the MLE's) and ``-xtwx`` as
    its Hessian; the first round evaluates ``beta0 + t step`` for ``t`` in (1, 1/2, 0), so the
    MLE itself stays a candidate. That saves one round.

    Parameters
    ----------
    beta0
        ``(genes, p)`` natural-log start; non-finite rows are left inactive (NaN results).
    active
        Genes to fit (default: every gene with a finite start). Genes whose counts are all zero
        must be left out (apeglm returns NA for them).
    xtwx, shrink, scale
        Fisher information at ``beta0`` (packed, summed over sites), the shrunk coefficient and
        the Cauchy scale, for the free first step.

    Returns
    -------
    dict
        The search state. ``candidates`` ``(genes, K, p)`` is what the sites evaluate next with
        :func:`nb_loglik_grad_hess`; the other keys stay at the aggregator.
    """
    beta0 = np.asarray(beta0, dtype=float)
    G, p = beta0.shape
    finite = np.isfinite(beta0).all(axis=1)
    active = finite if active is None else (np.asarray(active, bool) & finite)
    beta = np.where(finite[:, None], beta0, 0.0)
    K = len(NEWTON_STEPS)
    cands = np.repeat(beta[:, None, :], K, axis=1)
    step = np.zeros((G, p))
    if xtwx is not None:
        info = np.nan_to_num(np.asarray(xtwx, dtype=float))
        ok = active & np.isfinite(np.asarray(xtwx, dtype=float)).all(axis=1)
        step[ok] = surrogate_step(beta[ok], np.zeros((ok.sum(), p)), -info[ok], shrink, scale,
                                  no_shrink_scale)
        lengths = np.array([1.0, 0.5, 0.0])
        cands = beta[:, None, :] + lengths[None, :, None] * step[:, None, :]
    return {
        "beta": beta, "f": np.full(G, -np.inf), "active": active.copy(),
        "fitted": active.copy(), "converged": np.zeros(G, bool),
        "step": step, "length": np.ones(G), "dirs": np.zeros((G, K, p)),
        "hess": np.full((G, nb.n_packed(p)), np.nan),
        "candidates": cands, "rounds": 0,
    }


def surrogate_step(beta: np.ndarray, grad_lik: np.ndarray, hess_lik: np.ndarray, shrink: int,
                   scale: float, no_shrink_scale: float = NO_SHRINK_SCALE) -> np.ndarray:
    """Step to the maximum of the likelihood's quadratic model plus the exact log prior.

    The model ``g^T d + d^T H d / 2 + log prior(beta + d)`` (``g``, ``H``: the likelihood's
    gradient and packed Hessian at ``beta``) is maximised exactly: the other coefficients
    enter quadratically (their prior is normal), so profiling them out leaves, in the shrunk
    coefficient ``u``, ``a (u - u0) - b (u - u0)^2 / 2 - log(1 + u^2 / S^2)``, whose stationary
    points are the real roots of a cubic; the highest one is taken. Where the posterior is
    concave near the mode this is Newton's step to second order; far from it the Cauchy
    prior's pull is followed exactly instead of through its (indefinite) curvature.
    """
    beta = np.asarray(beta, dtype=float)
    G, p = beta.shape
    s2, S2 = no_shrink_scale**2, scale**2
    others = np.array([i for i in range(p) if i != shrink])
    A = -nb.unpack(np.asarray(hess_lik, dtype=float), p)  # positive semi-definite
    A[:, others, others] += 1.0 / s2
    c = np.asarray(grad_lik, dtype=float).copy()
    c[:, others] -= beta[:, others] / s2
    Aoo = A[:, others[:, None], others[None, :]]
    Aoj = A[:, others, shrink]
    sol = np.linalg.solve(Aoo, np.stack([c[:, others], Aoj], axis=-1))  # (G, p-1, 2)
    a = c[:, shrink] - np.einsum("go,go->g", Aoj, sol[..., 0])
    b = A[:, shrink, shrink] - np.einsum("go,go->g", Aoj, sol[..., 1])  # Schur complement
    u0 = beta[:, shrink]
    al = a + b * u0
    # -b u^3 + al u^2 - (b S^2 + 2) u + al S^2 = 0: roots as eigenvalues of the companion
    comp = np.zeros((G, 3, 3))
    comp[:, 0, :] = np.stack([al / b, -(b * S2 + 2.0) / b, al * S2 / b], axis=1)
    comp[:, 1, 0] = comp[:, 2, 1] = 1.0
    roots = np.linalg.eigvals(comp)
    real = np.abs(roots.imag) <= 1e-7 * (1.0 + np.abs(roots.real))
    u = roots.real
    t = u - u0[:, None]
    val = np.where(real, a[:, None] * t - 0.5 * b[:, None] * t * t - np.log1p(u * u / S2),
                   -np.inf)
    best = u[np.arange(G), np.argmax(val, axis=1)]
    # polish the cubic's root (eigenvalues carry ~1e-15 relative error) by Newton on it
    for _ in range(2):
        f = -b * best**3 + al * best**2 - (b * S2 + 2.0) * best + al * S2
        df = -3.0 * b * best**2 + 2.0 * al * best - (b * S2 + 2.0)
        best = best - np.where(df != 0, f / df, 0.0)
    dj = best - u0
    step = np.empty((G, p))
    step[:, shrink] = dj
    step[:, others] = sol[..., 0] - sol[..., 1] * dj[:, None]
    return step


def penalised_newton_step(state: dict, ll: np.ndarray, grad: np.ndarray, hess: np.ndarray,
                          shrink: int, scale: float, no_shrink_scale: float = NO_SHRINK_SCALE,
                          tol: float = 1e-10) -> dict:
    """One aggregator round of the posterior-mode search.

    The sites evaluated :func:`nb_loglik_grad_hess` at ``state["candidates"]`` and their
    outputs were summed. The best candidate (highest log posterior; the longest step unless a
    shorter one is better beyond rounding noise) is accepted if it does not decrease the log
    posterior. From it, :func:`surrogate_step` maximises the likelihood's quadratic model plus
    the exact log prior (Newton's step near the mode; it follows the Cauchy prior's pull where
    the posterior is not concave), and the next candidates are ``beta + t * step`` for the
    lengths in :data:`NEWTON_STEPS`. A round where no candidate improves keeps ``beta`` and
    divides the lengths by 8: a backtracking line search spread over rounds, as in
    :mod:`fed_de.steps.fallback`.

    A gene is converged when its step is below ``tol`` (max abs, natural log) after an
    accepted round; its candidates then stay at ``beta`` (evaluated again, masked).

    Parameters
    ----------
    state
        From :func:`newton_init` or the previous call (not modified).
    ll, grad, hess
        Sums over sites of :func:`nb_loglik_grad_hess` at the candidates: ``(G, K)``,
        ``(G, K, p)``, ``(G, K, T)``.
    shrink
        Index of the shrunk coefficient.
    scale
        Cauchy scale (:func:`apeglm_prior`).

    Returns
    -------
    dict
        The new state. ``beta`` is the current mode estimate, ``hess`` the packed log-posterior
        Hessian there (for :func:`posterior_sd`), ``converged`` the genes done.
    """
    st = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    cands = state["candidates"]
    G, K, p = cands.shape
    rows = np.arange(G)
    lp, _, lp_hdiag = log_prior(cands, shrink, scale, no_shrink_scale)
    f = np.where(np.isfinite(ll), ll + lp, -np.inf)
    # the longest step wins unless a shorter one is better by more than rounding noise: near
    # the mode the differences are noise, and picking by noise would slow Newton down
    noise = NOISE * (np.abs(np.nan_to_num(f[:, 0], neginf=0.0)) + 1.0)
    k = np.where(f.max(axis=1) > f[:, 0] + noise, np.argmax(f, axis=1), 0)
    best = f[rows, k]
    slack = NOISE * (np.abs(np.nan_to_num(state["f"], neginf=0.0)) + 1.0)
    accept = state["active"] & (best >= state["f"] - slack) & np.isfinite(best)
    acc = np.flatnonzero(accept)
    st["beta"][acc] = cands[acc, k[acc]]
    st["f"][acc] = best[acc]
    H = nb.unpack(hess[acc, k[acc]], p)
    H[:, np.arange(p), np.arange(p)] += lp_hdiag[acc, k[acc]]
    st["hess"][acc] = nb.pack(H)
    step = surrogate_step(st["beta"][acc], grad[acc, k[acc]], hess[acc, k[acc]], shrink,
                          scale, no_shrink_scale)
    dirs = np.asarray(NEWTON_STEPS)[None, :, None] * step[:, None, :]
    st["dirs"][acc] = dirs
    st["step"][acc] = step
    st["length"][acc] = 1.0
    rej = np.flatnonzero(state["active"] & ~accept)
    st["length"][rej] = state["length"][rej] / 8.0
    done = np.zeros(G, bool)
    done[acc] = np.abs(step).max(axis=1) <= tol
    st["converged"] = state["converged"] | done
    st["active"] = state["active"] & ~done & (st["length"] > 1e-12)
    new = st["beta"][:, None, :] + st["length"][:, None, None] * st["dirs"]
    st["candidates"] = np.where(st["active"][:, None, None], new, st["beta"][:, None, :])
    st["rounds"] = state["rounds"] + 1
    return st


def posterior_sd(hess: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Laplace approximation: covariance ``(-H)^{-1}`` of the log posterior's Hessian at the
    mode, and the posterior SDs (its diagonal's square roots).

    ``hess`` is packed ``(genes, T)``. Genes with a non-positive variance get NaN, as apeglm
    returns NA for them. Returns ``(sd (genes, p), cov (genes, p, p))``, natural-log scale.
    """
    H = nb.unpack(np.asarray(hess, dtype=float), p)
    finite = np.isfinite(H).all(axis=(1, 2))
    finite[finite] &= np.abs(np.linalg.det(H[finite])) > 0
    cov = np.full(H.shape, np.nan)
    with np.errstate(invalid="ignore"):
        cov[finite] = np.linalg.inv(-H[finite])
    var = np.diagonal(cov, axis1=1, axis2=2)
    bad = ~(var > 0).all(axis=1)
    cov[bad] = np.nan
    sd = np.sqrt(np.where(var > 0, var, np.nan))
    sd[bad] = np.nan
    return sd, cov


def relevel_transform(p: int, intercept: int, factor_cols: list[int], new_ref: int
                      ) -> np.ndarray:
    """Change of coefficients that makes a factor's level ``new_ref`` the reference.

    With ``beta' = T beta`` and ``X' = X T^{-1}``, ``X' beta' = X beta``: the same fit in the
    parametrisation R's ``relevel`` gives, where the contrast "level j vs level new_ref" is the
    single coefficient ``j`` (DESeq2's advice for apeglm on a contrast between two
    non-reference levels). The aggregator maps the sites' sums instead of refitting:
    ``grad' = T^{-T} grad``, ``H' = T^{-T} H T^{-1}``, sites evaluate at ``T^{-1} beta'``.

    Parameters
    ----------
    p
        Number of coefficients.
    intercept
        Column of the intercept.
    factor_cols
        Columns of the factor's non-reference levels.
    new_ref
        The column (one of ``factor_cols``) whose level becomes the reference; in the new
        coefficients this column holds "old reference vs new reference".
    """
    T = np.eye(p)
    T[intercept, new_ref] = 1.0  # intercept' = intercept + b_r
    for j in factor_cols:
        if j != new_ref:
            T[j, new_ref] = -1.0  # b_j' = b_j - b_r
    T[new_ref, new_ref] = -1.0  # old reference vs new: -b_r
    return T


# ----------------------------------------------------------------------------------------------
# posterior summaries
# ----------------------------------------------------------------------------------------------
def svalue(lfsr: np.ndarray) -> np.ndarray:
    """s-values: running mean of the sorted local false sign rates (apeglm's ``svalue``).

    Ties keep their input order (R's ``rank(ties.method="first")``); NaN stays NaN.
    """
    lfsr = np.asarray(lfsr, dtype=float)
    out = np.full(lfsr.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(lfsr))
    order = ok[np.argsort(lfsr[ok], kind="stable")]
    out[order] = np.cumsum(lfsr[order]) / np.arange(1, order.size + 1)
    return out


def posterior_summaries(mode: np.ndarray, sd: np.ndarray, threshold: float = 0.0,
                        level: float = 0.9) -> dict:
    """Summaries of the Laplace posterior ``N(mode, sd^2)`` of each gene's log fold change.

    Units are those of the inputs (log2 if ``mode``, ``sd`` and ``threshold`` are log2).

    Returns
    -------
    dict of ``(genes,)`` arrays
        ``mean`` (the mode: the Laplace posterior is symmetric), ``sd``; ``lfsr``, the local
        false sign rate ``Phi(-|mode| / sd)`` (apeglm's ``fsr``); ``svalue``; ``p_gt``,
        P(|LFC| > threshold); ``fsos``, apeglm's "false sign or small" rate
        ``P(LFC < t)`` for a positive mode, ``P(LFC > -t)`` for a negative one (DESeq2's
        ``lfcThreshold`` s-values are :func:`svalue` of it); ``lower``, ``upper``: the central
        ``level`` credible interval.
    """
    mode = np.asarray(mode, dtype=float)
    sd = np.asarray(sd, dtype=float)
    t = float(threshold)
    with np.errstate(divide="ignore", invalid="ignore"):
        lfsr = ndtr(-np.abs(mode) / sd)
        p_gt = ndtr((-t - mode) / sd) + ndtr((mode - t) / sd)
        fsos = np.where(mode >= 0, ndtr((t - mode) / sd), ndtr((mode + t) / sd))
    q = ndtri(0.5 + level / 2.0)
    return {"mean": mode, "sd": sd, "lfsr": lfsr, "svalue": svalue(lfsr), "p_gt": p_gt,
            "fsos": fsos, "lower": mode - q * sd, "upper": mode + q * sd}


# ----------------------------------------------------------------------------------------------
# normal prior (DESeq2's betaPrior): prior variances at the aggregator
# ----------------------------------------------------------------------------------------------
def wtd_quantile(x: np.ndarray, weights: np.ndarray, prob: float) -> float:
    """Weighted quantile as DESeq2's copy of ``Hmisc::wtd.quantile(type="quantile",
    normwt=TRUE)`` computes it (a port kept for exact agreement with R, ``R/core.R``).

    Weights are rescaled to sum to ``n``; tied values pool their weights; the quantile is
    interpolated between the order statistics at cumulative weights ``floor(1 + (n-1) prob)``
    and the next, each the first value whose cumulative weight reaches it.
    """
    x = np.asarray(x, dtype=float)
    w = np.asarray(weights, dtype=float)
    keep = ~(np.isnan(w) | (w == 0))
    x, w = x[keep], w[keep]
    keep = ~np.isnan(x + w)
    x, w = x[keep], w[keep]
    w = w * x.size / w.sum()
    o = np.argsort(x, kind="stable")
    x, w = x[o], w[o]
    ux, start = np.unique(x, return_index=True)
    if ux.size < x.size:  # tapply(weights, x, sum)
        w = np.add.reduceat(w, start)
        x = ux
    cw = np.cumsum(w)
    n = cw[-1]
    order = 1.0 + (n - 1.0) * prob
    low = max(math.floor(order), 1.0)
    high = min(low + 1.0, n)
    frac = order % 1.0

    def step_right(v: float) -> float:  # approx(cw, x, v, method="constant", f=1, rule=2)
        if v <= cw[0]:
            return float(x[0])
        if v >= cw[-1]:
            return float(x[-1])
        j = int(np.searchsorted(cw, v, side="left"))
        return float(x[j])

    return (1.0 - frac) * step_right(low) + frac * step_right(high)


def normal_prior_var(beta_log2: np.ndarray, base_mean: np.ndarray, disp_fit: np.ndarray,
                     intercept: int | None = 0, upper_quantile: float = 0.05) -> np.ndarray:
    """DESeq2's ``estimateBetaPriorVar`` (``betaPriorMethod="weighted"``), one variance per
    column of ``beta_log2``, on the log2 scale.

    A port kept for exact agreement with R (``R/core.R``): for each column, the MLEs with
    ``|beta| < 10`` are weighted by ``1 / (1/baseMean + dispFit)`` and the zero-mean normal
    whose ``1 - upper_quantile/2`` quantile equals their weighted ``1 - upper_quantile``
    quantile of ``|beta|`` gives the variance; ``1e6`` for a column with no such gene and for
    the intercept.

    Parameters
    ----------
    beta_log2
        MLE coefficients (log2), genes x columns, all-zero genes left out (or NaN: dropped).
        For an expanded model matrix pass the standard coefficients with
        :func:`expanded_prior_var`.
    base_mean, disp_fit
        Per-gene mean of normalised counts and fitted dispersion trend.
    intercept
        Column of the intercept (``None``: none).
    """
    beta_log2 = np.asarray(beta_log2, dtype=float)
    ok = np.isfinite(beta_log2).all(axis=1)
    beta_log2 = beta_log2[ok]
    weights = 1.0 / (1.0 / np.asarray(base_mean, float)[ok] + np.asarray(disp_fit, float)[ok])
    zq = float(ndtri(1.0 - upper_quantile / 2.0))
    out = np.empty(beta_log2.shape[1])
    if beta_log2.shape[0] == 1:
        out[:] = beta_log2[0] ** 2
    else:
        for j in range(beta_log2.shape[1]):
            x = beta_log2[:, j]
            use = np.abs(x) < 10
            if not use.any():
                out[j] = WIDE_PRIOR_VAR
            else:
                sd = wtd_quantile(np.abs(x[use]), weights[use], 1.0 - upper_quantile) / zq
                out[j] = sd * sd
    if intercept is not None:
        out[intercept] = WIDE_PRIOR_VAR
    return out


def expanded_design(X: np.ndarray, factors: dict[str, list[int]], intercept: int = 0
                    ) -> tuple[np.ndarray, dict[str, list[int]]]:
    """DESeq2's expanded model matrix (``makeExpandedModelMatrix``): every factor gets one
    indicator column per level, the reference included.

    Parameters
    ----------
    X
        Standard design (samples x p) with an intercept; a factor's reference-level samples
        are those with zeros in all of its columns.
    factors
        Factor name -> its standard columns (non-reference levels, in level order).

    Returns
    -------
    X_expanded, columns
        The expanded matrix, its columns in R's order (intercept; then each term of the
        standard design in place, a factor's reference level before its other levels), and
        factor name -> its expanded columns (reference level first).
    """
    X = np.asarray(X, dtype=float)
    in_factor = {c: f for f, cols in factors.items() for c in cols}
    cols, groups, done = [], {}, set()
    for j in range(X.shape[1]):
        f = in_factor.get(j)
        if f is None:
            cols.append(X[:, j])
            continue
        if f in done:
            continue
        done.add(f)
        fc = factors[f]
        ref = 1.0 - X[:, fc].sum(axis=1)
        groups[f] = list(range(len(cols), len(cols) + len(fc) + 1))
        cols.append(ref)
        cols.extend(X[:, c] for c in fc)
    return np.column_stack(cols), groups


def expanded_map(X: np.ndarray, factors: dict[str, list[int]], intercept: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Linear maps between the standard and expanded designs (:func:`expanded_design`).

    Returns ``M`` (p x p_e) with ``X_expanded = X @ M`` (a site never needs the expanded matrix
    from its data: ``X^T W X`` sums map as ``M^T (X^T W X) M``) and ``E`` (p_e x p) with
    ``X_expanded @ (E @ beta) = X @ beta`` (a standard fit mapped to the expanded coefficients,
    reference levels at zero: the start of the expanded ridge fit).
    """
    p = X.shape[1]
    Xe, groups = expanded_design(X, factors, intercept)
    pe = Xe.shape[1]
    in_factor = {c for cols in factors.values() for c in cols}
    plain_std = [j for j in range(p) if j not in in_factor]
    plain_exp = [j for j in range(pe) if all(j not in g for g in groups.values())]
    M = np.zeros((p, pe))
    E = np.zeros((pe, p))
    for js, je in zip(plain_std, plain_exp, strict=True):
        M[js, je] = 1.0
        E[je, js] = 1.0
    for f, cols in factors.items():
        ref, rest = groups[f][0], groups[f][1:]
        M[intercept, ref] = 1.0
        for c, ce in zip(cols, rest, strict=True):
            M[c, ref] = -1.0  # reference indicator = 1 - sum of the other levels'
            M[c, ce] = 1.0
            E[ce, c] = 1.0
    return M, E


def expanded_prior_var(beta_log2: np.ndarray, base_mean: np.ndarray, disp_fit: np.ndarray,
                       factors: dict[str, list[int]], p_expanded: int,
                       expanded_groups: dict[str, list[int]], intercept: int = 0,
                       upper_quantile: float = 0.05) -> np.ndarray:
    """Prior variances for the expanded model matrix, as DESeq2's ``estimateBetaPriorVar``
    with ``modelMatrixType="expanded"`` (a port kept for exact agreement with R,
    ``R/core.R``, ``R/expanded.R``).

    Each factor with ``L >= 3`` levels first gets the ``(L-1)(L-2)/2`` differences between its
    non-reference MLE columns (``addAllContrasts``); a variance is matched per column
    (:func:`normal_prior_var`); then every expanded column of a factor gets the mean of the
    variances of that factor's MLE and difference columns (``averagePriorsOverLevels``).
    Columns that are not factor levels keep their own variance; the intercept gets ``1e6``.

    Parameters
    ----------
    beta_log2
        Standard-design MLEs (log2), genes x p.
    factors
        Factor -> its standard columns (as :func:`expanded_design`).
    p_expanded, expanded_groups
        Width of the expanded matrix and factor -> expanded columns
        (from :func:`expanded_design`).
    """
    beta_log2 = np.asarray(beta_log2, dtype=float)
    blocks, owner = [beta_log2], [None] * beta_log2.shape[1]
    for f, cols in factors.items():
        for c in cols:
            owner[c] = f
        n = len(cols)
        if n > 1:  # R's order: for k = 2..n, i = k..n, j = k - 1 (columns i - j)
            pairs = [(i, k - 1) for k in range(1, n) for i in range(k, n)]
            blocks.append(np.column_stack([beta_log2[:, cols[i]] - beta_log2[:, cols[j]]
                                           for i, j in pairs]))
            owner.extend([f] * len(pairs))
    full = np.column_stack(blocks)
    var = normal_prior_var(full, base_mean, disp_fit, intercept=None,
                           upper_quantile=upper_quantile)
    out = np.full(p_expanded, np.nan)
    in_factor = {c for cols in expanded_groups.values() for c in cols}
    # non-factor columns of the standard design keep their order in the expanded one
    others_std = [j for j in range(beta_log2.shape[1]) if owner[j] is None]
    others_exp = [j for j in range(p_expanded) if j not in in_factor]
    for js, je in zip(others_std, others_exp, strict=True):
        out[je] = var[js]
    for f, cols in expanded_groups.items():
        out[cols] = np.mean([v for v, o in zip(var, owner, strict=True) if o == f])
    out[intercept] = WIDE_PRIOR_VAR
    return out


# ----------------------------------------------------------------------------------------------
# normal prior: the ridge-penalised IRLS (sites: fed_de.core.nb.irls_summands)
# ----------------------------------------------------------------------------------------------
def ridge_lambda(prior_var_log2: np.ndarray) -> np.ndarray:
    """Natural-log ridge ``1 / (ln(2)^2 betaPriorVar)`` for :func:`ridge_irls_update`."""
    return 1.0 / (LN2**2 * np.asarray(prior_var_log2, dtype=float))


def ridge_irls_start(xtx: np.ndarray, xty_log: np.ndarray, log_base_mean: np.ndarray,
                     intercept: int = 0) -> np.ndarray:
    """DESeq2's ``fitNbinomGLMs`` start: least squares of ``log(counts/sf + 0.1)`` on ``X`` if
    ``X`` has full rank, else zeros with the intercept at ``log(baseMean)``.

    ``xtx`` is ``X^T X`` (p x p, summed over sites) and ``xty_log`` the per-gene sums
    ``X^T log(y / sf + 0.1)`` (genes x p).
    """
    p = xtx.shape[0]
    if np.linalg.matrix_rank(xtx) == p:
        return np.linalg.solve(xtx, np.asarray(xty_log, float).T).T
    beta = np.zeros((len(log_base_mean), p))
    beta[:, intercept] = log_base_mean
    return beta


def ridge_irls_update(beta: np.ndarray, sums: dict, dev_old: np.ndarray, lam: np.ndarray,
                      active: np.ndarray, iteration: int, tol: float = 1e-8,
                      large: float = 30.0) -> dict:
    """One aggregator round of DESeq2's ``fitBeta`` IRLS with ridge ``lam`` (natural log).

    ``sums`` are :func:`fed_de.core.nb.irls_summands` at ``beta`` summed over sites. The
    deviance there decides convergence exactly as ``fitBeta`` (``|dev - dev_old| / (|dev| +
    0.1) < tol`` after the first iteration): a converged gene keeps ``beta`` and its ``xtwx``
    gives the standard errors (:func:`ridge_se`). Others move to
    ``(X^T W X + diag(lam))^{-1} X^T W z``; a gene whose update leaves ``|beta| <= large``
    (natural log, ``fitBeta``'s 30) stops unconverged (DESeq2 would refit it with optim).

    ``iteration`` is the index of ``beta`` in the sequence (0 for the start): ``fitBeta``
    first compares deviances after its second update, i.e. at ``iteration >= 2``.

    Returns a dict: ``beta``, ``deviance`` (at the input ``beta``), ``active`` (still
    iterating), ``converged`` (this round), ``diverged`` (this round).
    """
    dev = sums["deviance"]
    p = beta.shape[1]
    with np.errstate(invalid="ignore"):
        conv = np.abs(dev - dev_old) / (np.abs(dev) + 0.1) < tol
    conv = active & conv & (iteration >= 2)
    nan_dev = active & ~np.isfinite(dev)
    go = active & ~conv & ~nan_dev
    new = beta.copy()
    idx = np.flatnonzero(go)
    if idx.size:
        new[idx] = nb.solve_ridge(sums["xtwx"][idx], sums["xtwz"][idx], lam)
    big = go & (np.abs(new) > large).any(axis=1)
    new[big] = beta[big]
    return {"beta": new, "deviance": dev, "active": go & ~big, "converged": conv,
            "diverged": big | nan_dev, "p": p}


def ridge_se(xtwx: np.ndarray, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DESeq2's covariance of ridge-penalised coefficients, the sandwich
    ``(X^T W X + L)^{-1} X^T W X (X^T W X + L)^{-1}`` at the final means, and its SDs
    (natural log). Returns ``(se (genes, p), cov (genes, p, p))``."""
    cov = nb.wald_covariance(xtwx, lam)
    var = np.diagonal(cov, axis1=1, axis2=2)
    return np.sqrt(np.maximum(var, 0.0)), cov


def ridge_fixed_point_summands(y: np.ndarray, X: np.ndarray, log_sf: np.ndarray,
                               beta: np.ndarray, alpha: np.ndarray, min_mu: float = 0.5
                               ) -> dict:
    """Site sums for Newton's method on the fixed point of DESeq2's ridge IRLS.

    ``fitBeta`` iterates ``beta <- (X^T W X + L)^{-1} X^T W z`` with means floored at
    ``min_mu``; its fixed point is the root of ``F(beta) = X^T r - L beta`` with
    ``r = w (z - X beta)``: the penalised NB score ``(y - mu) / (1 + alpha mu)`` where
    ``mu >= min_mu``, and ``w_f (log(min_mu) - eta + (y - min_mu) / min_mu)`` where the mean is
    floored. Newton on ``F`` reaches that root in a few rounds where IRLS takes tens.

    Parameters
    ----------
    y, X, log_sf, alpha
        As :func:`nb_loglik_grad_hess` (``log_sf`` of shape ``(samples,)``).
    beta
        ``(genes, K, p)`` candidates (or ``(genes, p)``).

    Returns
    -------
    dict
        ``score``: ``X^T r`` ``(genes, K, p)``; ``jac``: packed ``X^T diag(-dr/deta) X``
        ``(genes, K, T)`` (positive semi-definite); ``xtwx``: packed ``X^T W X`` with the
        floored means ``(genes, K, T)``, for the standard errors and the IRLS step.
    """
    beta = np.asarray(beta, dtype=float)
    single = beta.ndim == 2
    if single:
        beta = beta[:, None, :]
    G = beta.shape[0]
    if G > nb.GENE_CHUNK:  # bound the samples x genes x K temporaries
        parts = [ridge_fixed_point_summands(y[:, sl], X, log_sf, beta[sl],
                                            np.asarray(alpha)[sl], min_mu)
                 for sl in (slice(i, i + nb.GENE_CHUNK) for i in range(0, G, nb.GENE_CHUNK))]
        out = {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}
        return {k: v[:, 0] for k, v in out.items()} if single else out
    off = np.asarray(log_sf, dtype=float)[:, None, None]
    eta = np.einsum("ip,gkp->igk", X, beta) + off
    mu = np.exp(np.clip(eta, -700.0, 700.0))
    yk = np.asarray(y, dtype=float)[:, :, None]
    a = np.asarray(alpha, dtype=float)[None, :, None]
    floored = mu < min_mu
    mu_f = np.where(floored, min_mu, mu)
    w = mu_f / (1.0 + a * mu_f)
    r = np.where(floored, w * (np.log(min_mu) - eta + (yk - min_mu) / min_mu),
                 (yk - mu) / (1.0 + a * mu))
    dr = np.where(floored, w, mu * (1.0 + a * yk) / (1.0 + a * mu) ** 2)  # -dr/deta
    out = {"score": np.einsum("igk,ip->gkp", r, X), "jac": nb.gram(X, dr),
           "xtwx": nb.gram(X, w)}
    if single:
        out = {k: v[:, 0] for k, v in out.items()}
    return out


def ridge_newton_init(beta0: np.ndarray, lam: np.ndarray, xtwx: np.ndarray | None = None,
                      active: np.ndarray | None = None) -> dict:
    """Start of :func:`ridge_newton_step` from ``beta0`` (the MLE, fitted with a negligible
    ridge ``lam0``).

    With ``xtwx`` (the packed ``X^T W X`` of the MLE's last IRLS round) the first round's
    candidates already include an IRLS step computed at the aggregator: at the MLE,
    ``F ~ -L beta0`` (its own score is ~0), so the step is ``-(X^T W X + L)^{-1} L beta0``;
    candidates ``beta0 + t step``, ``t`` in (1, 1/2, 0).
    """
    beta0 = np.asarray(beta0, dtype=float)
    G, p = beta0.shape
    finite = np.isfinite(beta0).all(axis=1)
    active = finite if active is None else (np.asarray(active, bool) & finite)
    beta = np.where(finite[:, None], beta0, 0.0)
    cands = np.repeat(beta[:, None, :], 3, axis=1)
    if xtwx is not None:
        A = nb.unpack(np.nan_to_num(np.asarray(xtwx, dtype=float)), p) + np.diag(lam)
        step = np.zeros((G, p))
        step[active] = np.linalg.solve(A[active], -(lam * beta[active])[..., None])[..., 0]
        cands = beta[:, None, :] + np.array([1.0, 0.5, 0.0])[None, :, None] * step[:, None, :]
    return {"beta": beta, "merit": np.full(G, np.inf), "active": active.copy(),
            "fitted": active.copy(), "converged": np.zeros(G, bool), "length": np.ones(G),
            "newton": np.zeros((G, p)), "irls": np.zeros((G, p)),
            "xtwx": np.full((G, nb.n_packed(p)), np.nan), "candidates": cands, "rounds": 0}


def ridge_newton_step(state: dict, sums: dict, lam: np.ndarray, tol: float = 1e-10) -> dict:
    """One aggregator round of Newton's method on the ridge IRLS fixed point.

    ``sums`` are :func:`ridge_fixed_point_summands` at ``state["candidates"]``, summed over
    sites. Each candidate is scored by ``F^T (X^T W X + L)^{-1} F`` (zero exactly at the fixed
    point); the best (the first, longest Newton step, unless another is better beyond rounding
    noise) is accepted if it does not increase the score. From it the next candidates are the
    Newton step, half of it, and the IRLS step (``(X^T W X + L)^{-1} F``, DESeq2's own update:
    a safeguard). A round without improvement halves the lengths. A gene stops when its Newton
    step is below ``tol``; ``xtwx`` at its ``beta`` then gives DESeq2's standard errors
    (:func:`ridge_se`).
    """
    st = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    cands = state["candidates"]
    G, K, p = cands.shape
    rows = np.arange(G)
    F = sums["score"] - lam * cands
    A = nb.unpack(sums["xtwx"], p) + np.diag(lam)
    fin = np.isfinite(A).all(axis=(-2, -1)) & np.isfinite(F).all(axis=-1)
    merit = np.full((G, K), np.inf)
    sol = np.linalg.solve(np.where(fin[..., None, None], A, np.eye(p)),
                          np.where(fin[..., None], F, 0.0)[..., None])[..., 0]
    merit[fin] = np.einsum("...p,...p->...", F, sol)[fin]
    noise = NOISE * (np.abs(np.where(np.isfinite(merit[:, 0]), merit[:, 0], 0.0)) + 1.0)
    k = np.where(merit.min(axis=1) < merit[:, 0] - noise, np.argmin(merit, axis=1), 0)
    best = merit[rows, k]
    slack = NOISE * (np.abs(np.where(np.isfinite(state["merit"]), state["merit"], 0.0)) + 1.0)
    accept = state["active"] & (best <= state["merit"] + slack) & np.isfinite(best)
    acc = np.flatnonzero(accept)
    st["beta"][acc] = cands[acc, k[acc]]
    st["merit"][acc] = best[acc]
    st["xtwx"][acc] = sums["xtwx"][acc, k[acc]]
    J = nb.unpack(sums["jac"][acc, k[acc]], p) + np.diag(lam)
    newton = np.linalg.solve(J, F[acc, k[acc]][..., None])[..., 0]
    st["newton"][acc] = newton
    st["irls"][acc] = sol[acc, k[acc]]
    st["length"][acc] = 1.0
    rej = np.flatnonzero(state["active"] & ~accept)
    st["length"][rej] = state["length"][rej] / 2.0
    done = np.zeros(G, bool)
    done[acc] = np.abs(newton).max(axis=1) <= tol
    st["converged"] = state["converged"] | done
    st["active"] = state["active"] & ~done & (st["length"] > 1e-8)
    L = st["length"][:, None]
    new = np.stack([st["beta"] + L * st["newton"], st["beta"] + 0.5 * L * st["newton"],
                    st["beta"] + L * st["irls"]], axis=1)
    st["candidates"] = np.where(st["active"][:, None, None], new, st["beta"][:, None, :])
    st["rounds"] = state["rounds"] + 1
    return st


def ridge_irls_pooled(y: np.ndarray, X: np.ndarray, sf: np.ndarray, alpha: np.ndarray,
                      lam: np.ndarray, beta0: np.ndarray, tol: float = 1e-8,
                      maxit: int = 100, min_mu: float = 0.5) -> dict:
    """The whole ridge IRLS on one site's data (pooled reference for the federated rounds).

    Returns ``beta``, ``se`` (natural log), ``cov``, ``xtwx`` (at the final ``beta``),
    ``converged`` and ``rounds`` (data rounds
    used until the last gene stopped).
    """
    G, p = beta0.shape
    beta = np.asarray(beta0, dtype=float).copy()
    active = np.isfinite(beta).all(axis=1)
    beta[~active] = 0.0
    converged = np.zeros(G, bool)
    xtwx = np.zeros((G, nb.n_packed(p)))
    dev_old = np.zeros(G)
    rounds = 0
    for it in range(maxit + 1):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        s = nb.irls_summands(y[:, idx], X, sf, beta[idx], alpha[idx], min_mu)
        rounds += 1
        sums = {k: np.zeros((G,) + v.shape[1:]) for k, v in s.items()}
        for k, v in s.items():
            sums[k][idx] = v
        xtwx[idx] = s["xtwx"]
        upd = ridge_irls_update(beta, sums, dev_old, lam, active, it, tol)
        converged |= upd["converged"]
        beta, active = upd["beta"], upd["active"]
        dev_old = np.where(np.isfinite(upd["deviance"]), upd["deviance"], dev_old)
    se, cov = ridge_se(xtwx, lam)
    return {"beta": beta, "se": se, "cov": cov, "xtwx": xtwx, "converged": converged,
            "rounds": rounds}
