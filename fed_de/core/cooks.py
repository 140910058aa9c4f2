"""Cook's distances and outlier replacement as DESeq2 computes them (pure functions).

DESeq2 (``calculateCooksDistance``, ``robustMethodOfMomentsDisp``, ``trimmedCellVariance``,
``replaceOutliers``):

- a robust dispersion per gene from trimmed cell means and trimmed squared errors of the
  normalised counts, over the design cells with at least 3 samples (trim 1/3, 1/4 or 1/8 and
  scale 2.04, 1.86 or 1.51 for cells of <= 3, <= 23 or more samples), the largest over cells,
  ``alpha = max((v - m) / m^2, 0.04)`` with ``m`` the mean over all samples;
- Cook's distance of sample i: ``(y - mu)^2 / (mu + alpha mu^2) / p * h / (1 - h)^2``, with
  ``mu`` the fitted means (not floored) and ``h`` the hat diagonals of the final IRLS weights;
- outliers: Cook's distance above the 0.99 quantile of F(p, m - p);
- replacement counts: ``as.integer(trimmed mean(0.2) of normalised counts * size factor)``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import fdtri  # F.ppf without importing scipy.stats (~0.4 s)

from fed_de.core import nb

ROBUST_MIN_DISP = 0.04  # DESeq2: minDisp of the robust dispersion (not 1e-8)
REPLACE_TRIM = 0.2
MIN_REPLICATES_COOKS = 3  # cells whose samples count for maxCooks and the robust dispersion
MIN_REPLICATES_REPLACE = 7  # DESeq2's minReplicatesForReplace


def cell_trim(n: int) -> tuple[float, float]:
    """Trim fraction and variance scale of ``trimmedCellVariance`` for a cell of ``n``."""
    if n <= 3.5:
        return 1.0 / 3.0, 2.04
    if n <= 23.5:
        return 0.25, 1.86
    return 0.125, 1.51


def cooks_cutoff(p: int, m: int) -> float:
    """DESeq2's default cutoff: the 0.99 quantile of F(p, m - p)."""
    return float(fdtri(p, m - p, 0.99))


def robust_dispersion(cell_var: np.ndarray, base_mean: np.ndarray) -> np.ndarray:
    """``max((v - m) / m^2, 0.04)`` with ``v`` the largest scaled trimmed cell variance.

    ``cell_var`` is genes x counted cells; NaN (a value not found) propagates.
    """
    v = cell_var.max(axis=1) if cell_var.shape[1] else np.full(cell_var.shape[0], np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = (v - base_mean) / base_mean**2
    return np.where(np.isnan(alpha), np.nan, np.maximum(alpha, ROBUST_MIN_DISP))


def hat_diagonals(X: np.ndarray, w: np.ndarray, xtwx: np.ndarray) -> np.ndarray:
    """Hat diagonals ``w_i x_i' (X'WX + ridge)^-1 x_i`` (samples x genes).

    ``xtwx`` is the *global* packed X'WX per gene at the final coefficients (genes x T).
    """
    p = X.shape[1]
    A = nb.unpack(xtwx, p) + np.diag(nb.ridge(p))
    with np.errstate(invalid="ignore"):
        inv = np.linalg.inv(np.where(np.isfinite(A).all(axis=(1, 2))[:, None, None], A,
                                     np.eye(p)))
    return w * np.einsum("ip,gpq,iq->ig", X, inv, X)


def cooks_distance(y: np.ndarray, mu: np.ndarray, alpha_robust: np.ndarray, h: np.ndarray,
                   p: int) -> np.ndarray:
    """Cook's distances (samples x genes)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pearson_sq = (y - mu) ** 2 / (mu + alpha_robust[None, :] * mu**2)
        return pearson_sq / p * h / (1.0 - h) ** 2


def replacement_counts(trimmed_mean: np.ndarray, size_factors: np.ndarray) -> np.ndarray:
    """R's ``as.integer(trimmed mean * size factor)`` (truncation), samples x genes."""
    return np.trunc(size_factors[:, None] * trimmed_mean[None, :])
