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

#: The largest count a site accepts: float64 holds every integer exactly up to 2**53.
MAX_COUNT = float(2**53)


def aligned_counts(study: Study, site: SiteData) -> np.ndarray:
    """The site's counts as a dense float array with the study's gene order."""
    X = site.counts.toarray() if sp.issparse(site.counts) else site.counts
    if tuple(study.genes) == site.genes:
        return X
    index = pd.Index(site.genes).get_indexer(study.genes)
    return X[:, index]


def check_counts(study: Study, site: SiteData, round_counts: bool | str = False) -> None:
    """Raise :class:`SiteDataError` unless the site's counts are usable as they are.

    ``round_counts``: ``False`` refuses non-integer counts; ``True`` rounds them unless they
    look log-transformed or normalised (:func:`looks_transformed`); ``"force"`` rounds anyway.
    """
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
    if (values > MAX_COUNT).any():
        raise SiteDataError(
            f"site {name!r}: counts above 2**53 at {where(values > MAX_COUNT)}; float64 sums "
            "hold integers exactly only up to 2**53 (no sequencing count comes near): check "
            "that the file holds raw counts, not an overflowed or scaled column")
    frac = values != np.round(values)
    if frac.any() and not round_counts:
        raise SiteDataError(f"site {name!r}: non-integer counts at {where(frac)}; "
                            + _non_integer_fix(site, values, frac))
    if frac.any() and round_counts != FORCE_ROUND and looks_transformed(values, frac):
        raise SiteDataError(
            f"site {name!r}: the counts look log-transformed or normalised (largest value "
            f"{np.max(values):.3g}, {_share(values, frac)} of non-zero values non-integer); "
            "rounding them would analyse rounded log values. Use the raw counts (an AnnData "
            "layer: layer=, --layer), or round anyway with round_counts='force' "
            "(--force-round-counts)")


#: ``round_counts`` value that rounds even counts that look log-transformed.
FORCE_ROUND = "force"


def looks_transformed(values: np.ndarray, frac: np.ndarray) -> bool:
    """Counts that look log-transformed or normalised rather than estimated: all below 50,
    and most non-zero values non-integer (estimated counts from salmon or kallisto reach the
    thousands)."""
    nonzero = values != 0
    if not nonzero.any():
        return False
    return bool(np.max(values) < 50 and frac[nonzero].mean() > 0.5)


def _share(values: np.ndarray, frac: np.ndarray) -> str:
    nonzero = values != 0
    return f"{frac[nonzero].mean():.0%}" if nonzero.any() else "0%"


def _non_integer_fix(site: SiteData, values: np.ndarray, frac: np.ndarray) -> str:
    """The fix an error about non-integer counts suggests."""
    if site.count_layers:
        layer = site.count_layers[0]
        return (f"DESeq2 models raw integer counts, and the AnnData's layer(s) "
                f"{list(site.count_layers)} hold integers: pass layer={layer!r} "
                f"(--layer {layer})")
    if looks_transformed(values, frac):
        return ("they look log-transformed or normalised (largest value "
                f"{np.max(values):.3g}); DESeq2 models raw integer counts: use the raw "
                "counts (an AnnData layer: layer=, --layer), not rounded normalised values")
    return ("DESeq2 models raw integer counts. Use raw counts, or round deliberately with "
            "round_counts=True (--round-counts) e.g. for estimated counts from "
            "salmon/kallisto")


def check_disclosure(study: Study, site: SiteData, min_cell_size: int,
                     n_sites: int = 0) -> None:
    """Refuse, before sending anything, when a site's aggregates could expose samples.

    The design-cell rule (``min_cell_size``) applies from two sites on: one site alone (a
    lab's own analysis, a pooled reference run) sends nothing anywhere. ``n_sites`` is the
    study's number of sites (0: not known, the rule applies).
    """
    p = study.n_coefs
    if site.n_samples < p + 1:
        if n_sites == 1:
            raise DisclosureError(
                f"site {site.name!r} holds {site.n_samples} sample(s), fewer than the "
                f"design's {p} coefficients + 1: no residual degree of freedom is left to "
                "estimate dispersions (DESeq2 refuses too). Add samples or simplify the design")
        raise DisclosureError(
            f"site {site.name!r} holds {site.n_samples} sample(s), fewer than the design's "
            f"{p} coefficients + 1; its sums could reveal individual samples. Join with more "
            "samples or merge with another site"
        )
    if min_cell_size <= 0 or not study.levels or n_sites == 1:
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
            f"than min_cell_size={min_cell_size}, and its sums go to other organisations. "
            "Merge levels or join with more samples; min_cell_size=0 (--min-cell-size 0) "
            "turns the rule off (a one-site analysis needs neither)"
        )


def validate_site(
    study: Study, site: SiteData, *, min_cell_size: int = 3, round_counts: bool | str = False,
    n_sites: int = 0,
) -> np.ndarray:
    """Run every local check; return the site's design matrix."""
    check_counts(study, site, round_counts=round_counts)
    X = design_matrix(study, site.obs, site.name)
    check_disclosure(study, site, min_cell_size, n_sites)
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
                   round_counts: bool | str = False, n_sites: int = 0) -> list[dict]:
    """Run every local check on each site; one report row per site (nothing is sent).

    ``n_sites`` is the study's number of sites (0: several, not counted here); the disclosure
    rule applies unless it is 1. When the sites given are the whole study (more than one
    site, or ``n_sites=1``) the design is also checked to be full rank over them together
    (what the aggregator checks on the summed Gram matrix); a single site of a larger study
    is not, since one site is not all sites: its row's ``note`` names the declared levels it
    lacks, which other sites must hold.
    """
    from fed_de.errors import FedDEError

    rows, xtx = [], np.zeros((study.n_coefs, study.n_coefs))
    for name, site in sites.items():
        row = {"site": name, "samples": site.n_samples, "genes": len(site.genes), "ok": True,
               "problem": "", "note": ""}
        try:
            X = validate_site(study, site, min_cell_size=min_cell_size,
                              round_counts=round_counts, n_sites=n_sites)
            xtx += X.T @ X
            absent = absent_levels(study, site)
            if absent:
                row["note"] = "levels absent here: " + "; ".join(
                    f"{k}={','.join(v)}" for k, v in absent.items())
        except FedDEError as err:
            row.update(ok=False, problem=str(err))
        rows.append(row)
    whole_study = len(sites) > 1 or n_sites == 1
    if whole_study and all(r["ok"] for r in rows):
        try:
            check_full_rank(xtx, study.coef_names)
        except FedDEError as err:
            rows.append({"site": "(all sites)", "samples": sum(r["samples"] for r in rows),
                         "genes": len(study.genes), "ok": False, "problem": str(err),
                         "note": ""})
    return rows


def absent_levels(study: Study, site: SiteData) -> dict[str, list[str]]:
    """Declared levels of each factor that none of the site's samples has."""
    obs = site.obs
    out = {}
    for factor, levels in study.levels.items():
        present = set(obs[factor].astype(str)) if factor in obs.columns else set()
        missing = [lv for lv in levels if lv not in present]
        if missing:
            out[factor] = missing
    return out
