"""Aggregator-side math of DESeq2's dispersion estimates (``estimateDispersions``).

The objective -- the Cox-Reid adjusted profile likelihood in log(alpha), with or without the
MAP's log-normal prior -- is formed from summed site sums (:func:`objective`: the Cox-Reid term
needs the *global* X'WX, so it is formed only here). The bulk pipeline follows DESeq2's line
search on it (:mod:`fed_de.core.disp_path`), the screen maximises it
(:mod:`fed_de.core.optim1d`, then :func:`genewise_estimates`). Both fit the trend and the prior
variance (:func:`fit_trend`) and keep the gene-wise value of dispersion outliers
(:func:`final_dispersions`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from fed_de.core import nb, optim1d, trend

MIN_DISP = 1e-8


@dataclass
class Prior:
    """Log-normal prior of the MAP: mean log(trend) per gene, common variance."""

    mean: np.ndarray
    var: float


@dataclass
class Trend:
    """The dispersion trend: its type (parametric, or the fallback actually used), its
    coefficients, the variance of log gene-wise estimates around it, the prior variance,
    and the warnings the fit gave."""

    fit_type: str
    coefficients: np.ndarray
    var_log_disp_ests: float
    prior_var: float
    warnings: list


def log_bounds(max_disp: float) -> tuple[float, float]:
    """Search range of log(alpha): DESeq2's ``log(minDisp/10)`` to ``log(maxDisp)``."""
    return float(np.log(MIN_DISP / 10)), float(np.log(max_disp))


def objective(ll, d1, d2, A, A1, A2, points: np.ndarray, p: int, prior: Prior | None = None):
    """Objective, gradient, curvature in log(alpha) at ``points`` from summed site sums:
    likelihood + Cox-Reid (+ the log-normal prior)."""
    cr, cr1, cr2 = nb.cox_reid(A, A1, A2, p)
    f, g, h = ll + cr, d1 + cr1, d2 + cr2
    if prior is None:
        return f, g, h
    return optim1d.add_log_normal_prior(f, g, h, points, prior.mean, prior.var)


def deseq2_stops_at_start(g0: np.ndarray, h0: np.ndarray, tol: float = 1e-6,
                          epsilon: float = 1e-4) -> np.ndarray:
    """Genes whose DESeq2 line search (``fitDisp``) ends at its first step.

    DESeq2 proposes ``a0 + kappa * dlp`` with ``kappa = 1``, accepts it under the Armijo rule
    (gain >= epsilon * kappa * dlp^2) and stops when the accepted step gains less than
    ``dispTol = 1e-6`` in log posterior; ``noIncrease`` then restores the rough estimate.
    This happens where the likelihood is flat at the start (typically a rough estimate at
    the 1e-8 floor for a nearly empty gene). The gain of that first step is predicted
    exactly enough by the second-order expansion at the start: the step is < 1e-3 there.
    """
    gain = g0 * g0 + 0.5 * h0 * g0 * g0
    return (gain >= epsilon * g0 * g0) & (gain < tol)


def genewise_estimates(x: np.ndarray, f: np.ndarray, start_f: np.ndarray,
                       start_g: np.ndarray, start_h: np.ndarray, alpha_init: np.ndarray,
                       skip: np.ndarray, max_disp: float) -> np.ndarray:
    """Gene-wise dispersions from a finished search's best point ``x`` (log alpha) and its
    objective ``f`` (DESeq2's ``noIncrease`` rule): the perturbation screen's rule."""
    alpha = np.exp(x)
    # DESeq2 keeps the rough estimate when the optimum does not beat the start by 1e-6
    no_increase = f < start_f + np.abs(start_f) / 1e6
    stops = deseq2_stops_at_start(start_g, start_h)
    alpha = np.where(no_increase | stops, alpha_init, np.minimum(alpha, max_disp))
    return np.where(skip, np.nan, np.clip(alpha, MIN_DISP, max_disp))


def fit_trend(base_mean: np.ndarray, disp_gene: np.ndarray, all_zero: np.ndarray,
              fit_type: str, n_samples: int, p: int) -> tuple[np.ndarray, Trend]:
    """The trend's value per gene (NaN for all-zero genes) and the fitted :class:`Trend`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = trend.fit_dispersion_trend(
            np.where(all_zero, np.nan, base_mean), disp_gene, MIN_DISP, fit_type,
            n_samples=n_samples, n_coefs=p,
        )
    disp_fit = np.where(all_zero, np.nan, fit["disp_fit"])
    return disp_fit, Trend(fit_type=fit["fit_type"],
                           coefficients=np.asarray(fit["coefficients"], dtype=float),
                           var_log_disp_ests=float(fit["var_log_disp_ests"]),
                           prior_var=float(fit["disp_prior_var"]),
                           warnings=[str(w.message) for w in caught])


def final_dispersions(disp_map: np.ndarray, disp_gene: np.ndarray, disp_fit: np.ndarray,
                      var_log_disp_ests: float, skip: np.ndarray, max_disp: float):
    """MAP dispersions within bounds, DESeq2's dispersion outliers, and the final values
    (outliers keep their gene-wise estimate): ``(disp_map, outlier, dispersion)``."""
    disp_map = np.clip(disp_map, MIN_DISP, max_disp)
    disp_map = np.where(skip, np.nan, disp_map)
    outlier = trend.disp_outliers(disp_gene, disp_fit, var_log_disp_ests)
    return disp_map, outlier, np.where(outlier, disp_gene, disp_map)
