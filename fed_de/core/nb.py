"""Negative-binomial GLM pieces that are sums over samples (site side) and their solvers
(aggregator side). Genes are the batch dimension; arrays are samples x genes at a site.

Conventions follow DESeq2: natural-log coefficients, fitted means floored at ``min_mu``,
dispersion ``alpha`` with variance ``mu + alpha mu^2``, a ridge ``lambda = 1e-6`` on the log2
scale (``1e-6 / ln(2)^2`` on the natural scale).
"""

from __future__ import annotations

import numpy as np
from scipy.special import digamma, gammaln

LN2 = float(np.log(2.0))
RIDGE_LOG2 = 1e-6
GENE_CHUNK = 2048  # genes per block: bounds the samples x genes x points temporaries


def ridge(p: int) -> np.ndarray:
    """DESeq2's ridge on the natural-log scale (``lambda / ln(2)^2``)."""
    return np.full(p, RIDGE_LOG2 / LN2**2)


def trigamma(x: np.ndarray) -> np.ndarray:
    """psi'(x) for x > 0: recurrence up to x >= 8, then the asymptotic series (~1e-12).

    scipy's ``polygamma(1, x)`` goes through the Hurwitz zeta function and is several times
    slower; this is the hot spot of the dispersion summands.
    """
    x = np.asarray(x, dtype=np.float64)
    flat = x.ravel()
    acc = np.zeros_like(flat)
    idx = np.flatnonzero(flat < 8.0)
    z = flat.copy()
    while idx.size:  # at most 8 passes, only over the small arguments
        zi = z[idx]
        acc[idx] += 1.0 / (zi * zi)
        z[idx] = zi + 1.0
        idx = idx[zi + 1.0 < 8.0]
    inv = 1.0 / z
    inv2 = inv * inv
    series = inv + 0.5 * inv2 + inv * inv2 * (1.0 / 6.0 - inv2 * (1.0 / 30.0 - inv2 * (
        1.0 / 42.0 - inv2 * (1.0 / 30.0 - inv2 * 5.0 / 66.0))))
    return (acc + series).reshape(x.shape)


# -- symmetric p x p matrices travel packed (upper triangle) -------------------------------
def n_packed(p: int) -> int:
    """Number of unique entries of a symmetric p x p matrix."""
    return p * (p + 1) // 2


def pack(A: np.ndarray) -> np.ndarray:
    """``(..., p, p)`` symmetric -> ``(..., p(p+1)/2)`` upper triangle."""
    iu = np.triu_indices(A.shape[-1])
    return A[..., iu[0], iu[1]]


def unpack(v: np.ndarray, p: int) -> np.ndarray:
    """Inverse of :func:`pack`."""
    iu = np.triu_indices(p)
    A = np.zeros(v.shape[:-1] + (p, p))
    A[..., iu[0], iu[1]] = v
    A[..., iu[1], iu[0]] = v
    return A


def gram(X: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Packed ``X^T diag(w_g) X`` for every gene (and point): ``w`` is ``(n, ...)``."""
    iu = np.triu_indices(X.shape[1])
    XX = X[:, iu[0]] * X[:, iu[1]]  # n x T
    return np.tensordot(w, XX, axes=([0], [0]))  # (..., T)


# -- fitted means ---------------------------------------------------------------------------
def fitted_mu(X: np.ndarray, beta: np.ndarray, sf: np.ndarray, min_mu: float) -> np.ndarray:
    """``max(sf * exp(X beta), min_mu)`` (samples x genes); ``beta`` is genes x p."""
    with np.errstate(over="ignore"):
        mu = sf[:, None] * np.exp(X @ beta.T)
    return np.maximum(mu, min_mu)


def nb_deviance(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray,
                lgamma_y1: np.ndarray | None = None,
                lgamma_ratio: np.ndarray | None = None) -> np.ndarray:
    """``-2 * sum_i log NB(y_i; mu_i, alpha)`` per gene (DESeq2's ``dnbinom_mu``).

    ``lgamma_y1`` (per-gene sum of ``lgamma(y + 1)``) and ``lgamma_ratio`` (per-gene sum of
    ``lgamma(y + 1/alpha) - lgamma(1/alpha)``, see :func:`lgamma_ratio`) do not depend on the
    means and may be passed to skip recomputing them.
    """
    r = 1.0 / alpha
    if lgamma_ratio is None:
        lgamma_ratio = nb_lgamma_ratio(y, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = (y * (np.log(mu) - np.log(mu + r)) - r * np.log1p(mu / r)).sum(axis=0)
    if lgamma_y1 is None:
        lgamma_y1 = gammaln(y + 1.0).sum(axis=0)
    return -2.0 * (logp + lgamma_ratio - lgamma_y1)


def nb_lgamma_ratio(y: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Per-gene sum of ``lgamma(y + 1/alpha) - lgamma(1/alpha)`` (the mean-free part)."""
    r = 1.0 / alpha
    return gammaln(y + r).sum(axis=0) - y.shape[0] * gammaln(r)


def irls_summands(y, X, sf, beta, alpha, min_mu: float = 0.5, lgamma_y1=None,
                  lgamma_ratio=None) -> dict:
    """One IRLS iteration's sums at ``beta``: packed ``X^T W X``, ``X^T W z``, deviance, and
    ``X^T diag(v) X`` with ``v`` the derivative of the IRLS pseudo-score.

    ``z = log(mu / sf) + (y - mu) / mu`` and ``w = mu / (1 + alpha mu)`` with ``mu`` floored,
    exactly as DESeq2's ``fitBeta``. The pseudo-score ``X^T W (z - X beta)`` vanishes at
    DESeq2's fixed point; its Jacobian is ``-X^T diag(v) X`` with ``v = mu (1 + alpha y) /
    (1 + alpha mu)^2`` (the observed information) where the mean is not floored and ``v = w``
    where it is (there ``w`` and ``z`` do not move with ``beta``): a Newton step towards the
    same fixed point.
    """
    with np.errstate(over="ignore"):
        raw = sf[:, None] * np.exp(X @ beta.T)
    mu = np.maximum(raw, min_mu)
    w = mu / (1.0 + alpha * mu)
    z = np.log(mu / sf[:, None]) + (y - mu) / mu
    v = np.where(raw > min_mu, w * (1.0 + alpha * y) / (1.0 + alpha * mu), w)
    return {"xtwx": gram(X, w), "xtwz": (w * z).T @ X,
            "deviance": nb_deviance(y, mu, alpha, lgamma_y1, lgamma_ratio),
            "xtwx_obs": gram(X, v)}


def gene_blocks(G: int, chunk: int | None = None) -> list[slice]:
    """Slices of at most ``chunk`` (default :data:`GENE_CHUNK`) genes; a last block of one
    gene joins the previous one.

    A samples x 1 block would be summed over samples in numpy's pairwise order rather than
    row by row, so a one-gene tail would move that gene's sums by the last bits.
    """
    bounds = list(range(0, G, chunk or GENE_CHUNK)) + [G]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def irls_candidate_sums(counts: np.ndarray, genes: np.ndarray, X: np.ndarray, sf: np.ndarray,
                        candidates: np.ndarray, alpha: np.ndarray, min_mu: float = 0.5,
                        lgamma_y1: np.ndarray | None = None) -> dict:
    """:func:`irls_summands` at each of ``K`` candidates of the genes ``genes``, in blocks.

    Parameters
    ----------
    counts : np.ndarray
        The site's counts, samples x all genes (read, never copied whole).
    genes : np.ndarray
        Column indices of the genes to compute, shape ``(g,)``.
    X, sf : np.ndarray
        Design (samples x p) and size factors (samples).
    candidates : np.ndarray
        Coefficients, ``(g, K, p)``.
    alpha : np.ndarray
        Dispersions of ``genes``, shape ``(g,)``.
    min_mu : float
        Floor of the fitted means.
    lgamma_y1 : np.ndarray, optional
        Per-gene sum of ``lgamma(y + 1)`` of ``genes``.

    Returns
    -------
    dict
        ``xtwx``, ``xtwx_obs`` (g x K x T), ``xtwz`` (g x K x p), ``deviance`` (g x K): the
        same numbers as :func:`irls_summands` on all ``genes`` at once, with samples x genes
        temporaries of at most :data:`GENE_CHUNK` genes.
    """
    g, K, p = candidates.shape
    T = n_packed(p)
    out = {"xtwx": np.empty((g, K, T)), "xtwz": np.empty((g, K, p)),
           "deviance": np.empty((g, K)), "xtwx_obs": np.empty((g, K, T))}
    for sl in gene_blocks(g):
        y = counts[:, genes[sl]]
        lgr = nb_lgamma_ratio(y, alpha[sl])  # mean-free part: once for every candidate
        lgy1 = None if lgamma_y1 is None else lgamma_y1[sl]
        for k in range(K):
            summands = irls_summands(y, X, sf, candidates[sl, k], alpha[sl], min_mu, lgy1, lgr)
            for key, value in summands.items():
                out[key][sl, k] = value
    return out


def fisher_gram(X: np.ndarray, beta: np.ndarray, sf: np.ndarray, alpha: np.ndarray,
                min_mu: float) -> np.ndarray:
    """Packed ``X^T W X`` at ``beta`` (``w = mu / (1 + alpha mu)``, ``mu`` floored at
    ``min_mu``), in blocks of :data:`GENE_CHUNK` genes: ``(G, T)``."""
    out = np.empty((beta.shape[0], n_packed(X.shape[1])))
    for sl in gene_blocks(beta.shape[0]):
        mu = fitted_mu(X, beta[sl], sf, min_mu)
        out[sl] = gram(X, mu / (1.0 + alpha[sl] * mu))
    return out


def solve_ridge(xtwx_packed: np.ndarray, rhs: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """``(X^T W X + diag(lam))^{-1} rhs`` per gene."""
    p = rhs.shape[-1]
    A = unpack(xtwx_packed, p) + np.diag(lam)
    return np.linalg.solve(A, rhs[..., None])[..., 0]


def wald_covariance(xtwx_packed: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """DESeq2's sandwich ``(X^T W X + L)^{-1} X^T W X (X^T W X + L)^{-1}`` per gene."""
    p = lam.shape[0]
    A = unpack(xtwx_packed, p)
    inv = np.linalg.inv(A + np.diag(lam))
    return inv @ A @ inv


# -- dispersion: profile likelihood in log(alpha) with Cox-Reid adjustment ------------------
def disp_summands(y: np.ndarray, mu: np.ndarray, X: np.ndarray, log_alpha: np.ndarray) -> dict:
    """Per-gene sums needed to evaluate the Cox-Reid adjusted log likelihood and its first two
    derivatives in ``log(alpha)`` at ``K`` points per gene.

    Parameters
    ----------
    y, mu
        Counts and fitted means, samples x genes.
    X
        Design matrix, samples x p.
    log_alpha
        Genes x K evaluation points.

    Returns
    -------
    dict
        ``ll, d1, d2`` (genes x K): DESeq2's ``ll_part`` (constants dropped) and its
        derivatives; ``A, A1, A2`` (genes x K x T): packed ``X^T W X`` with
        ``w = mu / (1 + alpha mu)`` and its first two derivatives in ``log(alpha)``.
    """
    G, K = log_alpha.shape
    T = n_packed(X.shape[1])
    out = {k: np.empty((G, K)) for k in ("ll", "d1", "d2")}
    out.update({k: np.empty((G, K, T)) for k in ("A", "A1", "A2")})
    for start in range(0, G, GENE_CHUNK):
        sl = slice(start, min(G, start + GENE_CHUNK))
        part = _disp_block(y[:, sl], mu[:, sl], X, log_alpha[sl])
        for k, v in part.items():
            out[k][sl] = v
    return out


def _disp_block(y, mu, X, log_alpha) -> dict:
    y = y[:, :, None]
    mu = mu[:, :, None]
    alpha = np.exp(log_alpha)[None]
    r = 1.0 / alpha
    t = y + r
    q = mu / r
    l1 = np.log1p(q)  # log(1 + mu/r); log(mu + r) = log(r) + l1
    inv_mr = 1.0 / (mu + r)
    # l(r) = lgamma(y+r) - lgamma(r) - y log(mu+r) - r log(1 + mu/r). Differences such as
    # digamma(y+r) - digamma(r) are taken per element, before summing over samples: summing
    # first would cancel large terms and make sums from different sites disagree in the last
    # digits more than the per-element form does.
    ll = gammaln(t) - gammaln(r) - y * (np.log(r) + l1) - r * l1
    dl_dr = digamma(t) - digamma(r) - l1 - t * inv_mr + 1.0
    d2l = trigamma(t) - trigamma(r) - inv_mr - (mu - y) * inv_mr * inv_mr + 1.0 / r
    ll_sum, dl_sum, d2l_sum = ll.sum(axis=0), dl_dr.sum(axis=0), d2l.sum(axis=0)
    # theta = log(alpha), r = exp(-theta): dl/dtheta = -r l_r; d2l/dtheta2 = r l_r + r^2 l_rr
    r0 = r[0]
    w = mu / (1.0 + alpha * mu)
    dw = -alpha * w * w
    d2w = dw + 2.0 * alpha * alpha * w**3
    return {"ll": ll_sum, "d1": -r0 * dl_sum, "d2": r0 * dl_sum + r0 * r0 * d2l_sum,
            "A": gram(X, w), "A1": gram(X, dw), "A2": gram(X, d2w)}


def cox_reid(A: np.ndarray, A1: np.ndarray, A2: np.ndarray, p: int):
    """Cox-Reid term ``-1/2 log det A`` and its first two derivatives in ``log(alpha)``.

    Inputs are packed and summed over sites: ``(..., T)``.
    """
    M, M1, M2 = unpack(A, p), unpack(A1, p), unpack(A2, p)
    sign, logdet = np.linalg.slogdet(M)
    with np.errstate(invalid="ignore"):
        inv = np.linalg.inv(np.where((sign > 0)[..., None, None], M, np.eye(p)))
    B = inv @ M1
    cr = np.where(sign > 0, -0.5 * logdet, np.nan)
    d1 = -0.5 * np.trace(B, axis1=-2, axis2=-1)
    d2 = -0.5 * (np.trace(inv @ M2, axis1=-2, axis2=-1) - np.einsum("...ij,...ji->...", B, B))
    return cr, d1, d2


def disp_summands_at(y: np.ndarray, mu: np.ndarray, X: np.ndarray, genes: np.ndarray,
                     points: np.ndarray, budget: int = 4_000_000) -> dict:
    """:func:`disp_summands` at scattered ``(gene, log alpha)`` pairs: one value per pair.

    Pairs are grouped by how many points their gene has (widths rounded up to a power of
    two), so the work stays within twice the number of pairs and each block holds at most
    ``budget`` samples x genes x points elements.
    """
    P, T = genes.size, n_packed(X.shape[1])
    out = {k: np.zeros(P) for k in ("ll", "d1", "d2")}
    out.update({k: np.zeros((P, T)) for k in ("A", "A1", "A2")})
    if P == 0:
        return out
    order = np.argsort(genes, kind="stable")
    g_sorted = genes[order]
    uniq, first, count = np.unique(g_sorted, return_index=True, return_counts=True)
    slot = np.arange(P) - np.repeat(first, count)  # position of each pair within its gene
    width = 2 ** np.ceil(np.log2(count)).astype(int)
    for w in np.unique(width):
        rows = np.flatnonzero(width == w)  # genes (indices into uniq) of this width
        dense = np.repeat(points[order][first[rows]][:, None], w, axis=1)  # pad: first point
        take = np.isin(np.searchsorted(uniq, g_sorted), rows)
        gi = np.searchsorted(uniq[rows], g_sorted[take])
        dense[gi, slot[take]] = points[order][take]
        step = max(1, budget // max(1, y.shape[0] * w))
        for s in range(0, rows.size, step):
            blk = slice(s, min(rows.size, s + step))
            part = disp_summands(y[:, uniq[rows[blk]]], mu[:, uniq[rows[blk]]], X, dense[blk])
            sel = take.copy()
            sel[take] = (gi >= blk.start) & (gi < blk.stop)
            dest = order[sel]
            for k, v in part.items():
                out[k][dest] = v[gi[sel[take]] - blk.start, slot[sel]]
    return out
