"""DESeq2's local dispersion trend: a port of R ``locfit``'s default one-predictor fit.

DESeq2's ``localDispersionFit`` (``R/core.R``) fits
``locfit(log(disp) ~ log(mean), weights = mean)`` with locfit's defaults and predicts with
``predict(fit, ...)``. This module reproduces that computation from the locfit 1.5-9 C
sources (files named per function below), so the trend agrees with R to rounding error:

* the fit family is ``qgaussian`` with the identity link, so each local fit is one weighted
  least-squares solve (``locfit.c``: ``likereg`` stops ``max_nr`` after one Newton step);
* bandwidth: the distance to the ``floor(0.7 * n + 1e-12)``-th nearest point, counted without
  the prior weights (``lf_nbhd.c``: ``nbhd``, ``kordstat``);
* kernel weights ``(1 - (d/h)^3)^3`` times the prior weights; local basis
  ``[1, dx, dx^2 / 2]`` (``weight.c``, ``lf_fitfun.c``);
* the solve scales ``X'WX`` to a correlation matrix, diagonalises it by Jacobi rotations and
  drops eigenvalues below ``1e-8`` times the largest diagonal entry (``m_jacob.c``,
  ``m_eigen.c``);
* evaluation structure ``rbox(cut = 0.8)``, the adaptive tree (``ev_atree.c``): fits at the
  ends of the data range, a cell is halved while ``length / min(h) > cut``; at most
  ``floor((5 / 0.7 / 0.8 + 1) * 2) = 19`` vertices, beyond which R stops with an error;
* a global quadratic (the "parametric component", ``pcomp.c``) is subtracted from every
  vertex value and slope and added back after interpolating, so outside the data range the
  prediction is the vertex's tangent line plus the global quadratic's curvature;
* prediction: cubic Hermite interpolation of the vertex values and slopes inside a leaf cell,
  linear extrapolation of the leftmost / rightmost cell outside (``ev_interp.c``).

A fitted trend is a flat float array (see :func:`locfit_predict`), so it travels in a shared
state like the parametric coefficients and can be evaluated again at new means.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "LocfitError",
    "constant_model",
    "locfit_fit",
    "locfit_predict",
    "local_dispersion_fit",
    "local_trend_values",
    "unpack_locfit",
]

# Layout of a packed model: [nv, xbar, pc0, pc1, pc2, x(nv), value(nv), slope(nv), h(nv)].
_HEADER = 5
# ev_atree.c: cells are split while length / bandwidth exceeds this (rbox(cut = 0.8)).
_CUT = 0.8
# m_eigen.c: eigenvalues below E_TOL times the largest are treated as zero.
_E_TOL = 1e-8
# m_eigen.c: at most this many Jacobi sweeps.
_E_MAXIT = 20


class LocfitError(RuntimeError):
    """locfit stops with an error (R: "newsplit: out of vertex space", no data...)."""


# ---------------------------------------------------------------------------------------------
# One local fit
# ---------------------------------------------------------------------------------------------


def _jacobi_eigen(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """locfit's ``eig_dec``: cyclic Jacobi rotations on a small symmetric matrix.

    Returns the rotated matrix (eigenvalues on the diagonal) and the eigenvectors (columns).
    """
    x = z.copy()
    d = x.shape[0]
    p = np.eye(d)
    for _ in range(_E_MAXIT):
        moved = False
        for i in range(d):
            for j in range(i + 1, d):
                if x[i, j] ** 2 > 1e-15 * abs(x[i, i] * x[j, j]):
                    c = (x[j, j] - x[i, i]) / 2
                    s = -x[i, j]
                    r = math.sqrt(c * c + s * s)
                    c /= r
                    s = math.sqrt((1 - c) / 2) * (1.0 if s > 0 else -1.0)
                    c = math.sqrt((1 + c) / 2)
                    xi, xj = x[i, :].copy(), x[j, :].copy()
                    x[i, :], x[j, :] = xi * c + xj * s, xj * c - xi * s
                    xi, xj = x[:, i].copy(), x[:, j].copy()
                    x[:, i], x[:, j] = xi * c + xj * s, xj * c - xi * s
                    x[i, j] = x[j, i] = 0.0
                    pi, pj = p[:, i].copy(), p[:, j].copy()
                    p[:, i], p[:, j] = pi * c + pj * s, pj * c - pi * s
                    moved = True
        if not moved:
            break
    return x, p


def _seqsum(a: np.ndarray, axis: int = 0) -> np.ndarray:
    # Left-to-right accumulation, as locfit's C loops (np.sum is pairwise: other rounding).
    return np.cumsum(a, axis=axis).take(-1, axis=axis) if a.shape[axis] else np.sum(a, axis)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # locfit's innerprod: s = 0; s += a[i] * b[i] in order.
    s = 0.0
    for ai, bi in zip(a, b, strict=True):
        s += ai * bi
    return s


def _solve_xtwx(z: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(X'WX)^{-1} v`` as locfit's ``jacob_solve`` with its default ``JAC_EIGD`` method.

    The matrix is scaled to unit diagonal, diagonalised, and components along eigenvalues
    ``<= 1e-8 * max(diag)`` are left undivided (that is what ``eig_solve`` does; it only
    matters for a degenerate neighbourhood). Products are formed in locfit's order.
    """
    p = z.shape[0]
    diag = np.diag(z)
    dg = np.array([0.0 if d <= 0 else 1.0 / math.sqrt(d) for d in diag])
    scaled = z * (dg[:, None] * dg[None, :])
    rot, q = _jacobi_eigen(scaled)
    evals = np.diag(rot)
    tol = _E_TOL * evals.max()
    x = v * dg
    w = np.array([_dot(q[:, i], x) for i in range(p)])
    w = np.array([w[i] / evals[i] if evals[i] > tol else w[i] for i in range(p)])
    return np.array([_dot(q[i, :], w) for i in range(p)]) * dg


def _local_quadratic(
    x: np.ndarray, y: np.ndarray, pw: np.ndarray, x0: float, kernel_w: np.ndarray
) -> np.ndarray:
    """Weighted least squares of ``y`` on ``[1, dx, dx^2/2]`` about ``x0`` (locfit's one step).

    As ``reginit`` + ``max_nr`` + ``likereg``: start at the weighted mean of ``y``, one Newton
    step. Sums run over the points of positive weight in data order, left to right, with
    locfit's operand order, so the result agrees with R's to the last bits. Returns
    ``[value, slope, curvature]`` at ``x0``.
    """
    use = kernel_w > 0
    if not np.any(use):
        raise LocfitError("locfit: no points with non-zero weight")
    dx = x[use] - x0
    kw = kernel_w[use]
    prior = pw[use]
    yy = y[use]
    s0 = float(_seqsum(kw * prior))
    if s0 == 0:
        raise LocfitError("locfit: no observations with positive weight")
    cf0 = float(_seqsum(kw * (prior * yy))) / s0
    basis = np.column_stack([np.ones_like(dx), dx, dx * dx / 2])
    resid = prior * (yy - cf0)  # link[ZDLL] at the starting value
    grad = _seqsum((basis * kw[:, None]) * resid[:, None])
    c = kw * prior  # ww * link[ZDDLL]
    xtwx = _seqsum((c[:, None, None] * basis[:, :, None]) * basis[:, None, :])
    delta = _solve_xtwx(xtwx, grad)
    return np.array([cf0, 0.0, 0.0]) + delta


def _nn_bandwidth(dist: np.ndarray, alpha: float) -> float:
    # lf_nbhd.c: distance to the k-th nearest point, k = floor(n * alpha + 1e-12), no weights.
    n = dist.size
    k = int(n * alpha + 1e-12)
    if k < 1:
        return 0.0
    if k < n:
        return float(np.partition(dist, k - 1)[k - 1])
    return float(dist.max()) * (k / n)  # d = 1: exp(log(k / n) / d)


def _tricube(dist: np.ndarray, h: float) -> np.ndarray:
    # weight.c: W(u) = (1 - u^3)^3 for u <= 1; with h == 0 only exact ties get weight 1.
    if h == 0:
        return (dist == 0).astype(float)
    u = dist / h
    v = 1 - u * u * u
    return np.where(u > 1, 0.0, v * v * v)


def _fit_vertex(
    x: np.ndarray, y: np.ndarray, pw: np.ndarray, x0: float, alpha: float
) -> tuple[np.ndarray, float]:
    dist = np.abs(x - x0)
    h = _nn_bandwidth(dist, alpha)
    return _local_quadratic(x, y, pw, x0, _tricube(dist, h)), h


# ---------------------------------------------------------------------------------------------
# Adaptive tree (ev_atree.c) and the parametric component (pcomp.c)
# ---------------------------------------------------------------------------------------------


def _max_vertices(alpha: float, cut: float) -> int:
    # ev_atree.c atree_guessnv for d = 1 with mk = 100.
    a0 = 1.0 if alpha > 1 else 1.0 / alpha
    return int((5 * a0 / min(1.0, cut) + 1) * 2)


def _split(h_lo: float, h_hi: float, length: float, box: float, cut: float) -> bool:
    # atree_split: compare the cell length with the smallest positive vertex bandwidth.
    hs = [h for h in (h_lo, h_hi) if h > 0]
    score = length / min(hs) if hs else 2 * length / box
    return cut < score


def _par_value(pc: np.ndarray, xbar: float, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Global quadratic and its slope at x0 (fitfun with and without the derivative).
    dx = x0 - xbar
    return pc[0] + pc[1] * dx + pc[2] * (dx * dx / 2), pc[1] + pc[2] * dx


def locfit_fit(
    x: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    alpha: float = 0.7,
    cut: float = _CUT,
) -> np.ndarray:
    """``locfit(y ~ x, weights = weights)`` with locfit's defaults, one predictor.

    Port of locfit 1.5-9's ``slocfit`` path for ``family = "qgaussian"``, ``deg = 2``,
    ``kern = "tricube"``, ``ev = rbox(cut)`` (adaptive tree), nearest-neighbour fraction
    ``alpha`` (``lp(nn = 0.7)``) and no fixed bandwidth.

    Parameters
    ----------
    x, y : np.ndarray
        Predictor and response, shape ``(n,)``, finite.
    weights : np.ndarray
        Prior weights, shape ``(n,)``, ``>= 0``.
    alpha : float, default 0.7
        Nearest-neighbour fraction of the bandwidth.
    cut : float, default 0.8
        Tree refinement: a cell is halved while its length exceeds ``cut`` times the smallest
        bandwidth at its vertices.

    Returns
    -------
    np.ndarray
        Packed model ``[nv, xbar, c0, c1, c2, x_v, value_v, slope_v, h_v]`` (vertices sorted
        by ``x``; ``value`` and ``slope`` have the global quadratic ``c0 + c1 (x - xbar) +
        c2 (x - xbar)^2 / 2`` subtracted, as locfit stores them). Evaluate with
        :func:`locfit_predict`.

    Raises
    ------
    ValueError
        Empty, mismatched or non-finite input.
    LocfitError
        Where locfit stops: the tree needs more vertices than it allocates, or a
        neighbourhood has no weight.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    pw = np.asarray(weights, dtype=float).ravel()
    if not (x.shape == y.shape == pw.shape):
        raise ValueError("x, y and weights differ in length")
    if x.size == 0:
        raise ValueError("locfit needs at least one observation")
    if not (np.isfinite(x).all() and np.isfinite(y).all() and np.isfinite(pw).all()):
        raise ValueError("x, y and weights must be finite")

    # Parametric component: a global weighted quadratic about the weighted mean of x.
    xbar = float(_seqsum(x * pw)) / float(_seqsum(pw))
    pc = _local_quadratic(x, y, pw, xbar, np.ones_like(x))

    lo, hi = float(x.min()), float(x.max())
    box = hi - lo
    max_nv = _max_vertices(alpha, cut)
    vx: list[float] = []
    vf: list[np.ndarray] = []  # [value, slope], parametric component subtracted
    vh: list[float] = []

    def add_fitted(x0: float) -> int:
        if len(vx) == max_nv:
            raise LocfitError("locfit: newsplit: out of vertex space")
        coef, h = _fit_vertex(x, y, pw, x0, alpha)
        p0, p1 = _par_value(pc, xbar, np.float64(x0))
        vx.append(x0)
        vf.append(np.array([coef[0] - p0, coef[1] - p1]))
        vh.append(h)
        return len(vx) - 1

    def add_pseudo(i_lo: int, i_hi: int, length: float) -> int:
        # newsplit with pv: value and slope from the parent cell's Hermite cubic (exvvalpv).
        if len(vx) == max_nv:
            raise LocfitError("locfit: newsplit: out of vertex space")
        vl, vr = vf[i_lo], vf[i_hi]
        f0 = (vl[0] + vr[0]) / 2 + length * (vl[1] - vr[1]) / 8
        f1 = 1.5 * (vr[0] - vl[0]) / length - (vl[1] + vr[1]) / 4
        vx.append((vx[i_lo] + vx[i_hi]) / 2)
        vf.append(np.array([f0, f1]))
        vh.append((vh[i_lo] + vh[i_hi]) / 2)
        return len(vx) - 1

    def grow(i_lo: int, i_hi: int, a: float, b: float) -> None:
        length = b - a
        if not _split(vh[i_lo], vh[i_hi], length, box, cut):
            return
        if length < cut * min(vh[i_lo], vh[i_hi]):
            mid = add_pseudo(i_lo, i_hi, length)
        else:
            mid = add_fitted((vx[i_lo] + vx[i_hi]) / 2)
        m = vx[mid]
        grow(i_lo, mid, a, m)
        grow(mid, i_hi, m, b)

    first = add_fitted(lo)
    last = add_fitted(hi)
    grow(first, last, lo, hi)

    order = np.argsort(vx, kind="stable")
    vals = np.array(vf)[order]
    return np.concatenate(
        [[len(vx), xbar], pc, np.array(vx)[order], vals[:, 0], vals[:, 1], np.array(vh)[order]]
    )


def constant_model(x0: float, value: float) -> np.ndarray:
    """A packed model (:func:`locfit_fit`'s layout) predicting ``value`` everywhere: the
    global component a constant, two vertices around ``x0`` with nothing added to it."""
    return np.array([2.0, x0, value, 0.0, 0.0, x0 - 1.0, x0 + 1.0, 0.0, 0.0, 0.0, 0.0,
                     0.0, 0.0])


def unpack_locfit(model: np.ndarray) -> dict:
    """Split a packed model from :func:`locfit_fit` into named arrays.

    Returns
    -------
    dict
        ``x`` (vertices, sorted), ``value``, ``slope`` (parametric component subtracted),
        ``h`` (bandwidth per vertex), ``xbar`` and ``pc`` (the global quadratic).
    """
    model = np.asarray(model, dtype=float).ravel()
    nv = int(model[0]) if model.size else 0
    if nv < 2 or model.size != _HEADER + 4 * nv:
        raise ValueError("not a packed locfit model")
    body = model[_HEADER:].reshape(4, nv)
    return {"x": body[0], "value": body[1], "slope": body[2], "h": body[3],
            "xbar": float(model[1]), "pc": model[2:5]}


def locfit_predict(model: np.ndarray, x_new: np.ndarray) -> np.ndarray:
    """``predict(fit, x_new)`` for a model from :func:`locfit_fit`.

    Cubic Hermite interpolation between the two vertices around each point (the leaf cell of
    locfit's tree), linear extrapolation of the outer cells beyond the data range, plus the
    global quadratic (``ev_interp.c``: ``rectcell_interp``, ``hermite2``; ``addparcomp``).

    Parameters
    ----------
    model : np.ndarray
        Packed model.
    x_new : np.ndarray
        Points to predict at (any shape); NaN gives NaN.

    Returns
    -------
    np.ndarray
        Fitted values, same shape as ``x_new``.
    """
    m = unpack_locfit(model)
    vx, f, s = m["x"], m["value"], m["slope"]
    x_new = np.asarray(x_new, dtype=float)
    xs = x_new.ravel()
    k = np.clip(np.searchsorted(vx, xs, side="right") - 1, 0, vx.size - 2)
    ll, ur = vx[k], vx[k + 1]
    width = ur - ll
    with np.errstate(invalid="ignore"):
        t = (xs - ll) / width
        phi1 = t * t * (3 - 2 * t)
        phi0 = 1 - phi1
        phi2 = t * (1 - t) * (1 - t)
        phi3 = t * t * (t - 1)
        # hermite2 outside [0, 1]: the tangent line of the nearer vertex
        left, right = t < 0, t > 1
        phi0 = np.where(left, 1.0, np.where(right, 0.0, phi0))
        phi1 = np.where(left, 0.0, np.where(right, 1.0, phi1))
        phi2 = np.where(left, t, np.where(right, 0.0, phi2)) * width
        phi3 = np.where(left, 0.0, np.where(right, t - 1, phi3)) * width
        inner = phi0 * f[k] + phi1 * f[k + 1] + phi2 * s[k] + phi3 * s[k + 1]
        par, _ = _par_value(m["pc"], m["xbar"], xs)
    return (inner + par).reshape(x_new.shape)


# ---------------------------------------------------------------------------------------------
# DESeq2's localDispersionFit
# ---------------------------------------------------------------------------------------------


def local_dispersion_fit(
    base_mean: np.ndarray, disp_gene: np.ndarray, min_disp: float = 1e-8
) -> np.ndarray:
    """DESeq2's ``localDispersionFit`` (``R/core.R``) on ``estimateDispersionsFit``'s genes.

    ``locfit(log(disp) ~ log(mean), weights = mean)`` over the genes with a finite
    ``base_mean > 0`` and ``disp_gene > 100 * min_disp`` (``useForFit``; the function's own
    ``>= 10 * min_disp`` filter then keeps them all).

    Parameters
    ----------
    base_mean : np.ndarray
        Mean of normalised counts per gene.
    disp_gene : np.ndarray
        Gene-wise dispersion estimates (NaN for all-zero genes).
    min_disp : float, default 1e-8
        DESeq2's ``minDisp``.

    Returns
    -------
    np.ndarray
        Packed locfit model; :func:`local_trend_values` evaluates the trend.

    Raises
    ------
    ValueError
        No gene passes the filter.
    LocfitError
        locfit itself stops.

    Notes
    -----
    Genes at a single baseMean (one gene, say) give a constant trend, the weighted mean of
    their log dispersions: what R's ``locfit`` predicts there (checked with locfit 1.5-9.7,
    which warns "Estimated rdf < 1.0"; the port's tree would divide by the zero-width box).
    """
    base_mean = np.asarray(base_mean, dtype=float).ravel()
    disp_gene = np.asarray(disp_gene, dtype=float).ravel()
    if base_mean.shape != disp_gene.shape:
        raise ValueError("base_mean and disp_gene differ in length")
    with np.errstate(invalid="ignore"):
        use = (np.isfinite(base_mean) & (base_mean > 0) & np.isfinite(disp_gene)
               & (disp_gene > 100 * min_disp) & (disp_gene >= 10 * min_disp))
    if not np.any(use):
        raise ValueError(
            f"no gene-wise dispersion estimate above 100 * minDisp = {100 * min_disp:g}")
    means = base_mean[use]
    if np.unique(means).size < 2:  # one abscissa: locfit has no cell to split
        return constant_model(float(np.log(means[0])),
                              float(_seqsum(np.log(disp_gene[use]) * means) / _seqsum(means)))
    return locfit_fit(np.log(means), np.log(disp_gene[use]), means)


def local_trend_values(model: np.ndarray, base_mean: np.ndarray) -> np.ndarray:
    """The local dispersion trend at each gene's mean: ``exp(predict(fit, log(mean)))``.

    Parameters
    ----------
    model : np.ndarray
        Packed model from :func:`local_dispersion_fit`.
    base_mean : np.ndarray
        Mean of normalised counts per gene.

    Returns
    -------
    np.ndarray
        Trend values; NaN where ``base_mean`` is not finite or ``<= 0``.
    """
    base_mean = np.asarray(base_mean, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        valid = np.isfinite(base_mean) & (base_mean > 0)
        log_mean = np.log(np.where(valid, base_mean, 1.0))
        values = np.exp(locfit_predict(model, log_mean))
    return np.where(valid, values, np.nan)
