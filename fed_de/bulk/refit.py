"""DESeq2's refit of genes whose outlier counts were replaced (``refitWithoutOutliers``).

The Cook's decisions (:func:`fed_de.bulk.cooks.decide`) give the refitted genes and their
starting values, computed at once from the per-cell sums of the replaced counts. The refit then
runs, for those genes only (all others masked; the sites' messages carry their rows only:
``RunState.rows``), DESeq2's sequence:

  :func:`begin`       install the refit's start; the mu-IRLS warm-started from the first fit
  mu-IRLS             at the new rough dispersions (``refit_mu_rounds``, :mod:`.irls`)
  dispersions         the gene-wise and MAP rounds of :mod:`.dispersions` (DESeq2's own path),
                      with the first fit's trend evaluated at the new baseMean and its prior
                      variance; DESeq2's dispersion-outlier rule then picks the final value
  final IRLS          (``refit_final_rounds``); the last aggregation takes the covariance from
                      X'WX at the accepted coefficients, so no closing round is needed, and
                      :func:`finish` merges the refitted genes' values into the results.
"""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np

from fed_de.bulk.dispersions import genewise_phase, map_phase
from fed_de.bulk.irls import irls_step, irls_sums, start_final_fit
from fed_de.bulk.state import Dispersions, FitStart, GeneResults, Refit, Totals
from fed_de.core import lrt, nb
from fed_de.core.irls import IRLSFit, at_accepted, converged_outside, start_irls
from fed_de.core.trend import trend_values
from fed_de.federation.calls import aggregator_step, call
from fed_de.federation.strategy import Phase, Round


@aggregator_step(writes=("start", "rows", "irls_mu", "dispersions"))
def begin(refit: Refit, irls_mu: IRLSFit, totals: Totals, trend) -> dict:
    """The refit's state: its start, the genes messages carry, its first IRLS, and the first
    fit's trend at the refit's baseMean."""
    new = refit.start
    mask = new.skip
    warm = np.nan_to_num(irls_mu.beta) if new.mu_rounds else None
    frozen = mask | bool(totals.linear_mu)
    mu_fit = start_irls(new.beta_alt, frozen, warm if warm is not None else new.beta_init,
                        keep_xtwx=False)  # its means only are read
    disp_fit = np.where(mask, np.nan, trend_values(trend.coefficients, new.base_mean,
                                                   trend.fit_type))
    return {"start": new, "rows": np.flatnonzero(refit.genes), "irls_mu": mu_fit,
            "dispersions": Dispersions(fit=disp_fit)}


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
        dev = at_accepted(sums.raw.full, fit)
        dev_r = at_accepted(sums.raw.reduced, irls_reduced)
        new["deviance"] = dev
        new["lrt_stat"] = lrt.lrt_test(dev, dev_r, genes.lrt_df)[0]
        new["lrt_converged"] = converged_outside(irls_reduced, mask)
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


def phases(mu_rounds: int, genewise_rounds: int, map_rounds: int, final_rounds: int,
           lrt_test: bool) -> list[Phase]:
    """The refit of the replaced genes, DESeq2's sequence: mu-IRLS, gene-wise and MAP
    dispersions (the first fit's trend and prior variance), final IRLS (the LRT's last round
    also carries both models' deviances)."""
    mu = [Round(call(irls_sums, stage="mu"), [call(irls_step, stage="mu")])
          for _ in range(mu_rounds)]
    final = [Round(call(irls_sums, stage="final"), [call(irls_step, stage="final")])
             for _ in range(final_rounds - 1)]
    last = call(irls_sums, stage="final", raw=True) if lrt_test else call(irls_sums,
                                                                          stage="final")
    final.append(Round(last, [call(irls_step, stage="final"), finish]))
    return [Phase("refit", opening=[begin], rounds=mu),
            genewise_phase(genewise_rounds), map_phase(map_rounds, fit_trend=False),
            Phase("refit_final", opening=[start_final_fit], rounds=final)]
