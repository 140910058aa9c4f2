"""DESeq2's normal prior on log fold changes (``lfcShrink(type="normal")``, the 2014
``betaPrior``) from per-gene sums.

A zero-mean normal prior on every non-intercept coefficient, with variances matched to an upper
quantile of the MLEs (:func:`normal_prior_var`, aggregator, no data round), and the
ridge-penalised IRLS of DESeq2's ``fitBeta`` with ``lambda = 1 / betaPriorVar``, either
replayed round by round (:func:`fed_de.core.nb.irls_summands`, :func:`ridge_irls_update`: R's
path, ~15-25 rounds) or solved by Newton's method on its fixed point
(:func:`ridge_fixed_point_summands` at the sites, :func:`ridge_newton_step` at the aggregator:
4-10 rounds from the MLE); standard errors :func:`ridge_se`. Contrasts use DESeq2's expanded
model matrix (:func:`expanded_design`, :func:`expanded_map`, :func:`expanded_prior_var`).

Pure numpy; genes are the leading dimension; site-side functions take counts as samples x genes
and return sums over samples.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtri

from fed_de.core import nb

__all__ = [
    "WIDE_PRIOR_VAR",
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
#: DESeq2's prior variance for the intercept (and the "no prior" ridge is 1 / 1e6).
WIDE_PRIOR_VAR = 1e6
#: Relative size of rounding noise in a merit summed over samples and sites.
NOISE = 1e-12

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
