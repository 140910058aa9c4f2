"""Screen sites (cells, read in row chunks) and a seeded synthetic perturbation screen.

A screen site is an AnnData of cells x genes with raw UMI counts in ``X`` (sparse CSR, in
memory or a backed ``.h5ad``) and a perturbation column in ``obs``. The local steps never hold
the whole count matrix as a dense array: they read it in row chunks of ``chunk_size`` cells
(``adata.X[start:stop]`` on a backed file), so a site's working memory is set by the chunk
size, not by its number of cells.

The generator (:func:`make_screen`) draws a Perturb-seq-like screen with a known truth:

- ~90 % zeros: gene means are log-normal around 0.04 UMI/cell (sd 1.6 in log); dispersions
  follow a trend ``alpha = a0 + a1 / mu`` with log-normal scatter;
- library-size variation (log-normal, sd 0.39) and a sequencing depth per site;
- a per-gene batch effect per site (log-normal, sd 0.2);
- null perturbations (no effect), and active ones with a knock-down target (log2 fold change
  -1.5 to -3 on a well-expressed gene) and off-target effects on a few genes (|log2 FC| 0.5
  to 1.5, either sign);
- some perturbations present at only some sites.

Examples
--------
>>> scr = make_screen(n_cells=600, n_genes=50, n_perturbations=4, seed=0)
>>> sorted(scr.sites)
['site_a', 'site_b', 'site_c']
>>> scr.truth_lfc.shape
(4, 50)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import substratools as tools

from fed_de.errors import SiteDataError

__all__ = ["ScreenSite", "load_screen_site", "SyntheticScreen", "make_screen",
           "DEFAULT_CHUNK_SIZE", "CONTROL_LABEL", "PERTURBATION_COLUMN"]

#: Cells read at once by a site (rows of the count matrix).
DEFAULT_CHUNK_SIZE = 2048
#: Defaults of the synthetic screen.
CONTROL_LABEL = "non-targeting"
PERTURBATION_COLUMN = "perturbation"


@dataclass(frozen=True, eq=False)
class ScreenSite:
    """One site's cells, read-only, read in row chunks.

    Attributes
    ----------
    name
        Site name (unique in the study).
    adata
        The AnnData (in memory with a CSR ``X``, or backed in read mode).
    chunk_size
        Cells per chunk read by the local steps.
    """

    name: str
    adata: ad.AnnData
    chunk_size: int = DEFAULT_CHUNK_SIZE
    _gene_index: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_samples(self) -> int:
        """Number of cells at this site."""
        return int(self.adata.n_obs)

    def __getstate__(self) -> dict:
        """Pickled (for the simulation's worker processes): a backed site travels as its file
        name and is opened read-only again where it lands."""
        state = dict(self.__dict__)
        if self.adata.isbacked:
            state["adata"] = ("backed", str(self.adata.filename))
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["adata"], tuple):
            state = {**state, "adata": ad.read_h5ad(state["adata"][1], backed="r")}
        self.__dict__.update(state)

    @property
    def genes(self) -> tuple[str, ...]:
        """The site's gene ids, in file order."""
        return tuple(str(g) for g in self.adata.var_names)

    @property
    def backed(self) -> bool:
        """Whether the counts are read from disk chunk by chunk."""
        return bool(self.adata.isbacked)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the count matrix held in memory (0 for a backed file)."""
        if self.backed:
            return 0
        X = self.adata.X
        if sp.issparse(X):
            return int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)
        return int(np.asarray(X).nbytes)

    def obs_column(self, column: str) -> pd.Series:
        """A copy of one metadata column (as strings; the site's data is never modified)."""
        obs = self.adata.obs
        if column not in obs.columns:
            raise SiteDataError(
                f"site {self.name!r}: obs has no column {column!r} (columns: "
                f"{list(obs.columns)[:10]}); name the perturbation / covariate column present "
                "at every site")
        values = obs[column]
        if values.isna().any():
            cells = list(obs.index[values.isna().to_numpy()][:5])
            raise SiteDataError(f"site {self.name!r}: column {column!r} is missing for cell(s) "
                                f"{cells}; label every cell or remove them")
        return values.astype(str).reset_index(drop=True)

    def aligned_to(self, genes: list[str]) -> ScreenSite:
        """The same site whose chunks come with the study's gene order."""
        site_genes = pd.Index(self.genes)
        if site_genes.has_duplicates:
            dup = site_genes[site_genes.duplicated()].unique().tolist()[:5]
            raise SiteDataError(f"site {self.name!r}: duplicated gene id(s) {dup}")
        index = site_genes.get_indexer(genes)
        if (index < 0).any():
            missing = [g for g, i in zip(genes, index, strict=True) if i < 0][:5]
            raise SiteDataError(
                f"site {self.name!r}: {int((index < 0).sum())} gene(s) of the study are "
                f"missing, e.g. {missing}; add them (zeros if not measured) or drop them from "
                "the study's gene list")
        identity = len(index) == len(site_genes) and bool(np.all(index == np.arange(len(index))))
        return ScreenSite(self.name, self.adata, self.chunk_size,
                          None if identity else index)

    def chunks(self, rows: np.ndarray | None = None) -> Iterator[tuple[int, sp.csr_matrix]]:
        """``(start, counts)`` for consecutive row chunks: CSR float64, study gene order.

        ``rows`` (sorted cell indices) restricts the reading to chunks holding those cells;
        the chunks are still whole (callers select rows inside a chunk).
        """
        n = self.n_samples
        step = max(1, int(self.chunk_size))
        for start in range(0, n, step):
            stop = min(n, start + step)
            if rows is not None:
                lo, hi = np.searchsorted(rows, [start, stop])
                if lo == hi:
                    continue
            X = self.adata.X[start:stop]
            X = X if sp.issparse(X) and X.format == "csr" else sp.csr_matrix(X)
            if self._gene_index is not None:
                X = X[:, self._gene_index]
            X = sp.csr_matrix(X, dtype=np.float64)
            X.sum_duplicates()
            yield start, X


def load_screen_site(source, name: str, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     backed: bool = False, layer: str | None = None) -> ScreenSite:
    """A screen site from an AnnData or an ``.h5ad`` path (``backed``: read chunks from disk).

    An in-memory AnnData is copied once with a read-only CSR ``X`` (the caller's object is
    never modified); a backed file is opened read-only and never loaded whole. ``layer``
    names the layer holding the raw UMI counts (scanpy's ``layers["counts"]``) when ``X``
    holds normalised values; it is read in memory.
    """
    if isinstance(source, ScreenSite):
        return source
    if layer is not None and backed:
        raise SiteDataError(f"site {name!r}: --backed reads X chunk by chunk from disk; a "
                            f"layer ({layer!r}) is read whole. Drop --backed, or store the raw "
                            "counts in X")
    if isinstance(source, ad.AnnData):
        if source.isbacked:
            if layer is not None:
                source = source.to_memory()
            else:
                return ScreenSite(name, source, chunk_size)
        if layer is not None and layer not in source.layers:
            raise SiteDataError(f"site {name!r}: the AnnData has no layer {layer!r} (layers: "
                                f"{list(source.layers)}); name the layer of raw counts")
        X = source.layers[layer] if layer is not None else source.X
        if X is None:
            raise SiteDataError(f"site {name!r}: AnnData.X is empty; put the raw UMI counts in X")
        X = sp.csr_matrix(X, copy=True)
        for arr in (X.data, X.indices, X.indptr):
            arr.setflags(write=False)
        view = ad.AnnData(X=X, obs=source.obs.copy(), var=pd.DataFrame(index=source.var_names))
        return ScreenSite(name, view, chunk_size)
    path = Path(source)
    if path.is_dir():
        found = sorted(path.glob("*.h5ad"))
        if len(found) != 1:
            raise SiteDataError(f"site {name!r}: {path} must hold exactly one .h5ad file")
        path = found[0]
    if not (path.is_file() and path.suffix == ".h5ad"):
        raise SiteDataError(f"site {name!r}: {source!r} is neither an AnnData nor an .h5ad file")
    if backed:
        adata = ad.read_h5ad(path, backed="r")
        if not isinstance(adata.X, ad.abc.CSRDataset) and not sp.issparse(adata.X):
            raise SiteDataError(f"site {name!r}: {path} stores X densely; a backed screen "
                                "site needs sparse CSR counts")
        return ScreenSite(name, adata, chunk_size)
    return load_screen_site(ad.read_h5ad(path), name, chunk_size, layer=layer)


# -- substra: the screen site's opener and data sample folder --------------------------------
SCREEN_OPENER_SOURCE = "from fed_de.screening.data import ScreenOpener  # noqa: F401\n"


def write_screen_site_folder(site: ScreenSite, folder: Path) -> Path:
    """Data sample folder of a screen site: ``site.h5ad`` (sparse) and ``site.json``."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    X = sp.vstack([block for _, block in site.chunks()]).tocsr() if site.n_samples else None
    adata = ad.AnnData(X=X, obs=site.adata.obs.copy(),
                       var=pd.DataFrame(index=list(site.genes)))
    adata.write_h5ad(folder / "site.h5ad")
    (folder / "site.json").write_text(json.dumps(
        {"name": site.name, "chunk_size": site.chunk_size, "backed": site.backed}))
    return folder


class ScreenOpener(tools.Opener):
    """substratools opener of a screen site: one folder with ``site.h5ad`` and ``site.json``."""

    def get_data(self, folders):
        """Open the site (backed when it was registered backed)."""
        import json

        if len(folders) != 1:
            raise SiteDataError(f"a screen site is one data sample folder, got {len(folders)}")
        folder = Path(folders[0])
        meta = json.loads((folder / "site.json").read_text())
        return load_screen_site(folder / "site.h5ad", meta["name"],
                                int(meta.get("chunk_size", DEFAULT_CHUNK_SIZE)),
                                bool(meta.get("backed", False)))

    def fake_data(self, n_samples=None):
        """Not supported: fed_de never runs on fake data."""
        raise NotImplementedError("fed_de does not use fake data")


# -- synthetic screen -------------------------------------------------------------------------
@dataclass
class SyntheticScreen:
    """A generated screen and its truth.

    Attributes
    ----------
    sites
        Site name -> AnnData (CSR counts; ``obs`` has the perturbation column and ``site``).
    truth_lfc
        True log2 fold changes, perturbations x genes (0 where no effect).
    null_perturbations
        Perturbations with no effect at all.
    targets
        Knock-down target gene of each active perturbation.
    gene_mean, dispersion
        True mean (UMI per cell at size factor 1) and dispersion of every gene.
    """

    sites: dict[str, ad.AnnData]
    truth_lfc: pd.DataFrame
    null_perturbations: list[str]
    targets: dict[str, str]
    gene_mean: pd.Series
    dispersion: pd.Series
    control: str = CONTROL_LABEL
    perturbation_column: str = PERTURBATION_COLUMN

    @property
    def perturbations(self) -> list[str]:
        """Perturbation labels, in study order."""
        return list(self.truth_lfc.index)

    @property
    def genes(self) -> list[str]:
        """Gene ids, in study order."""
        return list(self.truth_lfc.columns)

    def pooled(self) -> ad.AnnData:
        """All sites' cells in one AnnData (``obs['site']`` names the site)."""
        pooled = ad.concat(list(self.sites.values()), join="outer", merge="same")
        pooled.X = sp.csr_matrix(pooled.X)
        return pooled

    def zero_fraction(self) -> float:
        """Fraction of zero entries over all sites."""
        nnz = sum(a.X.nnz for a in self.sites.values())
        total = sum(a.n_obs * a.n_vars for a in self.sites.values())
        return 1.0 - nnz / total

    def write(self, folder: str | Path) -> dict[str, Path]:
        """Write one ``.h5ad`` per site; returns site name -> path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        for name, adata in self.sites.items():
            out[name] = folder / f"{name}.h5ad"
            adata.write_h5ad(out[name])
        return out


def make_screen(
    n_cells: int = 3000,
    n_genes: int = 200,
    n_perturbations: int = 10,
    *,
    n_sites: int = 3,
    seed: int = 0,
    control_fraction: float = 0.15,
    null_fraction: float = 0.4,
    off_target_fraction: float = 0.03,
    partial_fraction: float = 0.2,
    site_weights: tuple[float, ...] | None = None,
    site_depths: tuple[float, ...] | None = None,
    library_log_sd: float = 0.39,
    batch_log_sd: float = 0.2,
    log_mean: float = np.log(0.04),
    log_mean_sd: float = 1.6,
    disp_trend: tuple[float, float] = (0.1, 0.02),
    disp_log_sd: float = 0.3,
    dtype=np.float32,
) -> SyntheticScreen:
    """Draw a seeded perturbation screen split over sites, with its truth.

    Parameters
    ----------
    n_cells, n_genes, n_perturbations, n_sites
        Sizes (cells over all sites).
    seed
        Random seed.
    control_fraction
        Fraction of cells that are controls (the rest is split evenly over perturbations).
    null_fraction
        Fraction of perturbations with no effect.
    off_target_fraction
        Expected fraction of genes an active perturbation changes besides its target.
    partial_fraction
        Fraction of perturbations absent from one site (chosen at random).
    site_weights, site_depths
        Share of cells and sequencing depth of each site (defaults: unequal sites,
        depths 0.6 / 1.0 / 1.5 ...).
    library_log_sd
        sd of the log library-size factor within a site.
    batch_log_sd
        sd of the per-gene, per-site log batch effect.
    log_mean, log_mean_sd
        Log-normal distribution of gene means (UMI per cell at size factor 1).
    disp_trend, disp_log_sd
        Dispersion trend ``a0 + a1 / mean`` and the sd of its log-normal scatter.
    dtype
        dtype of the stored counts.
    """
    rng = np.random.default_rng(seed)
    names = [f"site_{chr(ord('a') + k)}" for k in range(n_sites)]
    weights = np.asarray(site_weights or np.arange(2, n_sites + 2), dtype=float)
    weights /= weights.sum()
    depths = np.asarray(site_depths or np.geomspace(0.6, 1.5, n_sites) if n_sites > 1
                        else [1.0], dtype=float)
    genes = [f"g{i:05d}" for i in range(n_genes)]
    perts = [f"P{i:04d}" for i in range(n_perturbations)]

    mean = np.exp(rng.normal(log_mean, log_mean_sd, n_genes))
    mean = np.clip(mean, 1e-3, 50.0)
    alpha = (disp_trend[0] + disp_trend[1] / mean) * np.exp(rng.normal(0, disp_log_sd, n_genes))
    alpha = np.clip(alpha, 1e-3, 20.0)
    batch = rng.normal(0.0, batch_log_sd, (n_sites, n_genes))

    lfc = np.zeros((n_perturbations, n_genes))
    n_null = int(round(null_fraction * n_perturbations))
    null_idx = rng.choice(n_perturbations, n_null, replace=False)
    is_null = np.zeros(n_perturbations, dtype=bool)
    is_null[null_idx] = True
    expressed = np.flatnonzero(mean > np.quantile(mean, 0.7))
    targets = {}
    for p in np.flatnonzero(~is_null):
        t = int(rng.choice(expressed))
        lfc[p, t] = -rng.uniform(1.5, 3.0)
        targets[perts[p]] = genes[t]
        k = rng.poisson(off_target_fraction * n_genes)
        others = rng.choice(np.setdiff1d(np.arange(n_genes), [t]), min(k, n_genes - 1),
                            replace=False)
        lfc[p, others] = rng.choice([-1.0, 1.0], len(others)) * rng.uniform(0.5, 1.5,
                                                                           len(others))

    # which sites hold each perturbation
    present = np.ones((n_perturbations, n_sites), dtype=bool)
    if n_sites > 1:
        partial = rng.random(n_perturbations) < partial_fraction
        present[np.flatnonzero(partial), rng.integers(0, n_sites, partial.sum())] = False

    n_by_site = np.round(weights * n_cells).astype(int)
    n_by_site[-1] = n_cells - n_by_site[:-1].sum()
    sites = {}
    for k, name in enumerate(names):
        n = int(n_by_site[k])
        here = np.flatnonzero(present[:, k])
        n_ctrl = int(round(control_fraction * n))
        labels = np.concatenate([np.full(n_ctrl, -1),
                                 here[rng.integers(0, len(here), n - n_ctrl)] if len(here)
                                 else np.full(n - n_ctrl, -1)])
        labels = labels[rng.permutation(n)]
        sf = depths[k] * np.exp(rng.normal(0.0, library_log_sd, n))
        X = _draw_counts(rng, sf, mean * np.exp(batch[k]), alpha, lfc, labels, dtype)
        obs = pd.DataFrame({
            PERTURBATION_COLUMN: np.where(labels < 0, CONTROL_LABEL,
                                          np.asarray(perts, dtype=object)[np.maximum(labels, 0)]),
            "site": name,
        }, index=[f"{name}_cell{i:06d}" for i in range(n)])
        obs[PERTURBATION_COLUMN] = obs[PERTURBATION_COLUMN].astype(str)
        sites[name] = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    return SyntheticScreen(
        sites=sites,
        truth_lfc=pd.DataFrame(lfc, index=perts, columns=genes),
        null_perturbations=[perts[i] for i in np.sort(null_idx)],
        targets=targets,
        gene_mean=pd.Series(mean, index=genes, name="mean"),
        dispersion=pd.Series(alpha, index=genes, name="dispersion"),
    )


def _draw_counts(rng, sf, gene_mean, alpha, lfc, labels, dtype, block: int = 4096):
    """Gamma-Poisson counts, drawn a block of cells at a time, as CSR."""
    parts = []
    shape = 1.0 / alpha
    for start in range(0, len(sf), block):
        sl = slice(start, start + block)
        lab = labels[sl]
        eff = np.where(lab[:, None] >= 0, np.exp2(lfc[np.maximum(lab, 0)]), 1.0)
        mu = sf[sl, None] * gene_mean[None, :] * eff
        lam = rng.gamma(shape[None, :], (mu / shape[None, :]))
        parts.append(sp.csr_matrix(rng.poisson(lam).astype(dtype)))
    return sp.vstack(parts, format="csr")
