"""fed_de against the R DESeq2 1.38.3 references of tests/data/r_extra/real (issue 13).

What issue 13 asked for, asserted:

* independent filtering: fed_de's filter on R's own p-values gives R's threshold and padj
  (pasilla, marioni; alpha 0.05 and 0.1) -- the differing NA patterns come from the p-values;
* the generated 3-level study (demo3): condition and the contrast b3 vs b2 as R, except the
  genes whose two compared groups are all zero (R: LFC 0, stat 0, p-value 1);
* a continuous covariate (demo3_age, age not centred): age and condition as R;
* pasilla and marioni: the calls of R within the issue's 0.05 % (measured: none differs), and
  R's NA pattern exactly. The causes found by benchmarks/accuracy (the MAP search near the
  floor, the gene-wise path, the trend fallback) are fixed by the dispersion path of
  docs/dispersion_path.md, tested against R's own path in tests/test_disp_path.py.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import fed_de
from fed_de.compare import compare_results
from fed_de.core.testing import independent_filtering

REAL = Path(__file__).parent / "data" / "r_extra" / "real"
# genes set to 0 in every b2 and b3 sample by make_data.py (G00327 is zero there by chance)
ZEROED = [f"G{i:05d}" for i in range(101, 107)]
LFC_TOL = 2e-2  # PyDESeq2's tolerance against R, relative to |LFC| + 0.01 (absolute near 0)


def facts(study: str) -> dict:
    return json.loads((REAL / study / "facts.json").read_text())


def load(study: str) -> ad.AnnData:
    folder = REAL / study
    counts = pd.read_csv(folder / "counts.csv.gz", index_col=0)
    meta_file = folder / ("metadata.csv" if (folder / "metadata.csv").exists()
                          else "metadata.csv.gz")
    meta = pd.read_csv(meta_file, index_col=0).loc[counts.index].drop(columns="site",
                                                                      errors="ignore")
    obs = meta.astype({c: str for c in meta.columns if c != "age"})
    return ad.AnnData(X=counts.to_numpy(), obs=obs, var=pd.DataFrame(index=counts.columns))


def r_results(study: str, prefix: str) -> pd.DataFrame:
    r = pd.read_csv(REAL / study / "results.csv.gz", index_col=0)
    cols = {f"{prefix}_{c}": c for c in ("log2FoldChange", "lfcSE", "stat", "pvalue", "padj")}
    return r[["baseMean", *cols, "dispersion"]].rename(columns=cols)


def assert_lfc_close(ours: pd.Series, ref: pd.Series) -> None:
    err = (ours - ref).abs() / (ref.abs() + 1e-2)
    assert err.max() < LFC_TOL, (err.idxmax(), ours[err.idxmax()], ref[err.idxmax()])


@cache
def fit(study: str, design: str):
    return fed_de.deseq2({"one": load(study)}, design, alpha=0.05, min_cell_size=0)


# ---- independent filtering ---------------------------------------------------------------


@pytest.mark.parametrize("study", ["pasilla", "marioni"])
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_independent_filtering_on_r_pvalues_gives_r_threshold(study, alpha):
    pv = pd.read_csv(REAL / study / "pvalues.csv.gz", index_col=0)
    padj, info = independent_filtering(pv["baseMean"].to_numpy(), pv["pvalue"].to_numpy(),
                                       alpha)
    ref = facts(study)[f"alpha{alpha}"]
    assert info["filterThreshold"] == pytest.approx(ref["filterThreshold"], rel=1e-12)
    assert info["filterTheta"] == pytest.approx(ref["filterTheta"], rel=1e-12)
    assert int(np.isnan(padj).sum()) == ref["nPadjNA"]
    assert int(np.sum(padj < alpha)) == ref["nCalls"]
    table = pd.read_csv(REAL / study / f"ifilter_alpha{alpha}.csv.gz")
    np.testing.assert_array_equal(info["numRej"], table["numRej"].to_numpy())
    np.testing.assert_allclose(info["loFitY"], table["loFitY"].to_numpy(), rtol=1e-10)
    # padj of the genes in the committed subset, to rounding
    sub = pd.read_csv(REAL / study / "default.csv.gz", index_col=0)
    ours = pd.Series(padj, index=pv.index).loc[sub.index]
    if alpha == 0.05:
        np.testing.assert_allclose(ours.to_numpy(), sub["padj"].to_numpy(), rtol=1e-12)


# ---- generated 3-level study: contrasts between non-reference levels ----------------------


def test_demo3_condition_matches_r():
    ours = fit("demo3", "~ batch + condition").results("condition_B_vs_A")
    ref = r_results("demo3", "condition")
    rep = compare_results(ours.loc[ref.index], ref, alpha=0.05)
    assert rep["calls"]["n_differing"] == 0 and rep["calls"]["n_ref"] == 140
    assert rep["spearman_stat"] > 0.99999
    for col in ("baseMean", "lfcSE", "padj"):
        assert not rep["columns"][col]["na_only_ours"] and not rep["columns"][col]["na_only_ref"]
    assert_lfc_close(ours.loc[ref.index, "log2FoldChange"], ref["log2FoldChange"])
    np.testing.assert_allclose(ours.loc[ref.index, "lfcSE"], ref["lfcSE"], rtol=5e-3)


def test_demo3_b3_vs_b2_matches_r_outside_zero_groups():
    ours = fit("demo3", "~ batch + condition").results(("batch", "b3", "b2"))
    ref = r_results("demo3", "b3_vs_b2")
    zero_rule = ref.index[(ref["log2FoldChange"] == 0) & (ref["pvalue"] == 1)]
    assert set(ZEROED) <= set(zero_rule) and len(zero_rule) == len(ZEROED) + 1
    keep = ref.index.difference(zero_rule)
    rep = compare_results(ours.loc[keep], ref.loc[keep], alpha=0.05)
    assert rep["calls"]["n_differing"] == 0 and rep["calls"]["n_ref"] > 700
    assert rep["spearman_stat"] > 0.99999
    assert_lfc_close(ours.loc[keep, "log2FoldChange"], ref.loc[keep, "log2FoldChange"])
    # R's zero-group rule: the standard error is still the model's
    np.testing.assert_allclose(ours.loc[ZEROED, "lfcSE"], ref.loc[ZEROED, "lfcSE"], rtol=1e-3)


def test_demo3_zero_groups_as_r():
    ours = fit("demo3", "~ batch + condition").results(("batch", "b3", "b2")).loc[ZEROED]
    ref = r_results("demo3", "b3_vs_b2").loc[ZEROED]
    np.testing.assert_array_equal(ref["log2FoldChange"], 0.0)  # what R does
    np.testing.assert_array_equal(ours["log2FoldChange"], 0.0)
    np.testing.assert_array_equal(ours["stat"], 0.0)
    np.testing.assert_array_equal(ours["pvalue"], 1.0)


# ---- continuous covariate ---------------------------------------------------------------


@pytest.mark.parametrize("coef,prefix", [("age", "age"), ("condition_B_vs_A", "condition")])
def test_demo3_age_matches_r(coef, prefix):
    res = fit("demo3_age", "~ age + batch + condition")
    assert res.study.coef_names == facts("demo3_age")["coefficients"]
    ours = res.results(coef)
    ref = r_results("demo3_age", prefix)
    rep = compare_results(ours.loc[ref.index], ref, alpha=0.05)
    assert rep["calls"]["n_differing"] == 0 and rep["calls"]["n_ref"] > 50
    assert rep["spearman_stat"] > 0.99999
    assert_lfc_close(ours.loc[ref.index, "log2FoldChange"], ref["log2FoldChange"])
    np.testing.assert_allclose(ours.loc[ref.index, "lfcSE"], ref["lfcSE"], rtol=5e-3)
    # the true age effects (binomial thinning) are found: R's calls among them
    truth = pd.read_csv(REAL / "demo3_age" / "age_truth.csv", index_col=0)
    if coef == "age":
        hit = (ours.loc[truth.index, "padj"] < 0.05).mean()
        assert hit > 0.5


def test_demo3_age_dispersions_close_to_r():
    res = fit("demo3_age", "~ age + batch + condition")
    ref = r_results("demo3_age", "age")
    ours = res.dispersions.loc[ref.index, "final"]
    np.testing.assert_allclose(ours, ref["dispersion"], rtol=1e-2)


# ---- the real studies: the issue's target --------------------------------------------------


@pytest.mark.parametrize("study,design,contrast", [
    ("marioni", "~ run + tissue", ("tissue", "Liver", "Kidney")),
    ("pasilla", "~ type + condition", ("condition", "treated", "untreated")),
])
def test_real_study_calls_within_issue_target(study, design, contrast):
    ours = fit(study, design).results(contrast)
    calls = pd.read_csv(REAL / study / "calls.csv.gz", index_col=0)
    r_call = calls["default_call"] != 0
    our_call = (ours.loc[calls.index, "padj"] < 0.05).to_numpy()
    differing = int((r_call.to_numpy() != our_call).sum())
    assert differing <= 0.0005 * len(calls)
    r_na = calls["default_padjNA"].to_numpy() == 1
    np.testing.assert_array_equal(ours.loc[calls.index, "padj"].isna().to_numpy(), r_na)
