"""Median-of-ratios size factors (DESeq2 ``ratio`` and ``poscounts``) from per-gene sums.

The geometric mean of a gene over all samples of all sites needs only the per-site sum of
log counts and the number of zeros; each sample's size factor is then a median over genes,
computed where the sample lives.
"""

from __future__ import annotations

import numpy as np

from fed_de.errors import NoCommonGeneError

SIZE_FACTOR_TYPES = ("ratio", "poscounts")


def log_count_sums(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene sum of log counts over positive counts, and number of zero counts.

    Parameters
    ----------
    counts
        Samples x genes raw counts.
    """
    counts = np.asarray(counts, dtype=np.float64)
    pos = counts > 0
    logs = np.log(counts, out=np.zeros_like(counts), where=pos)
    return logs.sum(axis=0), (~pos).sum(axis=0).astype(np.float64)


def log_geometric_means(
    sum_log: np.ndarray, n_zero: np.ndarray, n_samples: float, kind: str = "ratio"
) -> np.ndarray:
    """Per-gene log geometric means over all samples; ``-inf`` marks unusable genes.

    ``ratio`` (DESeq2's default) drops every gene with a zero in any sample; ``poscounts``
    (DESeq2's ``geoMeanNZ``) sums logs of positive counts and divides by all samples, dropping
    only all-zero genes.

    Raises
    ------
    NoCommonGeneError
        For ``ratio`` when every gene has a zero somewhere (points to ``poscounts``).
    """
    if kind not in SIZE_FACTOR_TYPES:
        raise ValueError(f"size factor type {kind!r} unknown; use one of {SIZE_FACTOR_TYPES}")
    sum_log = np.asarray(sum_log, dtype=np.float64)
    if kind == "ratio":
        out = np.where(n_zero == 0, sum_log / n_samples, -np.inf)
        if not np.isfinite(out).any():
            raise NoCommonGeneError(
                "every gene has at least one zero count in some sample of some site, so the "
                "median-of-ratios geometric means cannot be computed; use "
                "size_factors='poscounts' (DESeq2's estimator for sparse data)"
            )
        return out
    out = np.where(n_zero < n_samples, sum_log / n_samples, -np.inf)
    if not np.isfinite(out).any():
        raise NoCommonGeneError("every gene is zero in every sample: nothing to normalise on")
    return out


def median_ratio_factors(
    counts: np.ndarray, log_geo_means: np.ndarray, kind: str = "ratio"
) -> np.ndarray:
    """Each sample's (unnormalised for ``poscounts``) median-of-ratios size factor.

    Returns ``NaN`` for a sample with no usable gene (caller reports it).
    """
    counts = np.asarray(counts, dtype=np.float64)
    usable = np.isfinite(log_geo_means)
    sub = counts[:, usable]
    with np.errstate(divide="ignore"):
        ratios = np.log(sub) - log_geo_means[usable]
    if kind == "poscounts":
        ratios = np.where(sub > 0, ratios, np.nan)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.exp(np.nanmedian(ratios, axis=1))
    return np.exp(np.median(ratios, axis=1))
