"""Federated size factors and baseMean against pooled PyDESeq2 and R DESeq2."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydeseq2.dds import DeseqDataSet
from pydeseq2.preprocessing import deseq2_norm

import fed_de
from fed_de.demo_data import make_demo_study
from fed_de.errors import NoCommonGeneError
from fed_de.federation.secure import KEY_ROUND_STEPS
from tests.conftest import DATA, split_sites


def _federated_sf(result, sites) -> np.ndarray:
    return np.concatenate([result.size_factors[name].to_numpy() for name in sites])


def _pooled_order(sites) -> list[str]:
    return [s for a in sites.values() for s in a.obs_names]


@pytest.mark.parametrize("n_sites", [1, 3, 7])
def test_ratio_size_factors_equal_pydeseq2(n_sites):
    study = make_demo_study(n_samples=80, n_genes=600, seed=n_sites)
    pooled = study.pooled()
    # the demo study has zeros in many genes; ratio needs genes expressed everywhere
    counts = pd.DataFrame(np.asarray(pooled.X, dtype=float), index=pooled.obs_names,
                          columns=pooled.var_names)
    sites = split_sites(counts, pooled.obs.copy(), n_sites, seed=n_sites)
    res = fed_de.size_factors(sites, "~ condition", min_cell_size=0)
    order = _pooled_order(sites)
    _, ref_sf = deseq2_norm(counts.loc[order].to_numpy())
    np.testing.assert_allclose(_federated_sf(res, sites), ref_sf, rtol=1e-12)
    ref_bm = (counts.loc[order].to_numpy() / ref_sf[:, None]).mean(axis=0)
    np.testing.assert_allclose(res.base_mean.to_numpy(), ref_bm, rtol=1e-12)
    assert res.facts["sequential_steps"] == 5 + (KEY_ROUND_STEPS if n_sites > 1 else 0)


@pytest.mark.parametrize("n_sites", [1, 3, 7])
def test_poscounts_equal_pydeseq2(n_sites, synthetic):
    counts, meta = synthetic
    counts = counts.copy()
    rng = np.random.default_rng(1)
    counts = counts.mask(rng.random(counts.shape) < 0.2, 0)  # zeros everywhere: ratio fails
    sites = split_sites(counts, meta, n_sites, seed=2)
    order = _pooled_order(sites)
    res = fed_de.size_factors(sites, "~ condition", kind="poscounts", min_cell_size=0)
    dds = DeseqDataSet(counts=counts.loc[order], metadata=meta.loc[order],
                       design="~condition", quiet=True)
    dds.fit_size_factors(fit_type="poscounts")
    # PyDESeq2 keeps only genes with log geometric mean > 0; DESeq2 keeps every finite one.
    # All genes here have geometric means > 1, so both rules agree.
    assert (dds.logmeans > 0).all()
    np.testing.assert_allclose(_federated_sf(res, sites), dds.obs["size_factors"], rtol=1e-12)
    ref_bm = dds.layers["normed_counts"].mean(axis=0)
    np.testing.assert_allclose(res.base_mean.to_numpy(), ref_bm, rtol=1e-12)


def test_ratio_matches_r_deseq2(synthetic):
    counts, meta = synthetic
    r_sf = pd.read_csv(DATA / "r134/single_factor/r_test_size_factors.csv", index_col=0).iloc[:, 0]
    sites = split_sites(counts, meta, 3, seed=5)
    res = fed_de.size_factors(sites, "~ condition", min_cell_size=0)
    fed = pd.concat(res.size_factors.values())
    np.testing.assert_allclose(fed.loc[r_sf.index], r_sf.to_numpy(), rtol=1e-8)


def test_poscounts_matches_r_deseq2(synthetic):
    counts, meta = synthetic
    path = DATA / "r134/single_factor/r_test_size_factors_poscount.csv"
    r_sf = pd.read_csv(path, index_col=0).iloc[:, 0]
    sites = split_sites(counts, meta, 3, seed=6)
    res = fed_de.size_factors(sites, "~ condition", kind="poscounts", min_cell_size=0)
    fed = pd.concat(res.size_factors.values())
    np.testing.assert_allclose(fed.loc[r_sf.index], r_sf.to_numpy(), rtol=1e-8)


def test_poscounts_keeps_low_geometric_means_like_deseq2():
    """A gene with geometric mean below 1 enters DESeq2's poscounts median (not PyDESeq2's)."""
    counts = pd.DataFrame([[1, 5, 10, 1], [2, 7, 11, 1], [1, 9, 30, 2], [3, 5, 12, 1]],
                          index=["a", "b", "c", "d"], columns=["g1", "g2", "g3", "g4"],
                          dtype=float)
    counts.loc["a", "g4"] = 0
    meta = pd.DataFrame({"condition": ["A", "B", "A", "B"]}, index=counts.index)
    import anndata as ad

    res = fed_de.size_factors({"s": ad.AnnData(counts, obs=meta)}, kind="poscounts",
                              min_cell_size=0)
    logc = np.log(counts.where(counts > 0))
    loggeo = logc.fillna(0).sum() / len(counts)  # geoMeanNZ
    raw = np.exp((logc - loggeo).median(axis=1, skipna=True))
    expected = raw / np.exp(np.log(raw).mean())
    np.testing.assert_allclose(res.size_factors["s"].to_numpy(), expected.to_numpy(), rtol=1e-12)


def test_no_gene_expressed_everywhere_points_to_poscounts(synthetic):
    counts, meta = synthetic
    counts = counts.copy()
    for j, gene in enumerate(counts.columns):
        counts.iloc[j, counts.columns.get_loc(gene)] = 0  # a zero in every gene
    sites = split_sites(counts, meta, 2)
    with pytest.raises(NoCommonGeneError, match="poscounts"):
        fed_de.size_factors(sites, "~ condition", min_cell_size=0)
    res = fed_de.size_factors(sites, "~ condition", kind="poscounts", min_cell_size=0)
    assert all(np.isfinite(s).all() for s in res.size_factors.values())
