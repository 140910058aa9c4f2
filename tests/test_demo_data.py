"""Tests of the seeded three-hospital demo study generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fed_de.demo_data import SITE_NAMES, DemoStudy, make_demo_study

N_SAMPLES, N_GENES = 150, 2000


@pytest.fixture(scope="module")
def study() -> DemoStudy:
    return make_demo_study(n_samples=N_SAMPLES, n_genes=N_GENES, seed=3)


def test_same_seed_same_study(study: DemoStudy) -> None:
    again = make_demo_study(n_samples=N_SAMPLES, n_genes=N_GENES, seed=3)
    for name in SITE_NAMES:
        np.testing.assert_array_equal(study.sites[name].X, again.sites[name].X)
        pd.testing.assert_frame_equal(study.sites[name].obs, again.sites[name].obs)
    pd.testing.assert_frame_equal(study.truth, again.truth)
    other = make_demo_study(n_samples=N_SAMPLES, n_genes=N_GENES, seed=4)
    assert not np.array_equal(study.pooled().X, other.pooled().X)


def test_declaration(study: DemoStudy) -> None:
    assert study.levels == {"condition": ["A", "B"], "batch": ["b1", "b2", "b3"]}
    assert study.design == "~ batch + condition"
    assert study.genes[:2] == ["G00001", "G00002"]
    assert len(study.genes) == len(set(study.genes)) == N_GENES
    assert list(study.truth.index) == study.genes
    assert {"base_mean", "dispersion", "log2_fold_change", "is_de"} <= set(study.truth.columns)
    assert study.truth["is_de"].sum() == round(0.1 * N_GENES)
    assert (study.truth.loc[~study.truth["is_de"], "log2_fold_change"] == 0).all()
    assert (study.truth.loc[study.truth["is_de"], "log2_fold_change"].abs() >= 0.5).all()
    assert make_demo_study(100, 300, n_de=7).truth["is_de"].sum() == 7


def test_shapes_and_site_sizes(study: DemoStudy) -> None:
    assert list(study.sites) == list(SITE_NAMES)
    sizes = [study.sites[name].n_obs for name in SITE_NAMES]
    assert sizes == [75, 50, 25]
    ids = []
    for adata in study.sites.values():
        assert adata.n_vars == N_GENES
        assert list(adata.var_names) == study.genes
        assert isinstance(adata.X, np.ndarray) and adata.X.dtype == np.int64
        assert (adata.X >= 0).all()
        assert adata.obs["condition"].dtype == object and adata.obs["batch"].dtype == object
        ids.extend(adata.obs_names)
    assert len(ids) == len(set(ids)) == N_SAMPLES
    assert all(i.startswith("S") for i in ids)
    pooled = study.pooled()
    assert pooled.shape == (N_SAMPLES, N_GENES)
    assert list(pooled.obs_names) == ids
    assert list(pooled.var_names) == study.genes
    assert pooled.obs["condition"].dtype == object


@pytest.mark.parametrize("n_samples", [48, 61, 150, 400])
def test_hospital_c_lacks_b3_and_cells_are_filled(n_samples: int) -> None:
    study = make_demo_study(n_samples=n_samples, n_genes=50, seed=n_samples)
    assert sum(a.n_obs for a in study.sites.values()) == n_samples
    for name, adata in study.sites.items():
        obs = adata.obs
        assert set(obs["condition"]) == {"A", "B"}
        expected_batches = {"b1", "b2"} if name == "hospital_c" else {"b1", "b2", "b3"}
        assert set(obs["batch"]) == expected_batches
        cells = obs.groupby(["batch", "condition"]).size()
        assert len(cells) == 2 * len(expected_batches)
        assert (cells >= 3).all()


def test_too_few_samples() -> None:
    with pytest.raises(ValueError, match="too small"):
        make_demo_study(n_samples=40, n_genes=10)
    with pytest.raises(ValueError, match="n_de"):
        make_demo_study(n_genes=10, n_de=11)


def test_realistic_gene_distribution() -> None:
    truth = make_demo_study(n_samples=150, n_genes=5000, seed=0).truth
    assert 40 < truth["base_mean"].median() < 120
    assert 0.005 <= (truth["base_mean"] < 0.1).mean() <= 0.02
    assert truth["base_mean"].max() > 1e4
    # dispersion trend: high for lowly expressed genes, ~a0 for highly expressed ones
    high = truth.loc[truth["base_mean"] > 1000, "dispersion"].median()
    mid = truth.loc[truth["base_mean"].between(2, 5), "dispersion"].median()
    assert 0.03 < high < 0.1
    assert mid > 5 * high


def test_de_genes_shift_condition_means(study: DemoStudy) -> None:
    pooled = study.pooled()
    normed = pooled.X / study.size_factors[pooled.obs_names].to_numpy()[:, None]
    is_b = (pooled.obs["condition"] == "B").to_numpy()
    observed = np.log2((normed[is_b].mean(0) + 0.5) / (normed[~is_b].mean(0) + 0.5))
    truth = study.truth
    mask = (truth["is_de"] & (truth["base_mean"] > 10)).to_numpy()
    assert mask.sum() > 50
    r = np.corrcoef(observed[mask], truth["log2_fold_change"].to_numpy()[mask])[0, 1]
    assert r > 0.8
    # the true signs are recovered for nearly every large effect
    big = mask & (truth["log2_fold_change"].abs() > 1).to_numpy()
    signs = np.sign(observed[big]) == np.sign(truth["log2_fold_change"].to_numpy()[big])
    assert signs.mean() > 0.95


def test_write_round_trips(study: DemoStudy, tmp_path: Path) -> None:
    paths = study.write(tmp_path / "demo")
    assert list(paths) == list(SITE_NAMES)
    for name, folder in paths.items():
        assert folder == tmp_path / "demo" / name
        counts = pd.read_csv(folder / "counts.csv", index_col="sample")
        meta = pd.read_csv(folder / "metadata.csv", index_col="sample")
        adata = study.sites[name]
        assert list(counts.index) == list(adata.obs_names)
        assert list(counts.columns) == study.genes
        np.testing.assert_array_equal(counts.to_numpy(), adata.X)
        assert list(meta.index) == list(adata.obs_names)
        assert list(meta["condition"]) == list(adata.obs["condition"])
        assert list(meta["batch"]) == list(adata.obs["batch"])
        header = (folder / "counts.csv").read_text().split("\n", 1)[0].split(",")
        assert header[:2] == ["sample", "G00001"]
        assert (folder / "metadata.csv").read_text().startswith("sample,")


@pytest.mark.parametrize(("n_samples", "n_sites"), [(50, 2), (50, 5), (300, 20), (1000, 20)])
def test_n_sites_layout(n_samples: int, n_sites: int) -> None:
    """Other site counts: every sample placed once, sizes not increasing, every existing
    (batch, condition) cell of a site holds >= 3 samples, every batch held somewhere, and
    the genes (truth) are those of the three-site study of the same seed."""
    study = make_demo_study(n_samples=n_samples, n_genes=40, seed=9, n_sites=n_sites)
    assert list(study.sites) == [f"hospital_{i + 1:02d}" for i in range(n_sites)]
    sizes = [a.n_obs for a in study.sites.values()]
    assert sum(sizes) == n_samples and min(sizes) >= 6
    assert sizes[0] > sizes[-1]
    held = set()
    for adata in study.sites.values():
        cells = adata.obs.groupby(["batch", "condition"]).size()
        assert set(adata.obs["condition"]) == {"A", "B"}
        assert len(cells) == 2 * adata.obs["batch"].nunique() and (cells >= 3).all()
        held |= set(adata.obs["batch"])
    assert held == {"b1", "b2", "b3"}
    three = make_demo_study(n_samples=n_samples, n_genes=40, seed=9)
    pd.testing.assert_frame_equal(study.truth.drop(columns="base_mean"),
                                  three.truth.drop(columns="base_mean"))
    assert study.pooled().shape == (n_samples, 40)


def test_n_sites_too_many_for_the_samples() -> None:
    with pytest.raises(ValueError, match="too small for 10 sites.*fewer sites"):
        make_demo_study(n_samples=50, n_genes=10, n_sites=10)
