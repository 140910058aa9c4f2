"""Property-based: the federated answer does not depend on how samples are arranged in sites."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fed_de

COLUMNS = ["baseMean", "log2FoldChange", "lfcSE", "stat", "pvalue"]


def _study(seed: int, n: int = 36, g: int = 30) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    cond = np.array(["A", "B"] * (n // 2))
    mean = rng.lognormal(3, 1.2, g)
    lfc = np.where(rng.random(g) < 0.3, rng.normal(0, 1.5, g), 0.0)
    sf = rng.lognormal(0, 0.2, n)
    mu = sf[:, None] * mean[None, :] * np.exp(np.outer(cond == "B", lfc))
    disp = 0.05 + 1.0 / mean
    counts = rng.negative_binomial(1 / disp, 1 / (1 + disp * mu)).astype(float)
    obs = pd.DataFrame({"condition": cond}, index=[f"s{i}" for i in range(n)])
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))


def _fit(sites: dict, genes: list[str]) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fed_de.deseq2(sites, "~ condition", levels={"condition": ["A", "B"]},
                            genes=genes, min_cell_size=0)
    out = res.results()[COLUMNS].copy()
    out["dispersion"] = res.dispersions["final"]
    return out


def _split(adata: ad.AnnData, order: np.ndarray, cuts: list[int]) -> dict:
    parts = np.split(order, sorted(cuts))
    return {f"site{k}": adata[idx].copy() for k, idx in enumerate(parts) if len(idx) >= 3}


def _assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6, atol=1e-12)


DATA = _study(0)
GENES = list(DATA.var_names)
REFERENCE = _fit({"all": DATA}, GENES)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_sites=st.integers(2, 5))
def test_any_split_into_sites_gives_the_pooled_answer(seed, n_sites):
    rng = np.random.default_rng(seed)
    order = rng.permutation(DATA.n_obs)
    cuts = list(rng.choice(np.arange(3, DATA.n_obs - 3), n_sites - 1, replace=False))
    sites = _split(DATA, order, cuts)
    # every site must hold p + 1 = 3 samples; tiny fragments were merged away above
    covered = sum(s.n_obs for s in sites.values())
    if covered != DATA.n_obs:
        return
    _assert_same(_fit(sites, GENES), REFERENCE)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_site_order_and_sample_order_do_not_matter(seed):
    rng = np.random.default_rng(seed)
    order = rng.permutation(DATA.n_obs)
    sites = _split(DATA, order, [12, 24])
    names = list(sites)
    rng.shuffle(names)
    reordered = {n: sites[n][rng.permutation(sites[n].n_obs)].copy() for n in names}
    _assert_same(_fit(reordered, GENES), REFERENCE)
