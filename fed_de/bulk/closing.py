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
Without Cook's and with one fallback round (the defaults) the closing sums ride on the last
IRLS round (:func:`closing_fit_sums`): the coefficients a fit ends with are one of the
candidates that round evaluates (in DESeq2's optim box for a gene sent to the fallback, whose
one round accepts its start point), so the sites send the closing sums at every candidate and
the aggregation keeps each gene's own; the results are those of separate fallback and closing
rounds.
Contrasts, Wald statistics, p-values and adjusted p-values are computed from the per-gene
results at the aggregator, for any number of contrasts, with no further round
(:mod:`fed_de.bulk.results`).
"""

from __future__ import annotations

import numpy as np

from fed_de.bulk import cooks, irls
from fed_de.bulk import fallback as fallback_fit
from fed_de.bulk.cooks import CooksCounts, cooks_counts
from fed_de.bulk.irls import IRLSSums
from fed_de.bulk.state import CooksSetup, Dispersions, FitStart, GeneResults, Site, Totals
from fed_de.core import fallback as fallback_core
from fed_de.core import lrt, nb
from fed_de.core.fallback import FallbackFit
from fed_de.core.irls import MIN_MU, IRLSFit, at_accepted, converged_outside
from fed_de.federation.calls import aggregator_step, site_step
from fed_de.federation.messages import Message, part, sums, zero_rows
from fed_de.federation.strategy import Phase, Round


class ReducedDeviance(Message):
    """The LRT reduced model's deviance (-2 log likelihood) at its final coefficients."""

    deviance: np.ndarray = sums("G", narrow=True)


class ReducedDevianceAt(Message):
    """The LRT reduced model's deviance at each of its candidates."""

    deviance: np.ndarray = sums("G", "KB", narrow=True)


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
                        dispersions=dispersions, cell_nonzero=start.cell_nonzero,
                        withheld=totals.withheld, **fit)
    if sums.reduced is not None:  # LRT: deviance difference, chi-squared on the df difference
        genes.lrt_df = study.n_coefs - reduced.n_coefs
        stat, _ = lrt.lrt_test(sums.deviance, sums.reduced.deviance, genes.lrt_df)
        genes.lrt_stat = np.where(all_zero, np.nan, stat)
        genes.lrt_converged = converged_outside(irls_reduced, all_zero)
    return {"genes": genes}


class BoxedSums(Message):
    """The closing sums at each candidate of the last IRLS round.

    At the candidate clipped to DESeq2's optim box (where a gene sent to the fallback starts,
    and with one fallback round stays): the fallback's sums, X'WX and the deviance; at the
    candidate itself, the deviance (a gene that stays with IRLS beyond the box); the LRT
    reduced model's deviance at its candidates.
    """

    loglik: np.ndarray = sums("G", "KB", narrow=True)
    grad: np.ndarray = sums("G", "KB", "p", narrow=True)
    info: np.ndarray = sums("G", "KB", "T", narrow=True)
    xtwx: np.ndarray = sums("G", "KB", "T", narrow=True)
    deviance: np.ndarray = sums("G", "KB", narrow=True)
    deviance_free: np.ndarray = sums("G", "KB", narrow=True)
    reduced: ReducedDevianceAt | None = part()


class ClosingFitSums(Message):
    """The last final IRLS round with the closing sums at each of its candidates."""

    fit: IRLSSums = part()
    closing: BoxedSums = part()


def _boxed_sums(site: Site, start: FitStart, dispersions: Dispersions, irls_final: IRLSFit,
                irls_reduced: IRLSFit | None) -> BoxedSums:
    """:class:`BoxedSums`: per candidate, the closing sums as :func:`closing_sums` computes
    them at the final coefficients, and the fallback's sums in blocks of genes."""
    G, K, p = irls_final.candidates.shape
    alpha = np.nan_to_num(dispersions.final, nan=1.0)
    X, sf, y = site.kept.design, site.kept.size_factors, site.counts()
    lrt_on = site.reduced is not None
    T = nb.n_packed(p)
    out = {"loglik": np.zeros((G, K)), "grad": np.zeros((G, K, p)),
           "info": np.zeros((G, K, T)), "xtwx": np.zeros((G, K, T)),
           "deviance": np.zeros((G, K)), "deviance_free": np.zeros((G, K))}
    reduced = np.zeros((G, K)) if lrt_on else None
    free = np.nan_to_num(irls_final.candidates)
    boxed = np.clip(free, -fallback_core.BOX, fallback_core.BOX)
    for k in range(K):
        beta_r = (np.nan_to_num(irls_reduced.candidates[:, k])
                  if lrt_on and irls_reduced is not None else None)
        dev = lrt.lrt_site_deviances(y, sf, X, boxed[:, k], None if beta_r is None
                                     else site.kept.design_reduced, beta_r, alpha)
        out["xtwx"][:, k] = nb.fisher_gram(X, boxed[:, k], sf, alpha, MIN_MU)
        out["deviance"][:, k] = dev["deviance"]
        out["deviance_free"][:, k] = dev["deviance"]
        if not np.array_equal(boxed[:, k], free[:, k]):  # a candidate beyond the box
            out["deviance_free"][:, k] = lrt.lrt_site_deviances(
                y, sf, X, free[:, k], None, None, alpha)["deviance"]
        if beta_r is not None:
            reduced[:, k] = dev["deviance_r"]
    if lrt_on and irls_reduced is None:  # ``~ 1``: one point for every candidate, computed once
        reduced[:] = lrt.lrt_site_deviances(y, sf, site.kept.design_reduced,
                                            reduced_beta(start, None), None, None,
                                            alpha)["deviance"][:, None]
    idx = np.flatnonzero(~start.skip)
    for sl in nb.gene_blocks(idx.size):
        genes = idx[sl]
        part_ = fallback_core.fallback_sums(y[:, genes], X, sf, alpha[genes], boxed[genes])
        for key, value in part_.items():
            out[key][genes] = value
    msg = BoxedSums(**out, reduced=None if reduced is None
                    else ReducedDevianceAt(deviance=reduced))
    return zero_rows(msg, start.skip)  # all-zero or withheld genes


@site_step
def closing_fit_sums(site: Site, start: FitStart, dispersions: Dispersions,
                     irls_final: IRLSFit, irls_reduced: IRLSFit | None) -> ClosingFitSums:
    """The last IRLS round's sums, and the closing sums at each of its candidates: the
    aggregation keeps one candidate per gene, and the coefficients the fit ends with are that
    candidate (or, for a gene sent to the one fallback round, that candidate in the box)."""
    fit = irls.irls_sums(site, start, dispersions, None, irls_final, irls_reduced,
                         stage="final")
    return ClosingFitSums(fit=fit, closing=_boxed_sums(site, start, dispersions, irls_final,
                                                       irls_reduced))


@aggregator_step(writes=("irls_final", "irls_reduced"))
def closing_irls_step(sums: ClosingFitSums, irls_final: IRLSFit,
                      irls_reduced: IRLSFit | None, study, reduced) -> dict:
    """The IRLS update (:func:`fed_de.bulk.irls.irls_step`) from the round's fit part."""
    return irls.irls_step(sums.fit, None, irls_final, irls_reduced, study, reduced,
                          stage="final")


@aggregator_step(writes=("fallback",))
def closing_fallback_step(sums: ClosingFitSums, fallback: FallbackFit, irls_final: IRLSFit,
                          study) -> dict:
    """The one fallback round from the sums at the kept candidate in the box: every
    candidate of a first fallback round is its start point, that candidate
    (:func:`fed_de.core.fallback.start_fallback`)."""
    c = sums.closing
    KF = fallback.candidates.shape[1]

    def each(values):
        return np.repeat(at_accepted(values, irls_final)[:, None], KF, axis=1)

    return {"fallback": fallback_core.fallback_update(fallback, each(c.loglik), each(c.grad),
                                                      each(c.info), study.n_coefs)}


@aggregator_step(writes=("genes",))
def close_at_candidates(sums: ClosingFitSums, start: FitStart, totals: Totals,
                        dispersions: Dispersions, irls_final: IRLSFit, fallback: FallbackFit,
                        irls_reduced: IRLSFit | None, study, reduced) -> dict:
    """:func:`close_fit` from the closing sums at the final coefficients: the kept candidate,
    in the box for a refitted gene (and for any gene whose candidate is inside it)."""
    c, fit = sums.closing, irls_final
    beta = np.nan_to_num(fit.beta)
    inside = (np.clip(beta, -fallback_core.BOX, fallback_core.BOX) == beta).all(axis=1)
    boxed = fallback.refitted | inside
    xtwx = np.where(boxed[:, None], at_accepted(c.xtwx, fit),
                    at_accepted(sums.fit.full.xtwx, fit))
    deviance = np.where(boxed, at_accepted(c.deviance, fit), at_accepted(c.deviance_free, fit))
    closed = ClosingSums(xtwx=xtwx, deviance=deviance)
    if c.reduced is not None:
        closed.reduced = ReducedDeviance(deviance=at_accepted(c.reduced.deviance, irls_reduced))
    return close_fit(closed, start, totals, dispersions, irls_final, fallback, irls_reduced,
                     study, reduced)


def closing_round() -> Round:
    """The last final IRLS round that also runs the one fallback round and closes the fit
    (no Cook's)."""
    return Round(closing_fit_sums, [closing_irls_step, fallback_fit.fallback_begin,
                                    closing_fallback_step, close_at_candidates])


def phase(with_cooks: bool) -> Phase:
    """The closing round; with Cook's it joins the side chain and decides on outliers."""
    if not with_cooks:
        return Phase("closing", rounds=[Round(closing_sums, [close_fit])])
    return Phase("closing", opening=[cooks.join], join=True,
                 rounds=[Round(closing_sums, [close_fit, cooks.decide])])
