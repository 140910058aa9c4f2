"""Perturbation screen: one dispersion per gene from the control cells (optionally all cells),
gene-wise Cox-Reid and MAP shrinkage to a fitted trend, as in the DESeq2 pipeline.

The means of the dispersion fit are the Poisson means of the groups of cells (control cells of
each design cell; with ``dispersion_cells="all"``, every (perturbation, design cell) group as
well): ``mu_i = s_i * sum(y) / sum(s)`` over the cell's group, a saturated fit known after
round 2, so the Cox-Reid matrix is diagonal over groups and no IRLS round is needed.

Round G0  local : sums at the start point (moments estimate), two neighbours and three anchors
          agg   : best point per gene, Newton step      (:mod:`fed_de.core.optim1d`)
Round Gk  local : sums at three step lengths            agg : accept / shrink, next step
After the last gene-wise round the aggregator fits the trend and the prior width and starts
the MAP search (zero extra rounds); MAP rounds are the same with the prior added. With
``dispersion="moments"`` the gene-wise values are the moments estimates and the shrinkage is
closed-form (zero rounds).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import polygamma
from substrafl.remote import remote, remote_data

from fed_de.core import screen as core
from fed_de.core import trend
from fed_de.core.dispersion import (
    MIN_DISP,
    final_dispersions,
    fit_trend,
    genewise_estimates,
    log_bounds,
)
from fed_de.core.optim1d import STEP_FRACTIONS, Search
from fed_de.screening._old_base import sends, sum_messages
from fed_de.screening.data import ScreenSite
from fed_de.screening.setup import tracked

DISP_KEYS = ("ll", "d1", "d2", "A", "A1", "A2")
#: First gene-wise round: the moments estimate and its neighbours (log scale), and anchors
#: across the range (the bounds, and dispersions 1e-3, 0.1, 10) so that every gene's maximum
#: is bracketed at once.
START_OFFSETS = (0.0, -1.0, 1.0)
ANCHORS = (None, float(np.log(1e-3)), float(np.log(0.1)), float(np.log(10.0)), None)


class ScreenDispersionMixin:
    """Dispersions of a screen (after round 2)."""

    # -- site side ---------------------------------------------------------------------------
    def disp_groups(self) -> np.ndarray:
        """Dispersion group of every cell (``< 0``: not used for dispersions)."""
        q, c, Q, C = self.cell_groups()
        if self.options.get("dispersion_cells", "control") == "all":
            return np.where(q >= 0, q * C + c, -1)
        return np.where(q == 0, c, -1)

    def _disp_sums(self, site: ScreenSite, state: dict) -> dict:
        points, active = state["disp_points"], state["disp_active"]
        G, K = points.shape
        D = state["disp_means"].shape[0]
        idx = np.flatnonzero(active)
        out = {k: np.zeros((G, K)) for k in ("ll", "d1", "d2")}
        out.update({k: np.zeros((G, K, D)) for k in ("A", "A1", "A2")})
        if idx.size == 0:
            return out
        site = self.site_view(site)
        groups = self.disp_groups()
        rows = np.flatnonzero(groups >= 0)
        sf = self.local["sf"]
        means = state["disp_means"][:, idx]
        pts = np.nan_to_num(points[idx])
        min_mu = float(self.options.get("min_mu", core.MIN_MU))
        # genes whose no-count sums come from power sums of size factors (most of them)
        moments = core.sf_moments(sf, groups, D)
        series = core.series_genes(moments, means[:, :, None] * np.exp(pts)[None], means,
                                   min_mu)
        acc = core.disp_series_summands(moments, means, pts, series)
        for start, X in site.chunks(rows):
            sl = slice(start, start + X.shape[0])
            part = core.disp_summands(X[:, idx] if idx.size < G else X, sf[sl], groups[sl],
                                      means, pts, min_mu, dense=~series)
            for k, v in part.items():
                acc[k] += v
        for k, v in acc.items():
            out[k][idx] = v
        return out

    @remote_data
    @sends(ll=("G", "K0"), d1=("G", "K0"), d2=("G", "K0"), A=("G", "K0", "D"),
           A1=("G", "K0", "D"), A2=("G", "K0", "D"))
    @tracked
    def local_screen_disp_start(self, data_from_opener: ScreenSite, shared_state: dict) -> dict:
        """Dispersion sums at the start points."""
        return self._disp_sums(data_from_opener, shared_state)

    @remote_data
    @sends(ll=("G", "K"), d1=("G", "K"), d2=("G", "K"), A=("G", "K", "D"),
           A1=("G", "K", "D"), A2=("G", "K", "D"))
    @tracked
    def local_screen_disp_eval(self, data_from_opener: ScreenSite, shared_state: dict) -> dict:
        """Dispersion sums at this round's candidate points."""
        return self._disp_sums(data_from_opener, shared_state)

    # -- aggregator side ---------------------------------------------------------------------
    @remote
    def agg_screen_sums(self, shared_states: list[dict]) -> dict:
        """Filters, baseMean, moments dispersions and the start of the dispersion search (or,
        with ``dispersion="moments"``, the final dispersions) and of the fit."""
        tot = sum_messages(shared_states)
        self.check_control_levels(tot["ctrl_n"])
        summ = self.screen_summary(tot)
        X = self.screen.fit_design
        # dispersion groups: control cells of every design cell (+ perturbation groups)
        d_y, d_norm, d_norm2 = tot["ctrl_y"], tot["ctrl_norm"], tot["ctrl_norm2"]
        d_n, d_sf, d_inv = tot["ctrl_n"], tot["ctrl_sf"], tot["ctrl_inv_sf"]
        if self.options.get("dispersion_cells", "control") == "all":
            d_y = np.concatenate([d_y, tot["pc_y"]])
            d_norm = np.concatenate([d_norm, tot["pc_norm"]])
            d_norm2 = np.concatenate([d_norm2, tot["pc_norm2"]])
            d_n = np.concatenate([d_n, tot["pert_n"].ravel()])
            d_sf = np.concatenate([d_sf, tot["pert_sf"].ravel()])
            d_inv = np.concatenate([d_inv, tot["pc_inv_sf"]])
        n_disp = float(d_n.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(d_sf[:, None] > 0, d_y / np.where(d_sf > 0, d_sf, 1.0)[:, None], 0.0)
            disp_base = d_norm.sum(axis=0) / n_disp
        all_zero = d_y.sum(axis=0) == 0
        max_disp = max(10.0, n_disp)
        mom = core.moments_dispersion(d_norm, d_norm2, d_n, d_inv)
        alpha_hat = np.clip(np.nan_to_num(mom, nan=MIN_DISP), MIN_DISP, max_disp)
        # pairs whose perturbed cells sit in a design cell without control counts
        empty = (tot["ctrl_n"] > 0)[:, None] & (tot["ctrl_y"] == 0)
        degenerate = (tot["pert_n"] > 0).astype(float) @ empty.astype(float) > 0
        tested = summ["tested"] & ~degenerate & ~all_zero[None, :]
        b0 = core.control_start(tot["ctrl_y"], tot["ctrl_sf"], X)
        beta0 = core.pert_start(tot["pert_y"], tot["pert_sf"], X, b0)
        state = {
            "pair_base_mean": summ["base_mean"], "tested": tested, "n_pert": summ["n_pert"],
            "n_ctrl": summ["n_ctrl"], "ctrl_mean": summ["ctrl_mean"],
            "live_cells": (tot["ctrl_y"] > 0).T, "b0": b0, "beta0": beta0,
            "disp_means": means, "base_mean": np.where(all_zero, np.nan, disp_base),
            "all_zero": all_zero, "alpha_init": alpha_hat, "alpha_moments": mom,
            "max_disp": max_disp, "n_samples": n_disp,
            "n_disp_groups": int((d_n > 0).sum()),
        }
        if self.options.get("dispersion", "cox-reid") == "moments":
            self.finish_moments(state)
            return state
        lo, hi = log_bounds(max_disp)
        x0 = np.log(alpha_hat)
        pts = x0[:, None] + np.asarray(START_OFFSETS)[None, :]
        anchors = [lo if i == 0 else hi if a is None else a for i, a in enumerate(ANCHORS)]
        pts = np.column_stack([pts, np.broadcast_to(anchors, (x0.shape[0], len(anchors)))])
        state["disp_points"] = np.clip(pts, lo, hi)
        state["disp_active"] = ~all_zero
        return state

    def finish_moments(self, state: dict) -> None:
        """Moments gene-wise dispersions, trend, and closed-form log-normal shrinkage."""
        all_zero = state["all_zero"]
        disp_gene = np.where(all_zero, np.nan, state["alpha_init"])
        D = state["n_disp_groups"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = trend.fit_dispersion_trend(state["base_mean"], disp_gene, MIN_DISP,
                                             self.options.get("fit_type", "parametric"),
                                             n_samples=int(state["n_samples"]), n_coefs=D)
        disp_fit = np.where(all_zero, np.nan, fit["disp_fit"])
        final = disp_gene
        if self.options.get("shrink", True):
            dof = max(state["n_samples"] - D, 1.0)
            sampling = float(polygamma(1, dof / 2.0))
            final = core.shrink_log_dispersion(disp_gene, disp_fit, float(fit["disp_prior_var"]),
                                               sampling)
        state.update(disp_gene=disp_gene, disp_fit=disp_fit, disp_map=final,
                     disp_outlier=np.zeros_like(all_zero), dispersion=final,
                     trend_type=fit["fit_type"],
                     trend_coefficients=np.asarray(fit["coefficients"], dtype=float),
                     disp_prior_var=fit["disp_prior_var"],
                     var_log_disp_ests=float(fit["var_log_disp_ests"]),
                     trend_warnings=[str(w.message) for w in caught])
        self.start_fit(state)

    @remote
    def agg_screen_disp_start(self, shared_states: list[dict]) -> dict:
        """Objective at the start points; first candidates of the gene-wise search."""
        *messages, prev = shared_states
        tot = sum_messages(messages, list(DISP_KEYS))
        lo, hi = log_bounds(prev["max_disp"])
        points = prev["disp_points"]
        f0, g, h = core.disp_objective(tot, points)
        f = np.where(prev["disp_active"][:, None], f0, -np.inf)
        hist = core.search_start(points, f, g, h)
        f = f0
        state = dict(prev)
        state.update(gw_hist=hist, gw_start_f=f[:, 0], gw_start_g=g[:, 0], gw_start_h=h[:, 0])
        self._propose(state, hist, lo, hi)
        return state

    def _propose(self, state: dict, hist: dict, lo: float, hi: float) -> dict:
        best = core.search_best(hist, lo, hi)
        best["done"] |= state["all_zero"]
        state["disp_points"] = core.search_propose(best, lo, hi, len(STEP_FRACTIONS))
        state["disp_active"] = ~best["done"]
        return best

    @remote
    def agg_screen_disp_step(self, shared_states: list[dict], phase: str = "genewise") -> dict:
        """One round of the gene-wise or MAP search: add the evaluations, propose the next."""
        *messages, prev = shared_states
        tot = sum_messages(messages, list(DISP_KEYS))
        lo, hi = log_bounds(prev["max_disp"])
        key = "gw_hist" if phase == "genewise" else "map_hist"
        prior = prev.get("prior") if phase == "map" else None
        points = prev["disp_points"]
        f, g, h = core.disp_objective(tot, points, prior)
        f = np.where(prev["disp_active"][:, None], f, -np.inf)  # genes not evaluated
        hist = core.search_add(prev[key], points, f, g, h)
        state = dict(prev)
        state[key] = hist
        state[f"{phase}_best"] = self._propose(state, hist, lo, hi)
        return state

    @remote
    def agg_screen_disp_finish_genewise(self, shared_states: list[dict]) -> dict:
        """Last gene-wise round; trend, prior; start of the MAP search (or, without
        shrinkage, the final dispersions and the start of the fit)."""
        state = self.agg_screen_disp_step(shared_states, phase="genewise", _skip=True)
        best = state.pop("genewise_best")
        state["gw_search"] = dict(best, x=best["estimate"])
        finish_genewise(state, state["n_disp_groups"], self.options.get("fit_type", "parametric"))
        if not self.options.get("shrink", True):
            state.update(disp_map=state["disp_gene"], dispersion=state["disp_gene"],
                         disp_outlier=np.zeros_like(state["all_zero"]))
            self.start_fit(state)
            return state
        # the MAP search starts from every gene-wise evaluation, the prior added: the best of
        # them and the bracket they give (a gene-wise optimum at the 1e-8 floor is common for
        # genes with few counts, many log units below its MAP optimum)
        prior = state["prior"]
        hist = state["gw_hist"]
        dev = hist["x"] - prior["mean"][:, None]
        state["map_hist"] = {"x": hist["x"], "f": hist["f"] - 0.5 * dev**2 / prior["var"],
                             "g": hist["g"] - dev / prior["var"],
                             "h": hist["h"] - 1.0 / prior["var"]}
        lo, hi = log_bounds(state["max_disp"])
        self._propose(state, state["map_hist"], lo, hi)
        return state

    @remote
    def agg_screen_disp_finish_map(self, shared_states: list[dict]) -> dict:
        """Last MAP update; final dispersions; start of the fit."""
        state = self.agg_screen_disp_step(shared_states, phase="map", _skip=True)
        best = state.pop("map_best")
        state["map_search"] = dict(best, x=best["estimate"])
        finish_map(state)
        self.start_fit(state)
        return state


def finish_genewise(state: dict, p: int, fit_type: str) -> None:
    """Gene-wise estimates (DESeq2's rules), trend and prior from the finished search."""
    best, all_zero = state["gw_search"], state["all_zero"]
    search = Search(x=best["x"], f=best["f"], g=best["g"], h=best["h"], radius=None, done=None)
    disp_gene = genewise_estimates(search, state["gw_start_f"], state["gw_start_g"],
                                   state["gw_start_h"], state["alpha_init"], all_zero,
                                   state["max_disp"])
    disp_fit, tr = fit_trend(state["base_mean"], disp_gene, all_zero, fit_type,
                             int(state["n_samples"]), p)
    state.update(disp_gene=disp_gene, disp_fit=disp_fit, trend_type=tr.fit_type,
                 trend_coefficients=tr.coefficients, var_log_disp_ests=tr.var_log_disp_ests,
                 disp_prior_var=tr.prior_var, trend_warnings=tr.warnings,
                 prior={"mean": np.log(disp_fit), "var": tr.prior_var})


def finish_map(state: dict) -> None:
    """MAP dispersions within bounds; dispersion outliers keep their gene-wise value."""
    disp_map, outlier, final = final_dispersions(
        state["map_search"]["x"], state["disp_gene"], state["disp_fit"],
        state["var_log_disp_ests"], state["all_zero"], state["max_disp"])
    state.update(disp_map=disp_map, disp_outlier=outlier, dispersion=final)
