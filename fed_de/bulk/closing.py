"""Closing round of the fit: sums at the final coefficients, the covariance, and the per-gene
results.

Round W  site : packed X'WX and the deviance (-2 log likelihood with unfloored means, R's
                ``logLike``) at the final betas and dispersions; the LRT's reduced-model
                deviance (for ``~ 1`` at DESeq2's ``log(baseMean)``); with Cook's, the
                Cook's counts and the refit's starting sums
                (:func:`fed_de.bulk.cooks.cooks_counts`)                   -> ClosingSums
         agg  : DESeq2's stopping rule for genes still iterating, the Fisher-information
                covariance with DESeq2's ridge, (X'WX + L)^-1 X'WX (X'WX + L)^-1, and the
                per-gene results (:func:`close_fit`)
Without Cook's and with one fallback round (the defaults) the closing sums ride on the
fallback round (:func:`fallback_closing_sums`): that round accepts the coefficients it
evaluates (its start point), so the final coefficients are known before it runs and its
aggregation closes the fit; the results are those of a separate closing round, bit for bit.
Contrasts, Wald statistics, p-values and adjusted p-values are computed from the per-gene
results at the aggregator, for any number of contrasts, with no further round
(:mod:`fed_de.bulk.results`).
"""

from __future__ import annotations

import numpy as np

from fed_de.bulk import cooks
from fed_de.bulk import fallback as fallback_fit
from fed_de.bulk.cooks import CooksCounts, cooks_counts
from fed_de.bulk.fallback import FallbackSums
from fed_de.bulk.state import CooksSetup, Dispersions, FitStart, GeneResults, Site, Totals
from fed_de.core import lrt, nb
from fed_de.core.fallback import FallbackFit
from fed_de.core.irls import MIN_MU, IRLSFit
from fed_de.federation.calls import aggregator_step, site_step
from fed_de.federation.messages import Message, part, sums, zero_rows
from fed_de.federation.strategy import Phase, Round


class ReducedDeviance(Message):
    """The LRT reduced model's deviance (-2 log likelihood) at its final coefficients."""

    deviance: np.ndarray = sums("G", narrow=True)


class ClosingSums(Message):
    """X'WX and deviance at the final fit (+ LRT deviance, + Cook's counts)."""

    xtwx: np.ndarray = sums("G", "T", narrow=True)
    deviance: np.ndarray = sums("G", narrow=True)
    reduced: ReducedDeviance | None = part()
    cooks: CooksCounts | None = part()


def reduced_beta(start: FitStart, irls_reduced: IRLSFit | None) -> np.ndarray:
    """The reduced model's coefficients: its IRLS fit, or, for ``~ 1``, DESeq2's shortcut
    ``log(baseMean)`` (``fitNbinomGLMs`` does not fit an intercept-only model)."""
    if irls_reduced is None:
        return lrt.intercept_only_beta(np.where(start.skip, 1.0, start.base_mean))
    return np.nan_to_num(irls_reduced.beta)


def deviances(site: Site, beta: np.ndarray, beta_r: np.ndarray | None,
              alpha: np.ndarray) -> dict:
    """-2 log likelihood of the full (and reduced) model with unfloored means, as R's
    ``fitNbinomGLMs`` returns ``logLike`` (the 0.5 floor is only inside the IRLS)."""
    sf, X = site.kept.size_factors, site.kept.design
    Xr = site.kept.design_reduced if beta_r is not None else None
    return lrt.lrt_site_deviances(site.counts(), sf, X, beta, Xr, beta_r, alpha)


def final_beta(irls_final: IRLSFit, fallback: FallbackFit | None):
    """Final coefficients: IRLS, or the fallback refit for genes IRLS left unconverged."""
    beta = np.nan_to_num(irls_final.beta)
    if fallback is None:
        return beta, np.zeros(beta.shape[0], dtype=bool)
    return np.where(fallback.refitted[:, None], fallback.beta, beta), fallback.refitted


@site_step
def closing_sums(site: Site, start: FitStart, dispersions: Dispersions, irls_final: IRLSFit,
                 fallback: FallbackFit | None, irls_reduced: IRLSFit | None,
                 cooks: CooksSetup | None) -> ClosingSums:
    """X'WX and deviance at the final coefficients; the variants' parts."""
    beta, _ = final_beta(irls_final, fallback)
    alpha = np.nan_to_num(dispersions.final, nan=1.0)
    X, sf = site.kept.design, site.kept.size_factors
    lrt_on = site.reduced is not None
    dev = deviances(site, beta, reduced_beta(start, irls_reduced) if lrt_on else None, alpha)
    out = ClosingSums(xtwx=nb.fisher_gram(X, beta, sf, alpha, MIN_MU),  # floored means (fitBeta)
                      deviance=dev["deviance"])
    if lrt_on:
        out.reduced = ReducedDeviance(deviance=dev["deviance_r"])
    if cooks is not None:  # after the sums above: they use the counts before replacement
        out.cooks = cooks_counts(site, cooks, beta, alpha, irls_final.xtwx_acc, start.skip)
    return zero_rows(out, start.skip)  # all-zero or withheld genes


def final_sums(irls_final: IRLSFit, fallback: FallbackFit | None, xtwx: np.ndarray,
               deviance: np.ndarray, p: int, all_zero: np.ndarray) -> dict:
    """Coefficients, covariance, deviance and convergence flags of the final fit."""
    # the last IRLS round already judged the accepted betas: genes still iterating did not
    # converge within the unrolled rounds (DESeq2's betaConv = FALSE); genes the fallback
    # refitted are converged once its search ended (DESeq2 1.38: TRUE when optim converges)
    converged = irls_final.deseq2_rule | irls_final.converged
    beta, refitted = final_beta(irls_final, fallback)
    if fallback is not None:
        converged = np.where(refitted, ~fallback.active, converged)
    beta = np.where(all_zero[:, None], np.nan, beta)
    cov = nb.wald_covariance(np.where(all_zero[:, None], 1.0, xtwx), nb.ridge(p))
    cov[all_zero] = np.nan
    return {"beta": beta, "beta_cov": cov,
            "deviance": np.where(all_zero, np.nan, deviance),
            "beta_converged": converged & ~all_zero, "refitted_optim": refitted & ~all_zero}


@aggregator_step(writes=("genes",))
def close_fit(sums: ClosingSums, start: FitStart, totals: Totals, dispersions: Dispersions,
              irls_final: IRLSFit, fallback: FallbackFit | None,
              irls_reduced: IRLSFit | None, study, reduced) -> dict:
    """Convergence flags, the coefficient covariance, and every gene's results."""
    withheld = totals.withheld if totals.withheld is not None else np.zeros_like(start.skip)
    all_zero = start.skip & ~withheld
    fit = final_sums(irls_final, fallback, sums.xtwx, sums.deviance, study.n_coefs, start.skip)
    genes = GeneResults(base_mean=start.base_mean, all_zero=all_zero,
                        dispersions=dispersions, cell_totals=start.cell_totals,
                        withheld=totals.withheld, **fit)
    if sums.reduced is not None:  # LRT: deviance difference, chi-squared on the df difference
        genes.lrt_df = study.n_coefs - reduced.n_coefs
        stat, _ = lrt.lrt_test(sums.deviance, sums.reduced.deviance, genes.lrt_df)
        genes.lrt_stat = np.where(all_zero, np.nan, stat)
        conv = irls_reduced.converged if irls_reduced is not None else np.ones_like(all_zero)
        genes.lrt_converged = conv & ~all_zero
    return {"genes": genes}


class FallbackClosingSums(Message):
    """The fallback round with the closing sums at the coefficients it accepts."""

    fallback: FallbackSums = part()
    closing: ClosingSums = part()


@site_step
def fallback_closing_sums(site: Site, start: FitStart, dispersions: Dispersions,
                          irls_final: IRLSFit, fallback: FallbackFit,
                          irls_reduced: IRLSFit | None) -> FallbackClosingSums:
    """The fallback's sums at its start point and X'WX and deviance at the final
    coefficients: a first fallback round accepts its start point (every candidate is that
    point, :func:`fed_de.core.fallback.start_fallback`), so they are known already."""
    return FallbackClosingSums(
        fallback=fallback_fit.fallback_sums(site, fallback, dispersions),
        closing=closing_sums(site, start, dispersions, irls_final, fallback, irls_reduced,
                             None))


@aggregator_step(writes=("fallback",))
def fallback_closing_step(sums: FallbackClosingSums, fallback: FallbackFit, study) -> dict:
    """The fallback's update (:func:`fed_de.bulk.fallback.fallback_step`)."""
    return fallback_fit.fallback_step(sums.fallback, fallback, study)


@aggregator_step(writes=("genes",))
def close_fused(sums: FallbackClosingSums, start: FitStart, totals: Totals,
                dispersions: Dispersions, irls_final: IRLSFit, fallback: FallbackFit,
                irls_reduced: IRLSFit | None, study, reduced) -> dict:
    """:func:`close_fit` from the closing part of the fallback round."""
    return close_fit(sums.closing, start, totals, dispersions, irls_final, fallback,
                     irls_reduced, study, reduced)


def fused_round() -> Round:
    """The one fallback round that also closes the fit (no Cook's)."""
    return Round(fallback_closing_sums, [fallback_closing_step, close_fused])


def phase(with_cooks: bool) -> Phase:
    """The closing round; with Cook's it joins the side chain and decides on outliers."""
    if not with_cooks:
        return Phase("closing", rounds=[Round(closing_sums, [close_fit])])
    return Phase("closing", opening=[cooks.join], join=True,
                 rounds=[Round(closing_sums, [close_fit, cooks.decide])])
