"""DESeq2's refit of genes whose outlier counts were replaced (``refitWithoutOutliers``).

The Cook's decisions (:func:`fed_de.bulk.cooks.decide`) give the refitted genes and their
starting values, computed at once from the per-cell sums of the replaced counts. The refit then
runs, for those genes only (all others masked; the sites' messages carry their rows only:
``RunState.rows``), DESeq2's sequence:

  :func:`begin`       install the refit's start; the mu-IRLS warm-started from the first fit
  mu-IRLS             at the new rough dispersions (``refit_mu_rounds``, :mod:`.irls`)
  :func:`pair_start`, :func:`pair_step`
                      gene-wise and MAP searches side by side (``refit_disp_rounds``): MAP uses
                      the same means, the first fit's trend evaluated at the new baseMean, and
                      its prior variance; DESeq2's dispersion-outlier rule then picks the final
                      value (:func:`pair_finish`)
  final IRLS          (``refit_final_rounds``); the last aggregation takes the covariance from
                      X'WX at the accepted coefficients, so no closing round is needed, and
                      :func:`finish` merges the refitted genes' values into the results.
"""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np

from fed_de.bulk.dispersions import RADIUS, disp_sums, objective
from fed_de.bulk.irls import irls_step, irls_sums, start_final_fit
from fed_de.bulk.state import (
    Dispersions,
    DispSearch,
    FitStart,
    GeneResults,
    Refit,
    Totals,
)
from fed_de.core import dispersion as dcore
from fed_de.core import lrt, nb, optim1d
from fed_de.core.irls import IRLSFit, start_irls
from fed_de.core.trend import trend_values
from fed_de.federation.calls import aggregator_step, call
from fed_de.federation.strategy import Phase, Round


@aggregator_step(writes=("start", "rows", "irls_mu", "disp", "dispersions"))
def begin(refit: Refit, irls_mu: IRLSFit, totals: Totals, trend) -> dict:
    """The refit's state: its start, the genes messages carry, its first IRLS and points."""
    new = refit.start
    mask = new.skip
    warm = np.nan_to_num(irls_mu.beta) if new.mu_rounds else None
    frozen = mask | bool(totals.linear_mu)
    mu_fit = start_irls(new.beta_alt, frozen, warm if warm is not None else new.beta_init)
    disp_fit = np.where(mask, np.nan, trend_values(trend.coefficients, new.base_mean,
                                                   trend.fit_type))
    return {"start": new, "rows": np.flatnonzero(refit.genes), "irls_mu": mu_fit,
            "disp": DispSearch(points=dcore.initial_points(new.alpha_hat, totals.max_disp),
                               active=~mask),
            "dispersions": Dispersions(fit=disp_fit)}


def _propose_pair(disp: DispSearch, lo: float, hi: float) -> DispSearch:
    gw, mp = disp.genewise, disp.map
    return replace(disp, points=np.concatenate([optim1d.propose(gw, lo, hi),
                                                optim1d.propose(mp, lo, hi)], axis=1),
                   active=~(gw.done & mp.done))


@aggregator_step(writes=("disp",))
def pair_start(sums, disp: DispSearch, dispersions: Dispersions, trend, start: FitStart,
               totals: Totals, study) -> dict:
    """Start both searches from the first round's points (the MAP one with the prior)."""
    lo, hi = dcore.log_bounds(totals.max_disp)
    points, p = disp.points, study.n_coefs
    f, g, h = objective(sums, points, p)
    gw = optim1d.start(points, f, g, h, radius=RADIUS, lo=lo, hi=hi)
    prior = dcore.Prior(mean=np.log(dispersions.fit), var=trend.prior_var)
    fm, gm, hm = objective(sums, points, p, prior)
    mp = optim1d.start(points, fm, gm, hm, radius=RADIUS, lo=lo, hi=hi)
    for s in (gw, mp):
        s.done |= start.skip
    disp = replace(disp, genewise=gw, map=mp, prior=prior, start_f=f[:, 0], start_g=g[:, 0],
                   start_h=h[:, 0])
    return {"disp": _propose_pair(disp, lo, hi)}


@aggregator_step(writes=("disp",))
def pair_step(sums, disp: DispSearch, totals: Totals, study, last: bool = False) -> dict:
    """Update both searches (the points hold the gene-wise half, then the MAP half)."""
    lo, hi = dcore.log_bounds(totals.max_disp)
    points, p = disp.points, study.n_coefs
    K = points.shape[1] // 2
    halves = [{f.name: getattr(sums, f.name)[:, :K] for f in fields(sums)},
              {f.name: getattr(sums, f.name)[:, K:] for f in fields(sums)}]
    new = {}
    for key, half, pts, prior in (("genewise", halves[0], points[:, :K], None),
                                  ("map", halves[1], points[:, K:], disp.prior)):
        f, g, h = dcore.objective(**half, points=pts, p=p, prior=prior)
        new[key] = optim1d.update(getattr(disp, key), pts, f, g, h, lo, hi)
    disp = replace(disp, **new)
    return {"disp": disp if last else _propose_pair(disp, lo, hi)}


@aggregator_step(writes=("dispersions",))
def pair_finish(disp: DispSearch, dispersions: Dispersions, trend, start: FitStart,
                totals: Totals) -> dict:
    """The refit's gene-wise, MAP and final dispersions."""
    gene = dcore.genewise_estimates(disp.genewise, disp.start_f, disp.start_g, disp.start_h,
                                    start.alpha_hat, start.skip, totals.max_disp)
    disp_map, outlier, final = dcore.final_dispersions(
        disp.map.x, gene, dispersions.fit, trend.var_log_disp_ests, start.skip,
        totals.max_disp)
    return {"dispersions": replace(dispersions, gene=gene, map=disp_map, outlier=outlier,
                                   final=final)}


@aggregator_step(writes=("genes", "rows"))
def finish(genes: GeneResults, refit: Refit, start: FitStart, dispersions: Dispersions,
           irls_final: IRLSFit, irls_reduced: IRLSFit | None, study, sums=None) -> dict:
    """Covariance at the accepted coefficients; the refitted genes' values replace the first
    fit's; genes all zero after replacement get DESeq2's ``nowZero`` values. With the LRT,
    the last round's ``sums`` hold both models' deviances at every candidate: those at the
    accepted coefficients give the statistic."""
    fit, mask, p = irls_final, start.skip, study.n_coefs
    sel = refit.genes
    new = {
        "base_mean": start.base_mean,
        "beta": np.where(mask[:, None], np.nan, fit.beta),
        "beta_cov": nb.wald_covariance(np.where(mask[:, None], nb.pack(np.eye(p)),
                                                fit.xtwx_acc), nb.ridge(p)),
        "deviance": fit.dev_prev,
        "beta_converged": (fit.deseq2_rule | fit.converged) & ~mask,
        "refitted_optim": np.zeros_like(mask),
    }
    if sums is not None and sums.raw is not None:
        dev = _at_accepted(sums.raw.full, fit)
        dev_r = (_at_accepted(sums.raw.reduced, irls_reduced) if irls_reduced is not None
                 else sums.raw.reduced[:, 0])
        new["deviance"] = dev
        new["lrt_stat"] = lrt.lrt_test(dev, dev_r, genes.lrt_df)[0]
        conv = irls_reduced.converged if irls_reduced is not None else np.ones_like(mask)
        new["lrt_converged"] = conv & ~mask
    gone = refit.new_all_zero

    def merge(old, value, scrub=True):
        merged = np.where(sel.reshape((-1,) + (1,) * (np.ndim(old) - 1)), value, old)
        if not scrub:
            return merged
        shape = (-1,) + (1,) * (merged.ndim - 1)
        if merged.dtype == bool:
            return merged & ~gone.reshape(shape)
        return np.where(gone.reshape(shape), np.nan, merged)

    merged = {k: merge(getattr(genes, k), v, k != "base_mean") for k, v in new.items()}
    merged["base_mean"] = np.where(gone, 0.0, merged["base_mean"])
    old_d = genes.dispersions
    merged_d = Dispersions(**{f.name: merge(getattr(old_d, f.name), getattr(dispersions, f.name))
                              for f in fields(Dispersions)})
    return {"genes": replace(genes, **merged, dispersions=merged_d,
                             all_zero=genes.all_zero | gone,
                             cooks_outlier=genes.cooks_outlier & ~gone),
            "rows": None}


def _at_accepted(values: np.ndarray, fit: IRLSFit) -> np.ndarray:
    """Per gene, the value at the candidate the last update accepted (its coefficients)."""
    return values[np.arange(values.shape[0]), fit.picked]


def phase(mu_rounds: int, disp_rounds: int, final_rounds: int, lrt_test: bool) -> Phase:
    """The refit of the replaced genes: mu-IRLS, paired dispersion searches, final IRLS (the
    LRT's last round also carries both models' deviances)."""
    rounds = [Round(call(irls_sums, stage="mu"), [call(irls_step, stage="mu")])
              for _ in range(mu_rounds)]
    rounds.append(Round(call(disp_sums, first=True), [pair_start]))
    rounds += [Round(disp_sums, [call(pair_step, last=i == disp_rounds - 2)])
               for i in range(disp_rounds - 1)]
    rounds[-1].steps += [pair_finish, start_final_fit]
    rounds += [Round(call(irls_sums, stage="final"), [call(irls_step, stage="final")])
               for _ in range(final_rounds - 1)]
    last = call(irls_sums, stage="final", raw=True) if lrt_test else call(irls_sums,
                                                                          stage="final")
    rounds.append(Round(last, [call(irls_step, stage="final"), finish]))
    return Phase("refit", opening=[begin], rounds=rounds)
