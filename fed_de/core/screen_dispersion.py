"""The screen's dispersions from per-cell sums: moments, Cox-Reid summands and objective.

One dispersion per gene, from the control cells of every design cell (optionally from every
group of cells). The fitted means of the dispersion fit are the Poisson means of the groups
(``mu_i = s_i * sum(y) / sum(s)`` over cell ``i``'s group): a saturated fit known from the
group sums, so the Cox-Reid matrix ``X'WX`` is diagonal over groups and no IRLS is needed.

Site side: :func:`disp_summands` (cell by cell over a chunk) and
:func:`disp_series_summands` (the no-count part of most genes from power sums of size
factors, :mod:`fed_de.core.screen_sums`). Aggregator side: the moments estimate
(:func:`moments_dispersion`), the Cox-Reid adjusted objective (:func:`disp_objective`,
maximised by the bracketed search of :mod:`fed_de.core.optim1d`), and the closed-form
log-normal shrinkage used with moments estimates (:func:`shrink_log_dispersion`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from scipy.special import digamma, gammaln

from fed_de.core import nb
from fed_de.core.optim1d import add_log_normal_prior
from fed_de.core.screen_sums import MIN_MU, chunk_entries, row_blocks, series_sums

if TYPE_CHECKING:
    from fed_de.core.dispersion import Prior

#: Counts up to this use the exact finite sums for the dispersion derivatives (no lgamma
#: cancellation at small dispersions); larger counts use lgamma/digamma/trigamma.
Y_EXACT = 24


def moments_dispersion(norm: np.ndarray, norm2: np.ndarray, n: np.ndarray,
                       inv_sf: np.ndarray) -> np.ndarray:
    """Method-of-moments dispersion within groups of cells (DESeq2's ``momentsDispEstimate``
    with group means): ``(v - sum_c m_c sum_{i in c} 1/s_i / n) / (sum_c n_c m_c^2 / n)``.

    ``norm``, ``norm2``: ``(D, G)`` sums of normalised counts and their squares; ``n``,
    ``inv_sf``: ``(D,)`` cells and sums of ``1/s``. NaN for genes with no count.
    """
    full = n > 0
    n_tot = n[full].sum()
    m = np.where(full[:, None], norm / np.where(full, n, 1.0)[:, None], 0.0)
    ss = (norm2 - m * norm).sum(axis=0)
    dof = max(n_tot - full.sum(), 1.0)
    pois = (m * inv_sf[:, None]).sum(axis=0) / n_tot
    m2 = (n[:, None] * m * m).sum(axis=0) / n_tot
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ss / dof - pois) / m2


def disp_summands(X: sp.csr_matrix, sf: np.ndarray, groups: np.ndarray, means: np.ndarray,
                  log_alpha: np.ndarray, min_mu: float = MIN_MU,
                  dense: np.ndarray | None = None) -> dict:
    """Sums for the Cox-Reid adjusted NB likelihood of the dispersion at ``K`` points per gene.

    The fitted mean of cell ``i`` is ``s_i * means[groups[i], g]`` (the group means: a
    saturated fit), so the Cox-Reid matrix is diagonal over groups.

    Parameters
    ----------
    X
        Counts of a chunk of cells, CSR ``(rows, G)``.
    sf, groups
        Size factors and group (``< 0``: left out) of the chunk's cells.
    means
        ``(D, G)`` group means (mean counts per unit size factor).
    log_alpha
        ``(G, K)`` evaluation points.
    min_mu
        Floor of fitted means.
    dense
        ``(G,)`` genes whose no-count part (every cell, as if ``y = 0``) is summed cell by
        cell here; the caller adds the others' from power sums
        (:func:`disp_series_summands`). Default: every gene.

    Returns
    -------
    dict
        ``ll, d1, d2`` ``(G, K)``: log likelihood (terms constant in alpha dropped) and its
        derivatives in ``log alpha``; ``A, A1, A2`` ``(G, K, D)``: per-group sums of
        ``w = mu / (1 + alpha mu)`` and of its first two derivatives in ``log alpha``.
    """
    G, K = log_alpha.shape
    D = means.shape[0]
    alpha = np.exp(log_alpha)
    cols_d = np.arange(G) if dense is None else np.flatnonzero(dense)
    Gd = cols_d.size
    sums = np.zeros((4, D, G, K))  # per group: log1p(t), ti, ti^2, ti^3 with ti = t/(1+t)
    rows_used = np.flatnonzero(groups >= 0)
    if Gd:
        rows_used = rows_used[np.argsort(groups[rows_used], kind="stable")]
        g_sorted = groups[rows_used]
        means_d = means[:, cols_d]
        flat_alpha = alpha[cols_d].reshape(1, Gd * K)
        part = np.zeros((4, D, Gd * K))
        floor = rows_used.size > 0 and float(means_d.min()) * float(sf[rows_used].min()) < min_mu
        for blk in row_blocks(rows_used.size, Gd * K):
            r, gr = rows_used[blk], g_sorted[blk]
            mu = means_d[gr]
            mu *= sf[r, None]
            if floor:
                np.maximum(mu, min_mu, out=mu)
            t = np.repeat(mu, K, axis=1)
            t *= flat_alpha  # t = alpha mu, (rows, Gd * K)
            starts = np.concatenate([[0], np.flatnonzero(np.diff(gr)) + 1])
            seg = gr[starts]
            part[0, seg] += np.add.reduceat(np.log1p(t), starts, axis=0)
            inv = t + 1.0
            np.reciprocal(inv, out=inv)
            t *= inv
            part[1, seg] += np.add.reduceat(t, starts, axis=0)
            np.multiply(t, t, out=inv)
            part[2, seg] += np.add.reduceat(inv, starts, axis=0)
            inv *= t
            part[3, seg] += np.add.reduceat(inv, starts, axis=0)
        sums[:, :, cols_d] = part.reshape(4, D, Gd, K)
    out = _disp_from_sums(sums, alpha)
    # count part over stored entries: l_y = lgamma(y + r) - lgamma(r) - y log(mu + r)
    rows, cols, y = chunk_entries(X)
    sel = groups[rows] >= 0
    rows, cols, y = rows[sel], cols[sel], y[sel]
    mu_e = np.maximum(sf[rows] * means[groups[rows], cols], min_mu)
    ly, d1y, d2y = _count_part(y, mu_e, alpha[cols], cols, G)
    out["ll"] += ly
    out["d1"] += d1y
    out["d2"] += d2y
    return out


def _disp_from_sums(sums: np.ndarray, alpha: np.ndarray) -> dict:
    """Dispersion summands of the no-count part from per-group sums of ``log1p(t)``,
    ``ti``, ``ti^2``, ``ti^3`` (``(4, D, G, K)``; ``t = alpha mu``, ``ti = t / (1 + t)``)."""
    sl, st, st2 = (sums[k].sum(axis=0) for k in range(3))
    # l0 = -log1p(t)/alpha and its derivatives in log alpha
    ll = -sl / alpha
    d1 = (sl - st) / alpha
    d2 = (-sl + st + st2) / alpha
    s1, s2, s3 = (sums[k].transpose(1, 2, 0) for k in (1, 2, 3))
    a = alpha[:, :, None]
    A1 = -s2 / a
    return {"ll": ll, "d1": d1, "d2": d2, "A": s1 / a, "A1": A1, "A2": A1 + 2.0 * s3 / a}


def disp_series_summands(moments: dict, means: np.ndarray, log_alpha: np.ndarray,
                         genes: np.ndarray) -> dict:
    """The no-count part of :func:`disp_summands` for ``genes`` (``(G,)`` bool), from the
    groups' power sums of size factors (:func:`sf_moments`); zeros for the other genes."""
    G, K = log_alpha.shape
    D = means.shape[0]
    alpha = np.exp(log_alpha)
    idx = np.flatnonzero(genes)
    sums = np.zeros((4, D, G, K))
    if idx.size:
        z = means[:, idx, None] * alpha[None, idx, :]  # (D, g, K)
        ser = series_sums(moments, z, ("L", "T1", "T2", "T3"))
        for k, kind in enumerate(("L", "T1", "T2", "T3")):
            sums[k][:, idx] = ser[kind]
    return _disp_from_sums(sums, alpha)


def _count_part(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray, cols: np.ndarray,
                n_genes: int):
    """Per-gene sums of the ``y``-dependent part of the NB log likelihood and of its two
    derivatives in ``log alpha`` over stored entries (``y``, ``mu``, ``cols``: ``(n,)``;
    ``alpha``: ``(n, K)``). Returns three ``(G, K)`` arrays.

    Counts up to :data:`Y_EXACT` use the finite sums ``sum_{j<y} log((r + j) / (r + mu))``
    (exact, no cancellation as alpha -> 0), entries sorted by count so that every pass over
    ``j`` is a slice; larger counts use lgamma / digamma / trigamma.
    """
    n, K = alpha.shape
    order = np.argsort(-y, kind="stable")
    y, mu, alpha, cols = y[order], mu[order], alpha[order], cols[order]
    ly = np.zeros((n, K))
    d1 = np.zeros((n, K))
    d2 = np.zeros((n, K))
    n_big = int(np.searchsorted(-y, -Y_EXACT, side="left"))  # entries with y > Y_EXACT
    if n_big < n:
        sl = slice(n_big, n)
        ys, a, mus = y[sl], alpha[sl], mu[sl, None]
        tms = 1.0 + a * mus
        inv_tm = 1.0 / tms
        acc_l, acc_1, acc_2 = ly[sl], d1[sl], d2[sl]  # views
        # entries with y > j are the first m_j of the slice (counts sorted descending)
        m = np.searchsorted(-ys, -np.arange(int(ys[0])), side="left")
        for j, mj in enumerate(m):
            aj = a[:mj]
            inv_aj = 1.0 / (1.0 + aj * j)
            acc_l[:mj] += np.log1p(aj * (j - mus[:mj]) * inv_tm[:mj])
            acc_1[:mj] += aj * (mus[:mj] - j) * inv_aj * inv_tm[:mj]
            acc_2[:mj] += inv_tm[:mj] ** 2 - inv_aj * inv_aj
        d2[sl] += acc_1  # d2 = -d1 + sum(...), with d1 = -acc_1 below
        d1[sl] *= -1.0
    if n_big:
        sl = slice(0, n_big)
        yb = y[sl, None]
        r = 1.0 / alpha[sl]
        mr = mu[sl, None] + r
        ly[sl] = gammaln(yb + r) - gammaln(r) - yb * np.log(mr)
        l_r = digamma(yb + r) - digamma(r) - yb / mr
        l_rr = nb.trigamma(yb + r) - nb.trigamma(r) + yb / (mr * mr)
        d1[sl] = -r * l_r
        d2[sl] = r * l_r + r * r * l_rr
    out = []
    for arr in (ly, d1, d2):
        out.append(np.stack([np.bincount(cols, weights=arr[:, k], minlength=n_genes)
                             for k in range(K)], axis=1))
    return out


def cox_reid_diag(A: np.ndarray, A1: np.ndarray, A2: np.ndarray):
    """Cox-Reid term ``-1/2 log det`` of a diagonal ``X'WX`` (groups with ``A = 0`` left out)
    and its two derivatives in ``log alpha``; inputs ``(..., D)``, outputs ``(...)``."""
    pos = A > 0
    safe = np.where(pos, A, 1.0)
    r1 = np.where(pos, A1 / safe, 0.0)
    cr = -0.5 * np.where(pos, np.log(safe), 0.0).sum(axis=-1)
    cr1 = -0.5 * r1.sum(axis=-1)
    cr2 = -0.5 * (np.where(pos, A2 / safe, 0.0) - r1 * r1).sum(axis=-1)
    return cr, cr1, cr2


def disp_objective(ll, d1, d2, A, A1, A2, points: np.ndarray, prior: Prior | None = None):
    """Cox-Reid adjusted (and optionally prior-penalised) objective, gradient and curvature
    at ``points`` from the summed sums of :func:`disp_summands`."""
    cr, cr1, cr2 = cox_reid_diag(A, A1, A2)
    f, g, h = ll + cr, d1 + cr1, d2 + cr2
    if prior is None:
        return f, g, h
    return add_log_normal_prior(f, g, h, points, prior.mean, prior.var)


def shrink_log_dispersion(disp_gene: np.ndarray, disp_fit: np.ndarray, prior_var: float,
                          sampling_var: float) -> np.ndarray:
    """Normal-normal shrinkage of log gene-wise dispersions towards the trend (zero rounds):
    the precision-weighted mean of ``log disp_gene`` (variance ``sampling_var``) and
    ``log disp_fit`` (variance ``prior_var``)."""
    w = (1.0 / sampling_var) / (1.0 / sampling_var + 1.0 / prior_var)
    return np.exp(w * np.log(disp_gene) + (1.0 - w) * np.log(disp_fit))
