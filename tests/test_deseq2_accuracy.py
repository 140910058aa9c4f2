"""Federated DESeq2 against R DESeq2 and pooled PyDESeq2 (accuracy).

Part 1 compares ``fed_de.deseq2`` run over several sites with the R reference outputs bundled in
``tests/data``: R DESeq2 1.34.0 (PyDESeq2's own test references, ``r134/``) and DESeq2 1.38.3
(``r138/``, ``r_extra/deseq2/``). The tolerance is PyDESeq2's test tolerance against the same
files: maximum relative error < 0.02, identical NaN patterns. Size factors must agree to 1e-8.
Both R and fed_de apply Cook's filtering and refit (on these datasets they flag and refit no
gene; outlier cases: ``tests/test_cooks.py``).

Measured maximum relative errors, federated (3 sites) vs R 1.38.3. ``large_counts`` has only 8
samples and the disclosure rule needs ``p + 1 = 3`` samples per site, so it runs on 2 sites
(3 + 5 samples). Against the R 1.34 files the LFC/lfcSE/stat/pvalue/padj errors are the same.

=============  ========  ======  ======  ======  ======  ======  ======  ======  ======  ======
case           genewise  trend   MAP     final   LFC     lfcSE   stat    pvalue  padj    coef
=============  ========  ======  ======  ======  ======  ======  ======  ======  ======  ======
single_factor  9.4e-5    4.1e-5  6.5e-4  6.5e-4  2.1e-4  2.8e-4  3.0e-4  2.4e-3  3.9e-4  2.1e-4
multi_factor   2.2e-4    7.3e-5  3.2e-4  3.2e-4  2.0e-4  1.4e-4  1.9e-4  1.1e-3  1.1e-3  2.0e-4
continuous     4.4e-5    1.9e-5  1.0e-4  1.0e-4  3.9e-4  4.5e-5  3.7e-4  1.1e-3  1.1e-3  3.9e-4
wide           5.0e-4    1.5e-4  3.6e-4  5.0e-4  2.9e-3  2.3e-4  2.9e-3  2.0e-3  2.0e-3  2.9e-3
large_counts   1.3e-5    1.3e-5  1.6e-4  1.6e-4  4.7e-6  5.8e-5  6.3e-5  4.6e-3  4.6e-3  4.7e-6
=============  ========  ======  ======  ======  ======  ======  ======  ======  ======  ======

baseMean agrees to <= 4e-15 and size factors to <= 5e-15 everywhere; trend coefficients
(asymptDisp, extraPois) to <= 1.8e-4; dispersion-outlier flags are identical. Single factor
with other ``results()`` options (R 1.34 files): lfcThreshold 0.5 and altHypothesis
greater / greaterAbs / less / lessAbs: LFC 2.1e-4, lfcSE 2.8e-4, stat 1.5e-4 / 1.5e-4 /
5.7e-5 / 2.8e-4 (R's statistics that are exactly 0 are exactly 0 here too), pvalue 9.1e-5 /
9.1e-5 / 2.8e-5 / 1.9e-3, padj 4e-16 / 0 / 1e-14 / 1.9e-3; no independent filtering: as the
default run; ``fit_type="mean"``: LFC 4.6e-4, lfcSE 7.7e-5, stat 3.9e-4, pvalue 3.4e-4,
padj 3.2e-4. Wide data, gene14 / gene24 (low counts, means floored at 0.5; R's plain IRLS
needs 7 and 22 iterations): coefficients within 6e-4 of R; fed_de flags gene24
``betaConv = FALSE`` (R: TRUE), a documented deviation (docs/deviations.md, IRLS).

Barely expressed genes (``r_extra/deseq2/lowcount``): DESeq2 keeps gene-wise dispersion 1e-8
for 4 of 5 genes with 1-12 reads (its line search starts at the rough estimate clipped to
minDisp, where the profile likelihood is flat, and stops at its first step). fed_de
reproduces that decision from the exact derivatives at the start point
(``deseq2_stops_at_start``), so those genes stay out of the trend as in R.

Part 2 compares with pooled PyDESeq2 0.5.4 (defaults; its Cook's refit replaces nothing
here). Demo study: 120 samples x 1,500 genes, seed 0, 3 hospitals, ``~ batch + condition``;
relative errors over genes that are not all-zero, median / max:

=======================  =====  ===============  ===============  ===============  =========
data                     genes  LFC              lfcSE            pvalue           calls
=======================  =====  ===============  ===============  ===============  =========
synthetic ~condition     10     3.2e-7 / 2.0e-4  2.1e-7 / 2.8e-7  1.0e-6 / 2.1e-5  0 differ
synthetic ~group+cond.   10     6.3e-6 / 1.9e-4  1.2e-7 / 4.1e-7  2.5e-5 / 3.3e-4  0 differ
demo, all genes          1500   1.7e-5 / 7.3e-2  1.3e-4 / 1.0e-1  1.2e-4 / 2.8e-1  0 differ
demo, genewise >= 1e-6   1491   1.2e-5 / 7.2e-2  7.6e-5 / 1.2e-1  7.9e-5 / 2.8e-1  0 differ
demo, baseMean >= 5      1401   1.2e-5 / 1.5e-2  5.0e-5 / 3.2e-2  5.1e-5 / 1.0e-1  0 differ
=======================  =====  ===============  ===============  ===============  =========

(157, 157 and 147 genes with padj < 0.1 in the three demo sets.) Where they differ, PyDESeq2
is the one away from R: in the full demo study PyDESeq2 and R leave the same 9 barely
expressed genes at gene-wise dispersion 1e-8 and fed_de leaves none (the lowcount defect
above), which moves fed_de's trend by ~1e-3 relative from R's; on the baseMean >= 5 genes
fed_de vs R 1.38.3 (run outside the tests) is: genewise median 4.4e-6 / max 3.9e-4, trend
1.3e-6 / 3.4e-6, MAP 2.7e-5 / 1.7e-3, LFC 6.5e-6 / 1.5e-2 (largest on LFCs ~2e-3), lfcSE
1.2e-5 / 7.0e-4, no differing call, while PyDESeq2's L-BFGS-B estimates are off R by up to
8.9 % (gene-wise) and 6.2 % (MAP, G01096), and its trend by ~1e-3. The large maxima of
pvalue are on p-values ~1e-156. fed_de vs R on the full demo study: LFC median 1.2e-5, no
differing call; 4 genes keep ``betaConv = FALSE`` (R converges in 9-27 iterations).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import cache

import numpy as np
import pandas as pd
import pytest

import fed_de
from tests.conftest import DATA, read_site_layout, split_sites

TOL = 0.02  # PyDESeq2's tolerance against the same R files
RESULT_COLUMNS = ["baseMean", "log2FoldChange", "lfcSE", "stat", "pvalue", "padj"]
N_SITES = 3


@dataclass(frozen=True)
class Case:
    data: str
    design: str
    contrast: tuple | None
    r138: str
    n_sites: int = N_SITES


CASES = {
    "single_factor": Case("pydeseq2_synthetic", "~condition", ("condition", "B", "A"),
                          "synth_single"),
    "multi_factor": Case("pydeseq2_synthetic", "~group + condition", ("condition", "B", "A"),
                         "synth_multi"),
    "continuous": Case("pydeseq2_continuous", "~group + condition + measurement", None,
                       "synth_continuous"),
    "wide": Case("pydeseq2_wide", "~group + condition", ("condition", "B", "A"), "synth_wide"),
    # 8 samples: 3 sites would leave a site with fewer than p + 1 = 3 samples (refused)
    "large_counts": Case("pydeseq2_large_counts", "~condition", ("condition", "B", "A"),
                         "synth_large_counts", n_sites=2),
}



# ---- helpers -------------------------------------------------------------------------------


def sites_of(case: Case, seed: int = 0) -> dict:
    counts, meta = read_site_layout(case.data)
    return split_sites(counts, meta, case.n_sites, seed=seed)


@cache
def fit(name: str, fit_type: str = "parametric"):
    case = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fed_de.deseq2(sites_of(case), case.design,
                             contrasts=[case.contrast] if case.contrast else None,
                             fit_type=fit_type, min_cell_size=0)


def max_rel_err(ours, ref, *, zero_atol: float = 0.0) -> float:
    """Max relative error over entries finite in both; NaN patterns must be equal.

    Reference entries that are exactly 0 (R's thresholded statistics) must be ~0 here
    (``|ours| <= zero_atol``) and are left out of the relative error.
    """
    ours = np.asarray(ours, dtype=float)
    ref = np.asarray(ref, dtype=float)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref), err_msg="NaN patterns differ")
    zero = ref == 0
    assert np.all(np.abs(ours[zero]) <= zero_atol), (ours[zero], ref[zero])
    ok = np.isfinite(ref) & np.isfinite(ours) & ~zero
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(ours[ok] - ref[ok]) / np.abs(ref[ok])))


def read_r134(case: str, name: str) -> pd.DataFrame:
    return pd.read_csv(DATA / "r134" / case / name, index_col=0)


def read_r138(case: str, name: str) -> pd.DataFrame:
    return pd.read_csv(DATA / "r138" / CASES[case].r138 / name, index_col=0)


def assert_results_close(ours: pd.DataFrame, ref: pd.DataFrame, tol: float = TOL,
                         genes=None, columns=RESULT_COLUMNS) -> dict:
    genes = ref.index if genes is None else genes
    errors = {}
    for col in columns:
        if col in ref.columns:
            errors[col] = max_rel_err(ours.loc[genes, col], ref.loc[genes, col],
                                      zero_atol=1e-12)
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return errors


# ---- 1. against R DESeq2 ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_size_factors_match_r(name):
    case = CASES[name]
    res = fed_de.size_factors(sites_of(case), case.design, min_cell_size=0)
    ours = pd.concat(res.size_factors.values())
    r134 = read_r134(name, "r_test_size_factors.csv").iloc[:, 0]
    r138 = read_r138(name, "size_factors.csv.gz").iloc[:, 0]
    assert set(ours.index) == set(r134.index) == set(r138.index)
    np.testing.assert_allclose(ours.loc[r134.index], r134.to_numpy(), rtol=1e-8)
    np.testing.assert_allclose(ours.loc[r138.index], r138.to_numpy(), rtol=1e-8)


@pytest.mark.parametrize("name", list(CASES))
def test_dispersions_match_r(name):
    disp = fit(name).dispersions
    r134 = read_r134(name, "r_test_dispersions.csv").iloc[:, 0]
    assert max_rel_err(disp.loc[r134.index, "final"], r134) < TOL
    r138 = read_r138(name, "dispersions.csv.gz")
    np.testing.assert_allclose(disp.loc[r138.index, "baseMean"], r138["baseMean"], rtol=1e-10)
    for ours, theirs in [("genewise", "dispGeneEst"), ("trend", "dispFit"), ("MAP", "dispMAP"),
                         ("final", "dispersion")]:
        err = max_rel_err(disp.loc[r138.index, ours], r138[theirs])
        assert err < TOL, (ours, err)
    np.testing.assert_array_equal(disp.loc[r138.index, "outlier"], r138["dispOutlier"])
    np.testing.assert_array_equal(disp.loc[r138.index, "allZero"], r138["allZero"])


@pytest.mark.parametrize("name", list(CASES))
def test_dispersion_trend_matches_r(name):
    trend = fit(name).trend
    ref = json.loads((DATA / "r138" / CASES[name].r138 / "dispersion_trend.json").read_text())
    assert trend["fit_type"] == ref["fitType"]
    coef = ref["coefficients"]
    ours = np.asarray(trend["coefficients"], dtype=float)
    theirs = np.array([coef["asymptDisp"], coef["extraPois"]])
    assert max_rel_err(ours, theirs) < TOL


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("version", ["r134", "r138"])
def test_results_match_r(name, version):
    ref = (read_r134(name, "r_test_res.csv") if version == "r134"
           else read_r138(name, "results.csv.gz"))
    # R's tables were written with alpha 0.05 (independent filtering removes no gene here)
    ours = fit(name).results(alpha=0.05)
    assert_results_close(ours, ref)
    # the padj < alpha calls agree too
    np.testing.assert_array_equal(ours.loc[ref.index, "padj"] < 0.05, ref["padj"] < 0.05)


@pytest.mark.parametrize("name", list(CASES))
def test_coefficients_match_r(name):
    ref = read_r138(name, "coefficients.csv.gz")
    ours = fit(name).coefficients
    assert list(ours.columns) == list(ref.columns)
    assert max_rel_err(ours.loc[ref.index].to_numpy(), ref.to_numpy()) < TOL


def test_wide_reaches_deseq2_irls_fixed_point():
    """gene14 / gene24 of the wide data: low counts, means floored at 0.5, and R's plain IRLS
    needs 7 and 22 iterations (no optim refit). fed_de must land on the same fixed point."""
    r_beta = pd.read_csv(DATA / "r_extra/deseq2/wide_beta.csv.gz", index_col=0)
    assert r_beta["betaConv"].all()
    assert r_beta.loc[["gene14", "gene24"], "betaIter"].tolist() == [7, 22]
    genes = ["gene14", "gene24"]
    ours = fit("wide").coefficients.loc[genes]
    ref = read_r138("wide", "coefficients.csv.gz").loc[genes]
    assert max_rel_err(ours.to_numpy(), ref.to_numpy()) < 2e-3
    res = fit("wide").results(alpha=0.05).loc[genes]
    assert max_rel_err(res["log2FoldChange"], r_beta.loc[genes, "log2FoldChange"]) < 2e-3


@pytest.mark.parametrize("alt", ["greater", "greaterAbs", "less", "lessAbs"])
def test_lfc_threshold_alt_hypotheses_match_r(alt):
    ref = read_r134("single_factor", f"r_test_res_{alt}.csv")
    ours = fit("single_factor").results(lfc_threshold=0.5, alt_hypothesis=alt)
    assert_results_close(ours, ref)


def test_no_independent_filtering_matches_r():
    ref = read_r134("single_factor", "r_test_res_no_independent_filtering.csv")
    ours = fit("single_factor").results(independent_filtering=False)
    assert_results_close(ours, ref)


def test_mean_fit_type_matches_r():
    ref = read_r134("single_factor", "r_test_res_mean_curve.csv")
    result = fit("single_factor", fit_type="mean")
    assert result.trend["fit_type"] == "mean"
    assert_results_close(result.results(), ref)


# barely expressed genes: R 1.38.3 reference written by r_extra/deseq2/make_refs.R
LOWCOUNT = DATA / "r_extra/deseq2/lowcount"
LOW_GENES = ["low1", "low2", "low3", "low4", "low5"]


@cache
def lowcount_fit():
    counts, meta = (pd.read_csv(LOWCOUNT / f, index_col=0) for f in ("counts.csv",
                                                                       "metadata.csv"))
    sites = split_sites(counts, meta.loc[counts.index], N_SITES, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fed_de.deseq2(sites, "~condition", contrasts=[("condition", "B", "A")],
                             min_cell_size=0)


def test_lowcount_genewise_of_expressed_genes_match_r():
    """Gene-wise estimates of ordinary genes do not depend on the other genes: they agree."""
    ref = pd.read_csv(LOWCOUNT / "results.csv.gz", index_col=0)
    disp = lowcount_fit().dispersions
    genes = ref.index.difference(LOW_GENES)
    np.testing.assert_allclose(disp.loc[genes, "baseMean"], ref.loc[genes, "baseMean"],
                               rtol=1e-10)
    assert max_rel_err(disp.loc[genes, "genewise"], ref.loc[genes, "dispGeneEst"]) < TOL
    # R keeps 1e-8 for four of the five barely expressed genes
    assert (ref.loc[LOW_GENES, "dispGeneEst"] == 1e-8).sum() == 4


def test_lowcount_matches_r():
    ref = pd.read_csv(LOWCOUNT / "results.csv.gz", index_col=0)
    result = lowcount_fit()
    disp = result.dispersions
    assert max_rel_err(disp.loc[ref.index, "genewise"], ref["dispGeneEst"]) < TOL
    assert max_rel_err(disp.loc[ref.index, "trend"], ref["dispFit"]) < TOL
    np.testing.assert_array_equal(disp.loc[ref.index, "outlier"], ref["dispOutlier"])
    assert_results_close(result.results(), ref)


# ---- 2. against pooled PyDESeq2 0.5.4 --------------------------------------------------------

MIN_DISP_FOR_TREND = 1e-6  # 100 * minDisp


def pydeseq2_pooled(counts: pd.DataFrame, meta: pd.DataFrame, design: str,
                    contrast: tuple[str, str, str]):
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(counts=counts, metadata=meta, design=design, quiet=True,
                           inference=DefaultInference(n_cpus=2))
        dds.deseq2()
        stats = DeseqStats(dds, contrast=list(contrast), quiet=True,
                           inference=DefaultInference(n_cpus=2))
        stats.summary()
    return dds, stats.results_df


def compare_with_pydeseq2(ours: pd.DataFrame, ref: pd.DataFrame) -> dict:
    """Relative errors (median and max over genes not all-zero) and differing calls."""
    assert list(ours.index) == list(ref.index)
    out = {}
    for col in RESULT_COLUMNS:
        a, b = ours[col].to_numpy(float), ref[col].to_numpy(float)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=col)
        ok = np.isfinite(b) & (b != 0)
        err = np.abs(a[ok] - b[ok]) / np.abs(b[ok])
        out[col] = (float(np.median(err)), float(np.max(err)))
    out["calls_differ"] = list(ours.index[(ours["padj"] < 0.1) != (ref["padj"] < 0.1)])
    return out


@pytest.mark.parametrize("design", ["~condition", "~group + condition"])
def test_synthetic_matches_pooled_pydeseq2(design):
    counts, meta = read_site_layout("pydeseq2_synthetic")
    sites = split_sites(counts, meta, N_SITES, seed=1)
    order = [s for a in sites.values() for s in a.obs_names]
    dds, ref = pydeseq2_pooled(counts.loc[order], meta.loc[order], design,
                               ("condition", "B", "A"))
    result = fed_de.deseq2(sites, design, contrasts=[("condition", "B", "A")], min_cell_size=0)
    # the condition: no gene-wise dispersion below 100 * minDisp, in either tool
    assert (dds.var["genewise_dispersions"] >= MIN_DISP_FOR_TREND).all()
    assert (result.dispersions["genewise"] >= MIN_DISP_FOR_TREND).all()
    cmp = compare_with_pydeseq2(result.results(), ref.loc[result.genes])
    assert cmp["log2FoldChange"][0] <= 1e-4
    assert cmp["calls_differ"] == []
    assert cmp["baseMean"][1] <= 1e-12
    for col in RESULT_COLUMNS:
        assert cmp[col][1] < TOL, (col, cmp[col])


def demo_counts():
    """Demo study (120 samples x 1,500 genes over 3 hospitals), pooled counts and metadata."""
    from fed_de.demo_data import make_demo_study

    study = make_demo_study(n_samples=120, n_genes=1500, seed=0)
    pooled = study.pooled()
    counts = pd.DataFrame(np.asarray(pooled.X, dtype=np.int64), index=pooled.obs_names,
                          columns=pooled.var_names)
    return study, counts, pooled.obs[["condition", "batch"]].astype(str)


def expressed_genes(counts: pd.DataFrame, size_factors: np.ndarray) -> list[str]:
    """Genes with a mean normalised count >= 5."""
    return list(counts.columns[counts.div(size_factors, axis=0).mean() >= 5])


@pytest.fixture(scope="module")
def demo():
    """The demo study and pooled PyDESeq2 on it."""
    study, counts, meta = demo_counts()
    dds, ref = pydeseq2_pooled(counts, meta, "~batch + condition", ("condition", "B", "A"))
    return study, counts, meta, dds, ref


def run_demo(study, genes: list[str]):
    import anndata as ad

    sites = {name: ad.AnnData(pd.DataFrame(np.asarray(a.X, dtype=float), index=a.obs_names,
                                           columns=a.var_names)[genes], obs=a.obs.copy())
             for name, a in study.sites.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fed_de.deseq2(sites, study.design, contrasts=[("condition", "B", "A")],
                             levels=study.levels, min_cell_size=0)


def test_demo_all_genes_close_to_pooled_pydeseq2(demo):
    """The full demo study: medians within the issue's bound (differences are reported)."""
    study, counts, meta, dds, ref = demo
    result = run_demo(study, list(counts.columns))
    cmp = compare_with_pydeseq2(result.results(), ref)
    assert cmp["baseMean"][1] <= 1e-12
    assert cmp["log2FoldChange"][0] <= 1e-4
    assert cmp["lfcSE"][0] <= 1e-3
    assert cmp["pvalue"][0] <= 1e-3
    # PyDESeq2 (and R) leave barely expressed genes at minDisp, fed_de does not
    assert (dds.var["genewise_dispersions"] < MIN_DISP_FOR_TREND).sum() > 0


@pytest.fixture(scope="module")
def demo_without_tiny_dispersions(demo):
    """Demo genes whose PyDESeq2 gene-wise dispersion is >= 1e-6, refitted by both tools."""
    study, counts, meta, dds, _ = demo
    keep = list(counts.columns[~(dds.var["genewise_dispersions"] < MIN_DISP_FOR_TREND)])
    dds2, ref = pydeseq2_pooled(counts[keep], meta, "~batch + condition",
                                ("condition", "B", "A"))
    result = run_demo(study, keep)
    assert (dds2.var["genewise_dispersions"].dropna() >= MIN_DISP_FOR_TREND).all()
    assert (result.dispersions["genewise"].dropna() >= MIN_DISP_FOR_TREND).all()
    return result, ref


def test_demo_without_tiny_dispersions_lfc_median(demo_without_tiny_dispersions):
    result, ref = demo_without_tiny_dispersions
    cmp = compare_with_pydeseq2(result.results(), ref)
    assert cmp["log2FoldChange"][0] <= 1e-4


def test_demo_without_tiny_dispersions_same_calls(demo_without_tiny_dispersions):
    result, ref = demo_without_tiny_dispersions
    assert compare_with_pydeseq2(result.results(), ref)["calls_differ"] == []


def test_demo_expressed_genes_match_pooled_pydeseq2(demo):
    """Genes with baseMean >= 5: no tiny dispersion, every IRLS converges; issue's bounds."""
    study, counts, meta, dds, _ = demo
    keep = expressed_genes(counts, dds.obs["size_factors"].to_numpy())
    assert len(keep) >= 1000
    dds2, ref = pydeseq2_pooled(counts[keep], meta, "~batch + condition",
                                ("condition", "B", "A"))
    result = run_demo(study, keep)
    assert (dds2.var["genewise_dispersions"] >= MIN_DISP_FOR_TREND).all()
    assert (result.dispersions["genewise"] >= MIN_DISP_FOR_TREND).all()
    assert result.dispersions["betaConv"].all()
    cmp = compare_with_pydeseq2(result.results(), ref)
    assert cmp["log2FoldChange"][0] <= 1e-4
    assert cmp["calls_differ"] == []
    assert (result.results()["padj"] < 0.1).sum() > 50  # the comparison has calls to differ on
    # PyDESeq2 is the one away from R here (its L-BFGS-B gene-wise and MAP estimates): its
    # lfcSE differs from R's by 1.8e-4 in the median, fed_de's by 2e-9; so against PyDESeq2
    # the medians only, against R (tests/data/r_extra/demo120) the maxima too
    for col in RESULT_COLUMNS:
        assert cmp[col][0] <= 1e-3, (col, cmp[col])
    ours = result.results()
    r = read_demo_r_reference(counts[keep])
    assert list(r.index) == keep
    for alpha in (0.05, 0.1):
        assert ((ours.padj < alpha) == (r.padj < alpha)).all()
    assert np.abs(ours.log2FoldChange - r.log2FoldChange).max() <= 1e-3
    for col in ("lfcSE", "pvalue", "padj"):
        assert (ours[col].isna() == r[col].isna()).all(), col
        ok = r[col].notna() & (r[col] > 1e-300)
        rel = (np.abs(ours[col] - r[col]) / r[col])[ok].to_numpy()
        assert np.median(rel) <= 1e-5 and rel.max() <= 1e-2, (col, np.median(rel), rel.max())
    rel = (np.abs(ours.lfcSE - r.lfcSE) / r.lfcSE).max()
    assert rel <= 1e-5, rel


def read_demo_r_reference(counts: pd.DataFrame) -> pd.DataFrame:
    """R DESeq2 1.38.3 on the demo's expressed genes, after checking the counts are the ones
    R saw (the demo generator is seeded; a change to it needs make_data.py and make_refs.R
    rerun)."""
    import hashlib

    here = DATA / "r_extra" / "demo120"
    digest = hashlib.sha256(np.ascontiguousarray(counts.to_numpy(np.int64))).hexdigest()
    assert digest == (here / "counts_sha256.txt").read_text().strip(), \
        "demo counts changed: rerun tests/data/r_extra/demo120/make_data.py and make_refs.R"
    return pd.read_csv(here / "r_results.csv", index_col=0)
