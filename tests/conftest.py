"""Shared fixtures: the bundled reference data and helpers to split it into sites."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

DATA = Path(__file__).parent / "data"


def read_site_layout(name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """counts (samples x genes) and metadata of a bundled dataset."""
    folder = DATA / name
    counts = pd.read_csv(folder / "counts.csv", index_col=0)
    meta = pd.read_csv(folder / "metadata.csv", index_col=0)
    return counts, meta.loc[counts.index]


def split_sites(counts: pd.DataFrame, meta: pd.DataFrame, n_sites: int, seed: int = 0,
                stratify: str | None = None) -> dict[str, ad.AnnData]:
    """Split samples into ``n_sites`` sites of unequal size (shuffled, seeded).

    With ``stratify``, samples are dealt so that every site holds every level of that column.
    """
    rng = np.random.default_rng(seed)
    n = len(counts)
    weights = np.arange(1, n_sites + 1, dtype=float)
    weights /= weights.sum()
    order = rng.permutation(n)
    if stratify is not None:
        order = np.concatenate([rng.permutation(np.flatnonzero(meta[stratify].to_numpy() == lv))
                                for lv in sorted(meta[stratify].unique())])
    bounds = np.round(np.cumsum(weights) * n).astype(int)[:-1]
    if stratify is not None:
        # deal round-robin-weighted so each site sees every stratum
        site_of = np.searchsorted(np.cumsum(weights), (np.arange(n) % 97 + 0.5) / 97)
        groups = [order[site_of == k] for k in range(n_sites)]
    else:
        groups = np.split(order, bounds)
    return {
        f"site{k}": ad.AnnData(counts.iloc[np.sort(g)].astype(np.float64),
                               obs=meta.iloc[np.sort(g)].copy())
        for k, g in enumerate(groups)
    }


@pytest.fixture(scope="session")
def synthetic() -> tuple[pd.DataFrame, pd.DataFrame]:
    """PyDESeq2's synthetic dataset (100 samples x 10 genes)."""
    return read_site_layout("pydeseq2_synthetic")
