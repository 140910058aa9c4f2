"""Checks a site runs on its own data before it sends anything.

Every error names the site, the offending sample(s) or gene(s), and the fix.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fed_de.design import Study, check_covariates, check_full_rank, design_matrix
from fed_de.errors import DisclosureError, SiteDataError
from fed_de.site import SiteData


def aligned_counts(study: Study, site: SiteData) -> np.ndarray:
    """The site's counts as a dense float array with the study's gene order."""
    X = site.counts.toarray() if sp.issparse(site.counts) else site.counts
    if tuple(study.genes) == site.genes:
        return X
    index = pd.Index(site.genes).get_indexer(study.genes)
    return X[:, index]


def check_counts(study: Study, site: SiteData, round_counts: bool = False) -> None:
    """Raise :class:`SiteDataError` unless the site's counts are usable as they are."""
    name = site.name
    if site.n_samples == 0:
        raise SiteDataError(f"site {name!r} holds no samples; remove it from the study")
    samples = pd.Index(site.samples)
    if samples.has_duplicates:
        dup = samples[samples.duplicated()].unique().tolist()[:5]
        raise SiteDataError(f"site {name!r}: duplicated sample id(s) {dup}; make ids unique")
    genes = pd.Index(site.genes)
    if genes.has_duplicates:
        dup = genes[genes.duplicated()].unique().tolist()[:5]
        raise SiteDataError(f"site {name!r}: duplicated gene id(s) {dup}; make ids unique")
    missing = pd.Index(study.genes).difference(genes)
    if len(missing):
        raise SiteDataError(
            f"site {name!r}: {len(missing)} gene(s) of the study are missing, e.g. "
            f"{list(missing[:5])}; add them (zeros if not measured) or drop them from the study"
        )
    extra = genes.difference(pd.Index(study.genes))
    if len(extra):
        raise SiteDataError(
            f"site {name!r}: {len(extra)} gene(s) are not in the study's gene list, e.g. "
            f"{list(extra[:5])}; drop them or add them to the study"
        )
    values = site.counts.data if sp.issparse(site.counts) else np.asarray(site.counts)
    where = _locate(site)
    bad = ~np.isfinite(values)
    if bad.any():
        raise SiteDataError(f"site {name!r}: NaN or infinite counts at {where(bad)}; "
                            "fix or remove those entries")
    if (values < 0).any():
        raise SiteDataError(f"site {name!r}: negative counts at {where(values < 0)}; "
                            "counts must be raw, non-negative integers")
    frac = values != np.round(values)
    if frac.any() and not round_counts:
        raise SiteDataError(
            f"site {name!r}: non-integer counts at {where(frac)}; DESeq2 models raw integer "
            "counts. Use raw counts, or round deliberately with round_counts=True "
            "(--round-counts) e.g. for estimated counts from salmon/kallisto"
        )


def check_disclosure(study: Study, site: SiteData, min_cell_size: int) -> None:
    """Refuse, before sending anything, when a site's aggregates could expose samples."""
    p = study.n_coefs
    if site.n_samples < p + 1:
        raise DisclosureError(
            f"site {site.name!r} holds {site.n_samples} sample(s), fewer than the design's "
            f"{p} coefficients + 1; its sums could reveal individual samples. Join with more "
            "samples or merge with another site"
        )
    if min_cell_size <= 0 or not study.levels:
        return
    frame = check_covariates(study, site.obs, site.name)
    cells = frame[list(study.levels)].astype(str).value_counts()
    small = cells[cells < min_cell_size]
    if len(small):
        desc = ", ".join(
            f"{dict(zip(study.levels, k if isinstance(k, tuple) else (k,), strict=True))}"
            f" has {n}" for k, n in small.items()
        )
        raise DisclosureError(
            f"site {site.name!r} refuses to take part: design cell(s) {desc} sample(s), fewer "
            f"than min_cell_size={min_cell_size}. Set min_cell_size=0 (--min-cell-size 0) only "
            "for an analysis of your own data"
        )


def validate_site(
    study: Study, site: SiteData, *, min_cell_size: int = 3, round_counts: bool = False
) -> np.ndarray:
    """Run every local check; return the site's design matrix."""
    check_counts(study, site, round_counts=round_counts)
    X = design_matrix(study, site.obs, site.name)
    check_disclosure(study, site, min_cell_size)
    return X


def _locate(site: SiteData):
    """Describe where a boolean mask of bad values is (sample, gene)."""

    def where(mask: np.ndarray) -> str:
        if sp.issparse(site.counts):
            coo = site.counts.tocoo()
            rows, cols = coo.row[mask], coo.col[mask]
        else:
            rows, cols = np.nonzero(mask)
        pairs = [f"(sample {site.samples[r]!r}, gene {site.genes[c]!r})"
                 for r, c in zip(rows[:3], cols[:3], strict=True)]
        more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
        return ", ".join(pairs) + more

    return where


def validate_sites(sites: dict, study: Study, *, min_cell_size: int = 3,
                   round_counts: bool = False) -> list[dict]:
    """Run every local check on each site; one report row per site (nothing is sent).

    Also checks, on the sites given together, that the design is full rank (what the
    aggregator checks on the summed Gram matrix).
    """
    from fed_de.errors import FedDEError

    rows, xtx = [], np.zeros((study.n_coefs, study.n_coefs))
    for name, site in sites.items():
        row = {"site": name, "samples": site.n_samples, "genes": len(site.genes), "ok": True,
               "problem": ""}
        try:
            X = validate_site(study, site, min_cell_size=min_cell_size,
                              round_counts=round_counts)
            xtx += X.T @ X
        except FedDEError as err:
            row.update(ok=False, problem=str(err))
        rows.append(row)
    if all(r["ok"] for r in rows):
        try:
            check_full_rank(xtx, study.coef_names)
        except FedDEError as err:
            rows.append({"site": "(all sites)", "samples": sum(r["samples"] for r in rows),
                         "genes": len(study.genes), "ok": False, "problem": str(err)})
    return rows
