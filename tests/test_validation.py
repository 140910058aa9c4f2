"""Bad input gets a clear error naming the site, sample or gene, and the fix; nothing is sent."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

import fed_de
from fed_de.cli import app
from fed_de.demo_data import make_demo_study
from fed_de.errors import DesignError, SiteDataError, SiteTaskError


@pytest.fixture(scope="module")
def demo():
    return make_demo_study(n_samples=60, n_genes=150, seed=4)


def _run(sites, demo, **kw):
    kw.setdefault("levels", demo.levels)
    kw.setdefault("genes", demo.genes)
    kw.setdefault("min_cell_size", 0)  # the checks of a site's data, not the disclosure rules
    return fed_de.deseq2(sites, demo.design, **kw)


def _with_x(adata, X):
    out = adata.copy()
    out.X = X
    return out


def _sites(demo, **changes):
    sites = {k: v.copy() for k, v in demo.sites.items()}
    sites.update(changes)
    return sites


def test_non_integer_counts_refused_unless_rounded(demo):
    a = demo.sites["hospital_b"]
    X = np.asarray(a.X, dtype=float)
    X[2, 5] += 0.4
    with pytest.raises(SiteDataError, match=r"site 'hospital_b'.*non-integer.*"
                                            + a.obs_names[2] + r".*round_counts=True"):
        _run(_sites(demo, hospital_b=_with_x(a, X)), demo)
    res = _run(_sites(demo, hospital_b=_with_x(a, X)), demo, round_counts=True)
    ref = _run(demo.sites, demo)
    np.testing.assert_allclose(res.results().log2FoldChange, ref.results().log2FoldChange,
                               rtol=1e-12)


@pytest.mark.parametrize("bad, pattern", [(-1.0, "negative"), (np.nan, "NaN or infinite"),
                                          (np.inf, "NaN or infinite")])
def test_negative_nan_inf_counts(demo, bad, pattern):
    a = demo.sites["hospital_a"]
    X = np.asarray(a.X, dtype=float)
    X[0, 3] = bad
    with pytest.raises(SiteDataError, match=rf"site 'hospital_a': {pattern}.*"
                                            rf"{a.obs_names[0]}.*{a.var_names[3]}"):
        _run(_sites(demo, hospital_a=_with_x(a, X)), demo)


def test_sparse_and_dense_give_the_same_answer(demo):
    sparse = {k: _with_x(v, sp.csr_matrix(np.asarray(v.X, dtype=float)))
              for k, v in demo.sites.items()}
    a, b = _run(sparse, demo).results(), _run(demo.sites, demo).results()
    pd.testing.assert_frame_equal(a, b)


def test_gene_order_is_normalised_and_missing_or_extra_genes_are_errors(demo):
    a = demo.sites["hospital_c"]
    shuffled = a[:, a.var_names[::-1]].copy()
    pd.testing.assert_frame_equal(_run(_sites(demo, hospital_c=shuffled), demo).results(),
                                  _run(demo.sites, demo).results())
    with pytest.raises(SiteDataError, match=r"site 'hospital_c'.*missing.*G00007"):
        _run(_sites(demo, hospital_c=a[:, [g for g in a.var_names if g != "G00007"]].copy()),
             demo)
    extra = ad.concat([a, ad.AnnData(np.zeros((a.n_obs, 1)), obs=a.obs,
                                     var=pd.DataFrame(index=["EXTRA1"]))], axis=1)
    extra.obs = a.obs
    with pytest.raises(SiteDataError, match=r"not in the study's gene list.*EXTRA1"):
        _run(_sites(demo, hospital_c=extra), demo)


def test_duplicated_samples_and_empty_site(demo):
    a = demo.sites["hospital_a"].copy()
    names = list(a.obs_names)
    names[1] = names[0]
    a.obs_names = names
    with pytest.raises(SiteDataError, match=rf"duplicated sample id.*{names[0]}"):
        _run(_sites(demo, hospital_a=a), demo)
    empty = demo.sites["hospital_a"][:0].copy()
    with pytest.raises(SiteDataError, match="holds no samples"):
        _run(_sites(demo, hospital_a=empty), demo)


def test_design_column_missing_nan_covariate_undeclared_level(demo):
    a = demo.sites["hospital_b"].copy()
    a.obs = a.obs.drop(columns=["batch"])
    with pytest.raises(DesignError, match=r"site 'hospital_b'.*lacks design column.*batch"):
        _run(_sites(demo, hospital_b=a), demo)
    a = demo.sites["hospital_b"].copy()
    a.obs["batch"] = a.obs["batch"].astype(object)
    a.obs.iloc[3, a.obs.columns.get_loc("batch")] = None
    with pytest.raises(DesignError, match=rf"'batch' is missing.*{a.obs_names[3]}"):
        _run(_sites(demo, hospital_b=a), demo)
    a = demo.sites["hospital_b"].copy()
    a.obs["batch"] = a.obs["batch"].astype(object)
    a.obs.iloc[0, a.obs.columns.get_loc("batch")] = "b7"
    with pytest.raises(DesignError, match=r"'b7'.*does not declare"):
        _run(_sites(demo, hospital_b=a), demo)


def test_globally_rank_deficient_design_names_columns(demo):
    sites = {k: v[v.obs.batch != "b3"].copy() for k, v in demo.sites.items()}
    with pytest.raises(DesignError, match="not full rank.*batch_b3_vs_b1"):
        _run(sites, demo)


def test_unknown_contrast_factor_or_level(demo):
    with pytest.raises(ValueError, match="'treatment' is not a factor"):
        _run(demo.sites, demo, contrasts=[("treatment", "B", "A")])
    res = _run(demo.sites, demo)
    with pytest.raises(ValueError, match=r"'C' is not a level of 'condition'"):
        res.results(("condition", "C", "A"))


def test_failing_site_task_names_site_and_step_and_keeps_partial_facts(demo, monkeypatch):
    from fed_de.bulk.state import Site

    def boom(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Site, "cells", boom)
    with pytest.raises(SiteTaskError, match=r"log_sums.*'hospital_a'.*disk full") as info:
        _run(demo.sites, demo)
    assert info.value.site == "hospital_a"
    assert info.value.step == "log_sums"
    # the key round ran (3 sites + the aggregator); nothing of round 1 was sent
    assert info.value.facts["tasks"] == 4


def test_validate_command_reports_each_site(demo, tmp_path):
    folders = demo.write(tmp_path / "sites")
    bad = folders["hospital_b"] / "counts.csv"
    counts = pd.read_csv(bad, index_col=0)
    counts.iloc[1, 2] = -5
    counts.to_csv(bad)
    args = ["validate", "--design", demo.design, "--levels", "batch=b1,b2,b3",
            "--levels", "condition=A,B"]
    for name, path in folders.items():
        args += ["--site", f"{name}={path}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "hospital_a" in result.output and "ok" in result.output
    assert "negative" in result.output
