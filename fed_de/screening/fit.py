"""Perturbation screen: the NB GLM of every perturbation against frozen control statistics.

The control fit (intercept, and site / covariate effects) is a Newton iteration whose every
round needs only per-gene sums over control cells: the score ``X'(y - mu)/(1 + alpha mu)``,
the observed information and the log likelihood. Each perturbation's effect is a 1-D Newton
problem per (perturbation, gene) whose sums run over that perturbation's cells only; a site
computes them for all its perturbations in one pass over its cells, so the number of rounds
does not depend on the number of perturbations.

Both run in the same rounds: the effects are updated with the exact coupled Newton step
``beta += (u - sum h x' db) / sum h`` (``db``: the control coefficients' move in that
round), so they track the control fit and stop with it. Starts are Poisson fits from the
round-2 sums (exact for alpha = 0); a Newton step below 1e-5 is the last one taken (what
remains is ~1e-10), which the third round usually reaches. Genes whose control fit and
effects have all stopped are not computed again (sent as zeros) until the last round.

Round Fk  local : control sums (log likelihood, score, observed information), per-
                  perturbation sums (score, observed information times design rows)
          agg   : safeguarded Newton step of the control fit (step halving on a falling
                  likelihood), coupled Newton step of every effect
Last round  local : the same for genes still moving, and for every gene the Fisher
                  information of the control fit and each perturbation's ``sum w x`` at
                  the final point (its Wald standard error)
            agg   : the last update; Wald tests, BH per perturbation
The standard error is the sampling variance of the effect fitted against the frozen control
fit (:func:`fed_de.core.screen.frozen_wald_se`).
"""

from __future__ import annotations

import numpy as np
from substrafl.remote import remote, remote_data

from fed_de.core import screen as core
from fed_de.screening._old_base import sends, sum_messages
from fed_de.screening.data import ScreenSite
from fed_de.screening.setup import tracked

FIT_KEYS = ("ctrl_ll", "ctrl_score", "ctrl_hess", "pert_score", "pert_hx")
DROP_AFTER_DISPERSIONS = ("disp_means", "disp_points", "disp_active", "gw_search",
                          "map_search", "gw_hist", "map_hist", "prior", "gw_start_f",
                          "gw_start_g", "gw_start_h", "b0", "beta0")


class ScreenFitMixin:
    """Control fit and perturbation effects (after the dispersions)."""

    def start_fit(self, state: dict) -> None:
        """Fit state from the Poisson starts; drops what the dispersion search needed."""
        b0 = state["b0"]
        G, p = b0.shape
        done = state["all_zero"].copy()
        state["fit"] = {"b": b0, "b_acc": b0, "ll_acc": np.full(G, -np.inf),
                        "step": np.zeros((G, p)), "iter": 0, "done": done}
        state["beta"] = state["beta0"]
        state["pert_done"] = ~state["tested"]
        state["alpha_fit"] = np.nan_to_num(state["dispersion"], nan=1.0)
        for key in DROP_AFTER_DISPERSIONS:
            state.pop(key, None)

    # -- site side ---------------------------------------------------------------------------
    def _fit_sums(self, site: ScreenSite, state: dict, final: bool) -> dict:
        st = self.screen
        Xc = st.fit_design
        XX = core.packed_outer(Xc)
        fit, beta = state["fit"], state["beta"]
        G, p = fit["b"].shape
        P = beta.shape[0]
        T = XX.shape[1]
        out = {"ctrl_ll": np.zeros(G), "ctrl_score": np.zeros((G, p)),
               "ctrl_hess": np.zeros((G, T)), "pert_score": np.zeros((P, G)),
               "pert_hx": np.zeros((P, G, p))}
        site = self.site_view(site)
        active = np.flatnonzero(~fit["done"] | (~state["pert_done"]).any(axis=0))
        w = None
        if active.size:  # Newton sums of the genes still moving
            both = final and active.size > G // 2  # one pass for the Newton and Wald sums
            acc = self._pass(site, state, np.arange(G) if both else active, with_uh=True,
                             with_w=both)
            if acc["u"].shape[-1] == G:
                active = np.arange(G)
            w = acc.get("w")
            u, h = acc["u"], acc["h"]
            out["ctrl_ll"][active] = acc["ll"].sum(axis=0)
            out["ctrl_score"][active] = np.einsum("cg,cj->gj", u[0], Xc)
            out["ctrl_hess"][active] = np.einsum("cg,ct->gt", h[0], XX)
            out["pert_score"][:, active] = u[1:].sum(axis=1)
            out["pert_hx"][:, active] = np.einsum("pcg,cj->pgj", h[1:], Xc)
        if final:  # Fisher weights of every gene at the final point
            if w is None:
                w = self._pass(site, state, np.arange(G), with_uh=False, with_w=True)["w"]
            out["ctrl_info"] = np.einsum("cg,ct->gt", w[0], XX)
            out["pert_wx"] = np.einsum("pcg,cj->pgj", w[1:], Xc)
        return out

    def _pass(self, site: ScreenSite, state: dict, idx: np.ndarray, with_uh: bool,
              with_w: bool) -> dict:
        """One pass over the site's cells: fit sums of the genes ``idx``."""
        G = state["fit"]["b"].shape[0]
        q, c, Q, C = self.cell_groups()
        sf = self.local["sf"]
        if idx.size > G // 2:  # cheaper to compute every gene than to select columns
            idx = np.arange(G)
        table = core.mean_table(self.screen.fit_design, state["fit"]["b"][idx],
                                state["beta"][:, idx])
        alpha = state["alpha_fit"][idx]
        min_mu = float(self.options.get("min_mu", core.MIN_MU))
        code = np.where(q >= 0, q * C + c, -1)
        moments = core.sf_moments(sf, code, Q * C)
        flat = table.reshape(Q * C, -1)
        series = core.series_genes(moments, (flat * alpha)[:, :, None], flat, min_mu)
        acc = core.fit_series_summands(moments, table, alpha, series, with_uh=with_uh,
                                       with_w=with_w)
        for start, X in site.chunks(np.flatnonzero(q >= 0)):
            sl = slice(start, start + X.shape[0])
            part = core.fit_summands(X[:, idx] if idx.size < G else X, sf[sl], q[sl], c[sl],
                                     table, alpha, with_uh=with_uh, with_w=with_w,
                                     min_mu=min_mu, dense=~series)
            for k, v in part.items():
                acc[k] = acc[k] + v
        return acc

    @remote_data
    @sends(ctrl_ll=("G",), ctrl_score=("G", "p"), ctrl_hess=("G", "T"),
           pert_score=("P", "G"), pert_hx=("P", "G", "p"))
    @tracked
    def local_screen_fit(self, data_from_opener: ScreenSite, shared_state: dict) -> dict:
        """Newton sums of the control fit and of every perturbation effect."""
        return self._fit_sums(data_from_opener, shared_state, final=False)

    @remote_data
    @sends(ctrl_ll=("G",), ctrl_score=("G", "p"), ctrl_hess=("G", "T"),
           pert_score=("P", "G"), pert_hx=("P", "G", "p"), ctrl_info=("G", "T"),
           pert_wx=("P", "G", "p"))
    @tracked
    def local_screen_fit_final(self, data_from_opener: ScreenSite, shared_state: dict) -> dict:
        """Last Newton sums, plus the Fisher information the Wald test needs."""
        return self._fit_sums(data_from_opener, shared_state, final=True)

    # -- aggregator side ---------------------------------------------------------------------
    def _fit_update(self, prev: dict, tot: dict) -> dict:
        fit = prev["fit"]
        new_fit = core.control_update(fit, tot["ctrl_ll"], tot["ctrl_score"], tot["ctrl_hess"],
                                      self.screen.fit_design, prev["live_cells"])
        db = new_fit["b"] - fit["b"]
        unit = core.unit_coefficients(self.screen.fit_design)
        beta, step = core.pert_update(prev["beta"], tot["pert_score"], tot["pert_hx"], db, unit)
        frozen = prev["pert_done"]
        state = dict(prev)
        state["fit"] = new_fit
        state["beta"] = np.where(frozen, prev["beta"], beta)
        state["pert_done"] = frozen | ((np.abs(step) < core.DONE_STEP)
                                       & new_fit["done"][None, :])
        return state

    @remote
    def agg_screen_fit(self, shared_states: list[dict]) -> dict:
        """One Newton update of the control fit and of every effect."""
        *messages, prev = shared_states
        return self._fit_update(prev, sum_messages(messages, list(FIT_KEYS)))

    @remote
    def agg_screen_fit_final(self, shared_states: list[dict]) -> dict:
        """Last update; Wald statistics, p-values, BH within each perturbation."""
        *messages, prev = shared_states
        tot = sum_messages(messages)
        state = self._fit_update(prev, tot)
        beta = state["beta"]
        se = core.frozen_wald_se(tot["pert_wx"], tot["ctrl_info"],
                                 core.unit_coefficients(self.screen.fit_design))
        diverged = np.abs(beta) >= core.LARGE
        tested = state["tested"] & ~diverged & np.isfinite(se)
        lfc = np.where(tested, beta, np.nan)
        se = np.where(tested, se, np.nan)
        stat, pvalue = core.wald_pvalues(lfc, se)
        state["results"] = {
            "baseMean": state["pair_base_mean"],
            "log2FoldChange": lfc / core.LN2, "lfcSE": se / core.LN2, "stat": stat,
            "pvalue": pvalue, "padj": core.bh_by_row(pvalue),
        }
        state["converged"] = state["pert_done"] & state["fit"]["done"][None, :]
        state["tested"] = tested
        state["control_coefficients"] = state["fit"]["b"]
        return state
