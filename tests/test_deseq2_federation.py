"""Federated equals pooled, the round/byte budget, contrasts, and all-zero genes.

The pooled reference is fed_de itself with all samples at one site. Data: the demo study
(120 samples x 1,500 genes, seed 3, ``~ batch + condition``), as its three hospitals
(60 / 40 / 20 samples; hospital_c has no batch b3) and re-split into five sites
(17 / 43 / 25 / 15 / 20; site c has no b3). Measured maximum relative differences from the
one-site run (over entries that are finite and non-zero):

=======  ========  ======  ======  ======  ======  ======  ======  ======  ======  ======
sites    baseMean  LFC     lfcSE   stat    pvalue  padj    genew.  trend   MAP     final
=======  ========  ======  ======  ======  ======  ======  ======  ======  ======  ======
3        1.1e-15   1.2e-9  3.6e-14 1.2e-9  7.4e-12 5.9e-12 1.9e-13 1.1e-15 8.1e-14 8.1e-14
5        1.4e-15   7.2e-10 3.3e-14 7.2e-10 8.0e-12 8.0e-12 2.3e-13 1.9e-15 9.5e-14 9.5e-14
=======  ========  ======  ======  ======  ======  ======  ======  ======  ======  ======

The largest LFC relative differences are on fold changes ~1e-5 (absolute <= 4.3e-14);
identical padj < 0.1 calls (154 genes), dispersion-outlier, all-zero and betaConv flags.

Budget (this data): ``~ batch + condition`` (4 coefficients) 58 sequential steps whatever the
number of sites; tasks = steps / 2 x (sites + 1) = 58 / 116 / 174 for 1 / 3 / 5 sites;
11,437 bytes per gene per site. ``~ condition`` (2 coefficients, 1,500 genes): 42 steps,
84 tasks, 3,580 bytes per gene per site (limit 4,608); every site sends the same number of
bytes.

All-zero genes: three added (first, middle, last column) get baseMean 0 (as DESeq2 and
PyDESeq2 report it) and NaN in every other column; the other genes move by at most 5.0e-10
relative (LFC, on a fold change ~1e-5), 1.2e-11 (p-values), 2.4e-13 (dispersions).
"""

from __future__ import annotations

import copy
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import fed_de
from fed_de.demo_data import make_demo_study
from fed_de.federation.secure import KEY_ROUND_STEPS
from tests.conftest import read_site_layout, split_sites

ALPHA = 0.1
CONTRAST = ("condition", "B", "A")
RTOL = 1e-6
ATOL = 1e-12  # for values that are ~0 (log2 fold changes, statistics of null genes)


def deseq2(sites, design, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kwargs.setdefault("min_cell_size", 0)  # the statistics, not the disclosure rules
        return fed_de.deseq2(sites, design, **kwargs)


def as_float_sites(sites: dict) -> dict:
    return {name: ad.AnnData(pd.DataFrame(np.asarray(a.X, dtype=np.float64),
                                          index=a.obs_names, columns=a.var_names),
                             obs=a.obs.copy())
            for name, a in sites.items()}


def cut(adata: ad.AnnData, n_first: int, seed: int) -> tuple[ad.AnnData, ad.AnnData]:
    """Split a site in two (random samples, seeded)."""
    order = np.random.default_rng(seed).permutation(adata.n_obs)
    first, second = np.sort(order[:n_first]), np.sort(order[n_first:])
    return adata[first].copy(), adata[second].copy()


@pytest.fixture(scope="module")
def study():
    return make_demo_study(n_samples=120, n_genes=1500, seed=3)


@pytest.fixture(scope="module")
def site_layouts(study):
    """One site (pooled), the three hospitals, and five unequal sites (re-split)."""
    hospitals = as_float_sites(study.sites)
    a1, a2 = cut(hospitals["hospital_a"], 17, seed=1)
    b1, b2 = cut(hospitals["hospital_b"], 25, seed=2)
    five = {"a1": a1, "a2": a2, "b1": b1, "b2": b2, "c": hospitals["hospital_c"]}
    pooled = ad.concat(list(hospitals.values()), axis=0)
    return {1: {"pooled": pooled}, 3: hospitals, 5: five}


@pytest.fixture(scope="module")
def fits(study, site_layouts):
    out = {}
    for n, sites in site_layouts.items():
        # re-split sites hold design cells of 1-2 samples: disclosure control off for them;
        # DESeq2's outlier replacement and refit everywhere (the federated default is to
        # filter outliers instead: tests/test_cooks.py), so every layout runs one analysis
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[n] = deseq2(sites, study.design, contrasts=[CONTRAST], levels=study.levels,
                            min_cell_size=3 if n == 3 else 0, min_pooled_cell_size=10,
                            min_nonzero=0, min_replicates_for_replace=7)
    return out


# ---- 1. federated equals pooled ------------------------------------------------------------


def test_site_layouts(study, site_layouts):
    """Unequal sites, one lacking batch level b3 (and no site holding every sample)."""
    for n in (3, 5):
        sites = site_layouts[n]
        sizes = [a.n_obs for a in sites.values()]
        assert len(sites) == n and sum(sizes) == 120 and len(set(sizes)) == n
        lacking = [k for k, a in sites.items() if "b3" not in set(a.obs["batch"])]
        assert lacking == ["hospital_c" if n == 3 else "c"]


def rel_max(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(b) & (b != 0)
    return float(np.max(np.abs(a[ok] - b[ok]) / np.abs(b[ok])))


@pytest.mark.parametrize("n_sites", [3, 5])
def test_federated_equals_one_site(fits, n_sites):
    fed, pooled = fits[n_sites], fits[1]
    res, ref = fed.results(), pooled.results()
    disp, ref_disp = fed.dispersions, pooled.dispersions
    assert list(res.index) == list(ref.index)
    for col in ("baseMean", "log2FoldChange", "lfcSE", "stat", "pvalue", "padj"):
        np.testing.assert_allclose(res[col], ref[col], rtol=RTOL, atol=ATOL, err_msg=col)
    for col in ("baseMean", "genewise", "trend", "MAP", "final"):
        np.testing.assert_allclose(disp[col], ref_disp[col], rtol=RTOL, atol=0, err_msg=col)
    for col in ("outlier", "allZero", "betaConv"):
        np.testing.assert_array_equal(disp[col], ref_disp[col], err_msg=col)
    np.testing.assert_allclose(fed.coefficients, pooled.coefficients, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(res["padj"] < ALPHA, ref["padj"] < ALPHA)
    assert (res["padj"] < ALPHA).sum() > 50
    assert fed.trend["fit_type"] == pooled.trend["fit_type"] == "parametric"
    np.testing.assert_allclose(fed.trend["coefficients"], pooled.trend["coefficients"],
                               rtol=RTOL)


# ---- 2. budget -------------------------------------------------------------------------------


def test_sequential_steps_multi_factor(fits):
    for n in (1, 3, 5):
        facts = fits[n].facts
        # the whole pipeline, Cook's replacement and refit included (+ the key round of
        # secure aggregation from two sites on)
        keys = KEY_ROUND_STEPS if n > 1 else 0
        assert facts["sequential_steps"] <= 80 + keys, facts["sequential_steps"]
        # the plan does not depend on the number of sites
        assert facts["sequential_steps"] == fits[1].facts["sequential_steps"] + keys


@pytest.mark.parametrize("n_sites", [1, 3, 5])
def test_task_count_matches_rounds(fits, n_sites):
    """Each round is one task per site, then one aggregation that depends on all of them; the
    Cook's side chain adds its own rounds (and a start aggregation) beside the main chain."""
    from fed_de.bulk.state import DESeq2Options

    ROBUST_ROUNDS = DESeq2Options().robust_rounds
    facts = fits[n_sites].facts
    steps = facts["sequential_steps"]
    assert steps % 2 == 0
    side = 2 * (ROBUST_ROUNDS + 1)
    assert facts["tasks"] == (steps // 2 + side) * (n_sites + 1) + 1
    assert facts["secure_aggregation"] == (n_sites > 1)
    assert facts["n_sites"] == n_sites


def test_bytes_per_gene_two_coefficients(study):
    sites = as_float_sites(study.sites)
    # the Wald pipeline (Cook's off); with Cook's: test_bytes_per_gene_with_cooks
    result = deseq2(sites, "~ condition", levels={"condition": study.levels["condition"]},
                    cooks=False, secure_aggregation=False)
    facts = result.facts
    assert facts["n_genes"] >= 1000
    per_gene = facts["bytes_per_gene_by_site"]
    assert set(per_gene) == set(sites)
    # message shapes never depend on a site's sample count: every site sends the same
    assert len(set(facts["bytes_sent_by_site"].values())) == 1
    assert max(per_gene.values()) <= 4.5 * 1024, per_gene
    for name, sent in facts["bytes_sent_by_site"].items():
        assert per_gene[name] == pytest.approx(sent / facts["n_genes"])
    assert facts["sequential_steps"] <= 60
    # secure aggregation: a value travels as three 64-bit words (fixed point), a fit sum
    # declared narrow as two, a sample count as a fraction of a word, and X'WX's column
    # x_1 x_1 (= x_0 x_1 for a 0/1 column) not at all: here ~1.55 words a value
    masked = deseq2(sites, "~ condition", levels={"condition": study.levels["condition"]},
                    cooks=False).facts
    assert masked["secure_aggregation"]
    for name, sent in masked["bytes_sent_by_site"].items():
        assert 1.4 * facts["bytes_sent_by_site"][name] < sent < 1.8 * facts[
            "bytes_sent_by_site"][name]


def test_bytes_per_gene_with_cooks(study):
    """Cook's robust dispersions need exact trimmed cell statistics: an 8-way order-statistic
    search per gene, cell and bounding rank (the refit sends the refitted genes only)."""
    sites = as_float_sites(study.sites)
    facts = deseq2(sites, "~ condition", levels={"condition": study.levels["condition"]},
                   secure_aggregation=False).facts
    assert len(set(facts["bytes_sent_by_site"].values())) == 1
    assert max(facts["bytes_per_gene_by_site"].values()) <= 24 * 1024
    assert facts["sequential_steps"] <= 80


# ---- 3. contrasts ----------------------------------------------------------------------------


def test_reversed_contrast_negates(fits):
    result = fits[3]
    ba, ab = result.results(("condition", "B", "A")), result.results(("condition", "A", "B"))
    np.testing.assert_allclose(ab["log2FoldChange"], -ba["log2FoldChange"], rtol=1e-14,
                               atol=0)
    np.testing.assert_allclose(ab["stat"], -ba["stat"], rtol=1e-14, atol=0)
    np.testing.assert_array_equal(ab["lfcSE"], ba["lfcSE"])
    np.testing.assert_array_equal(ab["pvalue"], ba["pvalue"])
    np.testing.assert_array_equal(ab["padj"], ba["padj"])
    np.testing.assert_array_equal(ab["baseMean"], ba["baseMean"])


def test_numeric_contrast_equals_tuple(fits):
    result = fits[3]
    names = list(result.coefficients.columns)
    assert names[0] == "Intercept"
    cases = [(("condition", "B", "A"), {"condition_B_vs_A": 1.0}),
             (("batch", "b3", "b2"), {"batch_b3_vs_b1": 1.0, "batch_b2_vs_b1": -1.0}),
             (("batch", "b2", "b1"), {"batch_b2_vs_b1": 1.0})]
    n_zeroed = 0
    for tup, weights in cases:
        assert set(weights) <= set(names), names
        vec = np.array([weights.get(n, 0.0) for n in names])
        by_tuple, by_vector = result.results(tup), result.results(vec)
        if (vec >= 0).all():
            # R's contrastAllZeroNumeric leaves a one-signed numeric contrast alone, so genes
            # whose two batches hold only zeros keep their fitted LFC there; elsewhere the
            # two tables agree (BH's padj moves with those p-values, so it is left out)
            zeroed = (by_tuple["log2FoldChange"] == 0) & (by_tuple["pvalue"] == 1)
            n_zeroed += int(zeroed.sum())
            assert (by_vector.loc[zeroed, "log2FoldChange"] != 0).all()
            by_tuple = by_tuple.loc[~zeroed].drop(columns="padj")
            by_vector = by_vector.loc[~zeroed].drop(columns="padj")
        pd.testing.assert_frame_equal(by_tuple, by_vector, rtol=1e-12)
    assert 0 < n_zeroed < 10  # the fixture holds a gene whose batches b1 and b2 are all zero
    # a coefficient name is the same contrast too; DESeq2's default is the last coefficient
    pd.testing.assert_frame_equal(result.results("condition_B_vs_A"),
                                  result.results(("condition", "B", "A")), rtol=1e-12)


def test_more_contrasts_need_no_new_round(fits):
    result = fits[3]
    before = copy.deepcopy(result.facts)
    first = result.results().copy()
    for contrast in [("batch", "b3", "b1"), ("batch", "b2", "b3"), ("condition", "A", "B")]:
        table = result.results(contrast)
        assert table["pvalue"].notna().sum() > 1000
    result.results(alpha=0.05, lfc_threshold=0.5, alt_hypothesis="greater")
    assert result.facts == before
    pd.testing.assert_frame_equal(result.results(), first)  # nothing cached changed


def test_unknown_factor_or_level_is_named(fits):
    result = fits[3]
    with pytest.raises(ValueError, match="'treatment'"):
        result.results(("treatment", "B", "A"))
    with pytest.raises(ValueError, match="'C'"):
        result.results(("condition", "C", "A"))
    with pytest.raises(ValueError, match="'b9'"):
        result.results(("batch", "b1", "b9"))


def test_unknown_contrast_at_fit_time_is_named():
    counts, meta = read_site_layout("pydeseq2_synthetic")
    sites = split_sites(counts, meta, 3, seed=0)
    with pytest.raises(ValueError, match="'treatment'"):
        deseq2(sites, "~condition", contrasts=[("treatment", "B", "A")], min_cell_size=0)
    with pytest.raises(ValueError, match="'C'"):
        deseq2(sites, "~condition", contrasts=[("condition", "C", "A")], min_cell_size=0)


# ---- 4. all-zero genes -----------------------------------------------------------------------

ZERO_GENES = ["ZERO_first", "ZERO_mid", "ZERO_last"]


def with_zero_genes(sites: dict) -> dict:
    out = {}
    for name, a in sites.items():
        frame = pd.DataFrame(np.asarray(a.X, dtype=np.float64), index=a.obs_names,
                             columns=a.var_names)
        frame.insert(0, ZERO_GENES[0], 0.0)
        frame.insert(frame.shape[1] // 2, ZERO_GENES[1], 0.0)
        frame[ZERO_GENES[2]] = 0.0
        out[name] = ad.AnnData(frame, obs=a.obs.copy())
    return out


def test_all_zero_genes(study, site_layouts, fits):
    sites = with_zero_genes(site_layouts[3])
    result = deseq2(sites, study.design, contrasts=[CONTRAST], levels=study.levels)
    res, disp = result.results(), result.dispersions
    assert result.genes == list(sites["hospital_a"].var_names)
    zero = res.loc[ZERO_GENES]
    # DESeq2 / PyDESeq2 report baseMean 0 for an all-zero gene, NaN for everything else
    assert (zero["baseMean"] == 0).all()
    assert zero.drop(columns="baseMean").isna().all().all()
    assert disp.loc[ZERO_GENES, "allZero"].all()
    assert disp.loc[ZERO_GENES, ["genewise", "trend", "MAP", "final"]].isna().all().all()
    assert result.coefficients.loc[ZERO_GENES].isna().all().all()
    # every other gene is unchanged
    base = fits[3]
    others = base.genes
    ref, ref_disp = base.results(), base.dispersions
    for col in res.columns:
        np.testing.assert_allclose(res.loc[others, col], ref[col], rtol=1e-9, atol=ATOL,
                                   err_msg=col)
    for col in ("genewise", "trend", "MAP", "final"):
        np.testing.assert_allclose(disp.loc[others, col], ref_disp[col], rtol=1e-9, atol=0,
                                   err_msg=col)
    np.testing.assert_array_equal(res.loc[others, "padj"] < ALPHA, ref["padj"] < ALPHA)
