"""A screen's NB GLM: every perturbation against frozen control statistics, and its Wald tests.

The control fit (intercept, and site / covariate effects) is a Newton iteration whose every
round needs only per-gene sums over control cells: the score ``X'(y - mu)/(1 + alpha mu)``,
the observed information and the log likelihood. Each perturbation's effect is a 1-D Newton
problem per (perturbation, gene) whose sums run over that perturbation's cells only; a site
computes them for all its perturbations in one pass over its cells, so the number of rounds
does not depend on the number of perturbations.

Both run in the same rounds: the effects are updated with the exact coupled Newton step
``beta += (u - sum h x' db) / sum h`` (``db``: the control coefficients' move in that
round), so they track the control fit and stop with it. Starts are Poisson fits from the
round-2 sums (:func:`fit_starts`: exact for alpha = 0); a Newton step below 1e-5 is the last
one taken (what remains is ~1e-10), which the third round usually reaches. Genes whose
control fit and effects have all stopped are not computed again (sent as zeros) until the
last round.

Start     agg  : the fit from the starts and the final dispersions (:func:`start_fit`)
Round Fk  site : control sums (log likelihood, score, observed information), per-
                 perturbation sums (score, observed information times design rows)
                 (:func:`fit_sums`)                                          -> FitSums
          agg  : safeguarded Newton step of the control fit (step halving on a falling
                 likelihood), coupled Newton step of every effect (:func:`fit_step`)
Last round site : the same for genes still moving, and for every gene the Fisher
                 information of the control fit and each perturbation's ``sum w x`` at the
                 final point (``final=True``: the message's ``wald`` part)
          agg  : the last update; then (phase ``tests``) Wald tests, BH per perturbation
                 (:func:`wald_tests`)
The standard error is the sampling variance of the effect fitted against the frozen control
fit (:func:`fed_de.core.screen_fit.frozen_wald_se`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fed_de.core import screen_fit as cf
from fed_de.core.screen_sums import packed_outer, series_genes, sf_moments
from fed_de.core.screen_testing import bh_by_row, wald_pvalues
from fed_de.federation.calls import aggregator_step, call, site_step
from fed_de.federation.messages import Message, part, sums
from fed_de.federation.strategy import Phase, Round
from fed_de.screening.setup import GroupSums
from fed_de.screening.state import (
    DispersionGroups,
    FitStart,
    ScreenDispersions,
    ScreenFit,
    ScreenResults,
    ScreenSiteView,
    Summary,
    tracked,
)
from fed_de.screening.study import ScreenStudy


class WaldSums(Message):
    """Last round: Fisher information of the control fit, each perturbation's ``sum w x``."""

    ctrl_info: np.ndarray = sums("G", "T")
    pert_wx: np.ndarray = sums("P", "G", "p")


class FitSums(Message):
    """Newton sums of the control fit and of every perturbation effect."""

    ctrl_ll: np.ndarray = sums("G")
    ctrl_score: np.ndarray = sums("G", "p")
    ctrl_hess: np.ndarray = sums("G", "T")
    pert_score: np.ndarray = sums("P", "G")
    pert_hx: np.ndarray = sums("P", "G", "p")
    wald: WaldSums | None = part()


# -- site side ---------------------------------------------------------------------------------
def _pass(site: ScreenSiteView, fit: ScreenFit, idx: np.ndarray, with_uh: bool,
          with_w: bool) -> dict:
    """One pass over the site's cells: fit sums of the genes ``idx``."""
    G = fit.control.b.shape[0]
    q, c, Q, C = site.cell_groups()
    sf = site.kept.sf
    if idx.size > G // 2:  # cheaper to compute every gene than to select columns
        idx = np.arange(G)
    table = cf.mean_table(site.study.fit_design, fit.control.b[idx], fit.beta[:, idx])
    alpha = fit.alpha[idx]
    min_mu = site.options.min_mu
    code = np.where(q >= 0, q * C + c, -1)
    moments = sf_moments(sf, code, Q * C)
    flat = table.reshape(Q * C, -1)
    series = series_genes(moments, (flat * alpha)[:, :, None], flat, min_mu)
    acc = cf.fit_series_summands(moments, table, alpha, series, with_uh=with_uh,
                                 with_w=with_w)
    for start, X in site.data.chunks(np.flatnonzero(q >= 0)):
        sl = slice(start, start + X.shape[0])
        part_ = cf.fit_summands(X[:, idx] if idx.size < G else X, sf[sl], q[sl], c[sl],
                                table, alpha, with_uh=with_uh, with_w=with_w, min_mu=min_mu,
                                dense=~series)
        for k, v in part_.items():
            acc[k] = acc[k] + v
    return acc


@site_step
@tracked
def fit_sums(site: ScreenSiteView, fit: ScreenFit, final: bool = False) -> FitSums:
    """Newton sums of the control fit and of every perturbation effect; with ``final``, also
    the Fisher information the Wald test needs."""
    Xc = site.study.fit_design
    XX = packed_outer(Xc)
    G, p = fit.control.b.shape
    P = fit.beta.shape[0]
    out = {"ctrl_ll": np.zeros(G), "ctrl_score": np.zeros((G, p)),
           "ctrl_hess": np.zeros((G, XX.shape[1])), "pert_score": np.zeros((P, G)),
           "pert_hx": np.zeros((P, G, p))}
    active = np.flatnonzero(~fit.control.done | (~fit.pert_done).any(axis=0))
    w = None
    if active.size:  # Newton sums of the genes still moving
        both = final and active.size > G // 2  # one pass for the Newton and Wald sums
        acc = _pass(site, fit, np.arange(G) if both else active, with_uh=True, with_w=both)
        if acc["u"].shape[-1] == G:
            active = np.arange(G)
        w = acc.get("w")
        u, h = acc["u"], acc["h"]
        out["ctrl_ll"][active] = acc["ll"].sum(axis=0)
        out["ctrl_score"][active] = np.einsum("cg,cj->gj", u[0], Xc)
        out["ctrl_hess"][active] = np.einsum("cg,ct->gt", h[0], XX)
        out["pert_score"][:, active] = u[1:].sum(axis=1)
        out["pert_hx"][:, active] = np.einsum("pcg,cj->pgj", h[1:], Xc)
    wald = None
    if final:  # Fisher weights of every gene at the final point
        if w is None:
            w = _pass(site, fit, np.arange(G), with_uh=False, with_w=True)["w"]
        wald = WaldSums(ctrl_info=np.einsum("cg,ct->gt", w[0], XX),
                        pert_wx=np.einsum("pcg,cj->pgj", w[1:], Xc))
    return FitSums(**out, wald=wald)


# -- aggregator side ---------------------------------------------------------------------------
@aggregator_step(writes=("start", "summary"))
def fit_starts(sums: GroupSums, summary: Summary, groups: DispersionGroups,
               study: ScreenStudy) -> dict:
    """Poisson starts of the control fit and of every effect; the pairs tested narrowed to
    those the fit can estimate."""
    X = study.fit_design
    # pairs whose perturbed cells sit in a design cell without control counts
    empty = (sums.ctrl_n > 0)[:, None] & (sums.ctrl_y == 0)
    degenerate = (sums.pert_n > 0).astype(float) @ empty.astype(float) > 0
    tested = summary.tested & ~degenerate & ~groups.all_zero[None, :]
    b0 = cf.control_start(sums.ctrl_y, sums.ctrl_sf, X)
    beta0 = cf.pert_start(sums.pert_y, sums.pert_sf, X, b0)
    return {"start": FitStart(b0=b0, beta0=beta0, live_cells=(sums.ctrl_y > 0).T),
            "summary": replace(summary, tested=tested)}


@aggregator_step(writes=("fit", "start", "disp", "groups"))
def start_fit(start: FitStart, groups: DispersionGroups, dispersions: ScreenDispersions,
              summary: Summary) -> dict:
    """The fit from the Poisson starts with the final dispersions; what the dispersion
    searches needed is dropped (it would travel with every later round)."""
    fit = ScreenFit(control=cf.start_control_fit(start.b0, groups.all_zero), beta=start.beta0,
                    pert_done=~summary.tested,
                    alpha=np.nan_to_num(dispersions.final, nan=1.0),
                    live_cells=start.live_cells)
    return {"fit": fit, "start": None, "disp": None, "groups": replace(groups, means=None)}


@aggregator_step(writes=("fit",))
def fit_step(sums: FitSums, fit: ScreenFit, study: ScreenStudy) -> dict:
    """One Newton update of the control fit and of every effect."""
    X = study.fit_design
    control = cf.control_update(fit.control, sums.ctrl_ll, sums.ctrl_score, sums.ctrl_hess, X,
                                fit.live_cells)
    db = control.b - fit.control.b
    beta, step = cf.pert_update(fit.beta, sums.pert_score, sums.pert_hx, db,
                                cf.unit_coefficients(X))
    frozen = fit.pert_done
    return {"fit": replace(fit, control=control, beta=np.where(frozen, fit.beta, beta),
                           pert_done=frozen | ((np.abs(step) < cf.DONE_STEP)
                                               & control.done[None, :]))}


@aggregator_step(writes=("results",))
def wald_tests(sums: FitSums, fit: ScreenFit, summary: Summary, study: ScreenStudy) -> dict:
    """Wald statistics, p-values, BH within each perturbation (from the last round's
    ``wald`` sums, at the final point)."""
    se = cf.frozen_wald_se(sums.wald.pert_wx, sums.wald.ctrl_info,
                           cf.unit_coefficients(study.fit_design))
    diverged = np.abs(fit.beta) >= cf.LARGE
    tested = summary.tested & ~diverged & np.isfinite(se)
    lfc = np.where(tested, fit.beta, np.nan)
    se = np.where(tested, se, np.nan)
    stat, pvalue = wald_pvalues(lfc, se)
    arrays = {"baseMean": summary.base_mean, "log2FoldChange": lfc / cf.LN2,
              "lfcSE": se / cf.LN2, "stat": stat, "pvalue": pvalue, "padj": bh_by_row(pvalue)}
    return {"results": ScreenResults(
        arrays=arrays, tested=tested, converged=fit.pert_done & fit.control.done[None, :],
        control_coefficients=fit.control.b)}


# -- phases ------------------------------------------------------------------------------------
def fit_phase(rounds: int) -> Phase:
    """The fit (started with no round), ``rounds`` Newton rounds, the last with the Wald
    sums."""
    return Phase("fit", opening=[start_fit], rounds=[
        *[Round(fit_sums, [fit_step]) for _ in range(rounds - 1)],
        Round(call(fit_sums, final=True), [fit_step])])


def tests_phase() -> Phase:
    """Wald tests and BH at the aggregator, in the last fit round's aggregation."""
    return Phase("tests", opening=[wald_tests])
