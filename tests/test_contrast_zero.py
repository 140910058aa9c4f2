"""The all-zero contrast rule (fed_de.core.contrast_zero) against R DESeq2 1.38.3 results().

Reference (``data/r_extra/trendfilt/contrast_zero.csv.gz``, ``make_refs.R``): 400 simulated
genes, 12 samples, ``~ batch + cond`` with ``cond`` in A (reference), B, C; genes 11-40 have
only zeros in B and C, genes 41-60 only zeros in A and B, genes 1-4 are all zero. R's
``results()`` for the contrasts C vs B (two non-reference levels; also with lfcThreshold = 1,
greaterAbs and lessAbs, and as the numeric contrast c(0, 0, -1, 1)), B vs A (reference level),
``name = "cond_B_vs_A"`` and the LRT (reduced ~ batch); and ``getContrast`` (the contrast
before the rule). Starting from R's contrast estimates, the rule, the threshold tests and
independent filtering must give R's columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fed_de.core.contrast_zero import (
    apply_contrast_all_zero,
    character_contrast_all_zero,
    numeric_contrast_all_zero,
)
from fed_de.core.testing import adjust_pvalues, threshold_test

REF = Path(__file__).parent / "data" / "r_extra" / "trendfilt"
LEVELS = ["A", "B", "C"]
SAMPLES = [f"V{i}" for i in range(1, 13)]


@pytest.fixture(scope="module")
def ref():
    table = pd.read_csv(REF / "contrast_zero.csv.gz", float_precision="round_trip")
    samples = pd.read_csv(REF / "contrast_zero_samples.csv", index_col=0)
    counts = table[SAMPLES].to_numpy(float)  # genes x samples
    cond = samples["cond"].to_numpy()
    level_totals = np.column_stack([counts[:, cond == lv].sum(axis=1) for lv in LEVELS])
    return table, samples, counts, level_totals


def _genes(first: int, last: int, n: int = 400) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[first - 1 : last] = True
    return mask


def _check(table, prefix, lfc, stat, pvalue, alpha=0.1):
    r = {c: table[f"{prefix}{c}"].to_numpy() for c in ("log2FoldChange", "stat", "pvalue",
                                                          "padj")}
    np.testing.assert_allclose(lfc, r["log2FoldChange"], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(stat, r["stat"], rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(pvalue, r["pvalue"], rtol=1e-9, atol=1e-300)
    padj, _ = adjust_pvalues(table["baseMean"].to_numpy(), pvalue, alpha)
    np.testing.assert_allclose(padj, r["padj"], rtol=1e-9, atol=1e-300)


def test_masks_match_the_simulated_zero_groups(ref):
    table, _, _, totals = ref
    all_zero = _genes(1, 4)
    assert np.all(totals[all_zero] == 0) and np.all(table["baseMean"][all_zero] == 0)
    np.testing.assert_array_equal(character_contrast_all_zero(totals, LEVELS, "C", "B"),
                                  _genes(11, 40))
    np.testing.assert_array_equal(character_contrast_all_zero(totals, LEVELS, "B", "C"),
                                  _genes(11, 40))
    # a contrast with the reference level applies the rule too
    np.testing.assert_array_equal(character_contrast_all_zero(totals, LEVELS, "B", "A"),
                                  _genes(41, 60))
    assert not character_contrast_all_zero(totals, LEVELS, "C", "A").any()


@pytest.mark.parametrize(("prefix", "threshold", "alt"), [
    ("CB_", 0.0, "greaterAbs"), ("CB_gA1_", 1.0, "greaterAbs"), ("CB_lA1_", 1.0, "lessAbs")])
def test_non_reference_contrast_matches_r(ref, prefix, threshold, alt):
    table, _, _, totals = ref
    lfc = table["raw_0_0_-1_1_log2FoldChange"].to_numpy()
    se = table["raw_0_0_-1_1_lfcSE"].to_numpy()
    # before the rule the fold changes of the zero genes are arbitrary (not 0)
    mask = character_contrast_all_zero(totals, LEVELS, "C", "B")
    assert np.all(np.isfinite(lfc[mask])) and np.all(lfc[mask] != 0)
    stat, pvalue = threshold_test(lfc, se, threshold, alt)
    lfc2, stat2, p2 = apply_contrast_all_zero(lfc, se, stat, pvalue, mask,
                                              lfc_threshold=threshold, alt_hypothesis=alt)
    np.testing.assert_array_equal(table[f"{prefix}lfcSE"], se)  # lfcSE is kept
    _check(table, prefix, lfc2, stat2, p2)
    if threshold == 0:
        assert np.all(lfc2[mask] == 0) and np.all(stat2[mask] == 0) and np.all(p2[mask] == 1)
    # without the rule R's table is not reproduced
    assert not np.allclose(lfc[mask], table[f"{prefix}log2FoldChange"][mask])


def test_reference_level_contrast_matches_r(ref):
    table, _, _, totals = ref
    lfc = table["raw_0_0_1_0_log2FoldChange"].to_numpy()
    se = table["raw_0_0_1_0_lfcSE"].to_numpy()
    mask = character_contrast_all_zero(totals, LEVELS, "B", "A")
    stat, pvalue = threshold_test(lfc, se)
    lfc2, stat2, p2 = apply_contrast_all_zero(lfc, se, stat, pvalue, mask)
    _check(table, "BA_", lfc2, stat2, p2)
    assert np.all(table["BA_log2FoldChange"][mask] == 0)


def test_name_argument_does_not_apply_the_rule(ref):
    # results(dds, name = "cond_B_vs_A") is the same comparison as contrast B vs A, but R
    # leaves the zero genes' estimates as fitted
    table, _, _, totals = ref
    mask = character_contrast_all_zero(totals, LEVELS, "B", "A")
    np.testing.assert_allclose(table["nameBA_log2FoldChange"],
                               table["raw_0_0_1_0_log2FoldChange"], rtol=1e-14)
    assert np.all(table["nameBA_log2FoldChange"][mask] != 0)
    assert np.all(table["nameBA_pvalue"][mask] < 1)


def test_numeric_contrast_matches_r(ref):
    table, samples, counts, _ = ref
    cond, batch = samples["cond"].to_numpy(), samples["batch"].to_numpy()
    design = np.column_stack([np.ones(12), batch == "y", cond == "B", cond == "C"]).astype(float)
    cells, cell_of = np.unique(design, axis=0, return_inverse=True)
    cell_totals = np.column_stack([counts[:, cell_of.ravel() == k].sum(axis=1)
                                   for k in range(len(cells))])
    contrast = np.array([0.0, 0.0, -1.0, 1.0])
    mask = numeric_contrast_all_zero(cell_totals, cells, contrast)
    np.testing.assert_array_equal(mask, _genes(11, 40))
    lfc = table["raw_0_0_-1_1_log2FoldChange"].to_numpy()
    se = table["raw_0_0_-1_1_lfcSE"].to_numpy()
    stat, pvalue = threshold_test(lfc, se)
    _check(table, "numCB_", *apply_contrast_all_zero(lfc, se, stat, pvalue, mask))
    # weights of one sign never trigger the rule (R: contrast c(0, 0, 1, 0) is B vs A, yet
    # as a numeric contrast it is not cleaned)
    assert not numeric_contrast_all_zero(cell_totals, cells, np.array([0.0, 0, 1, 0])).any()


def test_lrt_keeps_its_statistic(ref):
    table, _, _, totals = ref
    mask = character_contrast_all_zero(totals, LEVELS, "C", "B")
    lfc = table["raw_0_0_-1_1_log2FoldChange"].to_numpy()
    se = table["raw_0_0_-1_1_lfcSE"].to_numpy()
    stat, pvalue = table["lrt_stat"].to_numpy(), table["lrt_pvalue"].to_numpy()
    lfc2, stat2, p2 = apply_contrast_all_zero(lfc, se, stat, pvalue, mask, test="LRT")
    _check(table, "lrtCB_", lfc2, stat2, p2)
    assert np.all(lfc2[mask] == 0) and np.all(stat2[mask] > 0)


def test_input_checks():
    totals = np.array([[0.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="not one of the levels"):
        character_contrast_all_zero(totals, LEVELS, "D", "A")
    with pytest.raises(ValueError, match="different levels"):
        character_contrast_all_zero(totals, LEVELS, "A", "A")
    with pytest.raises(ValueError, match="columns"):
        character_contrast_all_zero(totals[:, :2], LEVELS, "B", "A")
    with pytest.raises(ValueError, match="non-negative"):
        character_contrast_all_zero(-totals, LEVELS, "B", "A")
    with pytest.raises(ValueError, match="cell_design"):
        numeric_contrast_all_zero(totals, np.eye(2), np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="test"):
        apply_contrast_all_zero(*np.zeros((4, 1)), np.ones(1, bool), test="Score")
