"""Posterior summaries of a shrunken log fold change under its Laplace (normal)
approximation: mean, SD, local false sign rate, s-value, P(|LFC| > t), credible intervals.

Pure numpy, one value per gene.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri

__all__ = ["svalue", "posterior_summaries"]

def svalue(lfsr: np.ndarray) -> np.ndarray:
    """s-values: running mean of the sorted local false sign rates (apeglm's ``svalue``).

    Ties keep their input order (R's ``rank(ties.method="first")``); NaN stays NaN.
    """
    lfsr = np.asarray(lfsr, dtype=float)
    out = np.full(lfsr.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(lfsr))
    order = ok[np.argsort(lfsr[ok], kind="stable")]
    out[order] = np.cumsum(lfsr[order]) / np.arange(1, order.size + 1)
    return out


def posterior_summaries(mode: np.ndarray, sd: np.ndarray, threshold: float = 0.0,
                        level: float = 0.9) -> dict:
    """Summaries of the Laplace posterior ``N(mode, sd^2)`` of each gene's log fold change.

    Units are those of the inputs (log2 if ``mode``, ``sd`` and ``threshold`` are log2).

    Returns
    -------
    dict of ``(genes,)`` arrays
        ``mean`` (the mode: the Laplace posterior is symmetric), ``sd``; ``lfsr``, the local
        false sign rate ``Phi(-|mode| / sd)`` (apeglm's ``fsr``); ``svalue``; ``p_gt``,
        P(|LFC| > threshold); ``fsos``, apeglm's "false sign or small" rate
        ``P(LFC < t)`` for a positive mode, ``P(LFC > -t)`` for a negative one (DESeq2's
        ``lfcThreshold`` s-values are :func:`svalue` of it); ``lower``, ``upper``: the central
        ``level`` credible interval.
    """
    mode = np.asarray(mode, dtype=float)
    sd = np.asarray(sd, dtype=float)
    t = float(threshold)
    with np.errstate(divide="ignore", invalid="ignore"):
        lfsr = ndtr(-np.abs(mode) / sd)
        p_gt = ndtr((-t - mode) / sd) + ndtr((mode - t) / sd)
        fsos = np.where(mode >= 0, ndtr((t - mode) / sd), ndtr((mode + t) / sd))
    q = ndtri(0.5 + level / 2.0)
    return {"mean": mode, "sd": sd, "lfsr": lfsr, "svalue": svalue(lfsr), "p_gt": p_gt,
            "fsos": fsos, "lower": mode - q * sd, "upper": mode + q * sd}
