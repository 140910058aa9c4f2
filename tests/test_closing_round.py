"""The last IRLS round that also runs the one fallback round and closes the fit
(:func:`fed_de.bulk.closing.closing_round`, no Cook's) gives the results of the plan with
separate fallback and closing rounds, two rounds fewer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fed_de
from fed_de.bulk import closing, fallback
from fed_de.core.fallback import start_fallback
from fed_de.demo_data import make_demo_study


@pytest.fixture(scope="module")
def sparse():
    """A demo study with 40 genes of one to three non-zero counts (up to 3,000): IRLS
    diverges or stagnates on some, which the fallback takes."""
    s = make_demo_study(n_samples=150, n_genes=400, seed=5)
    rng = np.random.default_rng(1)
    sites = {}
    for name, ad in s.sites.items():
        ad = ad.copy()
        X = np.asarray(ad.X).copy()
        X[:, 20:60] = 0
        for g in range(20, 60):
            k = rng.integers(1, 4)
            X[rng.choice(X.shape[0], k, replace=False), g] = rng.choice([1, 5, 100, 3000], k)
        ad.X = X
        sites[name] = ad
    return s, sites


def _fit(study, sites, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fed_de.deseq2(sites, study.design, levels=study.levels, cooks=False,
                            min_nonzero=0, min_cell_size=0, **kw)
    return res, res.results(("condition", "B", "A"))


@pytest.mark.parametrize("kw", [{}, {"test": "LRT", "reduced": "~ batch"}],
                         ids=["wald", "lrt"])
def test_closing_round_equals_separate_rounds(sparse, kw, monkeypatch):
    study, sites = sparse
    active = []

    def spy(*args):
        out = start_fallback(*args)
        active.append(int(out.active.sum()))
        return out

    monkeypatch.setattr(fallback, "start_fallback", spy)
    fused, table = _fit(study, sites, **kw)
    monkeypatch.setattr(closing, "closing_round", lambda: None)
    apart, table_apart = _fit(study, sites, **kw)
    assert fused.facts["sequential_steps"] == apart.facts["sequential_steps"] - 4
    assert active[0] == active[1] > 0  # genes the fallback takes, in both plans
    assert table.columns.equals(table_apart.columns)
    for col in table.columns:
        np.testing.assert_allclose(table[col].to_numpy(float), table_apart[col].to_numpy(float),
                                   rtol=1e-12, atol=0, err_msg=col)
    np.testing.assert_array_equal(fused.dispersions["betaConv"],
                                  apart.dispersions["betaConv"])
