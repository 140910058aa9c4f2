"""DESeq2's starting values from summed sums: baseMean, moments dispersion, the linear fit,
rough dispersions, and the IRLS starts (``estimateDispersionsGeneEst``'s preamble,
``momentsDispEstimate``, ``linearModelMu``, ``roughDispEstimate``).

:func:`moments` and :func:`rough_start` take sums over samples (what sites send);
:func:`start_from_cell_sums` computes the same from per-design-cell sums of normalised counts,
which is what the Cook's refit has for the replaced counts.
"""

from __future__ import annotations

import numpy as np

from fed_de.core import nb
from fed_de.core.dispersion import MIN_DISP


def moments(sum_norm, sum_norm_sq, sum_inv_sf, n, scale: float) -> dict:
    """baseMean, variance-based moments dispersion and mean of 1/sf (``xim``) from sums of
    normalised counts over raw size factors; ``scale`` rescales size factors (poscounts)."""
    mean = sum_norm * scale / n
    var = (sum_norm_sq * scale * scale - n * mean * mean) / (n - 1)
    xim = sum_inv_sf * scale / n
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = (var - xim * mean) / mean**2
    return {"base_mean": mean, "moments_disp": disp, "xim": xim}


def max_disp(n: float) -> float:
    """DESeq2's ``maxDisp = max(10, n)`` for ``n`` samples."""
    return max(10.0, float(n))


def rough_start(rough_sum, moments_disp, n: float, p: int, xtx_packed, xt_logy, xt_loglin):
    """``alpha_hat = clip(min(rough, moments), minDisp, maxDisp)``, maxDisp, and the two IRLS
    starts (log normalised counts; log of the linear-fit means)."""
    rough = np.maximum(rough_sum / (n - p), 0.0)
    top = max_disp(n)
    alpha_hat = np.clip(np.fmin(rough, moments_disp), MIN_DISP, top)
    xtx = nb.unpack(xtx_packed, p)
    beta0 = np.linalg.solve(xtx, xt_logy.T).T
    beta_alt = np.linalg.solve(xtx, xt_loglin.T).T
    return alpha_hat, top, beta0, beta_alt


def reduced_starts(xrtxr_packed, xr_logy, xr_loglin):
    """The LRT reduced model's two IRLS starts."""
    pr = int(round((np.sqrt(8 * xrtxr_packed.size + 1) - 1) / 2))
    xrtxr = nb.unpack(xrtxr_packed, pr)
    return (np.linalg.solve(xrtxr, xr_logy.T).T, np.linalg.solve(xrtxr, xr_loglin.T).T)


def start_from_cell_sums(s1, s2, lg, n_c, xim: float, max_disp: float, Xc: np.ndarray,
                         Xrc: np.ndarray | None) -> dict:
    """DESeq2's starting values from per-design-cell sums of normalised counts (genes x
    cells): ``s1`` sums, ``s2`` sums of squares, ``lg`` sums of log(x + 0.1); ``n_c`` samples
    per cell; ``Xc`` (``Xrc``) the design rows of the cells (full, reduced model).

    The linear fit is one value per cell, so every sum over samples is a sum over cells.
    """
    n_c = np.asarray(n_c, dtype=float)
    n, p = n_c.sum(), Xc.shape[1]
    mean = s1.sum(axis=1) / n
    var = (s2.sum(axis=1) - n * mean * mean) / (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        moments_disp = (var - xim * mean) / mean**2
    xtx = Xc.T @ (n_c[:, None] * Xc)
    beta_lin = np.linalg.solve(xtx, (s1 @ Xc).T).T
    lin = beta_lin @ Xc.T  # genes x cells
    mu = np.maximum(lin, 1.0)
    rough = ((s2 - 2 * mu * s1 + n_c * mu * mu - n_c * mu) / mu**2).sum(axis=1)
    rough = np.maximum(rough / (n - p), 0.0)
    alpha_hat = np.clip(np.fmin(rough, moments_disp), MIN_DISP, max_disp)
    out = {"base_mean": mean, "moments_disp": moments_disp, "beta_lin": beta_lin,
           "alpha_hat": alpha_hat,
           "beta_init": np.linalg.solve(xtx, (lg @ Xc).T).T,
           "beta_alt": np.linalg.solve(xtx, ((n_c * np.log(np.maximum(lin, 0.1))) @ Xc).T).T}
    if Xrc is not None:
        xrtxr = Xrc.T @ (n_c[:, None] * Xrc)
        out["beta_init_reduced"] = np.linalg.solve(xrtxr, (lg @ Xrc).T).T
        out["beta_alt_reduced"] = np.linalg.solve(
            xrtxr, ((n_c * np.log(np.maximum(lin, 0.1))) @ Xrc).T).T
    return out
