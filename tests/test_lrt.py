"""Likelihood-ratio test against R DESeq2 1.38.3 (references made by
tests/data/r_extra/lrt/make_lrt_refs.R; the suite never runs R).

Measured (3 sites, max relative error over the 10 genes):

| case | LFC | lfcSE | stat | pvalue | padj |
|---|---|---|---|---|---|
| ~group+condition vs ~group | 2.0e-4 | 1.4e-4 | 2.7e-4 | 1.0e-3 | 1.0e-3 |
| ~group+condition vs ~condition | 2.0e-4 | 1.4e-4 | 2.7e-4 | 9.5e-4 | 9.5e-4 |
| ~group+condition+measurement vs ~group+condition | 3.9e-4 | 4.5e-5 | 8.4e-5 | 1.7e-3 | 1.7e-3 |
| ~group+condition+measurement vs ~group+measurement | 3.9e-4 | 4.5e-5 | 8.8e-5 | 6.1e-4 | 6.1e-4 |
| ~group+condition vs ~1 (R 1.38.3 shared reference) | 2.0e-4 | 1.4e-4 | 3.5e-3 | 1.9e-2 | 5.0e-3 |
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import fed_de
from fed_de.errors import DesignError
from tests.conftest import DATA, read_site_layout, split_sites

CASES = {
    "multi_factor": ("pydeseq2_synthetic", "~ group + condition", "~ group", None),
    "multi_factor_condition": ("pydeseq2_synthetic", "~ group + condition", "~ condition",
                               None),
    "continuous": ("pydeseq2_continuous", "~ group + condition + measurement",
                   "~ group + condition", None),
    "continuous_measurement": ("pydeseq2_continuous", "~ group + condition + measurement",
                               "~ group + measurement", None),
}
COLS = ["baseMean", "log2FoldChange", "lfcSE", "stat", "pvalue", "padj"]


def _fit(dataset, design, reduced, n_sites=3, **kw):
    counts, meta = read_site_layout(dataset)
    return fed_de.deseq2(split_sites(counts, meta, n_sites, seed=1), design, test="LRT",
                         reduced=reduced, min_cell_size=0, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_lrt_matches_r(case):
    dataset, design, reduced, contrast = CASES[case]
    ref = pd.read_csv(DATA / f"r_extra/lrt/{case}_lrt.csv", index_col=0)
    res = _fit(dataset, design, reduced).results(contrast)
    assert res.pvalue.isna().equals(ref.pvalue.isna())
    rel = ((res[COLS] - ref[COLS]) / ref[COLS]).abs().max()
    # PyDESeq2's own tolerance against R is 2e-2; fed_de is an order of magnitude tighter
    assert rel["log2FoldChange"] < 2e-3 and rel["lfcSE"] < 2e-3
    assert rel["stat"] < 2e-3 and rel["pvalue"] < 5e-3 and rel["padj"] < 5e-3


def test_lrt_against_intercept_only_reference():
    ref = pd.read_csv(DATA / "r138/synth_multi/results_lrt.csv.gz", index_col=0)
    res = _fit("pydeseq2_synthetic", "~ group + condition", "~ 1").results()
    rel = ((res[COLS] - ref[COLS]) / ref[COLS]).abs().max()
    assert (rel < 2e-2).all(), rel


def test_lrt_costs_no_extra_round_and_federation_changes_nothing():
    wald = fed_de.deseq2(*_args(), min_cell_size=0)
    lrt = _fit("pydeseq2_synthetic", "~ group + condition", "~ group")
    assert lrt.facts["sequential_steps"] == wald.facts["sequential_steps"]
    one = _fit("pydeseq2_synthetic", "~ group + condition", "~ group", n_sites=1)
    a, b = lrt.results(), one.results()
    np.testing.assert_allclose(a[COLS].to_numpy(), b[COLS].to_numpy(), rtol=1e-6)


def _args():
    counts, meta = read_site_layout("pydeseq2_synthetic")
    return split_sites(counts, meta, 3, seed=1), "~ group + condition"


def test_reduced_design_must_be_nested():
    with pytest.raises(DesignError, match="nested"):
        _fit("pydeseq2_synthetic", "~ condition", "~ group")
    with pytest.raises(ValueError, match="needs a reduced design"):
        fed_de.deseq2(*_args(), test="LRT", min_cell_size=0)
