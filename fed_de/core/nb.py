"""Negative-binomial GLM pieces that are sums over samples (site side) and their solvers
(aggregator side). Genes are the batch dimension; arrays are samples x genes at a site.

Conventions follow DESeq2: natural-log coefficients, fitted means floored at ``min_mu``,
dispersion ``alpha`` with variance ``mu + alpha mu^2``, a ridge ``lambda = 1e-6`` on the log2
scale (``1e-6 / ln(2)^2`` on the natural scale).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import digamma, gammaln

LN2 = float(np.log(2.0))
RIDGE_LOG2 = 1e-6
GENE_CHUNK = 2048  # genes per block: bounds the samples x genes x points temporaries
DISP_BLOCK = 16384  # samples x pairs per dispersion block: its temporaries stay in cache
CR_CHUNK = 8192  # matrices per block of the Cox-Reid term (bounds its p x p temporaries)
DISTINCT_MAX = 0.85  # tabulate special functions when distinct counts are below this share


def ridge(p: int) -> np.ndarray:
    """DESeq2's ridge on the natural-log scale (``lambda / ln(2)^2``)."""
    return np.full(p, RIDGE_LOG2 / LN2**2)


def trigamma(x: np.ndarray) -> np.ndarray:
    """psi'(x) for x > 0: recurrence up to x >= 8, then the asymptotic series (~1e-12).

    scipy's ``polygamma(1, x)`` goes through the Hurwitz zeta function and is several times
    slower; this is the hot spot of the dispersion summands. Compiled, one element at a time
    (:func:`fed_de.core.kernels.trigamma_values`: arithmetic only, so the numbers of the
    array form it replaced).
    """
    from fed_de.core.kernels import trigamma_values  # numba: loaded when used

    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.size)
    trigamma_values(np.ascontiguousarray(x).reshape(-1), out)
    return out.reshape(x.shape)


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


def nb_lgamma_ratio(y: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Per-gene sum of ``lgamma(y + 1/alpha) - lgamma(1/alpha)`` (the mean-free part)."""
    r = 1.0 / alpha
    return gammaln(y + r).sum(axis=0) - y.shape[0] * gammaln(r)


class IrlsWork:
    """The samples x genes temporaries of :func:`irls_summands` on one block of counts, lent
    to every call on that block (each candidate, each round of a replay).

    ``y`` is the block in C order: the compiled passes read it row by row, and a site's
    columns taken by index come F-ordered (strided reads cost more than the arithmetic).
    The per-gene sums over samples that read the caller's ``y`` keep its layout, and so
    their order of addition.
    """

    def __init__(self, y: np.ndarray):
        self.y = np.ascontiguousarray(y, dtype=np.float64)
        self.buffers = tuple(np.empty(y.shape) for _ in range(8))


def irls_summands(y, X, sf, beta, alpha, min_mu: float = 0.5, lgamma_y1=None,
                  lgamma_ratio=None, work: IrlsWork | None = None) -> dict:
    """One IRLS iteration's sums at ``beta``: packed ``X^T W X``, ``X^T W z``, deviance, and
    ``X^T diag(v) X`` with ``v`` the derivative of the IRLS pseudo-score.

    ``z = log(mu / sf) + (y - mu) / mu`` and ``w = mu / (1 + alpha mu)`` with ``mu`` floored,
    exactly as DESeq2's ``fitBeta``. The pseudo-score ``X^T W (z - X beta)`` vanishes at
    DESeq2's fixed point; its Jacobian is ``-X^T diag(v) X`` with ``v = mu (1 + alpha y) /
    (1 + alpha mu)^2`` (the observed information) where the mean is not floored and ``v = w``
    where it is (there ``w`` and ``z`` do not move with ``beta``): a Newton step towards the
    same fixed point.

    The deviance is ``-2 * sum_i log NB(y_i; mu_i, alpha)`` per gene (DESeq2's
    ``dnbinom_mu``). Its mean-free parts, ``lgamma_y1`` (per-gene sum of ``lgamma(y + 1)``)
    and ``lgamma_ratio`` (:func:`nb_lgamma_ratio`), may be passed to skip recomputing them.
    ``work`` (:class:`IrlsWork` of ``y``'s block) lends the temporaries and a C-ordered copy
    of ``y`` to calls on the same block: the same numbers, without allocating them anew.
    """
    # the same floating-point operations as the formulas above, each element's in two
    # compiled passes (fed_de.core.kernels.irls_weights, irls_response) around numpy's exp
    # and logarithms; the sums over samples are the matrix products' and, for the deviance,
    # in sample order
    from fed_de.core.kernels import irls_response, irls_weights  # numba: loaded when used

    if work is None:
        work = IrlsWork(y)
    ex, mu, w, v, a_z, a_r, a_q, log_mu = work.buffers
    np.matmul(X, beta.T, out=ex)
    g = ex.shape[1]
    alpha = np.array(np.broadcast_to(np.asarray(alpha, dtype=np.float64), (g,)))
    sf = np.array(sf, dtype=np.float64)  # a writeable copy: one compiled signature
    r = 1.0 / alpha
    with np.errstate(over="ignore"):
        np.exp(ex, out=ex)
    irls_weights(ex, work.y, sf, alpha, r, float(min_mu), mu, w, v, a_z, a_r, a_q)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.log(mu, out=log_mu)
        np.log(a_z, out=a_z)
        np.log(a_r, out=a_r)
        np.log1p(a_q, out=a_q)
    logp = np.empty(g)
    irls_response(work.y, mu, w, r, a_z, log_mu, a_r, a_q, ex, logp)  # z into ex
    if lgamma_ratio is None:
        lgamma_ratio = nb_lgamma_ratio(y, alpha)
    if lgamma_y1 is None:
        lgamma_y1 = gammaln(y + 1.0).sum(axis=0)
    return {"xtwx": gram(X, w), "xtwz": ex.T @ X,
            "deviance": -2.0 * (logp + lgamma_ratio - lgamma_y1), "xtwx_obs": gram(X, v)}


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
                        lgamma_y1: np.ndarray | None = None,
                        lgamma_ratio: np.ndarray | None = None) -> dict:
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
    lgamma_ratio : np.ndarray, optional
        :func:`nb_lgamma_ratio` of ``genes`` at ``alpha``, computed on these columns.

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
    # a candidate equal to an earlier one for every gene (a first round's third candidate is
    # its first) is not evaluated again
    first = [next(j for j in range(k + 1)
                  if np.array_equal(candidates[:, k], candidates[:, j], equal_nan=True))
             for k in range(K)]
    for sl in gene_blocks(g):
        y = counts[:, genes[sl]]
        # mean-free part: once for every candidate
        lgr = nb_lgamma_ratio(y, alpha[sl]) if lgamma_ratio is None else lgamma_ratio[sl]
        lgy1 = None if lgamma_y1 is None else lgamma_y1[sl]
        work = IrlsWork(y)
        for k in range(K):
            if first[k] < k:
                for key in out:
                    out[key][sl, k] = out[key][sl, first[k]]
                continue
            summands = irls_summands(y, X, sf, candidates[sl, k], alpha[sl], min_mu, lgy1, lgr,
                                     work)
            for key, value in summands.items():
                out[key][sl, k] = value
        work = None  # freed before the next block's is made
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
    genes = np.repeat(np.arange(G), K)
    out = disp_summands_at(y, mu, X, genes, np.ascontiguousarray(log_alpha).ravel())
    return {k: v.reshape((G, K) + v.shape[1:]) for k, v in out.items()}


def disp_summands_at(y: np.ndarray, mu: np.ndarray, X: np.ndarray, genes: np.ndarray,
                     points: np.ndarray, block: int = DISP_BLOCK) -> dict:
    """:func:`disp_summands` at scattered ``(gene, log alpha)`` pairs: one value per pair.

    Each pair is one column of samples x pairs blocks of about ``block`` elements: small
    enough that the temporaries stay in cache and are reused (no page faults), with no
    padding between genes that have different numbers of points.
    """
    P, T = genes.size, n_packed(X.shape[1])
    out = {k: np.empty(P) for k in ("ll", "d1", "d2")}
    out.update({k: np.empty((P, T)) for k in ("A", "A1", "A2")})
    iu = np.triu_indices(X.shape[1])
    XX = X[:, iu[0]] * X[:, iu[1]]  # n x T
    if P == 0:
        return out
    if P == 1:  # two columns, so that the sum over samples runs in sample order (below)
        return {k: v[:1] for k, v in disp_summands_at(y, mu, X, np.repeat(genes, 2),
                                                       np.repeat(points, 2), block).items()}
    step = max(2, block // max(1, y.shape[0]))
    used, col = np.unique(genes, return_inverse=True)
    dist = _DistinctWindow(y, used, ordered=bool(np.all(col[1:] >= col[:-1])))
    alpha = np.exp(points)
    r = 1.0 / alpha
    # the terms in r alone, once per pair: (alpha, r, lgamma(r), digamma(r), trigamma(r))
    per_pair = (alpha, r, gammaln(r), digamma(r), trigamma(r))
    for sl in gene_blocks(P, step):  # no one-column block
        s, e = sl.start, sl.stop
        g = genes[s:e]
        # np.take gives C-ordered samples x pairs blocks: numpy then sums over samples in
        # sample order, column by column (a one-column or F-ordered block is summed pairwise)
        _disp_block(np.take(y, g, axis=1), np.take(mu, g, axis=1), XX,
                    [v[s:e] for v in per_pair], {k: v[s:e] for k, v in out.items()},
                    dist.lookup(col[s:e]))
    return out


class _DistinctWindow:
    """:func:`_distinct` of the genes ``used`` (columns of ``y``), computed for a window of
    :data:`GENE_CHUNK` of them at a time: pairs come gene after gene, so the samples x genes
    tables (ranks, sorted counts) are never built for all genes at once. Each gene's table
    depends on its own counts only: the numbers are those of one call on all genes."""

    def __init__(self, y: np.ndarray, used: np.ndarray, ordered: bool) -> None:
        self.y, self.used, self.ordered = y, used, ordered
        self.lo, self.hi, self.dist = 0, 0, None

    def lookup(self, cols: np.ndarray) -> tuple | None:
        """:func:`_lookup` for a block of pairs whose genes are ``cols`` (indices in
        ``used``)."""
        lo, hi = int(cols.min()), int(cols.max()) + 1
        if self.dist is None or lo < self.lo or hi > self.hi:
            if self.ordered:  # later blocks read the genes after these
                self.lo, self.hi = lo, max(hi, min(lo + GENE_CHUNK, self.used.size))
            else:  # scattered pairs: every gene at once
                self.lo, self.hi = 0, self.used.size
            self.dist = None  # free the previous window first
            self.dist = _distinct(np.take(self.y, self.used[self.lo:self.hi], axis=1))
        return _lookup(self.dist, cols - self.lo)


def _distinct(y: np.ndarray) -> tuple:
    """Each gene's distinct counts: ``(values, start, size, rank)`` with ``values`` the
    genes' ascending distinct values one gene after the other, ``start`` / ``size`` each
    gene's slice of them, ``rank`` (samples x genes) each sample's index in its gene's."""
    yt = np.ascontiguousarray(y.T)
    order = np.argsort(yt, axis=1, kind="stable")
    ys = np.take_along_axis(yt, order, axis=1)
    new = np.ones(ys.shape, dtype=bool)
    new[:, 1:] = ys[:, 1:] != ys[:, :-1]
    rank_sorted = np.cumsum(new, axis=1) - 1
    rank = np.empty_like(rank_sorted)
    np.put_along_axis(rank, order, rank_sorted, axis=1)
    size = rank_sorted[:, -1] + 1 if yt.shape[1] else np.zeros(yt.shape[0], dtype=int)
    return ys[new], np.cumsum(size) - size, size, np.ascontiguousarray(rank.T)


def _lookup(dist: tuple, cols: np.ndarray) -> tuple | None:
    """For a block of pairs (``cols``: their genes' columns in ``dist``): the distinct
    counts of each pair, one pair after the other, ``(values, per_pair, index)`` with
    ``index`` (samples x pairs) each sample's place in ``values``; None when the counts of
    the block are mostly distinct (a table would not save work)."""
    values, start, size, rank = dist
    sz = size[cols]
    total = int(sz.sum())
    if total > DISTINCT_MAX * rank.shape[0] * cols.size:
        return None
    off = np.cumsum(sz) - sz
    idx = np.repeat(start[cols] - off, sz)
    idx += np.arange(total)
    index = np.take(rank, cols, axis=1)
    index += off
    return values[idx], sz, index


def _disp_block(y, mu, XX, per_pair, out, lookup=None) -> None:
    """The sums of :func:`disp_summands_at` for one block of pairs (samples x pairs), written
    into ``out``; ``per_pair`` holds the block's ``alpha, r, lgamma(r), digamma(r),
    trigamma(r)``. With a ``lookup`` (:func:`_lookup`), lgamma, digamma and trigamma of
    ``y + r`` are evaluated once per distinct count of a pair and read back per sample (the
    same numbers).

    The likelihood terms are summed by the compiled
    :func:`fed_de.core.kernels.disp_likelihood_sums` in one pass, in DESeq2's order of
    operations; differences such as digamma(y+r) - digamma(r) are taken per element, before
    summing over samples: summing first would cancel large terms and make sums from
    different sites disagree in the last digits more than the per-element form does. The
    kernel also writes the weights and their first derivative; the weights' sums stay
    matrix products.
    """
    from fed_de.core.kernels import disp_likelihood_sums  # numba: loaded when used

    alpha, r, lgamma_r, digamma_r, trigamma_r = per_pair
    if lookup is None:
        t = (y + r).ravel()
        index = np.arange(t.size).reshape(y.shape)
    else:
        t = lookup[0] + np.repeat(r, lookup[1])  # each distinct y + r
        index = lookup[2]
    l1 = np.divide(mu, r)
    np.log1p(l1, out=l1)  # log(1 + mu/r); log(mu + r) = log(r) + l1
    ll_sum, dl_sum, d2l_sum = np.empty(r.size), np.empty(r.size), np.empty(r.size)
    w, dw = np.empty_like(l1), np.empty_like(l1)  # w = mu / (1 + alpha mu), dw = -alpha w^2
    disp_likelihood_sums(y, mu, l1, r, np.log(r), lgamma_r, digamma_r, trigamma_r,
                         gammaln(t), digamma(t), trigamma(t), index, ll_sum, dl_sum, d2l_sum,
                         alpha, w, dw)
    # theta = log(alpha), r = exp(-theta): dl/dtheta = -r l_r; d2l/dtheta2 = r l_r + r^2 l_rr
    out["ll"][:] = ll_sum
    np.multiply(-r, dl_sum, out=out["d1"])
    np.add(r * dl_sum, r * r * d2l_sum, out=out["d2"])
    d2w = np.power(w, 3, out=l1)  # d2w = dw + 2 alpha^2 w^3
    d2w *= 2.0 * alpha * alpha
    d2w += dw
    for key, v in (("A", w), ("A1", dw), ("A2", d2w)):
        out[key][:] = v.T @ XX


def cox_reid(A: np.ndarray, A1: np.ndarray, A2: np.ndarray, p: int):
    """Cox-Reid term ``-1/2 log det A`` and its first two derivatives in ``log(alpha)``.

    Inputs are packed and summed over sites: ``(..., T)``. Taken :data:`CR_CHUNK` matrices
    at a time: each matrix's numbers are its own, and the ``p x p`` temporaries of a
    search's every point (~1 KB each) are never all held at once.
    """
    lead = A.shape[:-1]
    n = math.prod(lead)
    if n <= CR_CHUNK:
        return _cox_reid(A, A1, A2, p)
    flat = [np.reshape(a, (n, a.shape[-1])) for a in (A, A1, A2)]
    out = [np.empty(n) for _ in range(3)]
    for start in range(0, n, CR_CHUNK):
        part = _cox_reid(*(f[start:start + CR_CHUNK] for f in flat), p)
        for o, v in zip(out, part, strict=True):
            o[start:start + CR_CHUNK] = v
    return tuple(o.reshape(lead) for o in out)


def _cox_reid(A: np.ndarray, A1: np.ndarray, A2: np.ndarray, p: int):
    M, M1, M2 = unpack(A, p), unpack(A1, p), unpack(A2, p)
    sign, logdet = np.linalg.slogdet(M)
    with np.errstate(invalid="ignore"):
        inv = np.linalg.inv(np.where((sign > 0)[..., None, None], M, np.eye(p)))
    B = inv @ M1
    cr = np.where(sign > 0, -0.5 * logdet, np.nan)
    d1 = -0.5 * np.trace(B, axis1=-2, axis2=-1)
    d2 = -0.5 * (np.trace(inv @ M2, axis1=-2, axis2=-1) - np.einsum("...ij,...ji->...", B, B))
    return cr, d1, d2
