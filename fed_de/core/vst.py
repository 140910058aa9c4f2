"""DESeq2's variance stabilising transformation, computed by each site for its own samples.

``varianceStabilizingTransformation(blind=FALSE)`` is a per-value function of a normalised
count ``q = count / size factor`` once the dispersion trend is known: a closed form for the
parametric trend ``a + e / mu`` and for the mean trend ``a``, a numerical integral for the local
trend. The trend is global (fitted at the aggregator from gene-level statistics); each site
applies it with its own size factors, and the transformed values never leave the site.

A port kept for exact agreement with R: DESeq2's ``getVarianceStabilizedData``
(``R/vst.R``); for the local trend also R's ``splinefun(method="fmm")``
(``src/library/stats/src/splines.c``) and ``quantile(type=7)``.
"""

from __future__ import annotations

import numpy as np

from fed_de.core.testing import r_quantile7

__all__ = [
    "vst_parametric",
    "vst_mean",
    "vst",
    "local_grid",
    "fmm_spline",
    "spline_eval",
    "local_vst_spline",
    "vst_local",
]

LN2 = float(np.log(2.0))


def vst_parametric(q: np.ndarray, asympt_disp: float, extra_pois: float) -> np.ndarray:
    """VST for the parametric trend ``alpha(mu) = asymptDisp + extraPois / mu`` (log2 scale).

    ``log2((1 + e + 2 a q + 2 sqrt(a q (1 + e + a q))) / (4 a))`` of normalised counts ``q``.
    """
    a, e = float(asympt_disp), float(extra_pois)
    q = np.asarray(q, dtype=float)
    return np.log((1.0 + e + 2.0 * a * q + 2.0 * np.sqrt(a * q * (1.0 + e + a * q)))
                  / (4.0 * a)) / LN2


def vst_mean(q: np.ndarray, mean_disp: float) -> np.ndarray:
    """VST for the mean trend (one dispersion ``alpha``):
    ``(2 asinh(sqrt(alpha q)) - log(alpha) - log(4)) / log(2)``."""
    a = float(mean_disp)
    q = np.asarray(q, dtype=float)
    return (2.0 * np.arcsinh(np.sqrt(a * q)) - np.log(a) - np.log(4.0)) / LN2


def vst(counts: np.ndarray, size_factors: np.ndarray, trend_type: str,
        coefficients) -> np.ndarray:
    """A site's VST values (samples x genes) from its counts and size factors.

    Parameters
    ----------
    counts
        samples x genes.
    size_factors
        The site's size factors (or normalisation factors, samples x genes).
    trend_type, coefficients
        ``"parametric"`` with ``[asymptDisp, extraPois]`` or ``"mean"`` with ``[meanDisp]``
        (as ``fed_de`` stores the trend); for ``"local"`` use :func:`vst_local`.
    """
    sf = np.asarray(size_factors, dtype=float)
    q = np.asarray(counts, dtype=float) / (sf[:, None] if sf.ndim == 1 else sf)
    c = np.atleast_1d(np.asarray(coefficients, dtype=float))
    if trend_type == "parametric":
        return vst_parametric(q, c[0], c[1])
    if trend_type == "mean":
        return vst_mean(q, c[0])
    raise ValueError(f"trend type {trend_type!r}: use 'parametric' or 'mean' (or vst_local)")


# ----------------------------------------------------------------------------------------------
# local trend: numerical integration, as DESeq2
# ----------------------------------------------------------------------------------------------
def local_grid(max_ncount: float, n: int = 1000) -> np.ndarray:
    """DESeq2's integration grid ``sinh(seq(0, asinh(max), length.out=n))[-1]``.

    ``max_ncount`` is the largest normalised count of the study: one sample's value, so a
    federation needs it from a secure maximum (or a declared bound, which moves the grid and
    the result slightly away from R's).
    """
    return np.sinh(np.linspace(0.0, np.arcsinh(float(max_ncount)), n))[1:]


def fmm_spline(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """R's ``spline_coef`` for ``method="fmm"`` (Forsythe, Malcolm and Moler's end conditions:
    cubics through the first and last four points). Returns ``(x, y, b, c, d)``: on
    ``[x_i, x_{i+1}]`` the spline is ``y_i + t (b_i + t (c_i + t d_i))``, ``t = u - x_i``."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    n = x.size
    b, c, d = np.zeros(n), np.zeros(n), np.zeros(n)
    if n < 3:
        b[:] = (y[1] - y[0]) / (x[1] - x[0])
        return x, y, b, c, d
    d[:-1] = np.diff(x)
    c[1] = (y[1] - y[0]) / d[0]
    for i in range(1, n - 1):
        b[i] = 2.0 * (d[i - 1] + d[i])
        c[i + 1] = (y[i + 1] - y[i]) / d[i]
        c[i] = c[i + 1] - c[i]
    b[0], b[-1] = -d[0], -d[n - 2]
    c[0] = c[-1] = 0.0
    if n > 3:
        c0 = c[2] / (x[3] - x[1]) - c[1] / (x[2] - x[0])
        cn = c[n - 2] / (x[n - 1] - x[n - 3]) - c[n - 3] / (x[n - 2] - x[n - 4])
        c[0] = c0 * d[0] * d[0] / (x[3] - x[0])
        c[-1] = -cn * d[n - 2] * d[n - 2] / (x[n - 1] - x[n - 4])
    for i in range(1, n):  # Gaussian elimination
        t = d[i - 1] / b[i - 1]
        b[i] = b[i] - t * d[i - 1]
        c[i] = c[i] - t * c[i - 1]
    c[-1] = c[-1] / b[-1]
    for i in range(n - 2, -1, -1):  # back substitution
        c[i] = (c[i] - d[i] * c[i + 1]) / b[i]
    b[-1] = (y[-1] - y[-2]) / d[n - 2] + d[n - 2] * (c[n - 2] + 2.0 * c[-1])
    for i in range(n - 1):
        b[i] = (y[i + 1] - y[i]) / d[i] - d[i] * (c[i + 1] + 2.0 * c[i])
        d[i] = (c[i + 1] - c[i]) / d[i]
        c[i] = 3.0 * c[i]
    c[-1] = 3.0 * c[-1]
    d[-1] = d[n - 2]
    return x, y, b, c, d


def spline_eval(spline: tuple[np.ndarray, ...], u: np.ndarray) -> np.ndarray:
    """Evaluate an :func:`fmm_spline` at ``u`` (R's ``spline_eval``: outside the knots the end
    intervals' cubics extrapolate)."""
    x, y, b, c, d = spline
    u = np.asarray(u, dtype=float)
    i = np.clip(np.searchsorted(x, u, side="right") - 1, 0, x.size - 1)
    dx = u - x[i]
    return y[i] + dx * (b[i] + dx * (c[i] + dx * d[i]))


def local_vst_spline(trend_on_grid: np.ndarray, grid: np.ndarray, xim: float,
                     base_mean: np.ndarray) -> dict:
    """Aggregator side of the local-trend VST: the spline of the integral and its affine
    rescaling, which each site then applies (:func:`vst_local`).

    Parameters
    ----------
    trend_on_grid
        The dispersion trend at :func:`local_grid`'s points.
    grid
        :func:`local_grid`.
    xim
        ``mean(1 / size factors)`` over all samples (a sum over sites divided by n).
    base_mean
        Per-gene mean of normalised counts, every gene (all-zero genes included, as
        ``rowMeans``): its 95 % and 99.9 % quantiles anchor the scale.
    """
    xg = np.asarray(grid, dtype=float)
    integrand = 1.0 / np.sqrt(np.asarray(trend_on_grid, dtype=float) * xg**2 + xim * xg)
    knots = np.arcsinh((xg[1:] + xg[:-1]) / 2.0)
    values = np.cumsum((xg[1:] - xg[:-1]) * (integrand[1:] + integrand[:-1]) / 2.0)
    spline = fmm_spline(knots, values)
    h1, h2 = r_quantile7(np.asarray(base_mean, dtype=float), np.array([0.95, 0.999]))
    s1, s2 = spline_eval(spline, np.arcsinh([h1, h2]))
    eta = (np.log2(h2) - np.log2(h1)) / (s2 - s1)
    xi = np.log2(h1) - eta * s1
    return {"spline": spline, "eta": float(eta), "xi": float(xi)}


def vst_local(counts: np.ndarray, size_factors: np.ndarray, local: dict) -> np.ndarray:
    """A site's VST values for the local trend: ``eta * spline(asinh(q)) + xi``."""
    sf = np.asarray(size_factors, dtype=float)
    q = np.asarray(counts, dtype=float) / (sf[:, None] if sf.ndim == 1 else sf)
    return local["eta"] * spline_eval(local["spline"], np.arcsinh(q)) + local["xi"]
