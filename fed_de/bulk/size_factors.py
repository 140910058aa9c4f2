"""Federated median-of-ratios size factors and baseMean (DESeq2 ``ratio`` / ``poscounts``).

Round 1  site : validates its data, keeps its design matrix; sum of log positive counts and
                number of zeros per gene, sample count          -> :class:`LogSums`
         agg  : log geometric means over all samples of all sites (:func:`log_means`)
Round 2  site : each sample's size factor (kept at the site); per-gene sums of normalised
                counts and their squares, sum of 1/sf, X'X, X'(normalised counts), and the
                number of samples in each declared design cell, the normalised counts'
                sums per design cell (which compared groups are all zero) -> MomentSums
         agg  : baseMean, DESeq2's moments dispersion, the least-squares fit on normalised
                counts (``linearModelMu``), the linear-mu shortcut of cell-means designs, the
                full-rank check (:func:`moments`); every sum is rescaled exactly here for
                ``poscounts`` (the sites apply the rescaling at the next round)
The size factors never leave their site. The size-factor-only strategy
(``fed_de.size_factors``) uses :func:`normalised_sums` / :func:`base_means` at round 2, then
:func:`rescale_size_factors` (nothing sent).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fed_de.bulk.state import FitStart, Site, Totals
from fed_de.core import moments as mom
from fed_de.core import nb
from fed_de.core import size_factors as sf_core
from fed_de.design import check_full_rank, design_cells, design_matrix, n_distinct_rows
from fed_de.errors import DisclosureError, SiteDataError
from fed_de.federation.calls import aggregator_step, call, site_step
from fed_de.federation.messages import Message, counts, part, sums
from fed_de.federation.strategy import Phase, Round
from fed_de.validation import validate_site


class LogSums(Message):
    """Round 1: per-gene sums of log positive counts, zero counts, the sample count; samples
    per design cell and, per gene and cell, how many have a non-zero count (the disclosure
    rules, checked before any sum of values over a cell is sent)."""

    sum_log: np.ndarray = sums("G")
    n_zero: np.ndarray = counts("G")
    n_samples: float = counts()
    cell_counts: np.ndarray = counts("C")
    cell_nonzero: np.ndarray = counts("G", "C")


class CellSums(Message):
    """Per gene and design cell: sums of squared normalised counts and of log(normalised +
    0.1). With the cells' sums of normalised counts they give the rough dispersions and the
    IRLS starts of a factor design at once (its linear fit is one value per cell)."""

    sumsq: np.ndarray = sums("G", "C")
    logsum: np.ndarray = sums("G", "C", narrow=True)  # logs: far below 2**53


class MomentSums(Message):
    """Round 2: the sums behind baseMean, the moments dispersion and the linear fit (and,
    ``cells``, the rough round's sums per design cell)."""

    # sums of normalised counts (not of their squares): far below 2**53, narrow
    sum_norm: np.ndarray = sums("G", narrow=True)
    sum_norm_sq: np.ndarray = sums("G")
    sum_inv_sf: float = sums()
    sum_log_sf: float = sums()
    n_samples: float = counts()
    xtx: np.ndarray = sums("T")
    xty: np.ndarray = sums("G", "p", narrow=True)
    cell_norm: np.ndarray = sums("G", "C", narrow=True)
    cells: CellSums | None = part()


class NormalisedSums(Message):
    """Per-gene sums of normalised counts, and the sums that rescale size factors."""

    sum_norm: np.ndarray = sums("G")
    sum_log_sf: float = sums()
    n_samples: float = counts()


class Nothing(Message):
    """A site step that sends nothing."""


@site_step
def log_sums(site: Site, n_sites: int = 0) -> LogSums:
    """Validate the site, keep its design matrix, send per-gene log-count sums.

    ``n_sites`` (the study's sites, from the strategy) switches the disclosure rule off for a
    one-site analysis, which sends nothing to another organisation.
    """
    kept, data = site.kept, site.data
    if site.one_sample:  # a DP contribution: the whole site was checked by the real step
        kept.design = design_matrix(site.study, data.obs, data.name)
    else:
        kept.design = validate_site(site.study, data, min_cell_size=site.options.min_cell_size,
                                    round_counts=site.options.round_counts, n_sites=n_sites)
    if site.reduced is not None:
        kept.design_reduced = design_matrix(site.reduced, data.obs, data.name)
    counts = site.counts()
    sum_log, n_zero = sf_core.log_count_sums(counts)
    if site.options.size_factors == "ratio":
        # ratio leaves out every gene with a zero anywhere: its log sum is not needed
        sum_log = np.where(n_zero > 0, 0.0, sum_log)
    onehot = _cell_onehot(site)
    return LogSums(sum_log=sum_log, n_zero=n_zero, n_samples=float(data.n_samples),
                   cell_counts=onehot.sum(axis=0), cell_nonzero=(counts > 0).T @ onehot)


def _cell_onehot(site: Site) -> np.ndarray:
    """Samples x design cells indicator (one column without factors)."""
    if not site.study.levels:
        return np.ones((site.data.n_samples, 1))
    C = len(design_cells(site.study))
    return (site.cells()[:, None] == np.arange(C)[None, :]).astype(float)


@aggregator_step(writes=("totals",))
def log_means(sums: LogSums, study, options, n_sites: int = 0) -> dict:
    """Log geometric means over every sample of every site; the study-level disclosure
    rules (from two sites on): pooled design cells of at least ``min_pooled_cell_size``
    samples, and genes whose pooled cells hold a single non-zero count withheld."""
    log_means = sf_core.log_geometric_means(sums.sum_log, sums.n_zero, sums.n_samples,
                                            options.size_factors)
    withheld = np.zeros(sums.sum_log.shape[0], dtype=bool)
    if n_sites > 1 and options.min_cell_size > 0:
        check_pooled_cells(study, sums.cell_counts, options.min_pooled_cell_size)
        nz = sums.cell_nonzero
        withheld = ((nz > 0) & (nz < options.min_nonzero)).any(axis=1)
    return {"totals": Totals(n_samples=float(sums.n_samples), log_geo_means=log_means,
                             cell_counts=sums.cell_counts, withheld=withheld)}


def check_pooled_cells(study, cell_counts: np.ndarray, minimum: int) -> None:
    """Refuse a study whose pooled design cells are too small for their sums to stay
    unsolvable (the threshold found by attack: docs/privacy.md)."""
    small = (cell_counts > 0) & (cell_counts < minimum)
    if not small.any():
        return
    cells = design_cells(study) if study.levels else [()]
    desc = ", ".join(f"{dict(zip(study.levels, cells[i], strict=True))} has "
                     f"{int(cell_counts[i])}" for i in np.flatnonzero(small))
    raise DisclosureError(
        f"the pooled design cell(s) {desc} sample(s), fewer than "
        f"min_pooled_cell_size={minimum}: the sums of a cell that small can be solved for "
        "its samples' counts. Merge levels or add samples; min_pooled_cell_size=10 (with a "
        "warning) or min_cell_size=0 (no disclosure control: audited studies only) otherwise")


def compute_size_factors(site: Site, log_geo_means: np.ndarray) -> np.ndarray:
    """Raw size factors of this site's samples (kept at the site, never sent)."""
    sf = sf_core.median_ratio_factors(site.counts(), log_geo_means, site.options.size_factors)
    bad = ~np.isfinite(sf) | (sf <= 0)
    if bad.any():
        samples = [site.data.samples[i] for i in np.flatnonzero(bad)[:5]]
        raise SiteDataError(
            f"site {site.name!r}: sample(s) {samples} share no expressed gene with the "
            "study's geometric means, so no size factor exists; check these samples' "
            "counts (empty library?) or remove them"
        )
    site.kept.size_factors_raw = sf
    site.kept.size_factors = sf  # final for 'ratio'; rescaled later for 'poscounts'
    return sf


def size_factor_scale(kind: str, sum_log_sf: float, n_samples: float) -> float:
    """``poscounts`` divides size factors by their geometric mean; ``ratio`` does not."""
    if kind == "poscounts":
        return float(np.exp(sum_log_sf / n_samples))
    return 1.0


@site_step
def normalised_sums(site: Site, totals: Totals) -> NormalisedSums:
    """Size factors at the site; per-gene sums of counts over raw size factors."""
    sf = compute_size_factors(site, totals.log_geo_means)
    norm = site.counts() / sf[:, None]
    return NormalisedSums(sum_norm=norm.sum(axis=0), sum_log_sf=float(np.log(sf).sum()),
                          n_samples=float(site.data.n_samples))


@aggregator_step(writes=("totals", "start"))
def base_means(sums: NormalisedSums, options) -> dict:
    """baseMean per gene (mean of normalised counts over all samples)."""
    n = float(sums.n_samples)
    scale = size_factor_scale(options.size_factors, sums.sum_log_sf, n)
    # size factors are divided by scale, so normalised counts are multiplied by it
    base_mean = sums.sum_norm * scale / n
    return {"totals": Totals(n_samples=n, sf_scale=scale),
            "start": FitStart(base_mean=base_mean, skip=base_mean == 0)}


@site_step
def rescale_size_factors(site: Site, totals: Totals) -> Nothing:
    """Apply the global rescaling to this site's size factors (nothing is sent)."""
    site.kept.size_factors = site.kept.size_factors_raw / totals.sf_scale
    return Nothing()


@site_step
def moment_sums(site: Site, totals: Totals, cells: bool = False) -> MomentSums:
    """Size factors, then the sums behind baseMean, moments and the linear fit; with
    ``cells`` (factor design, ``ratio`` size factors: final already) the rough round's sums
    per design cell (:class:`CellSums`)."""
    sf = compute_size_factors(site, totals.log_geo_means)
    X = site.kept.design
    # withheld genes (a pooled cell with a single non-zero count) send nothing from here on
    norm = np.where(totals.withheld[None, :], 0.0, site.counts() / sf[:, None])
    n = site.data.n_samples
    onehot = _cell_onehot(site)
    sq = norm * norm
    out = MomentSums(sum_norm=norm.sum(axis=0), sum_norm_sq=sq.sum(axis=0),
                     sum_inv_sf=float((1.0 / sf).sum()), sum_log_sf=float(np.log(sf).sum()),
                     n_samples=float(n), xtx=nb.gram(X, np.ones(n)), xty=norm.T @ X,
                     cell_norm=norm.T @ onehot)
    if cells:
        logsum = np.where(totals.withheld[:, None], 0.0, np.log(norm + 0.1).T @ onehot)
        out.cells = CellSums(sumsq=sq.T @ onehot, logsum=logsum)
    return out


@aggregator_step(writes=("totals", "start"))
def moments(sums: MomentSums, totals: Totals, study, options) -> dict:
    """baseMean, moments dispersion, linear fit; decide DESeq2's linear-mu shortcut."""
    n, p = sums.n_samples, study.n_coefs
    c = size_factor_scale(options.size_factors, sums.sum_log_sf, n)
    m = mom.moments(sums.sum_norm, sums.sum_norm_sq, sums.sum_inv_sf, n, c)
    xtx = nb.unpack(sums.xtx, p)
    check_full_rank(xtx, study.coef_names)
    beta_lin = np.linalg.solve(xtx, (sums.xty * c).T).T
    # DESeq2 uses the linear fit for mu when the design has as many distinct rows as
    # coefficients (a cell-means design); with continuous terms rows are distinct.
    linear = (not study.continuous) and n_distinct_rows(study, totals.cell_counts > 0) == p
    totals = replace(totals, n_samples=n, sf_scale=c, xtx=sums.xtx, xim=m["xim"],
                     linear_mu=linear, log_geo_means=None)
    start = FitStart(base_mean=m["base_mean"], skip=(m["base_mean"] == 0) | totals.withheld,
                     moments_disp=m["moments_disp"], beta_lin=beta_lin,
                     cell_nonzero=sums.cell_norm * c > 0)
    return {"totals": totals, "start": start}


def phase(cells: bool = False) -> Phase:
    """Size factors, baseMean, moments and the linear fit: two rounds; ``cells``: the
    second also sends the rough round's sums per design cell."""
    second = call(moment_sums, cells=True) if cells else moment_sums
    return Phase("size_factors", rounds=[Round(log_sums, [log_means]),
                                         Round(second, [moments])])
