"""A screen's dispersions: one per gene from the control cells (optionally all cells),
gene-wise Cox-Reid and MAP shrinkage to a fitted trend, as in the DESeq2 pipeline.

The means of the dispersion fit are the Poisson means of the groups of cells (control cells of
each design cell; with ``dispersion_cells="all"``, every (perturbation, design cell) group as
well): ``mu_i = s_i * sum(y) / sum(s)`` over the cell's group, a saturated fit known after
round 2 (:func:`dispersion_groups`), so the Cox-Reid matrix is diagonal over groups and no
IRLS round is needed (:mod:`fed_de.core.screen_dispersion`).

Round G0  site : sums at the start point (moments estimate), two neighbours and five anchors
                 (:func:`first_points`)                                  -> DispSums
          agg  : best point per gene, bracket, next points (:func:`genewise_start`)
Round Gk  site : sums at three points per gene     agg : add them, next points
                 (:func:`search_step`; the bracketed search of :mod:`fed_de.core.optim1d`)
After the last gene-wise round: the gene-wise estimates (:func:`genewise_estimate`), the
trend and the prior (:func:`trend_and_prior`) and the MAP search from every gene-wise
evaluation with the prior added (:func:`map_begin`) -- aggregator work, no round.
Round Mk  the same with the prior added; after the last one the final dispersions
(:func:`map_finish`). Without shrinkage the gene-wise values are final (:func:`unshrunk`).
With ``dispersion="moments"`` the gene-wise values are the moments estimates and the
shrinkage is closed-form (:func:`moments_dispersions`: zero rounds).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.special import polygamma

from fed_de.core import optim1d
from fed_de.core import screen_dispersion as cd
from fed_de.core.dispersion import (
    MIN_DISP,
    Prior,
    final_dispersions,
    fit_trend,
    genewise_estimates,
    log_bounds,
)
from fed_de.core.locfit import LocfitError
from fed_de.core.optim1d import BRACKET_POINTS
from fed_de.core.screen_sums import series_genes, sf_moments
from fed_de.errors import FedDEError
from fed_de.federation.calls import aggregator_step, call, site_step
from fed_de.federation.messages import Message, sums
from fed_de.federation.strategy import Phase, Round
from fed_de.screening.setup import GroupSums
from fed_de.screening.state import (
    DispersionGroups,
    DispSearch,
    ScreenDispersions,
    ScreenOptions,
    ScreenSiteView,
    tracked,
)

#: First gene-wise round: the moments estimate and its neighbours (log scale), and anchors
#: across the range (the bounds, and dispersions 1e-3, 0.1, 10) so that every gene's maximum
#: is bracketed at once.
START_OFFSETS = (0.0, -1.0, 1.0)
ANCHORS = (None, float(np.log(1e-3)), float(np.log(0.1)), float(np.log(10.0)), None)


def max_points() -> int:
    """The most points per gene a dispersion round evaluates (the first round's)."""
    return max(len(START_OFFSETS) + len(ANCHORS), BRACKET_POINTS)


class DispSums(Message):
    """Likelihood sums with two derivatives at each point of a gene, and the per-group sums of
    the diagonal X'WX with two derivatives."""

    ll: np.ndarray = sums("G", "K")
    d1: np.ndarray = sums("G", "K")
    d2: np.ndarray = sums("G", "K")
    A: np.ndarray = sums("G", "K", "D")
    A1: np.ndarray = sums("G", "K", "D")
    A2: np.ndarray = sums("G", "K", "D")


# -- site side ---------------------------------------------------------------------------------
@site_step
@tracked
def disp_sums(site: ScreenSiteView, disp: DispSearch, groups: DispersionGroups) -> DispSums:
    """Dispersion sums at this round's points (genes whose search is over: zeros)."""
    points, active = disp.points, disp.active
    G, K = points.shape
    D = groups.means.shape[0]
    idx = np.flatnonzero(active)
    out = {k: np.zeros((G, K)) for k in ("ll", "d1", "d2")}
    out.update({k: np.zeros((G, K, D)) for k in ("A", "A1", "A2")})
    if idx.size == 0:
        return DispSums(**out)
    cells = site.disp_groups()
    rows = np.flatnonzero(cells >= 0)
    sf = site.kept.sf
    means = groups.means[:, idx]
    pts = np.nan_to_num(points[idx])
    min_mu = site.options.min_mu
    # genes whose no-count sums come from power sums of size factors (most of them)
    moments = sf_moments(sf, cells, D)
    series = series_genes(moments, means[:, :, None] * np.exp(pts)[None], means, min_mu)
    acc = cd.disp_series_summands(moments, means, pts, series)
    for start, X in site.data.chunks(rows):
        sl = slice(start, start + X.shape[0])
        part = cd.disp_summands(X[:, idx] if idx.size < G else X, sf[sl], cells[sl],
                                means, pts, min_mu, dense=~series)
        for k, v in part.items():
            acc[k] += v
    for k, v in acc.items():
        out[k][idx] = v
    return DispSums(**out)


# -- aggregator side ---------------------------------------------------------------------------
@aggregator_step(writes=("groups",))
def dispersion_groups(sums: GroupSums, options: ScreenOptions) -> dict:
    """The dispersion groups from the round-2 sums: Poisson means, baseMean, moments
    estimates and maxDisp."""
    d_y, d_norm, d_norm2 = sums.ctrl_y, sums.ctrl_norm, sums.ctrl_norm2
    d_n, d_sf, d_inv = sums.ctrl_n, sums.ctrl_sf, sums.ctrl_inv_sf
    if options.dispersion_cells == "all":
        pc = sums.all_cells
        d_y = np.concatenate([d_y, pc.y])
        d_norm = np.concatenate([d_norm, pc.norm])
        d_norm2 = np.concatenate([d_norm2, pc.norm2])
        d_n = np.concatenate([d_n, sums.pert_n.ravel()])
        d_sf = np.concatenate([d_sf, sums.pert_sf.ravel()])
        d_inv = np.concatenate([d_inv, pc.inv_sf])
    n_disp = float(d_n.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(d_sf[:, None] > 0, d_y / np.where(d_sf > 0, d_sf, 1.0)[:, None], 0.0)
        disp_base = d_norm.sum(axis=0) / n_disp
    all_zero = d_y.sum(axis=0) == 0
    max_disp = max(10.0, n_disp)
    mom = cd.moments_dispersion(d_norm, d_norm2, d_n, d_inv)
    return {"groups": DispersionGroups(
        means=means, base_mean=np.where(all_zero, np.nan, disp_base), all_zero=all_zero,
        alpha_init=np.clip(np.nan_to_num(mom, nan=MIN_DISP), MIN_DISP, max_disp),
        alpha_moments=mom, max_disp=max_disp, n_cells=n_disp,
        n_groups=int((d_n > 0).sum()))}


@aggregator_step(writes=("disp",))
def first_points(groups: DispersionGroups) -> dict:
    """The first gene-wise round's points: the moments start, its neighbours, the anchors."""
    lo, hi = log_bounds(groups.max_disp)
    x0 = np.log(groups.alpha_init)
    pts = x0[:, None] + np.asarray(START_OFFSETS)[None, :]
    anchors = [lo if i == 0 else hi if a is None else a for i, a in enumerate(ANCHORS)]
    pts = np.column_stack([pts, np.broadcast_to(anchors, (x0.shape[0], len(anchors)))])
    return {"disp": DispSearch(points=np.clip(pts, lo, hi), active=~groups.all_zero)}


def _objective(sums: DispSums, disp: DispSearch, prior: Prior | None = None):
    """Objective, gradient and curvature at the round's points; genes not evaluated get
    ``f = -inf`` (``f`` before that mask is returned too)."""
    f, g, h = cd.disp_objective(sums.ll, sums.d1, sums.d2, sums.A, sums.A1, sums.A2,
                                disp.points, prior)
    return np.where(disp.active[:, None], f, -np.inf), f, g, h


def _propose(disp: DispSearch, ev: optim1d.Evaluations, groups: DispersionGroups,
             **parts) -> DispSearch:
    """The search's best point and bracket, and the next round's points."""
    lo, hi = log_bounds(groups.max_disp)
    best = optim1d.bracket_best(ev, lo, hi)
    best.done |= groups.all_zero
    return replace(disp, **parts, best=best, active=~best.done,
                   points=optim1d.bracket_propose(best, lo, hi))


@aggregator_step(writes=("disp",))
def genewise_start(sums: DispSums, disp: DispSearch, groups: DispersionGroups) -> dict:
    """Objective at the start points; the first bracket and points of the gene-wise search."""
    f, f0, g, h = _objective(sums, disp)
    ev = optim1d.bracket_start(disp.points, f, g, h)
    return {"disp": _propose(disp, ev, groups, genewise=ev, start_f=f0[:, 0],
                             start_g=g[:, 0], start_h=h[:, 0])}


@aggregator_step(writes=("disp",))
def search_step(sums: DispSums, disp: DispSearch, groups: DispersionGroups,
                phase: str = "genewise") -> dict:
    """One round of the gene-wise or MAP search: add the evaluations, propose the next."""
    f, _, g, h = _objective(sums, disp, disp.prior if phase == "map" else None)
    ev = optim1d.bracket_add(getattr(disp, phase), disp.points, f, g, h)
    return {"disp": _propose(disp, ev, groups, **{phase: ev})}


@aggregator_step(writes=("dispersions",))
def genewise_estimate(disp: DispSearch, groups: DispersionGroups) -> dict:
    """Gene-wise estimates from the finished search (DESeq2's ``noIncrease`` rule)."""
    best = disp.best
    gene = genewise_estimates(best.estimate, best.f, disp.start_f, disp.start_g, disp.start_h,
                              groups.alpha_init, groups.all_zero, groups.max_disp)
    return {"dispersions": ScreenDispersions(gene=gene)}


def _trend(groups: DispersionGroups, gene: np.ndarray, options: ScreenOptions):
    """The trend over the groups' baseMean (coefficients: the saturated fit's groups).

    Where no trend can be fitted (R stops too), the error says how many genes it had: a
    screen's disclosure rules withhold genes (they count as all-zero here), and a small
    screen can be left with too few, or only genes at the dispersion floor.
    """
    try:
        return fit_trend(groups.base_mean, gene, groups.all_zero, options.fit_type,
                         int(groups.n_cells), groups.n_groups)
    except (ValueError, LocfitError) as err:
        used = int(np.sum(~np.asarray(groups.all_zero)))
        raise FedDEError(
            f"the dispersion trend cannot be fitted on the {used} of {gene.size} genes with "
            f"counts left after the disclosure rules ({err}). Add cells or sites, use "
            "fit_type='mean', or dispersion='moments'") from err


@aggregator_step(writes=("dispersions", "trend", "disp"))
def trend_and_prior(dispersions: ScreenDispersions, disp: DispSearch,
                    groups: DispersionGroups, options: ScreenOptions) -> dict:
    """The trend (parametric, or its fallback) and the prior of the MAP."""
    fit, trend = _trend(groups, dispersions.gene, options)
    return {"dispersions": replace(dispersions, fit=fit), "trend": trend,
            "disp": replace(disp, prior=Prior(mean=np.log(fit), var=trend.prior_var))}


@aggregator_step(writes=("disp",))
def map_begin(disp: DispSearch, groups: DispersionGroups) -> dict:
    """The MAP search from every gene-wise evaluation, the prior added (no round): the best
    of them and the bracket they give (a gene-wise optimum at the 1e-8 floor is common for
    genes with few counts, many log units below its MAP optimum)."""
    ev = disp.genewise
    f, g, h = optim1d.add_log_normal_prior(ev.f, ev.g, ev.h, ev.x, disp.prior.mean,
                                           disp.prior.var)
    ev = optim1d.Evaluations(x=ev.x, f=f, g=g, h=h)
    return {"disp": _propose(disp, ev, groups, map=ev)}


@aggregator_step(writes=("dispersions",))
def map_finish(disp: DispSearch, dispersions: ScreenDispersions, trend,
               groups: DispersionGroups) -> dict:
    """MAP dispersions within bounds; dispersion outliers keep their gene-wise value."""
    disp_map, outlier, final = final_dispersions(
        np.exp(disp.best.estimate), dispersions.gene, dispersions.fit, trend.var_log_disp_ests,
        groups.all_zero, groups.max_disp)
    return {"dispersions": replace(dispersions, map=disp_map, outlier=outlier, final=final)}


@aggregator_step(writes=("dispersions",))
def unshrunk(dispersions: ScreenDispersions, groups: DispersionGroups) -> dict:
    """Without shrinkage the gene-wise dispersions are final."""
    return {"dispersions": replace(dispersions, map=dispersions.gene, final=dispersions.gene,
                                   outlier=np.zeros_like(groups.all_zero))}


@aggregator_step(writes=("dispersions", "trend"))
def moments_dispersions(groups: DispersionGroups, options: ScreenOptions) -> dict:
    """Moments gene-wise dispersions, the trend, and closed-form log-normal shrinkage."""
    gene = np.where(groups.all_zero, np.nan, groups.alpha_init)
    fit, trend = _trend(groups, gene, options)
    final = gene
    if options.shrink:
        dof = max(groups.n_cells - groups.n_groups, 1.0)
        sampling = float(polygamma(1, dof / 2.0))
        final = cd.shrink_log_dispersion(gene, fit, trend.prior_var, sampling)
    return {"trend": trend, "dispersions": ScreenDispersions(
        gene=gene, fit=fit, map=final, final=final, outlier=np.zeros_like(groups.all_zero))}


# -- phases ------------------------------------------------------------------------------------
def genewise_phase(rounds: int) -> Phase:
    """The gene-wise search: a first round at the start points, then ``rounds - 1`` more."""
    step = [call(search_step, phase="genewise")]
    return Phase("genewise", opening=[first_points], closing=[genewise_estimate], rounds=[
        Round(disp_sums, [genewise_start]),
        *[Round(disp_sums, list(step)) for _ in range(rounds - 1)]])


def map_phase(rounds: int, shrink: bool) -> Phase:
    """Trend and prior (no round), then the MAP search (or, without shrinkage, nothing)."""
    if not shrink:
        return Phase("trend_prior_map", opening=[trend_and_prior, unshrunk])
    step = [call(search_step, phase="map")]
    return Phase("trend_prior_map", opening=[trend_and_prior, map_begin], closing=[map_finish],
                 rounds=[Round(disp_sums, list(step)) for _ in range(rounds)])


def moments_phase() -> Phase:
    """``dispersion="moments"``: gene-wise, trend and shrinkage at the aggregator, no round."""
    return Phase("trend_prior_map", opening=[moments_dispersions])
