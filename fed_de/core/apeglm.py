"""apeglm's log fold change shrinkage from per-gene sums: the adaptive Cauchy prior, the
posterior mode by Newton-type rounds, and its Laplace approximation.

Pure numpy; genes are the leading (batch) dimension of every per-gene array. A site holds
counts as samples x genes (as in :mod:`fed_de.core.nb`); what it computes are sums over its
samples, so "pooled" is one site and a federation sums the sites' outputs.

``lfcShrink(type="apeglm")`` (apeglm's ``method="nbinomCR"``) is the posterior of the
coefficients ``beta`` (natural log) of an NB GLM with offsets ``log(size factors)`` and fixed
dispersions: a Cauchy prior of scale ``S`` on the shrunk coefficient, ``N(0, 15^2)`` on every
other one. ``S = min(sqrt(A), 1)`` with ``A`` the Efron-Morris estimate of the spread of the
true effects from the MLEs and their standard errors (:func:`apeglm_prior`, aggregator, no
data round). The exact posterior mode is found from the MLE by Newton-type steps with the prior
handled exactly and a line search spread over rounds; the likelihood part is a sum over samples
(:func:`nb_loglik_grad_hess`, site side; :func:`penalised_newton_step`, aggregator side). The
posterior SD comes from the Hessian at the mode (:func:`posterior_sd`, apeglm's Laplace
approximation). A contrast between two non-reference levels is shrunk in the parametrisation
R's ``relevel`` gives (:func:`relevel_transform`). R's apeglm stops its optimiser early; its
path is replayed in :mod:`fed_de.core.apeglm_r` for comparison.
"""

from __future__ import annotations

import math

import numpy as np

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
]

#: apeglm's ``prior.no.shrink.scale``: sd of the normal prior on the coefficients not shrunk.
NO_SHRINK_SCALE = 15.0
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
    :mod:`fed_de.bulk.fallback`.

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
