"""Rough dispersions and IRLS starts: the round that opens the fit (``mu_fit`` phase).

Round 3  site : final size factors (the ``poscounts`` rescaling), then the sum of
                ((y - mu)^2 - mu) / mu^2 with the linear-fit means floored at 1
                (``roughDispEstimate``) and X' log(normalised + 0.1) (the IRLS start); the
                LRT adds the reduced model's starting sums (none for a reduced ``~ 1``,
                which DESeq2 does not fit)                                -> RoughSums
         agg  : ``alpha_hat = clip(min(rough, moments), minDisp, maxDisp)`` and the IRLS
                starts                                                  (:func:`rough_start`)
Factor designs with ``ratio`` size factors have no rough round: the moments round sends the
same sums per design cell and its aggregation computes the start (:func:`rough_from_cells`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fed_de.bulk.size_factors import MomentSums
from fed_de.bulk.state import FitStart, Site, Totals
from fed_de.core import moments as mom
from fed_de.core import nb
from fed_de.design import cell_design_rows
from fed_de.federation.calls import aggregator_step, site_step
from fed_de.federation.messages import Message, part, sums, zero_rows


class ReducedStartSums(Message):
    """The LRT reduced model's IRLS starting sums."""

    xr_logy: np.ndarray = sums("G", "pr")
    xr_loglin: np.ndarray = sums("G", "pr")
    xrtxr: np.ndarray = sums("Tr")


class RoughSums(Message):
    """Round 3: rough-dispersion sums and the sums of the two IRLS starts."""

    rough: np.ndarray = sums("G")
    xt_logy: np.ndarray = sums("G", "p")
    xt_loglin: np.ndarray = sums("G", "p")
    reduced: ReducedStartSums | None = part()


@site_step
def rough_sums(site: Site, totals: Totals, start: FitStart) -> RoughSums:
    """Final size factors; rough-dispersion sums and the log-linear IRLS starts."""
    sf = site.kept.size_factors_raw / totals.sf_scale
    site.kept.size_factors = sf
    X = site.kept.design
    norm = site.counts() / sf[:, None]
    lin = X @ start.beta_lin.T
    mu = np.maximum(lin, 1.0)
    rough = (((norm - mu) ** 2 - mu) / mu**2).sum(axis=0)
    reduced = None
    if site.reduced is not None and not site.reduced.intercept_only:
        Xr = site.kept.design_reduced
        reduced = ReducedStartSums(xr_logy=np.log(norm + 0.1).T @ Xr,
                                   xr_loglin=np.log(np.maximum(lin, 0.1)).T @ Xr,
                                   xrtxr=nb.gram(Xr, np.ones(Xr.shape[0])))
    out = RoughSums(rough=rough, xt_logy=np.log(norm + 0.1).T @ X,
                    xt_loglin=np.log(np.maximum(lin, 0.1)).T @ X, reduced=reduced)
    return zero_rows(out, start.skip)  # all-zero or withheld genes send nothing


@aggregator_step(writes=("totals", "start"))
def rough_from_cells(sums: MomentSums, totals: Totals, start: FitStart, study, reduced,
                     mu_rounds: int = 0) -> dict:
    """:func:`rough_start` from the moments round's per-cell sums (factor designs, ``ratio``
    size factors): the linear fit is one value per design cell, so the rough dispersions'
    sum and the IRLS starts' sums over samples are sums over cells
    (:func:`fed_de.core.moments.start_from_cell_sums`); no rough round."""
    max_disp = mom.max_disp(totals.n_samples)
    Xrc = (cell_design_rows(study, reduced)
           if reduced is not None and not reduced.intercept_only else None)
    new = mom.start_from_cell_sums(sums.cell_norm, sums.cells.sumsq, sums.cells.logsum,
                                   totals.cell_counts, totals.xim, max_disp,
                                   cell_design_rows(study), Xrc)
    keys = ("alpha_hat", "beta_init", "beta_alt", "beta_init_reduced", "beta_alt_reduced")
    fresh = {k: new[k] for k in keys if k in new}
    return {"totals": replace(totals, max_disp=max_disp),
            "start": replace(start, **fresh, mu_rounds=mu_rounds)}


@aggregator_step(writes=("totals", "start"))
def rough_start(sums: RoughSums, totals: Totals, start: FitStart, study,
                mu_rounds: int = 0) -> dict:
    """``alpha_hat`` (start of the dispersion search) and the IRLS starting betas."""
    alpha_hat, max_disp, beta0, beta_alt = mom.rough_start(
        sums.rough, start.moments_disp, totals.n_samples, study.n_coefs, totals.xtx,
        sums.xt_logy, sums.xt_loglin)
    new = {"alpha_hat": alpha_hat, "beta_init": beta0, "beta_alt": beta_alt,
           "mu_rounds": mu_rounds}
    if sums.reduced is not None:
        r = sums.reduced
        new["beta_init_reduced"], new["beta_alt_reduced"] = mom.reduced_starts(
            r.xrtxr, r.xr_logy, r.xr_loglin)
    return {"totals": replace(totals, max_disp=max_disp), "start": replace(start, **new)}
