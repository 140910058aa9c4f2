"""Dispersion trend, prior width and dispersion outliers, following R DESeq2 1.38.

Pure numpy maths (no I/O, no federation): every function takes and returns plain arrays or
floats, so a server can run it on aggregated per-gene statistics.

R sources ported (DESeq2 1.38.3, ``R/core.R`` and ``R/methods.R``; ``stats::glm.fit``):

* ``parametricDispersionFit``      -> :func:`fit_parametric_trend`
* ``glm(..., family=Gamma("identity"))`` -> :func:`gamma_identity_glm`
* ``estimateDispersionsFit``       -> :func:`fit_dispersion_trend`, :func:`fit_mean_trend`
* ``localDispersionFit`` (locfit)    -> :func:`fed_de.core.locfit.local_dispersion_fit`
* ``dispersionFunction<-`` setter  -> :func:`var_log_disp_ests`
* ``estimateDispersionsPriorVar``  -> :func:`disp_prior_variance`
* ``estimateDispersionsMAP`` (outlier rule) -> :func:`disp_outliers`

Conventions. Per-gene inputs are 1-D arrays aligned on genes. A gene whose ``base_mean`` is not
finite or is ``<= 0`` plays the role of R's ``allZero`` rows: it is left out of every fit and
gets a NaN trend value. Its ``disp_gene`` should be NaN, as in R.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.special import polygamma

from fed_de.core.locfit import local_dispersion_fit, local_trend_values

__all__ = [
    "TrendFitError",
    "gamma_identity_glm",
    "fit_parametric_trend",
    "fit_mean_trend",
    "trend_values",
    "var_log_disp_ests",
    "disp_prior_variance",
    "disp_outliers",
    "fit_dispersion_trend",
]

# R's mad() default consistency constant.
_MAD_CONSTANT = 1.4826
# DESeq2's hard-coded lower floor on the prior variance of log dispersions.
_MIN_PRIOR_VAR = 0.25


class TrendFitError(RuntimeError):
    """The parametric dispersion trend could not be fitted (R's ``try-error``).

    Raised where R's ``parametricDispersionFit`` or its ``glm`` call stops; callers are
    expected to catch it and fall back to another trend type.
    """


# ---------------------------------------------------------------------------------------------
# Gamma GLM with identity link (port of stats::glm.fit for this family)
# ---------------------------------------------------------------------------------------------


def _gamma_deviance(y: np.ndarray, mu: np.ndarray) -> float:
    # Gamma()$dev.resids with unit weights; y == 0 contributes log(1) (cannot occur: y > 0).
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(y == 0, 1.0, y / mu)
        return float(np.sum(-2.0 * (np.log(ratio) - (y - mu) / mu)))


def _valid_mu(mu: np.ndarray) -> bool:
    # Gamma()$validmu; the identity link's valideta is always TRUE.
    return bool(np.all(np.isfinite(mu)) and np.all(mu > 0))


def _weighted_ls(
    design: np.ndarray, z: np.ndarray, w: np.ndarray, tol: float
) -> tuple[np.ndarray, int]:
    """Least squares of ``z*w`` on ``design*w`` as R's ``Cdqrls`` (dqrdc2) sees it.

    dqrdc2 pivots a column to the end when the norm of its part orthogonal to the previous
    columns falls below ``tol`` times its original norm; its coefficient is then left at 0
    (Cdqrls zero-fills) and the rank drops.  The intercept column (``w > 0``) is never dropped.
    """
    a = design * w[:, None]
    b = z * w
    col_norm = np.linalg.norm(a, axis=0)
    if a.shape[0] >= 2:
        q, r = np.linalg.qr(a)
        if abs(r[1, 1]) >= tol * (col_norm[1] if col_norm[1] > 0 else 1.0):
            return np.linalg.solve(r, q.T @ b), 2
    # Rank 1: only the intercept column is used.
    c0 = float(a[:, 0] @ b) / float(a[:, 0] @ a[:, 0])
    return np.array([c0, 0.0]), 1


def gamma_identity_glm(
    x: np.ndarray,
    y: np.ndarray,
    start: np.ndarray,
    maxit: int = 25,
    epsilon: float = 1e-8,
) -> tuple[np.ndarray, bool]:
    """Fit ``glm(y ~ I(x), family=Gamma(link="identity"), start=start)`` as R does.

    A line-by-line port of ``stats::glm.fit`` (R 4.2) for this family: IRLS with working
    response ``y`` (identity link) and working weights ``1/mu^2``; step halving towards the
    previous coefficients while the deviance is not finite, then while some ``mu <= 0``;
    convergence when ``|dev - devold| / (|dev| + 0.1) < epsilon``.

    Parameters
    ----------
    x : np.ndarray
        Regressor, shape ``(n,)`` (DESeq2 passes ``1 / baseMean``).
    y : np.ndarray
        Response, shape ``(n,)``, all strictly positive (dispersion estimates).
    start : np.ndarray
        Starting coefficients ``[intercept, slope]`` (mandatory, as in DESeq2).
    maxit : int, default 25
        ``glm.control(maxit=)``.
    epsilon : float, default 1e-8
        ``glm.control(epsilon=)``.

    Returns
    -------
    coefficients : np.ndarray
        ``[intercept, slope]``. The slope is NaN when the design is rank deficient (constant
        ``x`` or a single observation), as R's ``NA``.
    converged : bool
        R's ``fit$converged``.

    Raises
    ------
    ValueError
        If the inputs have mismatched shapes, are not finite, or ``y`` has a value ``<= 0``
        (R: "non-positive values not allowed for the 'Gamma' family").
    TrendFitError
        Where ``glm.fit`` itself stops: no observations, invalid starting values, a step
        that cannot be corrected by halving, or non-finite coefficients at iteration 1.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    coef = np.asarray(start, dtype=float).ravel().copy()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({x.size} != {y.size})")
    if coef.size != 2:
        raise ValueError("start must hold 2 values: [intercept, slope]")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(np.isfinite(coef))):
        raise ValueError("x, y and start must be finite")
    if y.size == 0:
        raise TrendFitError("Gamma GLM: no observations to fit")
    if np.any(y <= 0):
        raise ValueError("non-positive values not allowed for the 'Gamma' family")

    design = np.column_stack([np.ones_like(x), x])
    # Cdqrls tolerance used by glm.fit.
    qr_tol = min(1e-7, epsilon / 1000.0)

    coefold = coef.copy()
    eta = design @ coef
    mu = eta
    if not _valid_mu(mu):
        raise TrendFitError("Gamma GLM: cannot find valid starting values")
    devold = _gamma_deviance(y, mu)
    conv = False
    rank = 2
    result: np.ndarray | None = None
    for iteration in range(1, maxit + 1):
        # Identity link: mu.eta = 1, so z = eta + (y - mu) = y and w = sqrt(1 / V(mu)) = 1/mu.
        z = eta + (y - mu)
        w = 1.0 / np.abs(mu)
        new, rank = _weighted_ls(design, z, w, qr_tol)
        if not np.all(np.isfinite(new)):
            if iteration == 1:
                # R would fail later on an undefined `coef`.
                raise TrendFitError("Gamma GLM: non-finite coefficients at iteration 1")
            conv = False
            break
        coef = new
        eta = design @ coef
        mu = eta
        dev = _gamma_deviance(y, mu)
        if not np.isfinite(dev):
            # "step size truncated due to divergence"
            ii = 1
            while not np.isfinite(dev):
                if ii > maxit:
                    raise TrendFitError("Gamma GLM: inner loop 1; cannot correct step size")
                ii += 1
                coef = (coef + coefold) / 2.0
                eta = design @ coef
                mu = eta
                dev = _gamma_deviance(y, mu)
        if not _valid_mu(mu):
            # "step size truncated: out of bounds"
            ii = 1
            while not _valid_mu(mu):
                if ii > maxit:
                    raise TrendFitError("Gamma GLM: inner loop 2; cannot correct step size")
                ii += 1
                coef = (coef + coefold) / 2.0
                eta = design @ coef
                mu = eta
            dev = _gamma_deviance(y, mu)
        if abs(dev - devold) / (abs(dev) + 0.1) < epsilon:
            conv = True
            result = coef.copy()
            break
        devold = dev
        result = coef.copy()
        coefold = coef.copy()
    assert result is not None  # maxit >= 1 and iteration-1 failures raised above
    if rank < 2:
        # glm.fit reports the aliased coefficient as NA.
        result[1] = np.nan
    return result, conv


# ---------------------------------------------------------------------------------------------
# Trend fits
# ---------------------------------------------------------------------------------------------


def _valid_mean(base_mean: np.ndarray) -> np.ndarray:
    # Stand-in for R's `!allZero`: baseMean is 0 exactly when all counts are 0.
    with np.errstate(invalid="ignore"):
        return np.isfinite(base_mean) & (base_mean > 0)


def fit_parametric_trend(
    base_mean: np.ndarray, disp_gene: np.ndarray, min_disp: float = 1e-8
) -> np.ndarray:
    """Fit DESeq2's parametric trend ``disp = asymptDisp + extraPois / mean``.

    Port of DESeq2's ``parametricDispersionFit`` applied to ``estimateDispersionsFit``'s
    ``useForFit`` genes: start at ``(0.1, 1)``; repeatedly keep the genes whose ratio
    ``disp / (a0 + a1/mean)`` lies in ``(1e-4, 15)`` and refit a Gamma-family identity-link GLM
    of ``disp`` on ``1/mean`` started at the current coefficients; stop when
    ``sum(log(new/old)^2) < 1e-6`` and the GLM converged.

    Only genes with finite ``disp_gene > 100 * min_disp`` (DESeq2's ``useForFit``) and finite
    ``base_mean > 0`` are used. PyDESeq2 0.5.4 omits the ``useForFit`` filter; R does not.

    Parameters
    ----------
    base_mean : np.ndarray
        Mean of normalised counts per gene, shape ``(G,)``.
    disp_gene : np.ndarray
        Gene-wise dispersion estimates (``dispGeneEst``), shape ``(G,)``.
    min_disp : float, default 1e-8
        DESeq2's ``minDisp``.

    Returns
    -------
    np.ndarray
        ``[asymptDisp, extraPois]``, both ``> 0``.

    Raises
    ------
    TrendFitError
        When R's fit would fail: no usable gene, a GLM error, a coefficient ``<= 0`` or
        undefined, or no convergence after 11 GLM fits.
    """
    base_mean = np.asarray(base_mean, dtype=float).ravel()
    disp_gene = np.asarray(disp_gene, dtype=float).ravel()
    if base_mean.shape != disp_gene.shape:
        raise ValueError("base_mean and disp_gene differ in length")
    with np.errstate(invalid="ignore"):
        use = _valid_mean(base_mean) & np.isfinite(disp_gene) & (disp_gene > 100 * min_disp)
    if not np.any(use):
        raise TrendFitError(
            "parametric dispersion fit failed: no gene has a dispersion estimate above "
            f"100 * minDisp = {100 * min_disp:g}"
        )
    means = base_mean[use]
    disps = disp_gene[use]

    coefs = np.array([0.1, 1.0])
    iteration = 0
    while True:
        ratio = disps / (coefs[0] + coefs[1] / means)
        good = (ratio > 1e-4) & (ratio < 15)
        try:
            new, converged = gamma_identity_glm(1.0 / means[good], disps[good], start=coefs)
        except (TrendFitError, ValueError) as exc:
            raise TrendFitError(f"parametric dispersion fit failed: {exc}") from exc
        old, coefs = coefs, new
        # NaN (rank deficiency) fails this test too, as R's all(c(TRUE, NA)) errors out.
        if not np.all(coefs > 0):
            raise TrendFitError(
                "parametric dispersion fit failed: non-positive or undefined coefficients "
                f"(asymptDisp={coefs[0]:.6g}, extraPois={coefs[1]:.6g})"
            )
        if np.sum(np.log(coefs / old) ** 2) < 1e-6 and converged:
            return coefs
        iteration += 1
        if iteration > 10:
            raise TrendFitError("dispersion fit did not converge (more than 10 iterations)")


def _r_mean(x: np.ndarray) -> float:
    # R's .Internal(mean): accurate sum / n, then one refinement pass on the residuals.
    n = x.size
    s = math.fsum(x) / n
    if math.isfinite(s):
        s += math.fsum(x - s) / n
    return s


def fit_mean_trend(disp_gene: np.ndarray, min_disp: float = 1e-8) -> float:
    """DESeq2 ``fitType="mean"``: trimmed mean of the gene-wise dispersions.

    ``mean(dispGeneEst[dispGeneEst > 10 * minDisp], na.rm=TRUE, trim=0.001)``, trimming as R's
    ``mean.default``: with ``n`` values, ``lo = floor(n * 0.001) + 1`` and the sorted values
    ``lo .. n + 1 - lo`` (1-based) are averaged.

    Parameters
    ----------
    disp_gene : np.ndarray
        Gene-wise dispersion estimates, NaN for genes R leaves out (all-zero genes).
    min_disp : float, default 1e-8
        DESeq2's ``minDisp``.

    Returns
    -------
    float
        The constant trend value.

    Raises
    ------
    ValueError
        If no gene passes the filter (R would return NaN).
    """
    d = np.asarray(disp_gene, dtype=float).ravel()
    with np.errstate(invalid="ignore"):
        x = d[d > 10 * min_disp]  # NaN compares False, like R's na.rm
    n = x.size
    if n == 0:
        raise ValueError(f"no gene-wise dispersion estimate above 10 * minDisp = {10 * min_disp:g}")
    lo = math.floor(n * 0.001)  # 0-based version of R's floor(n * trim) + 1
    x = np.sort(x)[lo : n - lo]
    return _r_mean(x)


def trend_values(
    coefs: np.ndarray, base_mean: np.ndarray, fit_type: str | None = None
) -> np.ndarray:
    """Evaluate a dispersion trend at each gene's mean.

    Parameters
    ----------
    coefs : np.ndarray
        ``[asymptDisp, extraPois]`` for a parametric trend, ``[meanDisp]`` for a mean trend,
        or a packed locfit model (:func:`fed_de.core.locfit.local_dispersion_fit`, at least
        13 values) for a local trend: what :func:`fit_dispersion_trend` returns as
        ``coefficients``.
    base_mean : np.ndarray
        Mean of normalised counts per gene.
    fit_type : {"parametric", "mean", "local"}, optional
        The trend type; by default inferred from the length of ``coefs``.

    Returns
    -------
    np.ndarray
        ``asymptDisp + extraPois / base_mean``, ``meanDisp``, or the local fit's
        ``exp(predict(fit, log(base_mean)))``; NaN where ``base_mean`` is not finite or
        ``<= 0`` (R's all-zero genes, whose ``dispFit`` is ``NA``).
    """
    coefs = np.atleast_1d(np.asarray(coefs, dtype=float))
    base_mean = np.asarray(base_mean, dtype=float)
    if fit_type is None:
        fit_type = {1: "mean", 2: "parametric"}.get(coefs.size, "local")
    valid = _valid_mean(base_mean)
    if fit_type == "parametric" and coefs.size == 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = coefs[0] + coefs[1] / base_mean
    elif fit_type == "mean" and coefs.size == 1:
        values = np.full(base_mean.shape, coefs[0])
    elif fit_type == "local":
        values = local_trend_values(coefs, base_mean)
    else:
        raise ValueError(
            "coefs must hold 2 (parametric) or 1 (mean) values, or a packed locfit model "
            f"(local); got {coefs.size} values for fit_type={fit_type!r}")
    return np.where(valid, values, np.nan)


# ---------------------------------------------------------------------------------------------
# Prior variance of log dispersions and outliers
# ---------------------------------------------------------------------------------------------


def _log_residuals_above_min(
    disp_gene: np.ndarray, disp_fit: np.ndarray, min_disp: float
) -> np.ndarray:
    # R: dispResiduals[dispGeneEst >= minDisp * 100], NA dropped.
    disp_gene = np.asarray(disp_gene, dtype=float).ravel()
    disp_fit = np.asarray(disp_fit, dtype=float).ravel()
    if disp_gene.shape != disp_fit.shape:
        raise ValueError("disp_gene and disp_fit differ in length")
    with np.errstate(invalid="ignore", divide="ignore"):
        above = disp_gene >= 100 * min_disp
        resid = np.log(disp_gene[above]) - np.log(disp_fit[above])
    return resid[~np.isnan(resid)]


def var_log_disp_ests(disp_gene: np.ndarray, disp_fit: np.ndarray, min_disp: float = 1e-8) -> float:
    """Robust variance of the log dispersion residuals (DESeq2's ``varLogDispEsts``).

    As in DESeq2's ``dispersionFunction<-`` setter: ``mad(log(dispGeneEst) - log(dispFit))^2``
    over the genes with ``dispGeneEst >= 100 * minDisp`` (NaN dropped), with R's
    ``mad`` constant 1.4826. R hard-codes ``minDisp = 1e-8`` there, whatever ``minDisp`` the
    trend fit used.

    Parameters
    ----------
    disp_gene : np.ndarray
        Gene-wise dispersion estimates.
    disp_fit : np.ndarray
        Trend values for the same genes.
    min_disp : float, default 1e-8
        Threshold parameter (keep the default to match R).

    Returns
    -------
    float
        ``varLogDispEsts``.

    Raises
    ------
    ValueError
        If no gene is at or above ``100 * min_disp`` (R leaves the value unset).
    """
    resid = _log_residuals_above_min(disp_gene, disp_fit, min_disp)
    if resid.size == 0:
        raise ValueError(
            "variance of dispersion residuals not estimable: no gene-wise estimate "
            f">= {100 * min_disp:g}"
        )
    mad = _MAD_CONSTANT * np.median(np.abs(resid - np.median(resid)))
    return float(mad**2)


def _r_hist_density(values: np.ndarray, breaks: np.ndarray) -> np.ndarray:
    """Densities of R's ``hist(values, breaks, plot=FALSE)`` on 2-D input, row by row.

    Right-closed bins with R's fuzz (``1e-7 * median(diff(breaks))``; the lowest break is
    moved down, the others up). ``values`` must already lie within the break range; NaN
    entries (filtered-out draws) are not counted.
    """
    h = np.diff(breaks)
    diddle = 1e-7 * np.median(h)
    fuzzy = breaks + np.r_[-diddle, np.full(breaks.size - 1, diddle)]
    nbins = breaks.size - 1
    finite = np.isfinite(values)
    # Interval (fuzzy[k], fuzzy[k+1]] -> bin k.
    idx = np.searchsorted(fuzzy, np.where(finite, values, breaks[0]), side="left") - 1
    idx = np.clip(idx, 0, nbins - 1)
    rows = np.broadcast_to(np.arange(values.shape[0])[:, None], values.shape)
    counts = np.zeros((values.shape[0], nbins))
    np.add.at(counts, (rows[finite], idx[finite]), 1.0)
    n = finite.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / (n * h[None, :])


def _loess_local_fit(
    x: np.ndarray, y: np.ndarray, centers: np.ndarray, span: float
) -> tuple[np.ndarray, np.ndarray]:
    """Value and slope at ``centers`` of loess' local quadratic fit (one predictor).

    As ``lowesf``/``ehg127``: the neighbourhood is the ``floor(n * span + 1e-5)`` nearest
    points, ``h`` the distance to the farthest of them, weights ``(1 - (d / h)^3)^3``
    (gaussian family, no robustness iterations), weighted least squares on
    ``[1, t, t^2]`` with ``t = (x - centre) / h``.
    """
    n = x.size
    q = min(max(int(math.floor(n * span + 1e-5)), 3), n)
    diff = x[None, :] - centers[:, None]
    dist = np.abs(diff)
    h = np.partition(dist, q - 1, axis=1)[:, q - 1 : q]
    h = np.where(h > 0, h, 1.0)
    u = dist / h
    w = np.where(u < 1, (1 - u**3) ** 3, 0.0)
    t = diff / h  # scaled so the 3x3 normal equations stay well conditioned
    basis = np.stack([np.ones_like(t), t, t * t], axis=-1)  # (m, n, 3)
    wb = basis * w[..., None]
    lhs = np.einsum("mni,mnj->mij", wb, basis)
    rhs = np.einsum("mni,n->mi", wb, y)
    coef = np.linalg.solve(lhs, rhs[..., None])[..., 0]
    return coef[:, 0], coef[:, 1] / h[:, 0]


def _loess_kd_vertices(x: np.ndarray, span: float, cell: float = 0.2) -> np.ndarray:
    """Sorted vertices of loess' k-d tree for one predictor (``ehg126`` + ``ehg124``).

    The bounding box is the data range widened by 0.5 % on each side; a cell holding more than
    ``floor(n * span * cell)`` points is split at its median point (``x[(l + u) // 2]``, moved
    off ties as R does), unless that value is one of the cell's bounds.
    """
    xs = np.sort(x)
    n = xs.size
    lo, hi = float(xs[0]), float(xs[-1])
    margin = 0.005 * max(hi - lo, 1e-10 * max(abs(lo), abs(hi)) + 1e-30)
    lo, hi = lo - margin, hi + margin
    fc = math.floor(n * (span * cell))
    verts = [lo, hi]
    stack = [(0, n - 1, lo, hi)]
    while stack:
        left, right, a, b = stack.pop()
        if right - left + 1 <= fc:
            continue
        m = (left + right) // 2
        # R's tie fix: try offsets 0, 1, -1, 2, -2, ... until x[m] != x[m + 1].
        offset = 0
        while left <= m + offset < right:
            if xs[m + offset] == xs[m + offset + 1]:
                offset = -offset + (1 if -offset >= 0 else 0)
            else:
                m += offset
                break
        split = float(xs[m])
        if split in (a, b):
            continue
        verts.append(split)
        stack.append((left, m, a, split))
        stack.append((m + 1, right, split, b))
    return np.sort(np.array(verts))


def _loess_smooth(
    x: np.ndarray,
    y: np.ndarray,
    x_new: np.ndarray,
    span: float = 0.2,
    surface: str = "interpolate",
) -> np.ndarray:
    """``predict(loess(y ~ x, span=span), x_new)`` for one predictor, R's defaults.

    Degree 2, gaussian family, ``surface="interpolate"``: local fits (value and slope) at the
    k-d tree vertices, then cubic Hermite interpolation inside each leaf cell; this matches R
    to rounding error. ``surface="direct"`` evaluates the local fit at each ``x_new``.
    ``x_new`` must lie within the range of ``x`` (R returns NA outside).
    """
    if surface == "direct":
        return _loess_local_fit(x, y, x_new, span)[0]
    verts = _loess_kd_vertices(x, span)
    value, slope = _loess_local_fit(x, y, verts, span)
    k = np.clip(np.searchsorted(verts, x_new, side="right") - 1, 0, verts.size - 2)
    width = verts[k + 1] - verts[k]
    s = (x_new - verts[k]) / width
    phi0 = (1 - s) ** 2 * (1 + 2 * s)
    phi1 = s**2 * (3 - 2 * s)
    psi0 = s * (1 - s) ** 2
    psi1 = -(s**2) * (1 - s)
    return phi0 * value[k] + phi1 * value[k + 1] + (psi0 * slope[k] + psi1 * slope[k + 1]) * width


# Histogram breaks of the small-df branch: -10, -9.5, ..., 10.
_KL_BREAKS = np.arange(-20, 21) / 2.0


def _kl_divs(obs: np.ndarray, rand: np.ndarray) -> np.ndarray:
    """DESeq2's KL divergence of the observed residual histogram to each simulated one.

    ``obs`` is 1-D, ``rand`` is 2-D (one simulated sample per row). Values outside the open
    break range are dropped first, as R does before ``hist``; ``small`` is the smallest
    positive density over both histograms, added to avoid ``log(0)``.
    """
    lo, hi = _KL_BREAKS[0], _KL_BREAKS[-1]
    obs = obs[(obs > lo) & (obs < hi)]
    if obs.size == 0:
        raise ValueError("no log dispersion residual within (-10, 10)")
    obs_density = _r_hist_density(obs[None, :], _KL_BREAKS)[0]
    with np.errstate(invalid="ignore"):
        rand = np.where((rand > lo) & (rand < hi), rand, np.nan)
    rand_density = _r_hist_density(rand, _KL_BREAKS)
    z = np.concatenate([np.broadcast_to(obs_density, rand_density.shape), rand_density], axis=1)
    small = np.min(np.where(z > 0, z, np.inf), axis=1, keepdims=True)
    return np.sum(
        obs_density * (np.log(obs_density + small) - np.log(rand_density + small)), axis=1
    )


def _argmin_smoothed(grid: np.ndarray, kl: np.ndarray) -> float:
    # loess-smooth the noisy KL curve and take which.min on a 1000-point grid.
    fine = np.linspace(0.0, 8.0, 1000)
    smoothed = _loess_smooth(grid, kl, fine, span=0.2)
    return float(fine[np.nanargmin(smoothed)])


def _kl_matched_variance(residuals: np.ndarray, df: int, seed: int) -> float:
    """Monte-Carlo branch of ``estimateDispersionsPriorVar`` for 1 <= m - p <= 3."""
    grid = np.linspace(0.0, 8.0, 200)
    n_draw = 10_000
    rng = np.random.default_rng(seed)
    kl = np.empty(grid.size)
    # Chunks bound the memory (200 x 1e4 draws); the draw order is fixed, so seed-deterministic.
    for start in range(0, grid.size, 50):
        sd = np.sqrt(grid[start : start + 50])[:, None]
        chi = rng.chisquare(df, size=(sd.shape[0], n_draw))
        noise = rng.standard_normal((sd.shape[0], n_draw)) * sd
        with np.errstate(divide="ignore"):
            rand = np.log(chi) + noise - math.log(df)
        kl[start : start + 50] = _kl_divs(residuals, rand)
    return _argmin_smoothed(grid, kl)


def disp_prior_variance(
    disp_gene: np.ndarray,
    disp_fit: np.ndarray,
    var_log_disp_ests: float,
    n_samples: int,
    n_coefs: int,
    min_disp: float = 1e-8,
    seed: int = 2,
) -> float:
    """Prior variance of log dispersions, as DESeq2's ``estimateDispersionsPriorVar``.

    With ``m`` samples and ``p`` design columns:

    * ``m - p > 3``: ``max(varLogDispEsts - trigamma((m - p) / 2), 0.25)``;
    * ``m == p``: ``varLogDispEsts``;
    * ``1 <= m - p <= 3``: the log residuals are matched, by Kullback-Leibler divergence of
      histograms (breaks ``-10, -9.5, ..., 10``), against simulated
      ``log(chi2_{m-p} / (m-p)) + N(0, v)`` for ``v`` on ``seq(0, 8, length=200)``
      (``1e4`` draws each); the KL curve is smoothed by ``loess(span=0.2)`` (ported, R's
      default k-d tree interpolation included) and minimised on a 1000-point grid; the result
      is ``max(argmin, 0.25)``.

    Deviation from R in the small-df branch only: R's RNG (``set.seed(2)``, ``rchisq``,
    ``rnorm``) cannot be reproduced, so numpy's ``default_rng(seed)`` draws are used. The
    result is deterministic for a given seed and agrees with R only up to Monte-Carlo noise
    (typically a few hundredths; both are draws from the same distribution).

    Parameters
    ----------
    disp_gene : np.ndarray
        Gene-wise dispersion estimates (NaN for all-zero genes).
    disp_fit : np.ndarray
        Trend values for the same genes.
    var_log_disp_ests : float
        Output of :func:`var_log_disp_ests`.
    n_samples : int
        Number of samples ``m`` (rows of the design matrix).
    n_coefs : int
        Number of design columns ``p``.
    min_disp : float, default 1e-8
        Threshold: residuals are taken over ``disp_gene >= 100 * min_disp``. DESeq2 calls this
        function with the default, whatever ``minDisp`` the user set.
    seed : int, default 2
        Seed of the Monte-Carlo branch (R uses ``set.seed(2)``).

    Returns
    -------
    float
        ``dispPriorVar``.

    Raises
    ------
    ValueError
        If ``n_samples < n_coefs``, or no gene-wise estimate is ``>= 100 * min_disp`` (R: "no
        data found which is greater than minDisp").
    """
    m, p = int(n_samples), int(n_coefs)
    if m < p:
        raise ValueError(f"n_samples ({m}) < n_coefs ({p}): no residual degrees of freedom")
    resid = _log_residuals_above_min(disp_gene, disp_fit, min_disp)
    if resid.size == 0:
        raise ValueError("no data found which is greater than minDisp")
    df = m - p
    if 1 <= df <= 3:
        # The log chi-square residual distribution is too skewed for the MAD at low df.
        return max(_kl_matched_variance(resid, df, seed), _MIN_PRIOR_VAR)
    if df > 3:
        # Subtract the expected sampling variance of log(chi2_df / df).
        expected = float(polygamma(1, df / 2.0))
        return max(float(var_log_disp_ests) - expected, _MIN_PRIOR_VAR)
    return float(var_log_disp_ests)


def disp_outliers(
    disp_gene: np.ndarray,
    disp_fit: np.ndarray,
    var_log_disp_ests: float,
    outlier_sd: float = 2.0,
) -> np.ndarray:
    """Flag dispersion outliers as ``estimateDispersionsMAP`` does.

    ``log(dispGeneEst) > log(dispFit) + outlierSD * sqrt(varLogDispEsts)``; NaN gives False.
    Flagged genes keep their gene-wise estimate instead of the MAP one.

    Parameters
    ----------
    disp_gene : np.ndarray
        Gene-wise dispersion estimates.
    disp_fit : np.ndarray
        Trend values for the same genes.
    var_log_disp_ests : float
        Output of :func:`var_log_disp_ests`.
    outlier_sd : float, default 2.0
        DESeq2's ``outlierSD``.

    Returns
    -------
    np.ndarray
        Boolean array, ``True`` for outliers.
    """
    disp_gene = np.asarray(disp_gene, dtype=float)
    disp_fit = np.asarray(disp_fit, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        flag = np.log(disp_gene) > np.log(disp_fit) + outlier_sd * math.sqrt(var_log_disp_ests)
    return np.asarray(flag, dtype=bool)  # NaN comparisons are already False


# ---------------------------------------------------------------------------------------------
# Top level
# ---------------------------------------------------------------------------------------------


def fit_dispersion_trend(
    base_mean: np.ndarray,
    disp_gene: np.ndarray,
    min_disp: float = 1e-8,
    fit_type: str = "parametric",
    *,
    n_samples: int | None = None,
    n_coefs: int | None = None,
    seed: int = 2,
) -> dict:
    """Fit the dispersion trend and its prior width, as DESeq2's ``estimateDispersionsFit``.

    As R 1.38: when ``fit_type="parametric"`` fails (:class:`TrendFitError`), the local
    (locfit) fit is substituted and a ``UserWarning`` carrying R's note is emitted; the
    returned ``fit_type`` is then ``"local"`` and ``requested_fit_type`` stays
    ``"parametric"``. A local fit that locfit itself cannot make raises, as R stops.

    Parameters
    ----------
    base_mean : np.ndarray
        Mean of normalised counts per gene; non-finite or ``<= 0`` marks all-zero genes.
    disp_gene : np.ndarray
        Gene-wise dispersion estimates (``dispGeneEst``).
    min_disp : float, default 1e-8
        DESeq2's ``minDisp`` for the trend fit. As in R, ``varLogDispEsts`` and
        ``dispPriorVar`` always use 1e-8.
    fit_type : {"parametric", "local", "mean"}, default "parametric"
        Trend type.
    n_samples, n_coefs : int, optional
        Design size ``m x p``, needed for ``disp_prior_var``; ``None`` leaves it ``None``.
    seed : int, default 2
        Seed of the small residual-df branch of :func:`disp_prior_variance`.

    Returns
    -------
    dict
        ``fit_type`` (the trend used: "parametric", "local" or "mean");
        ``requested_fit_type``; ``coefficients`` (``[asymptDisp, extraPois]``, ``[meanDisp]``,
        or the packed locfit model of :func:`fed_de.core.locfit.locfit_fit`; all three are
        evaluated again by :func:`trend_values`); ``disp_fit`` (trend per gene, NaN for
        all-zero genes); ``var_log_disp_ests``; ``disp_prior_var`` (float or ``None``).

    Raises
    ------
    ValueError
        Unknown ``fit_type``, or no gene-wise estimate above ``100 * min_disp`` (R stops:
        the usual curve fits cannot work).
    fed_de.core.locfit.LocfitError
        The local fit fails where R's ``locfit`` stops.
    """
    base_mean = np.asarray(base_mean, dtype=float).ravel()
    disp_gene = np.asarray(disp_gene, dtype=float).ravel()
    if base_mean.shape != disp_gene.shape:
        raise ValueError("base_mean and disp_gene differ in length")
    if fit_type not in ("parametric", "local", "mean"):
        raise ValueError(
            f"unsupported fit_type {fit_type!r}: use 'parametric', 'local' or 'mean'")
    requested = fit_type
    # R only ever sees the non-all-zero genes.
    disp_nz = np.where(_valid_mean(base_mean), disp_gene, np.nan)
    with np.errstate(invalid="ignore"):
        if not np.any(disp_nz > 100 * min_disp):
            raise ValueError(
                "all gene-wise dispersion estimates are within 2 orders of magnitude from "
                "the minimum value, so the trend cannot be fitted; use the gene-wise "
                "estimates as final dispersions"
            )

    coefs: np.ndarray
    if fit_type == "parametric":
        try:
            coefs = fit_parametric_trend(base_mean, disp_nz, min_disp=min_disp)
        except TrendFitError as exc:
            warnings.warn(
                f"{exc}; fitType='parametric', but the dispersion trend was not well captured "
                "by the function: y = a/x + b, and a local regression fit was automatically "
                "substituted (as DESeq2)",
                UserWarning,
                stacklevel=2,
            )
            fit_type = "local"
    if fit_type == "local":
        coefs = local_dispersion_fit(base_mean, disp_nz, min_disp=min_disp)
    elif fit_type == "mean":
        coefs = np.array([fit_mean_trend(disp_nz, min_disp=min_disp)])

    disp_fit = trend_values(coefs, base_mean, fit_type)
    var_log = var_log_disp_ests(disp_nz, disp_fit)
    prior_var = None
    if n_samples is not None and n_coefs is not None:
        prior_var = disp_prior_variance(disp_nz, disp_fit, var_log, n_samples, n_coefs, seed=seed)
    return {
        "fit_type": fit_type,
        "requested_fit_type": requested,
        "coefficients": coefs,
        "disp_fit": disp_fit,
        "var_log_disp_ests": var_log,
        "disp_prior_var": prior_var,
    }
