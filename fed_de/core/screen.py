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
#: Convergence: Newton step below this (natural log).
TOL = 1e-8
#: Relative rounding noise of summed log likelihoods (decisions below it are ties).
NOISE = 1e-11
#: Counts up to this use the exact finite sums for the dispersion derivatives (no lgamma
#: cancellation at small dispersions); larger counts use lgamma/digamma/trigamma.
Y_EXACT = 24
#: Elements per dense temporary (bounds a site's working memory, with the chunk size).
BLOCK_ELEMENTS = 1 << 22


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
                  log_alpha: np.ndarray, min_mu: float = MIN_MU) -> dict:
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
    sl = np.zeros((G, K))
    st = np.zeros((G, K))
    st2 = np.zeros((G, K))
    grp = np.zeros((3, D, G * K))
    rows_used = np.flatnonzero(groups >= 0)
    for blk in _row_blocks(rows_used.size, G * K):
        r = rows_used[blk]
        mu = np.maximum(sf[r, None] * means[groups[r]], min_mu)
        t = mu[:, :, None] * alpha[None]
        ti = t / (1.0 + t)
        sl += np.log1p(t).sum(axis=0)
        st += ti.sum(axis=0)
        ti2 = ti * ti
        st2 += ti2.sum(axis=0)
        ind = _indicator(groups[r], D)
        grp[0] += ind @ ti.reshape(r.size, -1)
        grp[1] += ind @ ti2.reshape(r.size, -1)
        grp[2] += ind @ (ti2 * ti).reshape(r.size, -1)
    # dense part (every cell, as if y = 0): l0 = -log1p(t)/alpha with t = alpha mu
    ll = -sl / alpha
    d1 = (sl - st) / alpha
    d2 = (-sl + st + st2) / alpha
    s1, s2, s3 = (grp[k].reshape(D, G, K).transpose(1, 2, 0) for k in range(3))
    a = alpha[:, :, None]
    A = s1 / a
    A1 = -s2 / a
    A2 = A1 + 2.0 * s3 / a
    # count part over stored entries: l_y = lgamma(y + r) - lgamma(r) - y log(mu + r)
    rows, cols, y = _entries(X)
    sel = groups[rows] >= 0
    rows, cols, y = rows[sel], cols[sel], y[sel]
    mu_e = np.maximum(sf[rows] * means[groups[rows], cols], min_mu)
    ly, d1y, d2y = _count_part(y, mu_e, alpha[cols])
    for k in range(K):
        ll[:, k] += np.bincount(cols, weights=ly[:, k], minlength=G)
        d1[:, k] += np.bincount(cols, weights=d1y[:, k], minlength=G)
        d2[:, k] += np.bincount(cols, weights=d2y[:, k], minlength=G)
    return {"ll": ll, "d1": d1, "d2": d2, "A": A, "A1": A1, "A2": A2}


def _count_part(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray):
    """``y``-dependent part of the NB log likelihood in ``log alpha`` and two derivatives.

    ``y``, ``mu``: ``(n,)``; ``alpha``: ``(n, K)``. Small counts use the finite sums
    ``sum_{j<y} log((r + j) / (r + mu))`` (exact, no cancellation as alpha -> 0).
    """
    n, K = alpha.shape
    ly = np.zeros((n, K))
    d1 = np.zeros((n, K))
    d2 = np.zeros((n, K))
    tm = 1.0 + alpha * mu[:, None]
    small = np.flatnonzero(y <= Y_EXACT)
    big = np.flatnonzero(y > Y_EXACT)
    if small.size:
        ys = y[small]
        a, tms, mus = alpha[small], tm[small], mu[small, None]
        inv_tm2 = 1.0 / (tms * tms)
        idx = np.arange(small.size)
        acc_l = np.zeros((small.size, K))
        acc_1 = np.zeros((small.size, K))
        acc_2 = np.zeros((small.size, K))
        for j in range(int(ys.max())):
            idx = idx[ys[idx] > j]
            aj = a[idx]
            one_aj = 1.0 + aj * j
            acc_l[idx] += np.log1p(aj * (j - mus[idx]) / tms[idx])
            acc_1[idx] += aj * (mus[idx] - j) / (one_aj * tms[idx])
            acc_2[idx] += inv_tm2[idx] - 1.0 / (one_aj * one_aj)
        ly[small] = acc_l
        d1[small] = -acc_1
        d2[small] = acc_1 + acc_2
    if big.size:
        yb = y[big, None]
        r = 1.0 / alpha[big]
        mr = mu[big, None] + r
        ly[big] = gammaln(yb + r) - gammaln(r) - yb * np.log(mr)
        l_r = digamma(yb + r) - digamma(r) - yb / mr
        l_rr = nb.trigamma(yb + r) - nb.trigamma(r) + yb / (mr * mr)
        d1[big] = -r * l_r
        d2[big] = r * l_r + r * r * l_rr
    return ly, d1, d2


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
    if prior is not None:
        dev = points - prior["mean"][:, None]
        f = f - 0.5 * dev**2 / prior["var"]
        g = g - dev / prior["var"]
        h = h - 1.0 / prior["var"]
    return f, g, h


def shrink_log_dispersion(disp_gene: np.ndarray, disp_fit: np.ndarray, prior_var: float,
                          sampling_var: float) -> np.ndarray:
    """Normal-normal shrinkage of log gene-wise dispersions towards the trend (zero rounds):
    the precision-weighted mean of ``log disp_gene`` (variance ``sampling_var``) and
    ``log disp_fit`` (variance ``prior_var``)."""
    w = (1.0 / sampling_var) / (1.0 / sampling_var + 1.0 / prior_var)
    return np.exp(w * np.log(disp_gene) + (1.0 - w) * np.log(disp_fit))


# -- bracketed 1-D search (dispersions) ----------------------------------------------------
#: Converged when the bracket or the Newton step is below this (log alpha).
X_TOL = 1e-7


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
    range bounds where there is none). Done: bracket or Newton step below :data:`X_TOL`, or
    the maximum at a bound.
    """
    x, f, g, h = state["x"], state["f"], state["g"], state["h"]
    score = np.where(np.isfinite(f), f, -np.inf)
    k = np.argmax(score, axis=1)
    rows = np.arange(x.shape[0])
    xb, fb, gb, hb = x[rows, k], score[rows, k], g[rows, k], h[rows, k]
    left = (g >= 0) & (x <= xb[:, None]) & np.isfinite(f)
    right = (g <= 0) & (x >= xb[:, None]) & np.isfinite(f)
    a = np.where(left.any(axis=1), np.where(left, x, -np.inf).max(axis=1), lo)
    b = np.where(right.any(axis=1), np.where(right, x, np.inf).min(axis=1), hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        newton = np.where(hb < 0, -gb / hb, np.nan)
    done = ((b - a) < X_TOL) | (np.abs(newton) < X_TOL) | ~np.isfinite(fb)
    done |= ((xb <= lo) & (gb <= 0)) | ((xb >= hi) & (gb >= 0))
    return {"x": xb, "f": fb, "g": gb, "h": hb, "a": a, "b": b, "newton": newton, "done": done}


def search_propose(best: dict, lo: float, hi: float, k: int = 3) -> np.ndarray:
    """Next ``k`` points per gene: the Newton point with two points tightly around it when it
    falls inside the bracket (the bracket then collapses around the root), else the
    quartiles of the bracket; done genes repeat their best point."""
    a, b, xb = best["a"], best["b"], best["x"]
    xn = xb + np.nan_to_num(best["newton"])
    inside = np.isfinite(best["newton"]) & (xn > a) & (xn < b)
    delta = np.maximum(0.05 * np.abs(xn - xb), 1e-8)
    around = np.stack([xn, xn - delta, xn + delta], axis=1)
    width = (b - a)[:, None]
    quart = a[:, None] + width * np.array([0.5, 0.25, 0.75])[None, :]
    pts = np.where(inside[:, None], around, quart)[:, :k]
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
                 mean_table: np.ndarray, alpha: np.ndarray, *, with_w: bool = False,
                 min_mu: float = MIN_MU) -> dict:
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
    with_w
        Also return the sums of the Fisher weights (for the Wald test).

    Returns
    -------
    dict
        ``(Q, C, G)`` sums of the score ``u = (y - mu) / (1 + alpha mu)`` and of the observed
        information ``h = mu (1 + alpha y) / (1 + alpha mu)^2`` (and ``w = mu / (1 + alpha
        mu)``); ``ll`` ``(C, G)``: log likelihood of the control cells (terms constant in
        the coefficients dropped).
    """
    Q, C, G = mean_table.shape
    flat = mean_table.reshape(Q * C, G)
    code = np.where(q >= 0, q * C + c, -1)
    u = np.zeros((Q * C, G))
    h = np.zeros((Q * C, G))
    w_sum = np.zeros((Q * C, G)) if with_w else None
    ll0 = np.zeros((C, G))
    rows, cols, y = _entries(X)
    keep_e = code[rows] >= 0
    rows, cols, y = rows[keep_e], cols[keep_e], y[keep_e]
    mu_e = np.empty(rows.size)
    used = np.flatnonzero(code >= 0)
    for blk in _row_blocks(used.size, G):
        r = used[blk]
        mu = np.maximum(sf[r, None] * flat[code[r]], min_mu)
        t = mu * alpha
        inv = 1.0 / (1.0 + t)
        w = mu * inv
        ind = _indicator(code[r], Q * C)
        ws = ind @ w
        u -= ws
        h += ind @ (w * inv)
        if with_w:
            w_sum += ws
        ctrl = np.flatnonzero(q[r] == 0)
        if ctrl.size:
            ll0 += _indicator(c[r[ctrl]], C) @ np.log1p(t[ctrl])
        # fitted means at the stored entries of these rows (entries are sorted by row)
        lo, hi = np.searchsorted(rows, [r[0], r[-1] + 1])
        mu_e[lo:hi] = mu[np.searchsorted(r, rows[lo:hi]), cols[lo:hi]]
    ll = -ll0 / alpha
    t_e = alpha[cols] * mu_e
    inv_e = 1.0 / (1.0 + t_e)
    key = code[rows] * G + cols
    size = Q * C * G
    u += np.bincount(key, weights=y * inv_e, minlength=size).reshape(Q * C, G)
    h += np.bincount(key, weights=y * t_e * inv_e * inv_e, minlength=size).reshape(Q * C, G)
    ctrl_e = q[rows] == 0
    if ctrl_e.any():
        ly = y[ctrl_e] * (np.log(mu_e[ctrl_e]) - np.log1p(t_e[ctrl_e]))
        ll += np.bincount(c[rows[ctrl_e]] * G + cols[ctrl_e], weights=ly,
                          minlength=C * G).reshape(C, G)
    out = {"u": u.reshape(Q, C, G), "h": h.reshape(Q, C, G), "ll": ll}
    if with_w:
        out["w"] = w_sum.reshape(Q, C, G)
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
    cells whose control mean is estimable (convergence is judged on them). A point whose log
    likelihood falls (beyond rounding noise) is rejected and the step halved.
    """
    G, p = fit["b"].shape
    first = fit["iter"] == 0
    ll_acc = fit["ll_acc"]
    slack = NOISE * (np.abs(np.nan_to_num(ll_acc)) + 1.0)
    accept = first | ~(ll < ll_acc - slack)
    accept &= ~fit["done"]
    Hm = nb.unpack(H, p) + RIDGE * np.eye(p)
    rhs = U - RIDGE * fit["b"]
    with np.errstate(invalid="ignore", over="ignore"):
        newton = np.linalg.solve(Hm, rhs[..., None])[..., 0]
    newton = np.nan_to_num(newton)
    big = np.abs(newton).max(axis=1, keepdims=True)
    newton = newton * np.minimum(1.0, MAX_STEP_CONTROL / np.maximum(big, 1e-300))
    step = np.where(accept[:, None], newton, 0.5 * fit["step"])
    base = np.where(accept[:, None], fit["b"], fit["b_acc"])
    cell_step = np.abs(step @ X.T)
    small = (np.where(live, cell_step, 0.0).max(axis=1) < TOL) & accept
    done = fit["done"] | small
    new_b = np.where(done[:, None], np.where(fit["done"][:, None], fit["b"], base),
                     np.clip(base + step, -LARGE, LARGE))
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
