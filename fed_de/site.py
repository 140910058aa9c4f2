"""A site's data: what a data node's opener hands to the local steps, read-only.

A site is one of:

- an AnnData (samples x genes, sample metadata in ``obs``): raw counts in ``X``, or in the
  layer named by ``layer=`` (scanpy keeps them in ``layers["counts"]`` beside a normalised
  ``X``);
- an ``.h5ad`` file (the same);
- a pair ``(counts, metadata)`` of DataFrames, as PyDESeq2 takes them: counts samples x genes
  (genes x samples, R's layout, is recognised), metadata indexed by sample id;
- a folder with a counts table and a metadata table, each ``.csv`` (comma) or ``.tsv`` /
  ``.txt`` (tab): ``counts.*`` samples x genes with the sample id first (a genes x samples
  table whose columns are the metadata's samples is read as such; featureCounts output, with
  its comment line and annotation columns, is recognised), ``metadata.*`` with the sample id
  first. A folder may hold one ``.h5ad`` instead.

The same loader backs the substratools opener of the substra backends
(:mod:`fed_de.backends.opener`), so simulation and real execution read data identically.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fed_de.errors import SiteDataError

SITE_META = "site.json"  # names the site (and its AnnData layer) in a substra sample folder
COUNTS_NAMES = ("counts.csv", "counts.tsv", "counts.txt")
METADATA_NAMES = ("metadata.csv", "metadata.tsv", "metadata.txt")
#: featureCounts' annotation columns, after ``Geneid``.
FEATURECOUNTS_ANNOTATION = ("Chr", "Start", "End", "Strand", "Length")

log = logging.getLogger("fed_de")


@dataclass(frozen=True, eq=False)
class SiteData:
    """One site's samples, immutable: counts are a read-only array, obs is copied on access.

    ``count_layers`` names the AnnData layers that hold integer counts when ``X`` does not
    (so an error about non-integer ``X`` can point at them).
    """

    name: str
    counts: np.ndarray | sp.csr_matrix
    genes: tuple[str, ...]
    samples: tuple[str, ...]
    _obs: pd.DataFrame
    count_layers: tuple[str, ...] = ()

    @property
    def obs(self) -> pd.DataFrame:
        """A copy of the sample metadata (the site's own data is never modified)."""
        return self._obs.copy()

    @property
    def n_samples(self) -> int:
        """Number of samples held at this site."""
        return len(self.samples)


def site_from_anndata(adata, name: str, layer: str | None = None) -> SiteData:
    """Wrap an AnnData (samples x genes) as read-only site data.

    Raw counts are read from ``X``, or from ``adata.layers[layer]``.
    """
    if layer is not None and layer != "X":
        if layer not in adata.layers:
            raise SiteDataError(
                f"site {name!r}: the AnnData has no layer {layer!r} (layers: "
                f"{list(adata.layers)}); name the layer that holds the raw counts, or leave "
                "layer unset to use X")
        X = adata.layers[layer]
    else:
        X = adata.X
    if X is None:
        raise SiteDataError(f"site {name!r}: AnnData.X is empty; put the raw counts in X or "
                            "name the layer that holds them (layer=, --layer)")
    count_layers = ()
    if layer is None and _has_fraction(X):
        count_layers = tuple(k for k, v in adata.layers.items() if not _has_fraction(v))
    site = _freeze_site(name, X, [str(g) for g in adata.var_names],
                        [str(s) for s in adata.obs_names], adata.obs)
    return _with_layers(site, count_layers)


def site_from_frames(counts: pd.DataFrame, metadata: pd.DataFrame, name: str,
                     what: str = "counts", meta_what: str = "metadata") -> SiteData:
    """A site from a counts DataFrame and a metadata DataFrame (PyDESeq2's inputs).

    ``counts`` is samples x genes; a table whose columns are the metadata's sample ids and
    whose rows are not (genes x samples, R's layout) is read transposed, with a warning.
    ``what`` and ``meta_what`` name the inputs in errors (e.g. the file names).
    """
    if not isinstance(counts, pd.DataFrame) or not isinstance(metadata, pd.DataFrame):
        raise SiteDataError(
            f"site {name!r}: a (counts, metadata) pair must hold two pandas DataFrames, got "
            f"({type(counts).__name__}, {type(metadata).__name__})")
    counts, metadata = counts.copy(), metadata.copy()
    counts.index = counts.index.astype(str)
    counts.columns = counts.columns.astype(str)
    metadata.index = metadata.index.astype(str)
    counts = _orient(counts, metadata, name, what, meta_what)
    for table, label in ((counts, what), (metadata, meta_what)):
        if table.index.has_duplicates:
            dup = table.index[table.index.duplicated()].unique().tolist()[:5]
            raise SiteDataError(f"site {name!r}: duplicated sample id(s) {dup} in {label} "
                                "(an empty id reads as 'nan'); give every sample one row and "
                                "a unique id")
    missing = counts.index.difference(metadata.index)
    if len(missing):
        raise SiteDataError(
            f"site {name!r}: sample(s) {list(missing[:5])} are in {what} but not in "
            f"{meta_what}; add their metadata or remove them from the counts")
    meta = metadata.loc[counts.index]
    try:
        values = counts.to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        numeric = counts.apply(pd.to_numeric, errors="coerce")
        bad = [c for c in counts.columns if (numeric[c].isna() & counts[c].notna()).any()]
        raise SiteDataError(
            f"site {name!r}: {what} holds non-numeric values in column(s) {bad[:5]}; counts "
            "must be numbers (annotation columns such as gene names belong elsewhere)"
        ) from None
    return _freeze_site(name, values, list(counts.columns), list(counts.index), meta)


def load_site(source, name: str, layer: str | None = None) -> SiteData:
    """Load a site from an AnnData, an ``.h5ad`` path, a ``(counts, metadata)`` pair of
    DataFrames, or a folder of tables.

    ``layer`` names the AnnData layer holding the raw counts (AnnData and ``.h5ad`` sites;
    ignored for tables, which hold one matrix).
    """
    if isinstance(source, SiteData):
        return source
    if hasattr(source, "X") and hasattr(source, "obs"):
        return site_from_anndata(source, name, layer)
    if isinstance(source, tuple | list):
        if len(source) != 2:
            raise SiteDataError(f"site {name!r}: give (counts, metadata), two DataFrames; got "
                                f"a {type(source).__name__} of {len(source)} items")
        return site_from_frames(source[0], source[1], name)
    if isinstance(source, pd.DataFrame):
        raise SiteDataError(f"site {name!r}: a counts DataFrame needs its metadata: give "
                            "(counts, metadata) or metadata=")
    if not isinstance(source, str | Path):
        raise SiteDataError(
            f"site {name!r}: a {type(source).__name__} is not a site; give an AnnData, an "
            ".h5ad path, a (counts, metadata) pair of DataFrames or a folder of tables")
    path = Path(source)
    if path.is_file() and path.suffix == ".h5ad":
        import anndata as ad

        return site_from_anndata(ad.read_h5ad(path), name, layer)
    if path.is_dir():
        return _load_folder(path, name, layer)
    if not path.exists():
        raise SiteDataError(f"site {name!r}: {path} does not exist")
    raise SiteDataError(f"site {name!r}: {path} is neither an .h5ad file nor a folder with "
                        f"counts and metadata tables ({', '.join(COUNTS_NAMES)})")


def _load_folder(path: Path, name: str, layer: str | None) -> SiteData:
    counts_files = [path / f for f in COUNTS_NAMES if (path / f).exists()]
    h5 = sorted(path.glob("*.h5ad"))
    if not counts_files:
        if len(h5) == 1:
            return load_site(h5[0], name, layer)
        if len(h5) > 1:
            raise SiteDataError(
                f"site {name!r}: {path} holds {len(h5)} .h5ad files {[f.name for f in h5]}; "
                "keep one per site folder, or give the path of the file to use")
        raise SiteDataError(
            f"site {name!r}: {path} holds neither a counts table ({', '.join(COUNTS_NAMES)}) "
            "with its metadata table nor one .h5ad file")
    if len(counts_files) > 1:
        raise SiteDataError(f"site {name!r}: {path} holds several counts tables "
                            f"{[f.name for f in counts_files]}; keep one")
    meta_files = [path / f for f in METADATA_NAMES if (path / f).exists()]
    if len(meta_files) != 1:
        found = [f.name for f in meta_files]
        raise SiteDataError(
            f"site {name!r}: {path} has {counts_files[0].name} but "
            + (f"several metadata tables {found}; keep one" if found else
               f"no metadata table ({', '.join(METADATA_NAMES)}): one row per sample, the "
               "sample id first"))
    counts = read_counts_table(counts_files[0], name)
    meta = _read_table(meta_files[0], name)
    return site_from_frames(counts, meta, name, counts_files[0].name, meta_files[0].name)


def read_counts_table(path: Path, name: str = "site") -> pd.DataFrame:
    """A counts table as written (CSV, TSV, or featureCounts output), first column as index.

    featureCounts output (a ``#`` comment line, then ``Geneid`` and the annotation columns
    ``Chr Start End Strand Length`` before one column per BAM file) is returned samples x
    genes, each sample named by its BAM file's name without directory and ``.bam``.
    """
    try:
        with path.open() as fh:
            head = [fh.readline() for _ in range(50)]
    except UnicodeDecodeError as err:
        raise SiteDataError(f"site {name!r}: cannot read {path}: not a text table ({err}); "
                            "save it as UTF-8 CSV or TSV") from None
    skip = 0
    while skip < len(head) and head[skip].startswith("#"):
        skip += 1
    sep = _separator(path, head[skip] if skip < len(head) else "")
    table = _read_table(path, name, sep=sep, skiprows=skip)
    header = next(csv.reader([head[skip].rstrip("\r\n")], delimiter=sep), []) \
        if skip < len(head) else []
    seen = pd.Index(header[1:])
    if seen.has_duplicates:  # pandas would read the second "g1" as "g1.1": a new gene
        dup = seen[seen.duplicated()].unique().tolist()[:5]
        raise SiteDataError(f"site {name!r}: duplicated column name(s) {dup} in {path.name}; "
                            "make gene (or sample) ids unique, e.g. merge the duplicated "
                            "rows of counts")
    if table.index.name == "Geneid" and all(c in table.columns
                                            for c in FEATURECOUNTS_ANNOTATION):
        table = table.drop(columns=list(FEATURECOUNTS_ANNOTATION)).T
        table.index = [_bam_sample(s) for s in table.index]
        log.info("site %r: read %s as featureCounts output (%d samples x %d genes)", name,
                 path.name, *table.shape)
    return table


def _bam_sample(column: str) -> str:
    base = Path(str(column)).name
    for suffix in (".bam", ".sam", ".cram"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _separator(path: Path, header: str) -> str:
    if path.suffix == ".csv":
        return "," if "," in header or "\t" not in header else "\t"
    return "\t" if "\t" in header or "," not in header else ","


def _read_table(path: Path, name: str, sep: str | None = None, skiprows: int = 0
                ) -> pd.DataFrame:
    try:
        if sep is None:
            with path.open() as fh:
                sep = _separator(path, fh.readline())
        return pd.read_csv(path, sep=sep, index_col=0, skiprows=skiprows)
    except (ValueError, pd.errors.ParserError) as err:  # UnicodeDecodeError is a ValueError
        raise SiteDataError(f"site {name!r}: cannot read {path}: {err}") from None


def _orient(counts: pd.DataFrame, metadata: pd.DataFrame, name: str, what: str,
            meta_what: str) -> pd.DataFrame:
    """Samples x genes: transposed when the columns, not the rows, are the metadata's
    samples; an error when neither matches."""
    samples = metadata.index
    in_rows = counts.index.isin(samples)
    in_cols = counts.columns.isin(samples)
    if in_rows.any() or not in_cols.any():
        if not in_rows.any():
            raise SiteDataError(
                f"site {name!r}: none of the {len(counts)} row ids of {what} (e.g. "
                f"{list(counts.index[:3])}) is a sample id of {meta_what} (e.g. "
                f"{list(samples[:3])}); the first column of each table must be the sample id")
        return counts
    if not in_cols.all():
        others = list(counts.columns[~in_cols][:5])
        raise SiteDataError(
            f"site {name!r}: {what} looks transposed (genes x samples): {int(in_cols.sum())} "
            f"of its columns are sample ids of {meta_what}, but {others} are not. fed_de "
            "reads samples x genes: transpose it (pandas .T), or drop the columns that are "
            "not samples")
    log.warning("site %r: %s is genes x samples (its columns are the samples of %s); read "
                "transposed", name, what, meta_what)
    return counts.T


def _has_fraction(X) -> bool:
    """Whether a count matrix holds any non-integer value (NaN and inf count as integers
    here: the count checks report them)."""
    values = X.data if sp.issparse(X) else np.asarray(X)
    if values.dtype.kind in "iub":
        return False
    values = values[np.isfinite(values)]
    return bool((values != np.round(values)).any())


def _with_layers(site: SiteData, count_layers: tuple[str, ...]) -> SiteData:
    if not count_layers:
        return site
    return SiteData(site.name, site.counts, site.genes, site.samples, site._obs, count_layers)


def _freeze_site(name, X, genes, samples, obs) -> SiteData:
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64, copy=True)
        for arr in (X.data, X.indices, X.indptr):
            arr.setflags(write=False)
    else:
        # C order whatever the source (a DataFrame gives F order): the sums' rounding then
        # does not depend on the input format (CSV and AnnData were 2e-10 apart)
        X = np.array(X, dtype=np.float64, copy=True, order="C")
        X.setflags(write=False)
    obs = pd.DataFrame(obs).copy()
    obs.index = pd.Index(samples)
    return SiteData(name=name, counts=X, genes=tuple(genes), samples=tuple(samples), _obs=obs)
