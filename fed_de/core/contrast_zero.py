"""DESeq2's rule for contrasts whose compared groups hold only zero counts.

``results(dds, contrast = ...)`` (DESeq2 1.38 ``R/results.R``, ``cleanContrast`` with
``contrastAllZeroCharacter`` / ``contrastAllZeroNumeric``) sets, for every gene that is not
all-zero but has only zero counts in the samples the contrast compares:
``log2FoldChange = 0``, ``stat = 0``, ``pvalue = 1`` (``lfcSE`` is kept). Then, in this order,
``results()`` recomputes ``stat``/``pvalue`` from ``log2FoldChange`` and ``lfcSE`` when an
``lfcThreshold`` or another ``altHypothesis`` is asked for, overwrites ``stat``/``pvalue`` with
the LRT's for ``test = "LRT"`` (only the fold change stays 0), sets p-values of Cook's
outliers to NA, and adjusts the p-values.

Which samples count:

* a character contrast ``c(factor, numerator, denominator)`` -- whether or not one of the two is
  the reference level -- compares the samples of those two levels;
* a numeric (or list) contrast with both positive and negative weights compares every sample
  whose design row is non-zero in a column the contrast uses; a contrast whose weights share a
  sign never triggers the rule;
* ``results(dds, name = ...)`` and ``results(dds)`` (no ``contrast``) do not apply it.

The aggregator needs, per gene, a total of non-negative counts over the samples of each level
(or each design cell): raw or normalised counts, summed directly (never obtained by
subtracting sums, whose rounding would hide an exact zero).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fed_de.core.testing import threshold_test

__all__ = [
    "character_contrast_all_zero",
    "numeric_contrast_all_zero",
    "apply_contrast_all_zero",
]


def _totals(name: str, a: np.ndarray) -> np.ndarray:
    arr = np.asarray(a, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (genes x groups), got shape {arr.shape}")
    if np.any(arr < 0) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must hold finite non-negative count totals")
    return arr


def character_contrast_all_zero(
    level_totals: np.ndarray, levels: Sequence[str], numerator: str, denominator: str
) -> np.ndarray:
    """Genes whose two compared levels hold only zero counts (``contrastAllZeroCharacter``).

    Parameters
    ----------
    level_totals : np.ndarray
        Shape ``(G, L)``: per gene, the sum of (raw or normalised) counts over the samples of
        each level of the contrast factor, every sample in exactly one level.
    levels : sequence of str
        The factor's levels, in the column order of ``level_totals``.
    numerator, denominator : str
        The contrast ``c(factor, numerator, denominator)``.

    Returns
    -------
    np.ndarray
        Boolean ``(G,)``: both groups all zero and the gene not all zero (R's ``!allZero``).

    Raises
    ------
    ValueError
        Unknown or equal levels, a shape mismatch, negative or non-finite totals.
    """
    totals = _totals("level_totals", level_totals)
    levels = list(levels)
    if totals.shape[1] != len(levels):
        raise ValueError(f"level_totals has {totals.shape[1]} columns for {len(levels)} levels")
    for lvl in (numerator, denominator):
        if lvl not in levels:
            raise ValueError(f"{lvl!r} is not one of the levels {levels}")
    if numerator == denominator:
        raise ValueError("numerator and denominator must be different levels")
    compared = totals[:, levels.index(numerator)] + totals[:, levels.index(denominator)]
    return (compared == 0) & (totals.sum(axis=1) > 0)


def numeric_contrast_all_zero(
    cell_totals: np.ndarray, cell_design: np.ndarray, contrast: np.ndarray
) -> np.ndarray:
    """Genes whose compared samples hold only zero counts, numeric contrast
    (``contrastAllZeroNumeric``).

    Parameters
    ----------
    cell_totals : np.ndarray
        Shape ``(G, C)``: per gene, the sum of counts over the samples of each design cell
        (samples sharing a design-matrix row).
    cell_design : np.ndarray
        Shape ``(C, p)``: the design-matrix row of each cell.
    contrast : np.ndarray
        Shape ``(p,)``: the numeric contrast.

    Returns
    -------
    np.ndarray
        Boolean ``(G,)``; all False when the contrast's non-zero weights share a sign.
    """
    totals = _totals("cell_totals", cell_totals)
    design = np.asarray(cell_design, dtype=float)
    c = np.asarray(contrast, dtype=float).ravel()
    if design.ndim != 2 or design.shape != (totals.shape[1], c.size):
        raise ValueError(
            f"cell_design must be (cells, coefficients) = ({totals.shape[1]}, {c.size}), "
            f"got {design.shape}")
    if np.all(c >= 0) or np.all(c <= 0):
        return np.zeros(totals.shape[0], dtype=bool)
    touched = (design @ (c != 0).astype(float)) != 0  # R: modelMatrix %*% contrastBinary != 0
    compared = totals[:, touched].sum(axis=1)
    return (compared == 0) & (totals.sum(axis=1) > 0)


def apply_contrast_all_zero(
    log2_fold_change: np.ndarray,
    lfc_se: np.ndarray,
    stat: np.ndarray,
    pvalue: np.ndarray,
    mask: np.ndarray,
    *,
    test: str = "Wald",
    lfc_threshold: float = 0.0,
    alt_hypothesis: str = "greaterAbs",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``results()``'s values for the genes of ``mask``, before Cook's filter and padj.

    ``log2FoldChange`` becomes 0. For a Wald test ``stat``/``pvalue`` become 0/1, or, with a
    threshold or another alternative, ``results()``'s recomputation from ``LFC = 0`` and the
    gene's ``lfcSE`` (e.g. ``lessAbs``: ``stat = T / SE``, ``pvalue = pnorm(T / SE,
    lower = FALSE)``). For the LRT they stay the LRT's. Other genes are unchanged.

    Parameters
    ----------
    log2_fold_change, lfc_se, stat, pvalue : np.ndarray
        The contrast's columns as computed (log2 scale), shape ``(G,)``.
    mask : np.ndarray
        From :func:`character_contrast_all_zero` or :func:`numeric_contrast_all_zero`.
    test : {"Wald", "LRT"}
    lfc_threshold, alt_hypothesis
        As in :func:`fed_de.core.testing.wald_test`.

    Returns
    -------
    log2_fold_change, stat, pvalue : np.ndarray
        New arrays (``lfcSE`` is not changed by the rule).
    """
    if test not in ("Wald", "LRT"):
        raise ValueError(f"test must be 'Wald' or 'LRT', not {test!r}")
    mask = np.asarray(mask, dtype=bool)
    lfc = np.where(mask, 0.0, np.asarray(log2_fold_change, dtype=float))
    stat = np.asarray(stat, dtype=float).copy()
    pvalue = np.asarray(pvalue, dtype=float).copy()
    if test == "Wald":
        stat[mask], pvalue[mask] = 0.0, 1.0
        if not (float(lfc_threshold) == 0 and alt_hypothesis == "greaterAbs"):
            se = np.asarray(lfc_se, dtype=float)[mask]
            stat[mask], pvalue[mask] = threshold_test(lfc[mask], se, lfc_threshold,
                                                      alt_hypothesis)
    return lfc, stat, pvalue
