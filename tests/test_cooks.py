"""Cook's outliers, replacement and refit against R DESeq2, federated vs one site.

References:

- ``r134/{multi_factor,continuous}/r_test_res_outliers.csv`` (PyDESeq2's suite, DESeq2 1.34)
  and ``r138/synth_outliers`` (DESeq2 1.38.3): the synthetic data with counts[sample1, gene1] =
  2000, counts[sample11, gene7] = 1000 and sample1 moved to a new condition level C (a cell of
  one sample, never replaceable). Multi-factor: R replaces and refits gene7 (``replace`` is
  TRUE for gene1, gene6 and gene7) and, every counted sample being replaceable, filters none.
  Continuous: no design cell repeats, so R neither filters nor replaces.
- ``r_extra/cooks`` (made by ``make_data.py`` and ``make_refs.R``, DESeq2 1.38.3): 30 samples,
  ``~ batch + condition`` with two cells of 10 (replaceable) and two of 5 (counted, not
  replaceable); outliers injected in genes g1-g6 (replaceable cells: replaced and refitted),
  g7-g10 (other cells: p-value NA), and g11, whose only non-zero count is an outlier (all zero
  after replacement: LFC 0, p-value 1 in R).

Measured (3 sites vs R): refitted genes within 1.9e-4 (p-values) and 3e-5 (LFC, lfcSE); the
whole tables within the Wald tolerances; federated vs one site <= 5e-12.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import fed_de
from fed_de.federation.secure import KEY_ROUND_STEPS
from tests.conftest import DATA, read_site_layout, split_sites
from tests.test_deseq2_accuracy import TOL, assert_results_close, max_rel_err
from tests.test_privacy import additive_part, later_dispersion_round

COOKS = DATA / "r_extra" / "cooks"
LEVELS = {"batch": ["b1", "b2"], "condition": ["A", "B"]}
COLUMNS = ["baseMean", "log2FoldChange", "lfcSE", "stat", "pvalue", "padj"]


def wald_plan_steps() -> int:
    """Sequential steps of the plan without Cook's (a factor design, ``ratio`` size
    factors): the key round of secure aggregation, size factors (2 rounds; the second also
    carries the rough round's sums per design cell), then every loop; the last IRLS round
    also runs the one fallback round and closes the fit. 36 with the defaults
    (docs/algorithm.md)."""
    from fed_de.bulk.state import DESeq2Options

    o = DESeq2Options()
    assert o.fallback_rounds == 1
    rounds = 1 + 2 + o.mu_rounds + o.genewise_rounds + o.map_rounds + o.final_rounds
    assert 2 * rounds == 36  # the measured defaults: mu 4, gene-wise 4, MAP 1, final 6
    return 2 * rounds


def outlier_edits(counts: pd.DataFrame, meta: pd.DataFrame):
    """PyDESeq2's outlier test edits."""
    counts, meta = counts.copy(), meta.copy()
    counts.loc["sample1", "gene1"] = 2000
    counts.loc["sample11", "gene7"] = 1000
    meta.loc["sample1", "condition"] = "C"
    return counts, meta


def run(sites, design, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fed_de.deseq2(sites, design, min_cell_size=0, **kw)


def injected_sites(split: bool) -> dict:
    counts = pd.read_csv(COOKS / "counts.csv", index_col=0)
    meta = pd.read_csv(COOKS / "metadata.csv", index_col=0)

    def site(idx):
        a = ad.AnnData(counts.loc[idx].to_numpy(dtype=float), obs=meta.loc[idx].copy())
        a.var_names = list(counts.columns)
        a.obs_names = list(idx)
        return a

    if not split:
        return {"pooled": site(meta.index)}
    return {s: site(meta.index[meta["site"] == s]) for s in ("h1", "h2", "h3")}


@pytest.fixture(scope="module")
def injected():
    one = run(injected_sites(False), "~ batch + condition", levels=LEVELS)
    fed = run(injected_sites(True), "~ batch + condition", levels=LEVELS)
    return one, fed


def test_injected_outliers_flag_replace_and_refit_as_r(injected):
    _, fed = injected
    ref = pd.read_csv(COOKS / "r_results.csv", index_col=0)
    res = fed.results(contrast=["condition", "B", "A"])
    genes = np.array(fed.study.genes)
    # the same genes replaced, refitted, filtered and emptied as R
    r_replace = ref["replace"].fillna(False).astype(bool).to_numpy()
    np.testing.assert_array_equal(fed.state.refit.replace, r_replace)
    assert list(genes[fed.state.refit.genes]) == [f"g{i}" for i in range(1, 7)]
    assert list(genes[fed.state.refit.new_all_zero]) == ["g11"]
    assert list(res.index[res["pvalue"].isna()]) == ["g7", "g8", "g9", "g10"]
    assert list(ref.index[ref["pvalue"].isna()]) == ["g7", "g8", "g9", "g10"]
    # values: refitted genes tightly, the whole table within the Wald tolerance
    refit = [f"g{i}" for i in range(1, 7)]
    for col in ["baseMean", "log2FoldChange", "lfcSE", "stat", "pvalue"]:
        assert max_rel_err(res.loc[refit, col], ref.loc[refit, col]) < 1e-3, col
    assert res.loc["g11", ["log2FoldChange", "lfcSE", "stat", "pvalue"]].tolist() == [0, 0, 0, 1]
    # p-values ~1e-117 amplify the statistic's relative error; compare those on stat
    ordinary = ref.index[~(ref["pvalue"] < 1e-30)]
    assert_results_close(res, ref, genes=ordinary)
    assert_results_close(res, ref, columns=["baseMean", "log2FoldChange", "lfcSE", "stat"])
    np.testing.assert_allclose(fed.dispersions.loc[refit, "final"],
                               ref.loc[refit, "dispersion"], rtol=1e-3)


def test_injected_outliers_federated_equals_one_site(injected):
    one, fed = injected
    a = one.results(contrast=["condition", "B", "A"])
    b = fed.results(contrast=["condition", "B", "A"])
    for col in COLUMNS:
        np.testing.assert_array_equal(a[col].isna(), b[col].isna())
        np.testing.assert_allclose(b[col], a[col], rtol=1e-6, atol=0, err_msg=col)
    for key in ("refitted", "replace", "new_all_zero", "outlier"):
        np.testing.assert_array_equal(one.cooks[key], fed.cooks[key])
    # the whole pipeline, Cook's refit included, within the 80-step budget (+ the key round
    # of secure aggregation, which one site does not need)
    assert fed.facts["sequential_steps"] <= 80 + KEY_ROUND_STEPS
    assert one.facts["sequential_steps"] + KEY_ROUND_STEPS == fed.facts["sequential_steps"]


def synthetic_outliers(n_sites: int = 3):
    counts, meta = read_site_layout("pydeseq2_synthetic")
    counts, meta = outlier_edits(counts, meta)
    return split_sites(counts, meta, n_sites, seed=0)


@pytest.fixture(scope="module")
def multi_outliers():
    return run(synthetic_outliers(), "~group + condition",
               levels={"group": ["X", "Y"], "condition": ["A", "B", "C"]})


@pytest.mark.parametrize("version", ["r134", "r138"])
def test_multi_factor_outliers_match_r(multi_outliers, version):
    res = multi_outliers.results(contrast=["condition", "B", "A"])
    if version == "r134":
        ref = pd.read_csv(DATA / "r134" / "multi_factor" / "r_test_res_outliers.csv",
                          index_col=0)
    else:
        ref = pd.read_csv(DATA / "r138" / "synth_outliers" / "results.csv.gz", index_col=0)
    errors = assert_results_close(res, ref, tol=TOL)
    assert errors["baseMean"] < 1e-12  # gene7's baseMean after replacement, exactly
    genes = np.array(multi_outliers.study.genes)
    assert list(genes[multi_outliers.state.refit.genes]) == ["gene7"]
    assert list(genes[multi_outliers.state.refit.replace]) == ["gene1", "gene6", "gene7"]
    assert not multi_outliers.state.genes.cooks_outlier.any()
    # the refitted gene tightly
    assert max_rel_err(res.loc[["gene7"], "pvalue"], ref.loc[["gene7"], "pvalue"]) < 1e-4


def test_multi_factor_outliers_dispersions_match_r138(multi_outliers):
    ref = pd.read_csv(DATA / "r138" / "synth_outliers" / "dispersions.csv.gz", index_col=0)
    disp = multi_outliers.dispersions
    for col, ours in [("dispGeneEst", "genewise"), ("dispersion", "final")]:
        assert max_rel_err(disp.loc[ref.index, ours], ref[col]) < 5e-3, col


def test_multi_factor_outliers_lrt_matches_r138():
    fit = run(synthetic_outliers(), "~group + condition", test="LRT", reduced="~ 1",
              levels={"group": ["X", "Y"], "condition": ["A", "B", "C"]})
    ref = pd.read_csv(DATA / "r138" / "synth_outliers" / "results_lrt.csv.gz", index_col=0)
    res = fit.results(contrast=["condition", "B", "A"])
    # gene6: sample1, alone in condition C, has count 0, so the full model's C coefficient
    # runs to -infinity and the deviance depends on where the IRLS stops (R: statistic 6.96,
    # fed_de 6.47; the supremum is >= 7.29). Not an outlier matter: the same without Cook's.
    genes = ref.index[~(ref["pvalue"] < 1e-30) & (ref.index != "gene6")]
    # (padj couples genes through BH ranks: gene6's p-value moves the others' padj)
    assert_results_close(res, ref, genes=genes, columns=["stat", "pvalue"])
    assert max_rel_err(res.loc[["gene7"], "stat"], ref.loc[["gene7"], "stat"]) < 2e-3
    assert_results_close(res, ref, columns=["baseMean", "log2FoldChange", "lfcSE"])


def test_continuous_outliers_match_r134():
    counts, meta = read_site_layout("pydeseq2_continuous")
    counts, meta = outlier_edits(counts, meta)
    fit = run(split_sites(counts, meta, 3, seed=0), "~group + condition + measurement",
              levels={"group": ["X", "Y"], "condition": ["A", "B", "C"]})
    ref = pd.read_csv(DATA / "r134" / "continuous" / "r_test_res_outliers.csv", index_col=0)
    res = fit.results("measurement")
    assert_results_close(res, ref)
    assert fit.state.refit is None  # no design cell repeats: nothing to replace or filter


def test_cooks_off_is_the_wald_pipeline():
    fit = run(synthetic_outliers(), "~group + condition", cooks=False,
              levels={"group": ["X", "Y"], "condition": ["A", "B", "C"]})
    assert fit.state.refit is None
    assert fit.facts["sequential_steps"] == wald_plan_steps()


def test_cli_run_reports_cooks_and_steps(tmp_path):
    """``fed-de run`` on the injected-outlier study as 3 CSV sites: run.json reports the
    sequential steps (<= 80) and the Cook's decisions; ``--no-cooks`` drops the step."""
    import json

    from typer.testing import CliRunner

    from fed_de.cli import app

    counts = pd.read_csv(COOKS / "counts.csv", index_col=0)
    meta = pd.read_csv(COOKS / "metadata.csv", index_col=0)
    args = ["run", "--design", "~ batch + condition", "--contrast", "condition", "B", "A",
            "--levels", "batch=b1,b2", "--levels", "condition=A,B", "--min-cell-size", "0"]
    for s in ("h1", "h2", "h3"):
        idx = meta.index[meta["site"] == s]
        (tmp_path / s).mkdir()
        counts.loc[idx].to_csv(tmp_path / s / "counts.csv")
        meta.loc[idx].to_csv(tmp_path / s / "metadata.csv")
        args += ["--site", f"{s}={tmp_path / s}"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    facts = json.loads((tmp_path / "out" / "run.json").read_text())
    assert facts["sequential_steps"] <= 80 + KEY_ROUND_STEPS
    assert (facts["genes_refitted"], facts["cooks_outliers_filtered"]) == (6, 4)
    table = pd.read_csv(tmp_path / "out" / "results.csv", index_col=0)
    assert list(table.index[table["pvalue"].isna()]) == ["g7", "g8", "g9", "g10"]
    res = CliRunner().invoke(app, [*args, "--no-cooks", "--out", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    plain = json.loads((tmp_path / "plain" / "run.json").read_text())
    assert plain["sequential_steps"] == wald_plan_steps()


def test_every_cooks_and_refit_message_is_a_sum_over_samples():
    """Additivity on a run that replaces and refits: the three sites' messages add up to the
    message of the pooled site, round by round (side chain, Cook's round and refit included);
    a Cook's value, a maximum or one sample's count would not."""
    kw = dict(levels=LEVELS, record_messages=True, secure_aggregation=False)
    fed = run(injected_sites(True), "~ batch + condition", **kw)
    one = run(injected_sites(False), "~ batch + condition", **kw)
    assert fed.state.refit.n_refit == 6
    parts = {s: [m for m in fed.facts["messages"] if m["site"] == s] for s in ("h1", "h2", "h3")}
    whole = one.facts["messages"]
    assert len(whole) == len(parts["h1"])
    steps = {m["step"] for m in whole}
    assert {"robust_sums", "robust_parts", "closing_sums"} <= steps
    # the closing round carries the Cook's counts; the refit's IRLS messages carry the 6
    # refitted genes only
    assert any("cooks.n_out" in m["message"] for m in whole)
    assert any(m["message"].get("full.xtwx", np.zeros((0,))).shape[:1] == (6,) for m in whole)
    for i, m in enumerate(whole):
        if later_dispersion_round(m):
            continue
        for key, value in m["message"].items():
            summed = sum(np.asarray(parts[s][i]["message"][key]) for s in parts)
            np.testing.assert_allclose(additive_part(m, key, summed),
                                       additive_part(m, key, value), rtol=1e-7, atol=1e-9,
                                       err_msg=f"{m['step']}:{key}")
