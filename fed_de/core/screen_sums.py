"""A screen site's cells as sums: design cells, count checks, size factors, group sums.

Pure numpy/scipy, site side: sparse CSR chunks of cells and per-cell vectors in, per-group
sums out. Cells are grouped as ``(q, c)``: ``q = 0`` for control cells, ``q = p + 1`` for
perturbation ``p`` (``q < 0``: a cell not used), ``c`` the design cell (its combination of
factor levels: the site when sites have their own effect, crossed with declared categorical
covariates; see :mod:`fed_de.core.screen_fit` for the model).

The power-series sums (:func:`sf_moments`, :func:`series_sums`) give a group's no-count sums
``sum_i f(s_i z)`` for every gene from a few power sums of its size factors, in ``O(terms)``
instead of ``O(cells)``: the dispersion and fit summands use them for most genes.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

#: Floor of fitted means. A numerical guard only: UMI genes worth testing have means of
#: 1e-3 .. 1e2 per cell, far above it, so it never shifts an estimate. DESeq2's 0.5 is a
#: bulk RNA-seq choice that drags the fitted means of genes below ~0.5 UMI/cell up and shrinks
#: their fold changes towards 0.
MIN_MU = 1e-8
#: Elements per dense temporary: 4 MB blocks stay in cache across the passes over them (and
#: bound a site's working memory, with the chunk size).
BLOCK_ELEMENTS = 1 << 19


# -- design cells ------------------------------------------------------------------------------
def cell_table(n_levels: list[int]) -> np.ndarray:
    """Every combination of factor levels (design cells), row-major: ``(C, F)`` level indices."""
    if not n_levels:
        return np.zeros((1, 0), dtype=np.int64)
    grids = np.meshgrid(*[np.arange(n) for n in n_levels], indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1)


def cell_design(n_levels: list[int]) -> np.ndarray:
    """Additive treatment-coded design of the cells: intercept, then one column per non-
    reference level of each factor. ``(C, p)``, ``p = 1 + sum(n_levels - 1)``."""
    table = cell_table(n_levels)
    cols = [np.ones(table.shape[0])]
    for f, n in enumerate(n_levels):
        for level in range(1, n):
            cols.append((table[:, f] == level).astype(np.float64))
    return np.column_stack(cols)


def cell_codes(levels: np.ndarray, n_levels: list[int]) -> np.ndarray:
    """Design-cell index of every cell from its ``(n, F)`` level indices (row-major)."""
    code = np.zeros(levels.shape[0], dtype=np.int64)
    for f, n in enumerate(n_levels):
        code = code * n + levels[:, f]
    return code


def packed_outer(X: np.ndarray) -> np.ndarray:
    """Packed ``x x'`` of every row: ``(C, T)``."""
    iu = np.triu_indices(X.shape[1])
    return X[:, iu[0]] * X[:, iu[1]]


# -- per-chunk helpers ---------------------------------------------------------------------------
def chunk_entries(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and value of every stored entry of a CSR chunk."""
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    return rows, X.indices.astype(np.int64), X.data


def group_indicator(codes: np.ndarray, n_codes: int) -> sp.csr_matrix:
    """Sparse ``(n_codes, rows)`` matrix summing rows by code (code < 0: left out)."""
    keep = np.flatnonzero(codes >= 0)
    return sp.csr_matrix((np.ones(keep.size), (codes[keep], keep)),
                         shape=(n_codes, codes.size))


def row_blocks(n_rows: int, width: int) -> list[slice]:
    """Slices of rows whose dense ``(rows, width)`` temporaries hold BLOCK_ELEMENTS each."""
    step = max(1, BLOCK_ELEMENTS // max(1, width))
    return [slice(s, min(n_rows, s + step)) for s in range(0, n_rows, step)]


def check_counts(X: sp.csr_matrix) -> str | None:
    """A reason the chunk's counts are unusable (non-finite, negative, non-integer), or None."""
    d = X.data
    if not np.isfinite(d).all():
        return "NaN or infinite counts"
    if (d < 0).any():
        return "negative counts"
    if (d != np.round(d)).any():
        return "non-integer counts (the model needs raw UMI counts)"
    return None


def library_sizes(X: sp.csr_matrix) -> np.ndarray:
    """Total counts of every cell of the chunk."""
    return np.asarray(X.sum(axis=1)).ravel()


def log_positive_sums(X: sp.csr_matrix) -> np.ndarray:
    """Per-gene sum of log counts over positive counts (poscounts geometric means)."""
    return np.bincount(X.indices, weights=np.log(X.data), minlength=X.shape[1])


def poscounts_factors(X: sp.csr_matrix, log_geo_means: np.ndarray) -> np.ndarray:
    """Unscaled ``poscounts`` median-of-ratios factors of the chunk's cells (NaN: no gene)."""
    out = np.full(X.shape[0], np.nan)
    usable = np.isfinite(log_geo_means)
    for i in range(X.shape[0]):  # one median per cell over its (few) expressed genes
        cols = X.indices[X.indptr[i]:X.indptr[i + 1]]
        vals = X.data[X.indptr[i]:X.indptr[i + 1]]
        ok = usable[cols]
        if ok.any():
            out[i] = np.exp(np.median(np.log(vals[ok]) - log_geo_means[cols[ok]]))
    return out


def group_sums(X: sp.csr_matrix, sf: np.ndarray, groups: np.ndarray, n_groups: int,
               log_values: bool = False) -> dict:
    """Sums per group of cells (``groups`` < 0: left out) of the chunk.

    Returns ``n, sf, inv_sf`` ``(n_groups,)`` and ``y`` (counts), ``norm`` (``y / s``),
    ``norm2`` (``(y / s)^2``), ``expr`` (expressing cells) ``(n_groups, G)``; with
    ``log_values`` also ``x`` and ``x2`` for ``x = log1p(y / s)``.
    """
    G = X.shape[1]
    keep = groups >= 0
    out = {
        "n": np.bincount(groups[keep], minlength=n_groups).astype(np.float64),
        "sf": np.bincount(groups[keep], weights=sf[keep], minlength=n_groups),
        "inv_sf": np.bincount(groups[keep], weights=1.0 / sf[keep], minlength=n_groups),
    }
    rows, cols, y = chunk_entries(X)
    g = groups[rows]
    sel = g >= 0
    key = g[sel] * G + cols[sel]
    y = y[sel]
    norm = y / sf[rows[sel]]
    size = n_groups * G

    def acc(w):
        return np.bincount(key, weights=w, minlength=size).reshape(n_groups, G)

    out.update(y=acc(y), norm=acc(norm), norm2=acc(norm * norm), expr=acc(np.ones_like(y)))
    if log_values:
        x = np.log1p(norm)
        out.update(x=acc(x), x2=acc(x * x))
    return out


# -- sums over a group's cells of functions of s_i z, from power sums of size factors ------
#: Largest ``z * max(s)`` summed by series (else cell by cell); the series then converge
#: geometrically and SERIES_TERMS terms leave a relative error below 1e-17.
SERIES_RHO = 0.35
SERIES_TERMS = 48
_K = np.arange(SERIES_TERMS + 1, dtype=np.float64)
_SIGN = np.where(_K % 2 == 1, 1.0, -1.0)  # (-1)^(k+1)
with np.errstate(divide="ignore"):
    #: Taylor coefficients in t of log1p(t), t/(1+t), (t/(1+t))^2, (t/(1+t))^3.
    SERIES_COEF = {
        "L": np.where(_K >= 1, _SIGN / np.maximum(_K, 1.0), 0.0),
        "T1": np.where(_K >= 1, _SIGN, 0.0),
        "T2": np.where(_K >= 2, -_SIGN * (_K - 1.0), 0.0),
        "T3": np.where(_K >= 3, _SIGN * (_K - 1.0) * (_K - 2.0) / 2.0, 0.0),
    }


def sf_moments(sf: np.ndarray, groups: np.ndarray, n_groups: int,
               terms: int = SERIES_TERMS) -> dict:
    """Per group of cells: largest and smallest size factor and the power sums
    ``sum_i (s_i / s_max)^k``, ``k = 0 .. terms`` (``(n_groups, terms + 1)``).

    With them, ``sum_i f(s_i z)`` for ``f`` analytic at 0 is a power series in
    ``u = z s_max`` (:func:`series_sums`): a group's no-count sums for every gene cost
    ``O(terms)`` instead of ``O(cells)``.
    """
    keep = groups >= 0
    g, s = groups[keep], sf[keep]
    smax = np.zeros(n_groups)
    np.maximum.at(smax, g, s)
    smin = np.full(n_groups, np.inf)
    np.minimum.at(smin, g, s)
    r = s / np.where(smax > 0, smax, 1.0)[g]
    S = np.zeros((n_groups, terms + 1))
    p = np.ones_like(r)
    for k in range(terms + 1):
        S[:, k] = np.bincount(g, weights=p, minlength=n_groups)
        p = p * r
    return {"smax": smax, "smin": smin, "S": S}


def series_sums(moments: dict, z: np.ndarray, kinds: tuple[str, ...]) -> dict:
    """``sum_i f(s_i z)`` over every group's cells for ``f`` in ``kinds`` (``"L"``:
    ``log1p(t)``, ``"T1"``: ``t/(1+t)``, ``"T2"``: its square, ``"T3"``: its cube).

    ``z``: ``(D, ...)``, every element with ``z * s_max < SERIES_RHO``. Horner's rule in
    ``u = z s_max`` with the group's power sums; elements are bucketed by how many terms
    they need for a relative error below 1e-17.
    """
    D = z.shape[0]
    u = (z * moments["smax"].reshape((D,) + (1,) * (z.ndim - 1))).reshape(D, -1)
    out = {k: np.zeros(u.shape) for k in kinds}
    with np.errstate(divide="ignore"):
        # u^n < 1e-21: a relative error below 1e-17 even for T3, whose coefficients grow
        # like n^2 / 2
        need = np.ceil(np.log(1e-21) / np.log(np.maximum(u, 1e-300)))
    bounds = (6, 12, 24, SERIES_TERMS)
    lo = -1.0
    for hi in bounds:
        d, e = np.nonzero((need > lo) & (need <= hi) & (u > 0))
        lo = hi
        if d.size == 0:
            continue
        ue = u[d, e]
        S = moments["S"][d]  # (n, terms + 1)
        for kind in kinds:
            coef = SERIES_COEF[kind]
            acc = coef[hi] * S[:, hi]
            for k in range(hi - 1, -1, -1):
                acc *= ue
                acc += coef[k] * S[:, k]
            out[kind][d, e] = acc
    return {k: v.reshape(z.shape) for k, v in out.items()}


def series_genes(moments: dict, z: np.ndarray, means: np.ndarray, min_mu: float) -> np.ndarray:
    """Genes whose no-count sums can come from power sums at this site: ``z s_max`` below
    :data:`SERIES_RHO` and the mean floor not reached, in every non-empty group.

    ``z``: ``(D, G, ...)`` (``alpha * mean``), ``means``: ``(D, G)``.
    """
    live = moments["S"][:, 0] > 0
    if not live.any():
        return np.ones(z.shape[1], dtype=bool)
    zl = z[live].reshape(int(live.sum()), z.shape[1], -1).max(axis=2)
    ok = (zl * moments["smax"][live, None] < SERIES_RHO).all(axis=0)
    return ok & (means[live] * moments["smin"][live, None] >= min_mu).all(axis=0)

