"""Gene-wise, trend and MAP dispersions (DESeq2's ``estimateDispersions``), federated.

Gene-wise: the Cox-Reid adjusted profile likelihood in log(alpha) is maximised per gene.
Each round the sites evaluate, at a few points per gene, the likelihood sums and the packed
X'WX with its two derivatives (:func:`disp_sums`); the aggregator adds them up, forms the exact
objective, gradient and curvature (:func:`fed_de.core.dispersion.objective`: the Cox-Reid term
needs the *global* X'WX) and runs a safeguarded Newton search with a parallel line search
(:mod:`fed_de.core.optim1d`).

Round G0  site : fitted means of the dispersion fit (kept at the site), sums at the start
                 point and a few spread points     agg : best point, first Newton step
Round Gk  site : sums at the candidates             agg : accept/shrink, next step
After the last gene-wise round: the gene-wise estimates (:func:`genewise_estimate`), the trend
and the prior variance (:func:`trend_and_prior`), and the MAP search from the gene-wise optimum
with the prior added (:func:`map_begin`) -- aggregator work, no round.
Round Mk  site : sums at the candidates             agg : MAP Newton update
After the last MAP round: bounds, and dispersion outliers keep their gene-wise value
(:func:`map_finish`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fed_de.bulk.state import Dispersions, DispSearch, FitStart, Site, Totals
from fed_de.core import dispersion as dcore
from fed_de.core import nb, optim1d
from fed_de.core.irls import MIN_MU, IRLSFit
from fed_de.federation.calls import aggregator_step, call, site_step
from fed_de.federation.messages import Message, sums
from fed_de.federation.strategy import Phase, Round

RADIUS = 3.0  # first trust radius of a search (log scale)


class DispSums(Message):
    """Likelihood sums and packed X'WX with its two derivatives at each point of a gene."""

    ll: np.ndarray = sums("G", "K")
    d1: np.ndarray = sums("G", "K")
    d2: np.ndarray = sums("G", "K")
    A: np.ndarray = sums("G", "K", "T")
    A1: np.ndarray = sums("G", "K", "T")
    A2: np.ndarray = sums("G", "K", "T")


def objective(sums: DispSums, points: np.ndarray, p: int, prior=None):
    """Objective, gradient and curvature at ``points`` from the summed message."""
    return dcore.objective(sums.ll, sums.d1, sums.d2, sums.A, sums.A1, sums.A2, points, p,
                           prior)


@site_step
def disp_sums(site: Site, disp: DispSearch, start: FitStart, totals: Totals,
              irls_mu: IRLSFit | None, first: bool = False) -> DispSums:
    """Sums at this round's points; the first round also fixes (and keeps) the means of
    the dispersion fit."""
    if first:
        X, sf = site.kept.design, site.kept.size_factors
        if totals.linear_mu:
            mu = np.maximum(sf[:, None] * (X @ start.beta_lin.T), MIN_MU)
        else:
            mu = nb.fitted_mu(X, np.nan_to_num(irls_mu.beta), sf, MIN_MU)
        site.kept.mu_disp = mu
    # genes whose search is over are sent as zeros: same shape, no work
    idx = np.flatnonzero(disp.active)
    part = nb.disp_summands(site.counts()[:, idx], site.kept.mu_disp[:, idx], site.kept.design,
                            np.nan_to_num(disp.points[idx]))
    G = disp.points.shape[0]
    out = {}
    for key, value in part.items():
        out[key] = np.zeros((G,) + value.shape[1:])
        out[key][idx] = value
    return DispSums(**out)


@aggregator_step(writes=("disp",))
def first_points(start: FitStart, totals: Totals) -> dict:
    """The first gene-wise round's points: the rough start, spread points and anchors."""
    return {"disp": DispSearch(points=dcore.initial_points(start.alpha_hat, totals.max_disp),
                               active=~start.skip)}


@aggregator_step(writes=("disp",))
def genewise_start(sums: DispSums, disp: DispSearch, start: FitStart, totals: Totals,
                   study) -> dict:
    """Best of the start points; first Newton candidates."""
    lo, hi = dcore.log_bounds(totals.max_disp)
    f, g, h = objective(sums, disp.points, study.n_coefs)
    search = optim1d.start(disp.points, f, g, h, radius=RADIUS, lo=lo, hi=hi)
    search.done |= start.skip
    return {"disp": replace(disp, genewise=search, start_f=f[:, 0], start_g=g[:, 0],
                            start_h=h[:, 0], points=optim1d.propose(search, lo, hi),
                            active=~search.done)}


@aggregator_step(writes=("disp",))
def search_step(sums: DispSums, disp: DispSearch, totals: Totals, study,
                phase: str = "genewise") -> dict:
    """One Newton update of the gene-wise (``phase="genewise"``) or MAP search."""
    lo, hi = dcore.log_bounds(totals.max_disp)
    prior = disp.prior if phase == "map" else None
    f, g, h = objective(sums, disp.points, study.n_coefs, prior)
    search = optim1d.update(getattr(disp, phase), disp.points, f, g, h, lo, hi)
    return {"disp": replace(disp, **{phase: search}, points=optim1d.propose(search, lo, hi),
                            active=~search.done)}


@aggregator_step(writes=("dispersions",))
def genewise_estimate(disp: DispSearch, start: FitStart, totals: Totals) -> dict:
    """Gene-wise estimates from the finished search (DESeq2's ``noIncrease`` rule)."""
    gene = dcore.genewise_estimates(disp.genewise, disp.start_f, disp.start_g, disp.start_h,
                                    start.alpha_hat, start.skip, totals.max_disp)
    return {"dispersions": Dispersions(gene=gene)}


@aggregator_step(writes=("dispersions", "trend", "disp"))
def trend_and_prior(dispersions: Dispersions, disp: DispSearch, start: FitStart,
                    totals: Totals, study, options) -> dict:
    """The trend (parametric, DESeq2's filter of genes above 100 * minDisp; or its fallback)
    and the prior variance of the MAP."""
    fit, trend = dcore.fit_trend(start.base_mean, dispersions.gene, start.skip,
                                 options.fit_type, int(totals.n_samples), study.n_coefs)
    prior = dcore.Prior(mean=np.log(fit), var=trend.prior_var)
    return {"dispersions": replace(dispersions, fit=fit), "trend": trend,
            "disp": replace(disp, prior=prior)}


@aggregator_step(writes=("disp",))
def map_begin(disp: DispSearch, start: FitStart, totals: Totals) -> dict:
    """The MAP search from the gene-wise optimum (no round: f, g, h there are known)."""
    lo, hi = dcore.log_bounds(totals.max_disp)
    search = dcore.map_start(disp.genewise, disp.prior, start.skip, totals.max_disp)
    return {"disp": replace(disp, map=search, points=optim1d.propose(search, lo, hi),
                            active=~search.done)}


@aggregator_step(writes=("dispersions",))
def map_finish(disp: DispSearch, dispersions: Dispersions, trend, start: FitStart,
               totals: Totals) -> dict:
    """MAP dispersions within bounds; dispersion outliers keep their gene-wise value."""
    disp_map, outlier, final = dcore.final_dispersions(
        disp.map.x, dispersions.gene, dispersions.fit, trend.var_log_disp_ests, start.skip,
        totals.max_disp)
    return {"dispersions": replace(dispersions, map=disp_map, outlier=outlier, final=final)}


def genewise_phase(rounds: int) -> Phase:
    """The gene-wise search: a first round at the start points, then ``rounds`` updates."""
    step = [call(search_step, phase="genewise")]
    return Phase("genewise", opening=[first_points], closing=[genewise_estimate], rounds=[
        Round(call(disp_sums, first=True), [genewise_start]),
        *[Round(disp_sums, list(step)) for _ in range(rounds)]])


def map_phase(rounds: int) -> Phase:
    """Trend and prior (no round), then the MAP search."""
    step = [call(search_step, phase="map")]
    return Phase("trend_prior_map", opening=[trend_and_prior, map_begin], closing=[map_finish],
                 rounds=[Round(disp_sums, list(step)) for _ in range(rounds)])
