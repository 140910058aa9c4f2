"""A site's data: what a data node's opener hands to the local steps, read-only.

A site is an AnnData (raw counts in ``X``, samples x genes, sample metadata in ``obs``), an
``.h5ad`` file, or a folder with ``counts.csv`` (samples x genes, first column = sample id)
and ``metadata.csv`` (first column = sample id). The same loader backs the substratools opener
of the substra backends (:mod:`fed_de.backends.opener`), so simulation and real execution read
data identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fed_de.errors import SiteDataError

SITE_META = "site.json"  # names the site in a substra data sample folder


@dataclass(frozen=True, eq=False)
class SiteData:
    """One site's samples, immutable: counts are a read-only array, obs is copied on access."""

    name: str
    counts: np.ndarray | sp.csr_matrix
    genes: tuple[str, ...]
    samples: tuple[str, ...]
    _obs: pd.DataFrame

    @property
    def obs(self) -> pd.DataFrame:
        """A copy of the sample metadata (the site's own data is never modified)."""
        return self._obs.copy()

    @property
    def n_samples(self) -> int:
        """Number of samples held at this site."""
        return len(self.samples)


def site_from_anndata(adata, name: str) -> SiteData:
    """Wrap an AnnData (samples x genes, raw counts in X) as read-only site data."""
    X = adata.X
    if X is None:
        raise SiteDataError(f"site {name!r}: AnnData.X is empty; put the raw counts in X")
    return _freeze_site(
        name, X, [str(g) for g in adata.var_names], [str(s) for s in adata.obs_names],
        adata.obs,
    )


def load_site(source, name: str) -> SiteData:
    """Load a site from an AnnData, an ``.h5ad`` path, or a folder of CSVs."""
    if isinstance(source, SiteData):
        return source
    if hasattr(source, "X") and hasattr(source, "obs"):
        return site_from_anndata(source, name)
    path = Path(source)
    if path.is_file() and path.suffix == ".h5ad":
        import anndata as ad

        return site_from_anndata(ad.read_h5ad(path), name)
    if path.is_dir():
        h5 = sorted(path.glob("*.h5ad"))
        if (path / "counts.csv").exists():
            return _load_csv_folder(path, name)
        if len(h5) == 1:
            return load_site(h5[0], name)
        raise SiteDataError(
            f"site {name!r}: {path} holds neither counts.csv + metadata.csv nor one .h5ad file"
        )
    raise SiteDataError(f"site {name!r}: {source!r} is not an AnnData, an .h5ad file or a folder")


def _load_csv_folder(path: Path, name: str) -> SiteData:
    meta_path = path / "metadata.csv"
    if not meta_path.exists():
        raise SiteDataError(f"site {name!r}: {path} has counts.csv but no metadata.csv")
    counts = pd.read_csv(path / "counts.csv", index_col=0)
    meta = pd.read_csv(meta_path, index_col=0)
    counts.index = counts.index.astype(str)
    meta.index = meta.index.astype(str)
    missing = counts.index.difference(meta.index)
    if len(missing):
        raise SiteDataError(
            f"site {name!r}: sample(s) {list(missing[:5])} are in counts.csv but not in "
            "metadata.csv; add their metadata or remove them from the counts"
        )
    meta = meta.loc[counts.index]
    try:
        values = counts.to_numpy(dtype=np.float64)
    except ValueError as err:
        raise SiteDataError(f"site {name!r}: counts.csv holds non-numeric values ({err})") from None
    return _freeze_site(name, values, list(counts.columns.astype(str)), list(counts.index), meta)


def _freeze_site(name, X, genes, samples, obs) -> SiteData:
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64, copy=True)
        for arr in (X.data, X.indices, X.indptr):
            arr.setflags(write=False)
    else:
        X = np.array(X, dtype=np.float64, copy=True)
        X.setflags(write=False)
    obs = pd.DataFrame(obs).copy()
    obs.index = pd.Index(samples)
    return SiteData(name=name, counts=X, genes=tuple(genes), samples=tuple(samples), _obs=obs)
