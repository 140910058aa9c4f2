"""The post-fit phase end to end: ``fed_de.deseq2(shrink=..., pca=True)`` against R, against the
pooled computation, and against known truth (fed_de.bulk.postfit, .shrink, .pca).

apeglm, 3 sites (large_counts: 2), against R DESeq2 1.34's ``lfcShrink(type="apeglm")``
(tests/data/r134). R's L-BFGS stops early (tests/test_shrink.py), so each gene is judged against
the exact posterior mode for R's own inputs (R's size factors, dispersions, MLE) and against R.
Max over genes of |LFC - ref| / max(|ref LFC|, ref lfcSE):

=============  ==================  ===========  ======================================
dataset        fed_de vs exact     R's own      fed_de vs R (genes where R's own
               mode (R's inputs)   optimiser    optimiser error < 5e-4)
=============  ==================  ===========  ======================================
single_factor  5.9e-7              1.2e-3       3.5e-4
multi_factor   6.2e-6              9.4e-4       3.3e-4
continuous     1.8e-6              3.6e-3       3.1e-4
large_counts   3.0e-10             2.5e-2       3.7e-4
=============  ==================  ===========  ======================================

The first column is how far fed_de's fit (dispersions, MLE) is from R's; the second, R's
optimiser error (docs/deviations.md). normal, 3 hospitals of the demo3 study against R DESeq2
1.38.3's ``lfcShrink(type="normal")`` (tests/data/r_extra/shrink/demo3): LFC within 2.4e-6
(log2, absolute), lfcSE within 7.7e-8 relative, for two coefficients (standard design) and two
contrasts (expanded design), one between two non-reference levels. VST and PCA on demo3 against
R's ``varianceStabilizingTransformation(blind=FALSE)`` and ``plotPCA``: with R's trend and size
factors the VST is R's to 1e-9; end to end, with fed_de's own trend, to 2.5e-8 (7.4e-9
relative), PCA coordinates to 2.2e-8 (range 5.6), percentVar to 1e-9 relative.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

import fed_de
from fed_de.bulk import pca as pca_steps
from fed_de.bulk.shrink import ShrinkNotComputedError
from fed_de.core import apeglm as ap
from fed_de.core import pca as pcore
from fed_de.demo_data import make_demo_study
from tests.conftest import DATA, read_site_layout, split_sites
from tests.test_shrink import LN2, load_apeglm, mle_fit, run_apeglm

DEMO3 = DATA / "r_extra" / "shrink" / "demo3"
APEGLM = {  # R folder: (data, design, sites)
    "single_factor": ("pydeseq2_synthetic", "~condition", 3),
    "multi_factor": ("pydeseq2_synthetic", "~group + condition", 3),
    "continuous": ("pydeseq2_continuous", "~group + condition + measurement", 3),
    "large_counts": ("pydeseq2_large_counts", "~condition", 2),
}


def quiet_deseq2(*args, **kwargs):
    """``fed_de.deseq2`` without its warnings. The studies here (48-60 samples, a PCA block
    that spans their covariance) have pooled design cells below the disclosure minimum: the
    post-fit arithmetic is tested with the rules off unless a test says otherwise
    (tests/test_privacy.py tests the rules, post-fit included)."""
    kwargs.setdefault("min_cell_size", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fed_de.deseq2(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# apeglm against R
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(APEGLM))
def test_apeglm_end_to_end_against_r(name):
    data, design, n_sites = APEGLM[name]
    counts, meta = read_site_layout(data)
    res = quiet_deseq2(split_sites(counts, meta, n_sites, seed=0), design, shrink="apeglm",
                       min_cell_size=0)
    ours = res.lfc_shrink()
    d = load_apeglm(name)
    ref = d["ref"]
    assert list(ours.columns) == ["baseMean", "log2FoldChange", "lfcSE", "pvalue", "padj"]
    # the exact posterior mode for R's own inputs (the maths is tested in test_shrink.py)
    scale = ap.apeglm_prior(LN2 * d["res"].log2FoldChange.to_numpy(),
                            LN2 * d["res"].lfcSE.to_numpy())
    mle = mle_fit(d["y"], d["X"], d["sf"], d["disp"])
    st, _ = run_apeglm(d["y"], d["X"], np.log(d["sf"]), d["disp"], d["shrink"], scale,
                       mle["beta"], info=mle["xtwx"])
    exact = st["beta"][:, d["shrink"]] / LN2
    sd, _ = ap.posterior_sd(st["hess"], d["X"].shape[1])
    unit = np.maximum(np.abs(ref.log2FoldChange), ref.lfcSE).to_numpy()
    lfc = ours.log2FoldChange.to_numpy()
    assert np.max(np.abs(lfc - exact) / unit) < 2e-5  # fed_de's fit vs R's fit
    np.testing.assert_allclose(ours.lfcSE, sd[:, d["shrink"]] / LN2, rtol=2e-5)
    r_error = np.abs(exact - ref.log2FoldChange.to_numpy()) / unit  # R's optimiser
    near = r_error < 5e-4
    assert near.sum() >= 3
    assert np.max(np.abs(lfc - ref.log2FoldChange.to_numpy())[near] / unit[near]) < 1e-3
    assert np.all(np.abs(lfc - ref.log2FoldChange.to_numpy()) / unit < r_error + 2e-5)
    # the unshrunken test's p-values, as DESeq2 keeps them
    pd.testing.assert_series_equal(ours.pvalue, res.results().pvalue)
    assert res.facts["shrink"]["unconverged_genes"] == {res.state.shrink.targets[0].name: 0}


# ---------------------------------------------------------------------------------------------
# normal prior, VST and PCA against R on demo3 (three hospitals)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo3():
    return make_demo_study(n_samples=48, n_genes=400, seed=3)


@pytest.mark.parametrize("targets", [
    ["condition_B_vs_A", "batch_b3_vs_b1"],
    [("condition", "B", "A"), ("batch", "b3", "b2")],
], ids=["coefficients", "contrasts"])
def test_normal_end_to_end_against_r(demo3, targets):
    # R's reference data: 48 samples, pooled design cells of 6-11, below the disclosure
    # minimum; the rule is switched off (it is tested in test_privacy.py)
    res = quiet_deseq2(demo3.sites, demo3.design, levels=demo3.levels, shrink="normal",
                       shrink_coef=targets, min_cell_size=0)
    for target in targets:
        key = target if isinstance(target, str) else "_".join(target)
        ref = pd.read_csv(DEMO3 / f"normal_{key}.csv.gz", index_col=0)
        ours = res.lfc_shrink(target).loc[ref.index]
        assert np.max(np.abs(ours.log2FoldChange - ref.log2FoldChange)) < 1e-5
        assert np.max(np.abs(ours.lfcSE / ref.lfcSE - 1)) < 1e-6
        # DESeq2 keeps results()'s other columns for type="normal"
        base = res.results(target).loc[ref.index]
        pd.testing.assert_series_equal(ours.stat, base.stat)
        pd.testing.assert_series_equal(ours.padj, base.padj)


def test_vst_and_pca_against_r(demo3):
    ref = json.loads((DEMO3 / "plotpca.json").read_text())
    vst_r = pd.read_csv(DEMO3 / "vst_blind_false.csv.gz", index_col=0)
    res = quiet_deseq2(demo3.sites, demo3.design, levels=demo3.levels, pca=True,
                       min_cell_size=0)
    pooled = demo3.pooled()
    y = np.asarray(pooled.X, dtype=float)
    r = vst_r.loc[pooled.obs_names, pooled.var_names].to_numpy()
    sf_r = pd.Series(ref["size_factors"], index=ref["samples"]).loc[pooled.obs_names]
    trend_r = [ref["trend"]["asymptDisp"][0], ref["trend"]["extraPois"][0]]
    # the transform the sites apply, with R's trend and size factors: R's values
    with_r = pca_steps.transform({"type": "parametric", "coefficients": np.array(trend_r)}, y,
                                 sf_r.to_numpy())
    np.testing.assert_allclose(with_r, r, rtol=1e-9)
    # end to end, with fed_de's own trend and size factors
    sfr = fed_de.size_factors(demo3.sites, levels=demo3.levels, min_cell_size=0)
    sf = pd.concat(sfr.size_factors.values()).loc[pooled.obs_names].to_numpy()
    ours = pca_steps.transform(res.state.pca.vst, y, sf)
    assert np.max(np.abs(ours - r)) < 1e-6
    assert set(np.array(res.genes)[res.state.pca.genes]) == set(ref["ranked_genes"])
    coords = pd.concat(res.site_pca.values()).loc[ref["samples"], ["PC1", "PC2"]].to_numpy()
    plot_r = np.column_stack([ref["PC1"], ref["PC2"]])
    sign = np.sign((coords * plot_r).sum(axis=0))
    assert np.max(np.abs(coords * sign - plot_r)) < 1e-6
    np.testing.assert_allclose(res.facts["pca"]["percent_var"], ref["percentVar"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# federated = one site; PCA = pooled SVD
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    return make_demo_study(n_samples=60, n_genes=600, seed=11)


@pytest.fixture(scope="module")
def apeglm_runs(demo):
    kw = dict(levels=demo.levels, contrasts=[("condition", "B", "A")], shrink="apeglm",
              shrink_coef=[("condition", "B", "A"), ("batch", "b3", "b2")], pca=True)
    fed = quiet_deseq2(demo.sites, demo.design, **kw)
    one = quiet_deseq2({"pooled": demo.pooled()}, demo.design, **kw)
    return fed, one


def test_federated_shrinkage_and_pca_equal_one_site(apeglm_runs, demo):
    fed, one = apeglm_runs
    for target in (("condition", "B", "A"), ("batch", "b3", "b2")):
        a, b = fed.lfc_shrink(target), one.lfc_shrink(target)
        np.testing.assert_array_equal(a.isna(), b.isna())
        np.testing.assert_allclose(a.log2FoldChange, b.log2FoldChange, rtol=0, atol=1e-8)
        np.testing.assert_allclose(a.lfcSE, b.lfcSE, rtol=1e-8)
        pa, pb = fed.posterior(target, threshold=0.5), one.posterior(target, threshold=0.5)
        np.testing.assert_allclose(pa.to_numpy(), pb.to_numpy(), rtol=1e-7, atol=1e-8)
    pf, po = fed.state.pca, one.state.pca
    np.testing.assert_array_equal(pf.genes, po.genes)
    np.testing.assert_allclose(pf.axes, po.axes, atol=1e-8)  # signs fixed alike
    np.testing.assert_allclose(pf.values, po.values, rtol=1e-8)
    np.testing.assert_allclose(fed.pca["centroids"], one.pca["centroids"], atol=1e-8)
    coords = pd.concat(fed.site_pca.values()).loc[one.site_pca["pooled"].index]
    np.testing.assert_allclose(coords[["PC1", "PC2"]], one.site_pca["pooled"][["PC1", "PC2"]],
                               atol=1e-8)


def test_federated_normal_equals_one_site(demo):
    kw = dict(levels=demo.levels, shrink="normal",
              shrink_coef=["condition_B_vs_A", ("batch", "b3", "b2")])
    fed = quiet_deseq2(demo.sites, demo.design, **kw)
    one = quiet_deseq2({"pooled": demo.pooled()}, demo.design, **kw)
    for target in kw["shrink_coef"]:
        a, b = fed.lfc_shrink(target), one.lfc_shrink(target)
        np.testing.assert_allclose(a.log2FoldChange, b.log2FoldChange, rtol=0, atol=1e-8)
        np.testing.assert_allclose(a.lfcSE, b.lfcSE, rtol=1e-8)


def test_pca_equals_pooled_svd(apeglm_runs, demo):
    """Axes, variances and every site's coordinates are the pooled PCA's up to sign (1e-6);
    centroids are the coordinates' means per level and per site x level."""
    fed, _ = apeglm_runs
    p = fed.state.pca
    sfr = fed_de.size_factors(demo.sites, levels=demo.levels, min_cell_size=0)
    x = {name: pca_steps.transform(p.vst, np.asarray(a.X, float),
                                   sfr.size_factors[name].to_numpy())
         for name, a in demo.sites.items()}
    pooled = pcore.pca_pooled(np.vstack(list(x.values())), 500, 2)
    np.testing.assert_array_equal(np.sort(p.genes), np.sort(pooled["genes"]))
    axes = pd.DataFrame(p.axes, index=p.genes).loc[pooled["genes"]].to_numpy()
    sign = np.sign((axes * pooled["axes"]).sum(axis=0))
    assert np.max(np.abs(axes * sign - pooled["axes"])) < 1e-6
    np.testing.assert_allclose(p.values, pooled["values"], rtol=1e-6)
    np.testing.assert_allclose(fed.pca["percent_var"], pooled["percent_var"], rtol=1e-6)
    coords = np.vstack([fed.site_pca[s][["PC1", "PC2"]].to_numpy() for s in demo.sites])
    assert np.max(np.abs(coords * sign - pooled["coords"])) < 1e-6 * np.abs(coords).max()
    groups = np.concatenate([fed.site_pca[s]["group"].to_numpy() for s in demo.sites])
    for level in p.levels:
        np.testing.assert_allclose(fed.pca["centroids"].loc[level],
                                   coords[groups == level].mean(axis=0), atol=1e-10)
    for site, frame in fed.site_pca.items():
        by_site = fed.pca["centroids_by_site"][site]
        for level, part in frame.groupby("group"):
            np.testing.assert_allclose(by_site.loc[level], part[["PC1", "PC2"]].mean(),
                                       atol=1e-10)
    assert fed.facts["pca"]["exact_block"]  # 60 samples: the block (59) spans the covariance


def test_pca_subspace_rounds_reach_the_pooled_axes(demo):
    """A block narrower than the covariance's rank (20 < 59): 6 rounds reach the pooled axes
    and coordinates to 1e-6, and the run's error estimate tracks the true error."""
    from fed_de.api import declare_study, load_sites, postfit_options
    from fed_de.backends import run
    from fed_de.bulk.strategy import DESeq2Strategy

    loaded = load_sites(demo.sites)
    study = declare_study(loaded, demo.design, demo.levels)
    post = postfit_options(study, [("condition", "B", "A")], None, None, True, 500, None,
                           tuple(s.name for s in loaded))
    strategy = DESeq2Strategy(study.to_dict(), cooks=False, pca_block=20, pca_rounds=6,
                              min_cell_size=0, n_sites=3, **post)
    done = run(strategy, loaded)
    p = done.state.pca
    sfr = fed_de.size_factors(demo.sites, levels=demo.levels, min_cell_size=0)
    x = np.vstack([pca_steps.transform(p.vst, np.asarray(a.X, float),
                                       sfr.size_factors[name].to_numpy())
                   for name, a in demo.sites.items()])
    pooled = pcore.pca_pooled(x, 500, 2)
    axes = pd.DataFrame(p.axes, index=p.genes).loc[pooled["genes"]].to_numpy()
    sign = np.sign((axes * pooled["axes"]).sum(axis=0))
    error = np.max(np.abs(axes * sign - pooled["axes"]))
    assert p.V.shape[1] == 20 and p.rounds == 6 and error < 1e-6
    coords = np.vstack([done.local_states[name].pca_coords for name in demo.sites])
    assert np.max(np.abs(coords * sign - pooled["coords"])) < 1e-6 * np.abs(coords).max()
    assert error / 3 < pca_steps.error_estimate(p) < 3 * error


def test_relevelled_contrast_equals_refit_with_that_reference(apeglm_runs, demo):
    """apeglm of batch b3 vs b2 (both non-reference) equals DESeq2's advice: declare b2 as
    the reference, refit, shrink the coefficient batch_b3_vs_b2."""
    fed, _ = apeglm_runs
    levels = {**demo.levels, "batch": ["b2", "b1", "b3"]}
    refit = quiet_deseq2(demo.sites, demo.design, levels=levels, shrink="apeglm",
                         shrink_coef="batch_b3_vs_b2")
    a, b = fed.lfc_shrink(("batch", "b3", "b2")), refit.lfc_shrink("batch_b3_vs_b2")
    ok = a.log2FoldChange.notna()
    assert ok.sum() > 500
    np.testing.assert_allclose(a.log2FoldChange[ok], b.log2FoldChange[ok], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.lfcSE[ok], b.lfcSE[ok], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# posterior summaries: calibration on known truth
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["apeglm", "normal"])
def test_posterior_calibration_on_known_truth(kind):
    """Simulated three-hospital study with known LFCs (60 samples x 2,000 genes, 10 % DE):
    among true non-null genes called at lfsr < 0.05 the wrong sign is <= 5 %; the 90 %
    posterior intervals cover >= 85 % of true LFCs."""
    study = make_demo_study(n_samples=60, n_genes=2000, seed=11)
    res = quiet_deseq2(study.sites, study.design, levels=study.levels,
                       contrasts=[("condition", "B", "A")], shrink=kind, min_cell_size=0)
    post = res.posterior(level=0.9)
    truth = study.truth.log2_fold_change.loc[post.index].to_numpy()
    ok = post.lfsr.notna().to_numpy()
    assert ok.mean() > 0.97
    called = ok & (post.lfsr < 0.05).to_numpy() & (truth != 0)
    assert called.sum() > 100
    wrong = np.sign(post.posteriorMean.to_numpy()[called]) != np.sign(truth[called])
    assert wrong.mean() <= 0.05
    cover = (post.credLower.to_numpy() <= truth) & (truth <= post.credUpper.to_numpy())
    assert cover[ok].mean() >= 0.85


# ---------------------------------------------------------------------------------------------
# the contract: columns, what was not computed, bad input, rounds and bytes
# ---------------------------------------------------------------------------------------------
def test_lfc_shrink_columns_svalue_and_what_was_not_computed(apeglm_runs):
    fed, _ = apeglm_runs
    with_s = fed.lfc_shrink(svalue=True)
    assert list(with_s.columns) == ["baseMean", "log2FoldChange", "lfcSE", "svalue"]
    post = fed.posterior()
    np.testing.assert_allclose(with_s.svalue, post.svalue)
    np.testing.assert_array_equal(post.posteriorMean, with_s.log2FoldChange)
    # a contrast against the base level is that coefficient (same posterior)
    pd.testing.assert_frame_equal(fed.lfc_shrink("condition_B_vs_A"), fed.lfc_shrink())
    with pytest.raises(ShrinkNotComputedError, match=r"shrank \['condition_B_vs_A', "
                       r"'batch_b3_vs_b2'\] with 'apeglm'.*shrink_coef"):
        fed.lfc_shrink(("batch", "b2", "b1"))
    with pytest.raises(ShrinkNotComputedError, match="type='normal'"):
        fed.lfc_shrink(type="normal")
    with pytest.raises(ValueError, match="numeric contrasts cannot be shrunk"):
        fed.lfc_shrink(np.array([0, 0, 0, 1.0]))
    table = fed.shrunk_results()
    assert {"log2FoldChangeShrunk", "lfcSEShrunk", "posteriorSD", "lfsr", "svalue",
            "probAbsLFCgt", "credLower", "credUpper"} <= set(table.columns)
    np.testing.assert_array_equal(table.log2FoldChange, fed.results().log2FoldChange)


def test_bad_shrink_and_pca_options_fail_before_anything_runs(demo):
    calls = []
    kw = dict(levels=demo.levels, progress=lambda *a: calls.append(a))
    for bad, match in [({"shrink": "ashr"}, "shrink must be one of"),
                       ({"shrink": "apeglm", "shrink_coef": "condition_C_vs_A"},
                        "not a coefficient"),
                       ({"shrink": "normal", "shrink_coef": ("batch", "b9", "b1")},
                        "not a level of 'batch'"),
                       ({"pca": True, "pca_group": "hospital"}, "not a factor"),
                       ({"pca": True, "pca_genes": 1}, "at least 2")]:
        with pytest.raises(ValueError, match=match):
            quiet_deseq2(demo.sites, demo.design, **kw, **bad)
    assert calls == []  # refused before the first task
    with pytest.raises(ValueError, match="interactions"):
        quiet_deseq2(demo.sites, "~ batch + condition + batch:condition", shrink="normal",
                     shrink_coef=("condition", "B", "A"), **kw)


def test_rounds_and_bytes_added_are_reported(demo):
    """The post-fit phase adds two sequential steps per round, and the payload each site
    sends is what its messages hold."""
    sites = dict(list(demo.sites.items())[:2])
    kw = dict(levels=demo.levels, secure_aggregation=False, cooks=False)
    base = quiet_deseq2(sites, demo.design, **kw)
    res = quiet_deseq2(sites, demo.design, shrink="apeglm", pca=True, record_messages=True,
                       **kw)
    post = res.facts["postfit"]
    assert post["rounds"] == 6 and post["sequential_steps"] == 12
    assert res.facts["sequential_steps"] - base.facts["sequential_steps"] == 12
    msgs = [m for m in res.facts["messages"] if m["step"].startswith("postfit_sums")]
    for name in sites:
        sent = sum(v.nbytes for m in msgs if m["site"] == name for v in m["message"].values())
        assert sent == post["payload_bytes_per_site"]
    assert sum(post["payload_bytes_per_round"]) == post["payload_bytes_per_site"]


# ---------------------------------------------------------------------------------------------
# privacy: what the post-fit phase sends
# ---------------------------------------------------------------------------------------------
def test_postfit_messages_are_sums_shaped_by_study_sizes():
    """Sites of 9 and 61 samples send post-fit messages of identical shapes, none with a
    site's sample count, and each is a sum over samples: site A's + site B's message is the
    message of A and B merged into one site (the per-site centroid rows: summed over rows)."""
    import anndata as ad

    from tests.test_privacy import _two_sites

    study, sites = _two_sites(n_small=9, n_large=61)
    kw = dict(levels=study.levels, genes=study.genes, record_messages=True,
              secure_aggregation=False, min_cell_size=0, shrink="apeglm", pca=True,
              rounds={"pca": 2})
    fed = quiet_deseq2(sites, study.design, **kw)
    merged = quiet_deseq2({"merged": ad.concat(list(sites.values()))}, study.design, **kw)

    def post(res, site):
        return [m for m in res.facts["messages"]
                if m["site"] == site and m["step"].startswith("postfit_sums")]

    small, large, whole = post(fed, "small"), post(fed, "large"), post(merged, "merged")
    assert len(small) == len(large) == len(whole) == fed.facts["postfit"]["rounds"] == 6
    for a, b, m in zip(small, large, whole, strict=True):
        assert set(a["message"]) == set(b["message"]) == set(m["message"])
        for key, value in m["message"].items():
            va, vb = np.asarray(a["message"][key]), np.asarray(b["message"][key])
            assert va.shape == vb.shape and not {9, 61} & set(va.shape), (key, va.shape)
            total = va + vb
            if ".by_site." in key:  # one row per declared site
                total, value = total.sum(axis=0), np.asarray(value).sum(axis=0)
            np.testing.assert_allclose(total, value, rtol=1e-7, atol=1e-8, err_msg=key)


# ---------------------------------------------------------------------------------------------
# every backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_postfit_on_substra_subprocess_backend_equals_simulation(tmp_path):
    """Shrinkage and PCA on substra's subprocess backend (real registered functions, datasets
    and tasks): the simulation's answer. Round counts cut to keep it at ~60 tasks."""
    demo = make_demo_study(n_samples=48, n_genes=40, seed=2)
    sites = dict(list(demo.sites.items())[:2])
    kw = dict(levels={"condition": ["A", "B"]}, genes=demo.genes, cooks=False,
              shrink="apeglm", shrink_coef="condition_B_vs_A", pca=True, pca_genes=30,
              rounds={"mu": 2, "genewise": 2, "map": 2, "final": 3, "shrink": 3, "pca": 1})
    real = quiet_deseq2(sites, "~ condition", backend="subprocess", workdir=tmp_path, **kw)
    sim = quiet_deseq2(sites, "~ condition", **kw)
    np.testing.assert_allclose(real.lfc_shrink().to_numpy(), sim.lfc_shrink().to_numpy(),
                               rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(real.posterior(threshold=0.5).to_numpy(),
                               sim.posterior(threshold=0.5).to_numpy(), rtol=1e-10,
                               equal_nan=True)
    np.testing.assert_allclose(real.state.pca.axes, sim.state.pca.axes, rtol=1e-12)
    np.testing.assert_allclose(real.pca["centroids"], sim.pca["centroids"], rtol=1e-12)
    assert real.facts["sequential_steps"] == sim.facts["sequential_steps"]
    assert real.facts["postfit"]["rounds"] == sim.facts["postfit"]["rounds"] == 3
