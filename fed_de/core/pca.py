"""PCA of VST values over sites without moving samples (DESeq2's ``plotPCA``).

``plotPCA`` takes the ``ntop = 500`` genes with the largest variance of the VST values over all
samples, centres each gene and runs ``prcomp``. Here:

1. (site) :func:`vst_moments`: per-gene sums of the VST values and their squares, shifted by a
   public per-gene value so that the variance has no cancellation; (aggregator)
   :func:`top_variable` picks the genes, as R's ``order(rowVars, decreasing=TRUE)``.
2. Subspace iteration on ``C = Y^T Y`` (``Y`` the pooled gene-centred matrix, samples x genes):
   (site) :func:`cov_product` returns ``Y_s^T (Y_s V)``, genes x b, for the current orthonormal
   ``V``; (aggregator) :func:`subspace_update` sums them (``C V``), takes the eigenvectors of the
   Nystrom approximation ``C V (V^T C V)^+ V^T C`` (exact once ``b >= rank(C)``, i.e. with at
   least as many columns as samples - 1) and orthonormalises ``C V`` for the next round.
3. (site) :func:`site_coordinates`: the site's own samples' coordinates ``Y_s A`` on the final
   axes ``A``; they stay at the site. :func:`level_sums` gives the per-level coordinate sums of
   groups of at least ``min_cell_size`` samples for the centroids the aggregator may see;
   (aggregator) :func:`centroids`.

Variance explained is DESeq2's ``percentVar``: eigenvalue over the total variance of the
selected genes (the trace of ``C``, known from step 1).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "vst_moments",
    "top_variable",
    "subspace_start",
    "cov_product",
    "subspace_update",
    "align_signs",
    "site_coordinates",
    "level_sums",
    "centroids",
    "pca_pooled",
]


# ----------------------------------------------------------------------------------------------
# round 1: per-gene moments and the top-n variable genes
# ----------------------------------------------------------------------------------------------
def vst_moments(x: np.ndarray, shift: np.ndarray) -> dict:
    """Site sums for the gene variances: ``n``, ``s1 = sum(x - shift)``, ``s2 = sum((x -
    shift)^2)`` per gene (``x`` samples x genes).

    ``shift`` is any public per-gene value near the mean (e.g. the VST of the gene's
    ``baseMean``): it keeps ``s2 - s1^2 / n`` free of cancellation.
    """
    d = np.asarray(x, dtype=float) - np.asarray(shift, dtype=float)[None, :]
    return {"n": float(d.shape[0]), "s1": d.sum(axis=0), "s2": (d * d).sum(axis=0)}


def top_variable(moments: dict, shift: np.ndarray, ntop: int = 500,
                 exclude: np.ndarray | None = None) -> dict:
    """Aggregator: mean and variance (denominator ``n - 1``, as ``rowVars``) of every gene from
    the summed :func:`vst_moments`, and the ``ntop`` most variable genes, largest first (ties
    by gene order, as R's stable ``order``), never one of ``exclude`` (a mask).

    Returns ``genes`` (indices), ``mean`` and ``var`` of the selected genes, ``total_var``
    (their sum: the trace of ``C / (n - 1)``) and ``n``.
    """
    n = float(moments["n"])
    s1, s2 = np.asarray(moments["s1"], float), np.asarray(moments["s2"], float)
    var = (s2 - s1 * s1 / n) / (n - 1.0)
    mean = np.asarray(shift, dtype=float) + s1 / n
    order = np.argsort(-var, kind="stable")
    if exclude is not None:
        order = order[~np.asarray(exclude, dtype=bool)[order]]
    order = order[: min(ntop, order.size)]
    return {"genes": order, "mean": mean[order], "var": var[order],
            "total_var": float(var[order].sum()), "n": n}


# ----------------------------------------------------------------------------------------------
# subspace iteration
# ----------------------------------------------------------------------------------------------
def subspace_start(n_genes: int, block: int, seed: int = 0) -> np.ndarray:
    """A public, seeded orthonormal start ``V`` (genes x block)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n_genes, block)))
    return q


def cov_product(x_sel: np.ndarray, mean: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Site: ``Y_s^T (Y_s V)`` with ``Y_s = x_sel - mean`` (the site's samples, the selected
    genes, centred by the pooled means): genes x block, whatever the number of samples."""
    Y = np.asarray(x_sel, dtype=float) - np.asarray(mean, dtype=float)[None, :]
    return Y.T @ (Y @ V)


def subspace_update(V: np.ndarray, CV: np.ndarray, k: int, rtol: float = 1e-12) -> dict:
    """Aggregator: one round of subspace iteration from ``CV = sum_s Y_s^T Y_s V``.

    Returns
    -------
    dict
        ``axes`` (genes x k) and ``values`` (k,): eigenvectors and eigenvalues of the Nystrom
        approximation of ``C`` from this round (exact when ``V`` spans ``C``'s range), largest
        first, signs by :func:`align_signs`; ``V``: the orthonormal basis of ``CV`` for the
        next round; ``residual`` (k,): ``||C a - lambda a|| / lambda_1`` of the Ritz pairs of
        ``span(V)``, a convergence measure.
    """
    V = np.asarray(V, dtype=float)
    CV = np.asarray(CV, dtype=float)
    H = V.T @ CV
    H = 0.5 * (H + H.T)
    s, U = np.linalg.eigh(H)
    keep = s > rtol * max(s.max(), 0.0)
    B = CV @ (U[:, keep] / np.sqrt(s[keep]))  # C_nys = B B^T
    P, sig, _ = np.linalg.svd(B, full_matrices=False)
    axes = align_signs(P[:, :k])
    values = sig[:k] ** 2
    # Ritz pairs of span(V) for the residual
    order = np.argsort(s)[::-1][:k]
    W, theta = V @ U[:, order], s[order]
    R = CV @ U[:, order] - W * theta
    residual = np.linalg.norm(R, axis=0) / max(theta[0], np.finfo(float).tiny)
    Q, _ = np.linalg.qr(CV)
    return {"axes": axes, "values": values, "V": Q, "residual": residual}


def align_signs(A: np.ndarray) -> np.ndarray:
    """Fix each axis' sign so that its largest-magnitude loading is positive."""
    idx = np.argmax(np.abs(A), axis=0)
    return A * np.sign(A[idx, np.arange(A.shape[1])])


# ----------------------------------------------------------------------------------------------
# coordinates and centroids
# ----------------------------------------------------------------------------------------------
def site_coordinates(x_sel: np.ndarray, mean: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Site: its samples' coordinates on the axes (samples x k); they never leave the site."""
    return (np.asarray(x_sel, dtype=float) - np.asarray(mean, dtype=float)[None, :]) @ axes


def level_sums(coords: np.ndarray, codes: np.ndarray, n_levels: int,
               min_cell_size: int) -> dict:
    """Site: per-level sums of coordinates and counts, for levels with at least
    ``min_cell_size`` of the site's samples (others send zeros: not disclosed).

    ``codes`` is each sample's level index (``-1``: none)."""
    coords = np.asarray(coords, dtype=float)
    codes = np.asarray(codes)
    n = np.array([(codes == lv).sum() for lv in range(n_levels)], dtype=float)
    sums = np.array([coords[codes == lv].sum(axis=0) for lv in range(n_levels)])
    small = n < min_cell_size
    n[small] = 0.0
    sums[small] = 0.0
    return {"n": n, "sum": sums.reshape(n_levels, coords.shape[1])}


def centroids(sums: list[dict]) -> dict:
    """Aggregator: per-level centroids pooled over sites, and per site x level.

    ``sums`` is one :func:`level_sums` output per site. Returns ``pooled`` (levels x k, NaN
    where no site disclosed the level), ``pooled_n`` and ``by_site`` (sites x levels x k)."""
    n = np.array([s["n"] for s in sums])
    tot = np.array([s["sum"] for s in sums])
    with np.errstate(invalid="ignore", divide="ignore"):
        by_site = tot / n[..., None]
        pooled = tot.sum(axis=0) / n.sum(axis=0)[:, None]
    return {"pooled": pooled, "pooled_n": n.sum(axis=0), "by_site": by_site}


def pca_pooled(x: np.ndarray, ntop: int = 500, k: int = 2) -> dict:
    """Reference: ``plotPCA``'s computation on one matrix (samples x genes) by SVD."""
    x = np.asarray(x, dtype=float)
    var = x.var(axis=0, ddof=1)
    genes = np.argsort(-var, kind="stable")[: min(ntop, var.size)]
    Y = x[:, genes] - x[:, genes].mean(axis=0)
    _, s, Vt = np.linalg.svd(Y, full_matrices=False)
    axes = align_signs(Vt[:k].T)
    values = s**2
    return {"genes": genes, "axes": axes, "values": values[:k], "coords": Y @ axes,
            "percent_var": values[:k] / values.sum()}
