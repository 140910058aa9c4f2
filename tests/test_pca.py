"""Federated PCA of VST values (fed_de.core.pca) against pooled SVD and R's plotPCA.

pasilla (7 samples, R DESeq2 1.38.3 ``plotPCA(vst(blind=FALSE), returnData=TRUE)`` and
``prcomp`` of its top-500 genes, make_refs.R): same 500 genes, same percentVar, coordinates to
~1e-9. Three sites give the pooled axes. With a block of b >= n - 1 = 6 columns one round of
subspace iteration is exact; with b = 3 (k = 2) 8 rounds reach 1e-9.

Rounds to 1e-6 (axes and eigenvalues) on the 150 x 5,000 demo study (3 sites), k = 2:
b = 2: 9, b = 4: 7, b = 7: 6, b = 10: 5, b = 20: 4; k = 3 (a small gap after PC3): b = 12: 9,
b = 30: 7. A round costs genes x b floats per site (500 x 10 x 8 B = 40 KB).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fed_de.core import pca
from fed_de.core import vst as vs

EXTRA = Path(__file__).parent / "data" / "r_extra" / "shrink" / "pasilla"
SITES = [np.array([0, 4]), np.array([1, 2, 5]), np.array([3, 6])]  # 7 pasilla samples


@pytest.fixture(scope="module")
def pasilla():
    counts = pd.read_csv(EXTRA / "counts.csv.gz", index_col=0)
    meta = pd.read_csv(EXTRA / "metadata.csv", index_col=0).loc[counts.index]
    sf = pd.read_csv(EXTRA / "size_factors.csv", index_col=0).loc[counts.index].iloc[:, 0]
    cfg = json.loads((EXTRA / "vst.json").read_text())["parametric"]
    coefs = [cfg["asymptDisp"], cfg["extraPois"]]
    y = counts.to_numpy(float)
    x = vs.vst(y, sf.to_numpy(), "parametric", coefs)
    shift = vs.vst_parametric((y / sf.to_numpy()[:, None]).mean(axis=0), *coefs)
    return {"x": x, "shift": shift, "genes": counts.columns, "meta": meta,
            "samples": counts.index, "ref": json.loads((EXTRA / "pca.json").read_text())}


def federated_pca(x, shift, sites, k, block, rounds, ntop=500, seed=0):
    tot = {}
    for m in (pca.vst_moments(x[s], shift) for s in sites):
        for key, v in m.items():
            tot[key] = tot.get(key, 0) + v
    top = pca.top_variable(tot, shift, ntop)
    V = pca.subspace_start(len(top["genes"]), block, seed)
    history = []
    for _ in range(rounds):
        CV = sum(pca.cov_product(x[s][:, top["genes"]], top["mean"], V) for s in sites)
        up = pca.subspace_update(V, CV, k)
        V = up["V"]
        history.append(up)
    return top, history


def test_top_genes_and_variances_match_r(pasilla):
    top, _ = federated_pca(pasilla["x"], pasilla["shift"], SITES, 2, 6, 1)
    assert list(pasilla["genes"][top["genes"]]) == pasilla["ref"]["top_genes"]
    np.testing.assert_allclose(top["var"], pasilla["x"][:, top["genes"]].var(axis=0, ddof=1),
                               rtol=1e-12)


def test_federated_pca_equals_pooled_and_r(pasilla):
    x, ref = pasilla["x"], pasilla["ref"]
    top, hist = federated_pca(x, pasilla["shift"], SITES, 4, 6, 1)
    fed = hist[-1]
    pooled = pca.pca_pooled(x, 500, 4)
    np.testing.assert_allclose(fed["axes"], pooled["axes"], atol=1e-9)  # signs aligned alike
    np.testing.assert_allclose(fed["values"], pooled["values"], rtol=1e-10)
    n = x.shape[0]
    np.testing.assert_allclose(fed["values"] / (n - 1), ref["sdev2"][:4], rtol=1e-8)
    np.testing.assert_allclose(fed["values"][:2] / ((n - 1) * top["total_var"]),
                               ref["percentVar"], rtol=1e-8)
    # each site's own coordinates, stacked, are prcomp's up to sign
    coords = np.empty((n, 4))
    for s in SITES:
        coords[s] = pca.site_coordinates(x[s][:, top["genes"]], top["mean"], fed["axes"])
    rx = pd.read_csv(EXTRA / "prcomp_x.csv", index_col=0).loc[pasilla["samples"]].to_numpy()
    sign = np.sign((rx * coords).sum(axis=0))
    np.testing.assert_allclose(coords * sign, rx, rtol=1e-7, atol=1e-8)
    plot = pd.read_csv(EXTRA / "plotpca.csv", index_col=0).loc[pasilla["samples"]]
    np.testing.assert_allclose(coords[:, :2] * sign[:2], plot[["PC1", "PC2"]], atol=1e-8)


def test_small_block_converges(pasilla):
    """k = 2 with b = 3 < rank: 8 rounds reach the exact axes to 1e-9."""
    x = pasilla["x"]
    _, hist = federated_pca(x, pasilla["shift"], SITES, 2, 3, 8)
    pooled = pca.pca_pooled(x, 500, 2)
    err = [np.abs(h["axes"] - pooled["axes"]).max() for h in hist]
    assert err[-1] < 1e-9 and err[0] > 1e-4  # it does need the rounds
    assert hist[-1]["residual"].max() < 1e-8


def test_demo_rounds_to_1e6():
    """60 samples x 2,000 genes over three hospitals (true trend and size factors), k = 2,
    b = 10: six rounds reach 1e-6 (five: 1.4e-6)."""
    from fed_de.demo_data import make_demo_study

    study = make_demo_study(n_samples=60, n_genes=2000, seed=2)
    xs = [vs.vst(np.asarray(a.X, float), study.size_factors.loc[a.obs_names].to_numpy(),
                 "parametric", [0.05, 2.0]) for a in study.sites.values()]
    x = np.vstack(xs)
    bounds = np.cumsum([0] + [len(v) for v in xs])
    sites = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(xs))]
    shift = vs.vst_parametric(study.truth.base_mean.to_numpy(), 0.05, 2.0)
    _, hist = federated_pca(x, shift, sites, 2, 10, 6)
    pooled = pca.pca_pooled(x, 500, 2)
    last = hist[-1]
    assert np.abs(last["axes"] - pooled["axes"]).max() < 1e-6
    assert np.abs(last["values"] / pooled["values"] - 1).max() < 1e-6


def test_centroids_only_over_large_groups(pasilla):
    """Sites send per-level sums only for groups of >= min_cell_size of their samples."""
    x = pasilla["x"]
    sites = [np.array([0, 1, 4, 5]), np.array([2, 3, 6])]  # the second has one treated sample
    top, hist = federated_pca(x, pasilla["shift"], sites, 2, 6, 1)
    axes = hist[-1]["axes"]
    levels = sorted(pasilla["meta"].condition.unique())
    codes = pasilla["meta"].condition.map({lv: i for i, lv in enumerate(levels)}).to_numpy()
    sums = []
    for s in sites:
        coords = pca.site_coordinates(x[s][:, top["genes"]], top["mean"], axes)
        sums.append(pca.level_sums(coords, codes[s], len(levels), min_cell_size=2))
    cen = pca.centroids(sums)
    coords = (x[:, top["genes"]] - top["mean"]) @ axes
    disclosed = np.zeros(len(codes), bool)
    for s, part in zip(sites, sums, strict=True):
        for lv in range(len(levels)):
            if part["n"][lv] > 0:
                disclosed[s[codes[s] == lv]] = True
            else:  # a group under min_cell_size sends nothing
                assert (codes[s] == lv).sum() < 2 and not part["sum"][lv].any()
    for lv in range(len(levels)):
        use = disclosed & (codes == lv)
        np.testing.assert_allclose(cen["pooled"][lv], coords[use].mean(axis=0), atol=1e-12)
    assert cen["pooled_n"].sum() == disclosed.sum() == len(codes) - 1
    assert np.isnan(cen["by_site"][1, levels.index("treated")]).all()
