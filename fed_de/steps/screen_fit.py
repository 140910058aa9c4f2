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
round-2 sums (exact for alpha = 0), so a few rounds reach |step| < 1e-8.

Round Fk  local : control sums (log likelihood, score, observed information), per-
                  perturbation sums (score, observed information times design rows)
          agg   : safeguarded Newton step of the control fit (step halving on a falling
                  likelihood), coupled Newton step of every effect
Last round  local : the same, plus the Fisher information of the control fit and each
                  perturbation's ``sum w x`` (its Wald standard error)
            agg   : the last update; Wald tests, BH per perturbation
The standard error is the sampling variance of the effect fitted against the frozen control
fit (:func:`fed_de.core.screen.frozen_wald_se`).
"""

from __future__ import annotations

import numpy as np
from substrafl.remote import remote, remote_data

from fed_de.core import screen as core
from fed_de.screen_data import ScreenSite
from fed_de.steps.base import sends, sum_messages
from fed_de.steps.screen import tracked

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
        active = ~fit["done"] | (~state["pert_done"]).any(axis=0)
        idx = np.arange(G) if final else np.flatnonzero(active)
        out = {"ctrl_ll": np.zeros(G), "ctrl_score": np.zeros((G, p)),
               "ctrl_hess": np.zeros((G, T)), "pert_score": np.zeros((P, G)),
               "pert_hx": np.zeros((P, G, p))}
        if final:
            out.update(ctrl_info=np.zeros((G, T)), pert_wx=np.zeros((P, G, p)))
        if idx.size == 0:
            return out
        site = self.site_view(site)
        q, c, Q, C = self.cell_groups()
        sf = self.local["sf"]
        table = core.mean_table(Xc, fit["b"][idx], beta[:, idx])
        alpha = state["alpha_fit"][idx]
        min_mu = float(self.options.get("min_mu", core.MIN_MU))
        acc: dict = {}
        for start, X in site.chunks(np.flatnonzero(q >= 0)):
            sl = slice(start, start + X.shape[0])
            part = core.fit_summands(X[:, idx] if idx.size < G else X, sf[sl], q[sl], c[sl],
                                     table, alpha, with_w=final, min_mu=min_mu)
            for k, v in part.items():
                acc[k] = acc[k] + v if k in acc else v
        u, h = acc["u"], acc["h"]
        out["ctrl_ll"][idx] = acc["ll"].sum(axis=0)
        out["ctrl_score"][idx] = np.einsum("cg,cj->gj", u[0], Xc)
        out["ctrl_hess"][idx] = np.einsum("cg,ct->gt", h[0], XX)
        out["pert_score"][:, idx] = u[1:].sum(axis=1)
        out["pert_hx"][:, idx] = np.einsum("pcg,cj->pgj", h[1:], Xc)
        if final:
            out["ctrl_info"][idx] = np.einsum("cg,ct->gt", acc["w"][0], XX)
            out["pert_wx"][:, idx] = np.einsum("pcg,cj->pgj", acc["w"][1:], Xc)
        return out

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
        state["pert_done"] = frozen | ((np.abs(step) < core.TOL) & new_fit["done"][None, :])
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
