"""Perturbation-screen statistics from per-cell sums: NB GLM against frozen control statistics,
dispersions, Wald tests, expression filters, Welch t and van Elteren (stratified Wilcoxon).

Pure numpy/scipy: sparse CSR chunks of cells and per-cell vectors in, per-group sums out
(site side); sums in, estimates out (aggregator side). Nothing here knows about sites,
AnnData or substrafl.

The model, per gene ``g``. A cell ``i`` lies in a design cell ``c(i)`` (its site when sites
have their own effect, crossed with declared categorical covariates) and is either a control
cell or carries perturbation ``p(i)``::

    log mu_ig = log s_i + x_c(i)' b_g  (+ beta_p(i)g for perturbed cells),   y ~ NB(mu, alpha_g)

``x_c`` codes the design cell additively (intercept, treatment-coded dummies); ``b_g`` is the
control fit and ``beta_pg`` the effect of perturbation ``p`` (natural log). Cells are grouped
as ``(q, c)`` with ``q = 0`` for controls and ``q = p + 1`` for perturbation ``p``.

Conventions: dispersions ``alpha`` with variance ``mu + alpha mu^2``; a ridge of DESeq2's size
(``1e-6`` on the log2 scale) on every coefficient; fitted means floored at :data:`MIN_MU`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.special import digamma, gammaln, ndtr
from scipy.special import stdtr as _stdtr

from fed_de.core import nb
from fed_de.core.optim1d import add_log_normal_prior

LN2 = nb.LN2
#: Ridge on every coefficient, natural-log scale (DESeq2's 1e-6 on the log2 scale).
RIDGE = nb.RIDGE_LOG2 / LN2**2
#: Floor of fitted means. A numerical guard only: UMI genes worth testing have means of
#: 1e-3 .. 1e2 per cell, far above it, so it never shifts an estimate. DESeq2's 0.5 is a
#: bulk RNA-seq choice that drags the fitted means of genes below ~0.5 UMI/cell up and shrinks
#: their fold changes towards 0.
MIN_MU = 1e-8
#: |coefficient| beyond which a fit is diverged (natural log).
LARGE = 30.0
#: Log mean given to a design cell whose control cells hold no count of a gene.
LOG_ZERO = -25.0
#: Largest Newton step per round: control coefficients, perturbation effects (natural log).
MAX_STEP_CONTROL = 5.0
MAX_STEP_PERT = 2.0
#: Convergence: a Newton step below this (natural log) is the last one taken; Newton's
#: quadratic convergence leaves an error of order DONE_STEP^2.
DONE_STEP = 1e-5
#: Relative rounding noise of summed log likelihoods (decisions below it are ties).
NOISE = 1e-11
#: Counts up to this use the exact finite sums for the dispersion derivatives (no lgamma
#: cancellation at small dispersions); larger counts use lgamma/digamma/trigamma.
Y_EXACT = 24
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
def _entries(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and value of every stored entry of a CSR chunk."""
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    return rows, X.indices.astype(np.int64), X.data


def _indicator(codes: np.ndarray, n_codes: int) -> sp.csr_matrix:
    """Sparse ``(n_codes, rows)`` matrix summing rows by code (code < 0: left out)."""
    keep = np.flatnonzero(codes >= 0)
    return sp.csr_matrix((np.ones(keep.size), (codes[keep], keep)),
                         shape=(n_codes, codes.size))


def _row_blocks(n_rows: int, width: int) -> list[slice]:
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
    rows, cols, y = _entries(X)
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


# -- dispersions ---------------------------------------------------------------------------------
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
        for blk in _row_blocks(rows_used.size, Gd * K):
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
    rows, cols, y = _entries(X)
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


def disp_objective(tot: dict, points: np.ndarray, prior: dict | None = None):
    """Cox-Reid adjusted (and optionally prior-penalised) objective, gradient and curvature."""
    cr, cr1, cr2 = cox_reid_diag(tot["A"], tot["A1"], tot["A2"])
    f, g, h = tot["ll"] + cr, tot["d1"] + cr1, tot["d2"] + cr2
    if prior is None:
        return f, g, h
    return add_log_normal_prior(f, g, h, points, prior["mean"], prior["var"])


def shrink_log_dispersion(disp_gene: np.ndarray, disp_fit: np.ndarray, prior_var: float,
                          sampling_var: float) -> np.ndarray:
    """Normal-normal shrinkage of log gene-wise dispersions towards the trend (zero rounds):
    the precision-weighted mean of ``log disp_gene`` (variance ``sampling_var``) and
    ``log disp_fit`` (variance ``prior_var``)."""
    w = (1.0 / sampling_var) / (1.0 / sampling_var + 1.0 / prior_var)
    return np.exp(w * np.log(disp_gene) + (1.0 - w) * np.log(disp_fit))


# -- bracketed 1-D search (dispersions) ----------------------------------------------------
#: Converged when the bracket is below this (log alpha).
X_TOL = 1e-7
#: A Newton step below this (log alpha) is taken and ends the search: Newton's quadratic
#: convergence leaves an error of order NEWTON_DONE^2.
NEWTON_DONE = 1e-4


def search_start(points: np.ndarray, f: np.ndarray, g: np.ndarray, h: np.ndarray) -> dict:
    """Search state from a first set of evaluations (``(G, K)`` each): the history."""
    return {"x": points.copy(), "f": f.copy(), "g": g.copy(), "h": h.copy()}


def search_add(state: dict, points, f, g, h) -> dict:
    """The state with one more round of evaluations appended."""
    return {k: np.concatenate([state[k], v], axis=1)
            for k, v in (("x", points), ("f", f), ("g", g), ("h", h))}


def search_best(state: dict, lo: float, hi: float) -> dict:
    """Best point per gene, the bracket around the maximum, and whether the search is done.

    The bracket ``[a, b]`` runs from the largest evaluated point left of the best whose
    derivative is ``>= 0`` to the smallest one right of it whose derivative is ``<= 0`` (the
    range bounds where there is none). Done: bracket below :data:`X_TOL`, Newton step below
    :data:`NEWTON_DONE` (``estimate`` then takes it), or the maximum at a bound.
    """
    x, f, g, h = state["x"], state["f"], state["g"], state["h"]
    score = np.where(np.isfinite(f), f, -np.inf)
    top = score.max(axis=1, keepdims=True)
    # the earliest point within rounding noise of the best wins: sites summing in another
    # order follow the same path
    near = score >= top - NOISE * (np.abs(np.nan_to_num(top, neginf=0.0)) + 1.0)
    k = np.argmax(near, axis=1)
    rows = np.arange(x.shape[0])
    xb, fb, gb, hb = x[rows, k], score[rows, k], g[rows, k], h[rows, k]
    ok = np.isfinite(score)
    left = (g >= 0) & (x <= xb[:, None]) & ok
    right = (g <= 0) & (x >= xb[:, None]) & ok
    ka = np.argmax(np.where(left, x, -np.inf), axis=1)
    kb = np.argmin(np.where(right, x, np.inf), axis=1)
    has_a, has_b = left.any(axis=1), right.any(axis=1)
    out = {"x": xb, "f": fb, "g": gb, "h": hb,
           "a": np.where(has_a, x[rows, ka], lo), "b": np.where(has_b, x[rows, kb], hi),
           "ga": g[rows, ka], "ha": h[rows, ka], "gb": g[rows, kb], "hb": h[rows, kb],
           "both": has_a & has_b}
    with np.errstate(divide="ignore", invalid="ignore"):
        out["newton"] = np.where(hb < 0, -gb / hb, np.nan)
    close = np.abs(out["newton"]) < NEWTON_DONE
    done = ((out["b"] - out["a"]) < X_TOL) | close | ~np.isfinite(fb)
    done |= ((xb <= lo) & (gb <= 0)) | ((xb >= hi) & (gb >= 0))
    out["done"] = done
    # the estimate: the best point, plus its last (tiny) Newton step where that ended it
    out["estimate"] = np.where(close, np.clip(xb + np.nan_to_num(out["newton"]), lo, hi), xb)
    return out


def _hermite_root(a, b, ga, ha, gb, hb, iters: int = 60) -> np.ndarray:
    """Root in ``[a, b]`` of the cubic matching ``g`` and its derivative at both ends
    (``ga >= 0 >= gb``), by bisection on the cubic."""
    L = b - a

    def cubic(t):
        t2, t3 = t * t, t * t * t
        return ((2 * t3 - 3 * t2 + 1) * ga + (t3 - 2 * t2 + t) * L * ha
                + (-2 * t3 + 3 * t2) * gb + (t3 - t2) * L * hb)

    lo_t, hi_t = np.zeros_like(a), np.ones_like(a)
    for _ in range(iters):
        mid = 0.5 * (lo_t + hi_t)
        pos = cubic(mid) >= 0
        lo_t = np.where(pos, mid, lo_t)
        hi_t = np.where(pos, hi_t, mid)
    return a + 0.5 * (lo_t + hi_t) * L


def search_propose(best: dict, lo: float, hi: float, k: int = 3) -> np.ndarray:
    """Next points per gene inside the bracket (one end of which is the best point).

    When the Newton point from the best falls inside: the Newton point, the root of the cubic
    interpolating the derivative at both bracket ends (or a doubled Newton step while one end
    is a range bound), and the bracket's midpoint (which at least halves it). Otherwise the
    bracket's quartiles. Done genes repeat their best point."""
    a, b, xb = best["a"], best["b"], best["x"]
    step = np.nan_to_num(best["newton"])
    span = b - a
    inner = lambda v: np.clip(v, a + 1e-3 * span, b - 1e-3 * span)  # noqa: E731
    newton = inner(np.where(np.isfinite(best["newton"]), xb + step, 0.5 * (a + b)))
    with np.errstate(all="ignore"):
        herm = _hermite_root(a, b, np.nan_to_num(best["ga"]), np.nan_to_num(best["ha"]),
                             np.nan_to_num(best["gb"]), np.nan_to_num(best["hb"]))
    second = inner(np.where(best["both"], herm, xb + 2.0 * step))
    valid = np.isfinite(best["newton"]) & (xb + step > a) & (xb + step < b)
    guided = np.stack([newton, second, 0.5 * (a + b)], axis=1)
    quarters = a[:, None] + span[:, None] * np.array([0.25, 0.5, 0.75])[None, :]
    pts = np.where(valid[:, None], guided, quarters)[:, :k]
    pts = np.where(best["done"][:, None], xb[:, None], pts)
    return np.clip(pts, lo, hi)


# -- NB fit against frozen control statistics ------------------------------------------------
def control_start(ctrl_y: np.ndarray, ctrl_sf: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Start of the control fit: weighted least squares of the log Poisson means of the design
    cells (exact for a cell-means design). Cells without control counts get :data:`LOG_ZERO`.

    ``ctrl_y`` ``(C, G)`` and ``ctrl_sf`` ``(C,)``: sums of counts and size factors over the
    control cells of each design cell. Returns ``(G, p)``.
    """
    C, G = ctrl_y.shape
    has = ctrl_sf > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        logm = np.where(ctrl_y > 0, np.log(ctrl_y / np.where(has, ctrl_sf, 1.0)[:, None]),
                        LOG_ZERO)
    wt = np.where(ctrl_y > 0, ctrl_sf[:, None], 1e-6 * ctrl_sf[:, None]) * has[:, None]
    p = X.shape[1]
    XtWX = np.einsum("cg,ci,cj->gij", wt, X, X) + 1e-9 * np.eye(p)
    XtWz = np.einsum("cg,ci,cg->gi", wt, X, logm)
    return np.linalg.solve(XtWX, XtWz[..., None])[..., 0]


def pert_start(pert_y: np.ndarray, pert_cell_sf: np.ndarray, X: np.ndarray,
               b: np.ndarray) -> np.ndarray:
    """Poisson start of every perturbation effect (exact for alpha = 0):
    ``log(sum y / sum_c (sum s) exp(x_c' b))``; ``(P, G)``."""
    m = np.exp(np.clip(b @ X.T, -2 * LARGE, 2 * LARGE))  # (G, C)
    denom = pert_cell_sf @ m.T  # (P, G)
    ok = (pert_y > 0) & (denom > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = np.where(ok, np.log(np.where(ok, pert_y, 1.0) / np.where(ok, denom, 1.0)),
                        -LARGE / 3)
    return np.clip(beta, -LARGE, LARGE)


def fit_summands(X: sp.csr_matrix, sf: np.ndarray, q: np.ndarray, c: np.ndarray,
                 mean_table: np.ndarray, alpha: np.ndarray, *, with_uh: bool = True,
                 with_w: bool = False, min_mu: float = MIN_MU,
                 dense: np.ndarray | None = None) -> dict:
    """Newton sums of the NB fit, per group ``(q, c)`` of the chunk's cells.

    Parameters
    ----------
    X
        Counts of a chunk of cells, CSR ``(rows, G)``.
    sf, q, c
        Size factors, group (0 = control, ``p + 1`` = perturbation ``p``, ``< 0``: left out)
        and design cell of the chunk's cells.
    mean_table
        ``(Q, C, G)``: ``exp(x_c' b + beta_q)`` (``beta_0 = 0``).
    alpha
        ``(G,)`` dispersions.
    with_uh
        Return the Newton sums (score, observed information, control log likelihood).
    with_w
        Return the sums of the Fisher weights (for the Wald test).
    min_mu
        Floor of fitted means.
    dense
        ``(G,)`` genes whose no-count part is summed cell by cell here; the caller adds the
        others' from power sums (:func:`fit_series_summands`). Default: every gene.

    Returns
    -------
    dict
        ``u``, ``h`` ``(Q, C, G)``: sums of the score ``(y - mu) / (1 + alpha mu)`` and of the
        observed information ``mu (1 + alpha y) / (1 + alpha mu)^2``; ``ll`` ``(C, G)``: log
        likelihood of the control cells (terms constant in the coefficients dropped);
        ``w`` ``(Q, C, G)``: sums of ``mu / (1 + alpha mu)``.
    """
    Q, C, G = mean_table.shape
    flat = mean_table.reshape(Q * C, G)
    code = np.where(q >= 0, q * C + c, -1)
    used = np.flatnonzero(code >= 0)
    cols_d = np.arange(G) if dense is None else np.flatnonzero(dense)
    Gd = cols_d.size
    w_d = np.zeros((Q * C, Gd))
    h_d = np.zeros((Q * C, Gd))
    l_d = np.zeros((C, Gd))
    floor = used.size > 0 and float(flat.min()) * float(sf[used].min()) < min_mu
    if Gd:
        flat_d = flat[:, cols_d] if Gd < G else flat
        alpha_d = alpha[cols_d]
        for blk in _row_blocks(used.size, Gd):
            r = used[blk]
            mu = flat_d[code[r]]
            mu *= sf[r, None]
            if floor:
                np.maximum(mu, min_mu, out=mu)
            inv = mu * alpha_d  # t = alpha mu
            ctrl = np.flatnonzero(q[r] == 0)
            if with_uh and ctrl.size:
                l_d += _indicator(c[r[ctrl]], C) @ np.log1p(inv[ctrl])
            inv += 1.0
            np.reciprocal(inv, out=inv)
            mu *= inv  # w = mu / (1 + t)
            ind = _indicator(code[r], Q * C)
            w_d += ind @ mu
            if with_uh:
                mu *= inv  # mu / (1 + t)^2
                h_d += ind @ mu
    w_sum = np.zeros((Q * C, G))
    w_sum[:, cols_d] = w_d
    out: dict = {}
    if with_w:
        out["w"] = w_sum.reshape(Q, C, G)
    if not with_uh:
        return out
    h = np.zeros((Q * C, G))
    h[:, cols_d] = h_d
    ll = np.zeros((C, G))
    ll[:, cols_d] = -l_d / alpha[cols_d]
    rows, cols, y = _entries(X)
    keep_e = code[rows] >= 0
    rows, cols, y = rows[keep_e], cols[keep_e], y[keep_e]
    key = code[rows] * G + cols
    mu_e = sf[rows] * flat.ravel()[key]  # fitted means at the stored entries
    if floor:
        np.maximum(mu_e, min_mu, out=mu_e)
    t_e = alpha[cols] * mu_e
    inv_e = 1.0 / (1.0 + t_e)
    size = Q * C * G
    u = np.bincount(key, weights=y * inv_e, minlength=size).reshape(Q * C, G) - w_sum
    h += np.bincount(key, weights=y * t_e * inv_e * inv_e, minlength=size).reshape(Q * C, G)
    ctrl_e = q[rows] == 0
    if ctrl_e.any():
        ly = y[ctrl_e] * (np.log(mu_e[ctrl_e]) - np.log1p(t_e[ctrl_e]))
        ll += np.bincount(c[rows[ctrl_e]] * G + cols[ctrl_e], weights=ly,
                          minlength=C * G).reshape(C, G)
    out.update(u=u.reshape(Q, C, G), h=h.reshape(Q, C, G), ll=ll)
    return out


def fit_series_summands(moments: dict, mean_table: np.ndarray, alpha: np.ndarray,
                        genes: np.ndarray, *, with_uh: bool = True,
                        with_w: bool = False) -> dict:
    """The no-count part of :func:`fit_summands` for ``genes`` (``(G,)`` bool), from the
    groups' power sums of size factors (``moments`` over the ``Q * C`` groups); zeros for
    the other genes. ``w = T1 / alpha``, ``h = (T1 - T2) / alpha``, ``ll = -L / alpha``."""
    Q, C, G = mean_table.shape
    idx = np.flatnonzero(genes)
    w = np.zeros((Q * C, G))
    h = np.zeros((Q * C, G))
    ll = np.zeros((C, G))
    if idx.size:
        live = np.flatnonzero(moments["S"][:, 0] > 0)
        z = mean_table.reshape(Q * C, G)[np.ix_(live, idx)] * alpha[idx]
        sub = {k: v[live] for k, v in moments.items()}
        kinds = ("T1", "T2") if with_uh else ("T1",)
        ser = series_sums(sub, z, kinds)
        a = alpha[idx]
        w[np.ix_(live, idx)] = ser["T1"] / a
        if with_uh:
            h[np.ix_(live, idx)] = (ser["T1"] - ser["T2"]) / a
            ctrl = live[live < C]  # groups q = 0: control cells of each design cell
            if ctrl.size:
                zc = mean_table[0][np.ix_(ctrl, idx)] * a
                lser = series_sums({k: v[ctrl] for k, v in moments.items()}, zc, ("L",))
                ll[np.ix_(ctrl, idx)] = -lser["L"] / a
    out: dict = {}
    if with_w:
        out["w"] = w.reshape(Q, C, G)
    if with_uh:
        out.update(u=-w.reshape(Q, C, G), h=h.reshape(Q, C, G), ll=ll)
    return out


def mean_table(X: np.ndarray, b: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``exp(x_c' b_g + beta_qg)`` for every group ``q`` (control first) and cell: ``(Q, C, G)``."""
    eta_c = np.clip(b @ X.T, -2 * LARGE, 2 * LARGE).T  # (C, G)
    full = np.concatenate([np.zeros((1,) + beta.shape[1:]), beta], axis=0)  # (Q, G)
    return np.exp(np.clip(eta_c[None] + full[:, None, :], -3 * LARGE, 3 * LARGE))


def control_update(fit: dict, ll: np.ndarray, U: np.ndarray, H: np.ndarray, X: np.ndarray,
                   live: np.ndarray) -> dict:
    """One safeguarded Newton update of the control coefficients (per gene).

    ``fit``: ``b`` (the point the sites evaluated), ``b_acc`` / ``ll_acc`` (last accepted
    point), ``step``, ``iter``, ``done``. ``ll`` ``(G,)``, ``U`` ``(G, p)``, ``H`` ``(G, T)``:
    log likelihood, score and packed observed information at ``b``. ``live`` ``(G, C)``: design
    cells whose control mean is estimable (convergence is judged on them). A point whose
    penalised log likelihood falls (beyond rounding noise) is rejected and the step halved.
    """
    G, p = fit["b"].shape
    first = fit["iter"] == 0
    ll_acc = fit["ll_acc"]
    ll = ll - 0.5 * RIDGE * (fit["b"] ** 2).sum(axis=1)  # the ridge-penalised objective
    slack = NOISE * (np.abs(np.nan_to_num(ll_acc)) + 1.0)
    accept = first | ~(ll < ll_acc - slack)
    accept &= ~fit["done"]
    Hm = nb.unpack(H, p) + RIDGE * np.eye(p)
    rhs = U - RIDGE * fit["b"]
    with np.errstate(invalid="ignore", over="ignore"):
        newton = np.linalg.solve(Hm, rhs[..., None])[..., 0]
    # clipped coefficient by coefficient: a cell without control counts (its mean heads to 0)
    # must not slow the others down
    newton = np.clip(np.nan_to_num(newton), -MAX_STEP_CONTROL, MAX_STEP_CONTROL)
    step = np.where(accept[:, None], newton, 0.5 * fit["step"])
    base = np.where(accept[:, None], fit["b"], fit["b_acc"])
    cell_step = np.abs(step @ X.T)
    small = (np.where(live, cell_step, 0.0).max(axis=1) < DONE_STEP) & accept
    done = fit["done"] | small
    # a gene whose Newton step is below DONE_STEP takes that last step (Newton converges
    # quadratically: what remains is ~DONE_STEP^2) and stops
    new_b = np.where(fit["done"][:, None], fit["b"], np.clip(base + step, -LARGE, LARGE))
    return {"b": new_b, "b_acc": base, "ll_acc": np.where(accept, ll, ll_acc),
            "step": np.where(done[:, None], 0.0, step), "iter": fit["iter"] + 1, "done": done}


def unit_coefficients(X: np.ndarray) -> np.ndarray:
    """``v`` with ``X v = 1``: recovers ``sum h`` from ``sum h x`` (``e_0`` when the design
    has an intercept column, ``1`` for cell-means coding)."""
    v = np.linalg.lstsq(X, np.ones(X.shape[0]), rcond=None)[0]
    if not np.allclose(X @ v, 1.0):
        raise ValueError("the design rows do not span the intercept")
    return v


def pert_update(beta: np.ndarray, u: np.ndarray, hx: np.ndarray, db: np.ndarray,
                unit: np.ndarray):
    """Newton update of every perturbation effect, the control coefficients having moved by
    ``db`` ``(G, p)`` since the sums ``u`` ``(P, G)`` and ``hx`` ``(P, G, p)`` (observed
    information times the cells' design rows) were taken; ``unit``: see
    :func:`unit_coefficients`. Returns the new effects and the step (``(P, G)`` each)."""
    h = hx @ unit + RIDGE
    coupling = np.einsum("pgj,gj->pg", hx, db)
    with np.errstate(invalid="ignore", divide="ignore"):
        step = (u - RIDGE * beta - coupling) / h
    step = np.clip(np.nan_to_num(step), -MAX_STEP_PERT, MAX_STEP_PERT)
    return np.clip(beta + step, -LARGE, LARGE), step


def frozen_wald_se(wx: np.ndarray, ctrl_info: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Standard error (natural log) of the perturbation effects fitted against frozen control
    coefficients.

    The effect is fitted with ``b`` fixed at the control fit ``b_hat``; its sampling variance
    adds the perturbed cells' Fisher information ``d = sum w`` and the control fit's
    uncertainty carried through ``a = sum w x / d``::

        var(beta_p) = 1 / d + a' (X'WX_control)^-1 a

    With an intercept-only control this is ``1/d + 1/W_control``, the (beta_p, beta_p) entry
    of the inverse 2 x 2 information of (intercept, beta_p) over control and perturbed cells.
    ``wx`` ``(P, G, p)``; ``ctrl_info`` packed ``(G, T)``; ``unit``: see
    :func:`unit_coefficients`. The value does not depend on how the design cells are coded.
    """
    p = wx.shape[-1]
    d = wx @ unit + RIDGE
    with np.errstate(invalid="ignore", divide="ignore"):
        cinv = np.linalg.inv(nb.unpack(ctrl_info, p) + RIDGE * np.eye(p))
        a = wx / d[..., None]
        var = 1.0 / d + np.einsum("pgi,gij,pgj->pg", a, cinv, a)
    return np.sqrt(var)


def wald_pvalues(lfc_nat: np.ndarray, se_nat: np.ndarray):
    """Wald statistic and two-sided normal p-value."""
    with np.errstate(invalid="ignore", divide="ignore"):
        stat = lfc_nat / se_nat
    return stat, 2.0 * ndtr(-np.abs(stat))


# -- filters and multiple testing ---------------------------------------------------------------
def expression_filter(ctrl_expr, ctrl_mean, n_ctrl, pert_expr, pert_mean, n_pert, *,
                      min_pct_ctrl: float = 0.01, min_pct_pert: float = 0.002,
                      min_mean_ctrl: float = 0.05, min_mean_pert: float = 0.005,
                      min_cells_ctrl: int = 1, min_cells_pert: int = 1) -> np.ndarray:
    """Pairs (perturbation, gene) worth testing: ``(P, G)`` bool.

    A pair is left out when it is low in *both* arms (fraction of expressing cells below
    ``min_pct_*`` and mean normalised count below ``min_mean_*``, per arm), or when an arm
    has fewer than ``min_cells_*`` expressing cells (no finite effect exists), or when the
    perturbation has no cell. crispyx's ``nb_glm_test`` filters with the same rules and
    defaults.
    """
    n_pert = np.asarray(n_pert, dtype=float)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        pct_c = ctrl_expr / n_ctrl
        pct_p = pert_expr / n_pert
    low_c = (pct_c < min_pct_ctrl) & (ctrl_mean < min_mean_ctrl)
    low_p = (pct_p < min_pct_pert) & (pert_mean < min_mean_pert)
    off = low_c[None, :] & low_p
    if min_cells_ctrl > 0:
        off |= (ctrl_expr < min_cells_ctrl)[None, :]
    if min_cells_pert > 0:
        off |= pert_expr < min_cells_pert
    return ~off & (n_pert > 0)


def bh_by_row(pvalue: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg within each row (perturbation); NaN p-values are left out."""
    from fed_de.core.testing import p_adjust_bh

    return np.vstack([p_adjust_bh(row) for row in pvalue]) if len(pvalue) else pvalue.copy()


# -- Welch t-test -------------------------------------------------------------------------------
def welch_t(n1, s1, ss1, n2, s2, ss2):
    """Welch's t-test from counts, sums and sums of squares (group 1 vs group 2).

    Returns the mean difference, t statistic, degrees of freedom and two-sided p-value;
    NaN where a group has fewer than 2 cells or both variances are 0.
    """
    n1 = np.asarray(n1, dtype=float)
    n2 = np.asarray(n2, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        m1, m2 = s1 / n1, s2 / n2
        v1 = np.maximum(ss1 - n1 * m1 * m1, 0.0) / (n1 - 1.0)
        v2 = np.maximum(ss2 - n2 * m2 * m2, 0.0) / (n2 - 1.0)
        e1, e2 = v1 / n1, v2 / n2
        se2 = e1 + e2
        t = (m1 - m2) / np.sqrt(se2)
        df = se2 * se2 / (e1 * e1 / (n1 - 1.0) + e2 * e2 / (n2 - 1.0))
        t = np.where((n1 > 1) & (n2 > 1) & (se2 > 0), t, np.nan)
        pval = 2.0 * _stdtr(df, -np.abs(t))
    return m1 - m2, t, df, pval


# -- van Elteren (Wilcoxon rank-sum stratified by site) --------------------------------------
def van_elteren_site(values: np.ndarray, cols: np.ndarray, q_of_entry: np.ndarray,
                     s_of_entry: np.ndarray, n_cells: np.ndarray, n_genes: int) -> dict:
    """One site's van Elteren sums for every perturbation against the control.

    Within each stratum ``s`` (a design cell held by this site), perturbation ``p``'s cells are
    ranked with the stratum's control cells, gene by gene (ties get mid-ranks; zeros are one
    tie group). With ``U`` the Mann-Whitney statistic, ``N`` the cells ranked, the site sends
    ``sum_s U / (N + 1)``, ``sum_s E[U] / (N + 1)`` and ``sum_s Var[U] / (N + 1)^2``
    (tie-corrected): van Elteren's weights, summed over strata and then over sites.

    Parameters
    ----------
    values, cols, q_of_entry, s_of_entry
        Every stored (non-zero) entry of the site's control and perturbed cells: normalised
        value (``y / s``; ranks are the same for ``log1p(y / s)``), gene, group (0 control,
        ``p + 1`` perturbation ``p``) and stratum.
    n_cells
        ``(S, Q)`` cells per stratum and group.
    n_genes
        G.

    Returns
    -------
    dict
        ``u, e, v`` ``(P, G)``.
    """
    S, Q = n_cells.shape
    P, G = Q - 1, n_genes
    out = {k: np.zeros((P, G)) for k in ("u", "e", "v")}
    for s in range(S):
        n_c = n_cells[s, 0]
        n_p = n_cells[s, 1:]
        if n_c == 0 or not (n_p > 0).any():
            continue
        sel = s_of_entry == s
        val, col, grp = values[sel], cols[sel], q_of_entry[sel]
        # exact ranks of the stratum's values within each gene (integer codes, gene-major)
        order = np.lexsort((val, col))
        vs, cs = val[order], col[order]
        new = np.ones(vs.size, dtype=bool)
        new[1:] = (vs[1:] != vs[:-1]) | (cs[1:] != cs[:-1])
        code = np.empty(vs.size, dtype=np.int64)
        code[order] = np.cumsum(new) - 1
        is_c = grp == 0
        ctrl_codes = np.sort(code[is_c])
        ctrl_nz = np.bincount(col[is_c], minlength=G).astype(np.float64)
        ctrl_before = np.concatenate([[0], np.cumsum(ctrl_nz)[:-1]])
        # control tie groups among non-zeros: sum (t^3 - t) per gene
        uc, tc = np.unique(ctrl_codes, return_counts=True)
        gene_of_code = np.empty(int(code.max()) + 1 if code.size else 0, dtype=np.int64)
        gene_of_code[code] = col
        tie_c = np.bincount(gene_of_code[uc], weights=tc.astype(float)**3 - tc, minlength=G) \
            if uc.size else np.zeros(G)
        pe = ~is_c
        pc, pcol, pq = code[pe], col[pe], grp[pe] - 1
        lt = np.searchsorted(ctrl_codes, pc, "left")
        le = np.searchsorted(ctrl_codes, pc, "right")
        eq = (le - lt).astype(np.float64)
        less = lt - ctrl_before[pcol]
        z_c = n_c - ctrl_nz  # control zeros per gene
        key = pq * G + pcol
        u_nz = np.bincount(key, weights=z_c[pcol] + less + 0.5 * eq,
                           minlength=P * G).reshape(P, G)
        nz_p = np.bincount(key, minlength=P * G).reshape(P, G).astype(np.float64)
        z_p = n_p[:, None] - nz_p
        u = 0.5 * z_p * z_c[None, :] + u_nz
        # ties of the union: zeros, control ties, and the perturbed values' extra ties
        pk, tp = np.unique(pq.astype(np.int64) * (code.max() + 1) + pc, return_counts=True)
        pk_q = pk // (code.max() + 1)
        pk_code = pk % (code.max() + 1)
        t_c_at = (np.searchsorted(ctrl_codes, pk_code, "right")
                  - np.searchsorted(ctrl_codes, pk_code, "left")).astype(np.float64)
        tot = t_c_at + tp
        extra = (tot**3 - tot) - (t_c_at**3 - t_c_at)
        tie_extra = np.bincount(pk_q * G + gene_of_code[pk_code], weights=extra,
                                minlength=P * G).reshape(P, G)
        t0 = z_c[None, :] + z_p
        ties = t0**3 - t0 + tie_c[None, :] + tie_extra
        N = (n_c + n_p)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            var = n_p[:, None] * n_c / 12.0 * ((N + 1.0) - ties / (N * (N - 1.0)))
        ok = (n_p > 0)[:, None]
        wgt = 1.0 / (N + 1.0)
        out["u"] += np.where(ok, u * wgt, 0.0)
        out["e"] += np.where(ok, 0.5 * n_p[:, None] * n_c * wgt, 0.0)
        out["v"] += np.where(ok, np.nan_to_num(var) * wgt * wgt, 0.0)
    return out


def van_elteren_test(u: np.ndarray, e: np.ndarray, v: np.ndarray):
    """z statistic and two-sided normal p-value from summed van Elteren sums."""
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(v > 0, (u - e) / np.sqrt(v), np.nan)
    return z, 2.0 * ndtr(-np.abs(z))
