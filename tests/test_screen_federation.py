"""A federated screen equals the same cells analysed as one site; rounds, messages, chunks.

- 3 sites = one site holding every cell (with the site as a covariate, which is what the
  federated site effect is), <= 1e-6 relative on every output, for every method;
- sequential steps do not depend on the number of perturbations (<= 30 for ``nb_glm``);
- every message is a sum: its shapes do not depend on a site's number of cells;
- a backed ``.h5ad`` read in small chunks gives the in-memory answer.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

from fed_de.backends.plan import record_plan
from fed_de.federation.secure import KEY_ROUND_STEPS
from fed_de.screening.api import COLUMNS, screen
from fed_de.screening.data import make_screen
from fed_de.screening.strategy import ScreenStrategy
from fed_de.screening.study import ScreenStudy

KW = {"perturbation_column": "perturbation", "control": "non-targeting"}


def same_rules(method: str) -> dict:
    """Options that give a federated run and its pooled twin the same disclosure decisions.
    Rank tests run without site effects, so their federated design cells pool the sites,
    while the pooled twin's site covariate splits them: the expressing-cell rule per design
    cell's controls then differs by design (docs/privacy.md), so it is turned off for both."""
    return {"min_nonzero": 1} if method == "wilcoxon" else {}


@pytest.fixture(scope="module")
def small_screen():
    return make_screen(n_cells=3000, n_genes=200, n_perturbations=10, seed=0)


def assert_same(a, b, rtol=1e-6):
    for k in COLUMNS:
        x, y = a.arrays[k], b.arrays[k]
        assert np.array_equal(np.isnan(x), np.isnan(y)), k
        ok = np.isfinite(x)
        assert np.allclose(x[ok], y[ok], rtol=rtol, atol=1e-300), k
    assert np.array_equal(a.tested, b.tested)


@pytest.mark.parametrize("method", ["nb_glm", "wilcoxon", "t_test"])
def test_federated_equals_pooled(small_screen, method):
    scr = small_screen
    fed = screen(scr.sites, **KW, method=method, **same_rules(method))
    pooled = screen({"all": scr.pooled()}, **KW, method=method, **same_rules(method),
                    covariates=["site"] if method != "t_test" else None,
                    levels={"site": list(scr.sites)})
    assert_same(fed, pooled)
    assert fed.tested.sum() > 500
    if method == "nb_glm":
        assert fed.facts["site_effects"]
        for col in fed.gene_table.columns:
            x, y = fed.gene_table[col].to_numpy(), pooled.gene_table[col].to_numpy()
            ok = np.isfinite(x)
            assert np.allclose(x[ok], y[ok], rtol=1e-6), col
        assert fed.converged[fed.tested].all()


@pytest.mark.parametrize("method", ["nb_glm", "wilcoxon"])
def test_covariate_federated_equals_pooled(method):
    """An additive design (site + batch, batch crossing the sites) and van Elteren strata
    (site x batch) give the pooled answer."""
    scr = make_screen(n_cells=3000, n_genes=120, n_perturbations=6, seed=5)
    rng = np.random.default_rng(0)
    sites = {}
    for name, a in scr.sites.items():
        a = a.copy()
        a.obs["batch"] = rng.choice(["b1", "b2"], a.n_obs)
        sites[name] = a
    pooled_ad = ad.concat(list(sites.values()), merge="same")
    fed = screen(sites, **KW, method=method, covariates=["batch"], **same_rules(method))
    pooled = screen({"all": pooled_ad}, **KW, method=method, covariates=["site", "batch"],
                    levels={"site": list(sites)}, **same_rules(method))
    assert_same(fed, pooled)
    if method == "nb_glm":
        assert fed.study.fit_design.shape == (6, 4)  # additive: not cell means
        assert fed.converged[fed.tested].all()


def test_site_order_and_unequal_split_do_not_matter(small_screen):
    scr = small_screen
    a = screen(scr.sites, **KW, site_effects=False)
    b = screen(dict(reversed(list(scr.sites.items()))), **KW, site_effects=False)
    assert_same(a, b)
    c = screen({"one": scr.pooled()}, **KW)
    assert_same(a, c)


def test_rounds_do_not_depend_on_perturbations():
    steps = {}
    for P in (5, 60):
        scr = make_screen(n_cells=1200, n_genes=30, n_perturbations=P, seed=1)
        study = ScreenStudy(genes=scr.genes, perturbations=scr.perturbations,
                            control="non-targeting", perturbation_column="perturbation",
                            factors=[["site", list(scr.sites)]], site_factor=True)
        strategy = ScreenStrategy(study.to_dict())
        steps[P] = record_plan(strategy, list(scr.sites)).sequential_steps
    assert steps[5] == steps[60] <= 30 + KEY_ROUND_STEPS
    res = screen(make_screen(1500, 40, 6, seed=2).sites, **KW, size_factors="poscounts")
    assert res.facts["sequential_steps"] <= 30 + KEY_ROUND_STEPS  # secure aggregation's keys


def test_messages_are_sums_not_cells():
    """Sites of very different sizes send messages of identical keys and shapes."""
    shapes = []
    for n in (900, 2700):
        scr = make_screen(n_cells=n, n_genes=40, n_perturbations=4, seed=3)
        res = screen(scr.sites, **KW, record_messages=True, secure_aggregation=False)
        msgs = res.facts["messages"]
        by_step = {}
        for m in msgs:
            by_step.setdefault(m["step"], {k: np.shape(v) for k, v in m["message"].items()})
        shapes.append(by_step)
        for m in msgs:
            for v in m["message"].values():
                assert n not in np.shape(v) and not any(
                    d == a.n_obs for d in np.shape(v) for a in scr.sites.values())
    assert shapes[0] == shapes[1]


def test_backed_chunks_equal_in_memory(tmp_path, small_screen):
    """A backed file read 250 cells at a time gives the in-memory answer; nothing of the
    count matrix is held in memory."""
    paths = small_screen.write(tmp_path)
    for method in ("nb_glm", "wilcoxon", "t_test"):
        mem = screen(small_screen.sites, **KW, method=method)
        backed = screen(paths, **KW, method=method, backed=True, chunk_size=250,
                        measure_memory=True)
        assert_same(mem, backed, rtol=1e-10)
        peaks = backed.facts["peak_memory_by_site"]
        assert all(v["resident_counts_bytes"] == 0 for v in peaks.values())


def test_memory_follows_chunk_size(tmp_path):
    """The same backed sites read in chunks of 100 or 1500 cells: the working memory of
    every site shrinks with the chunk, whatever the number of cells."""
    scr = make_screen(n_cells=3000, n_genes=400, n_perturbations=4, seed=4)
    paths = scr.write(tmp_path)
    peak = {}
    for chunk in (100, 1500):
        res = screen(paths, **KW, backed=True, chunk_size=chunk, measure_memory=True,
                     dispersion="moments")
        peak[chunk] = {k: v["task_peak_bytes"]
                       for k, v in res.facts["peak_memory_by_site"].items()}
    for name in paths:
        assert peak[100][name] < 0.5 * peak[1500][name]


def test_errors_name_the_fix(small_screen):
    from fed_de.errors import DesignError

    sites = dict(small_screen.sites)
    no_ctrl = sites["site_a"][sites["site_a"].obs["perturbation"] != "non-targeting"].copy()
    with pytest.raises(Exception, match="control"):
        screen({**sites, "site_a": no_ctrl}, **KW)
    with pytest.raises(DesignError, match="no cell is labelled"):
        screen(sites, perturbation_column="perturbation", control="NT")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match="obs has no column"):
            screen(sites, perturbation_column="guide", control="non-targeting")


def test_gene_order_dense_counts_and_absent_perturbation():
    """A site with its genes in another order, one with dense integer counts, a site with
    control cells only and a declared perturbation present nowhere change nothing else."""
    scr = make_screen(n_cells=2000, n_genes=80, n_perturbations=5, seed=0)
    sites = dict(scr.sites)
    perm = np.random.default_rng(0).permutation(scr.sites["site_b"].n_vars)
    sites["site_b"] = sites["site_b"][:, perm].copy()
    sites["site_c"] = sites["site_c"].copy()
    sites["site_c"].X = sites["site_c"].X.toarray().astype(np.int64)
    ref = screen(scr.sites, **KW)
    assert_same(screen(sites, **KW, genes=scr.genes), ref, rtol=1e-12)
    a = scr.sites["site_a"]
    only_ctrl = a[a.obs["perturbation"] == "non-targeting"].copy()
    res = screen({**scr.sites, "site_a": only_ctrl}, **KW,
                 perturbations=[*scr.perturbations, "ABSENT"])
    assert np.isnan(res["ABSENT"]["pvalue"]).all() and res.n_cells["ABSENT"] == 0
    assert np.isfinite(res.arrays["pvalue"]).sum() > 200
