"""Cook's decisions and DESeq2's refit of genes whose outlier counts were replaced.

Closing round, aggregation (``agg_wald_cooks``): the first fit's covariance (as
``agg_wald``), then DESeq2's rules from the summed Cook's counts:
``maxCooks > cutoff`` (filtering), ``replace`` (any sample above the cutoff), genes that become
all zero, and -- when some gene is refitted -- ``maxCooks`` recomputed with the replaceable
samples left out (NA when every sample is replaceable). The refit's start comes from the
per-cell sums of the replaced counts at once: baseMean, moments, the linear fit,
``roughDispEstimate`` and the IRLS starts (the linear fit is one value per design cell).

Refit rounds, for the replaced genes only (all others masked), DESeq2's sequence:
  mu-IRLS at the new rough dispersions (``refit_mu_rounds``; warm-started from the first fit)
  gene-wise and MAP searches side by side (``refit_disp_rounds``): MAP uses the same means,
      the first fit's trend evaluated at the new baseMean, and its prior variance; DESeq2's
      dispersion-outlier rule then picks the final value
  final IRLS (``refit_final_rounds``); its last aggregation takes the covariance from X'WX
      at the accepted coefficients, so no closing round is needed
and the refitted genes' values replace the first fit's.
"""

from __future__ import annotations

import numpy as np
from substrafl.remote import remote, remote_data

from fed_de.core import nb, optim1d, trend
from fed_de.simulation.opener import SiteData
from fed_de.steps.base import sends, sum_messages
from fed_de.steps.cooks import cell_design_rows
from fed_de.steps.dispersion_init import MIN_DISP
from fed_de.steps.dispersions import (
    DISP_SUMS,
    genewise_estimates,
    log_bounds,
    objective,
)
from fed_de.steps.irls import start_irls

# values a refitted gene takes from the refit
RESULT_KEYS = ("base_mean", "disp_gene", "disp_fit", "disp_map", "dispersion", "disp_outlier",
               "beta", "beta_cov", "deviance", "beta_converged", "refitted_optim", "lrt_stat",
               "lrt_converged")


class RefitMixin:
    """Cook's decisions, and the refit of genes with replaced counts."""

    @remote
    def agg_wald_cooks(self, shared_states: list[dict]) -> dict:
        """First fit's covariance; Cook's filtering and replacement decisions; refit start."""
        *messages, prev = shared_states
        tot = sum_messages(messages)
        state = self.close_fit(prev, tot)
        ck = state["cooks"]
        all_zero = state["all_zero"]
        n, p = int(round(state["n_samples"])), self.study.n_coefs
        outlier = (tot["n_out"] > 0) & ~all_zero if ck["active"] else np.zeros_like(all_zero)
        n_cells = np.asarray(state["cell_counts"], dtype=float)
        sufficient = bool(ck["cells_replace"].any()) and n > p
        replace = (tot["n_any"] > 0) & ~all_zero & sufficient
        start = refit_start(tot, state, cell_design_rows(self.study),
                            cell_design_rows(self.study, self.reduced) if self.reduced else None)
        new_all_zero = replace & (start["base_mean"] == 0)
        nrefit = int(replace.sum())
        block = nrefit > 0 and nrefit > int(new_all_zero.sum())
        if block:  # DESeq2 recomputes maxCooks with the replaceable samples set to 0
            every = bool((n_cells[n_cells > 0] >= 7).all())
            outlier = (np.zeros_like(outlier) if every
                       else (tot["n_out_kept"] > 0) & ~all_zero & ck["active"])
        refit = (tot["n_replaced"] > 0) & ~new_all_zero & block
        state["cooks_outlier"] = outlier
        state["refit"] = {"genes": refit, "new_all_zero": new_all_zero, "replace": replace,
                          "n_refit": int(refit.sum())}
        state["pass1"] = {k: state[k] for k in RESULT_KEYS if k in state}
        state["pass1"]["all_zero"] = all_zero
        # the refit's state: every other gene masked
        mask = ~refit
        state.update(start)
        state["all_zero"] = mask
        # the refit's messages carry the refitted genes only
        state["compact_rows"] = np.flatnonzero(refit)
        state["alpha_init"] = state["alpha_hat"]
        warm = np.nan_to_num(prev["irls_mu"]["beta"]) if prev.get("irls_mu_rounds") else None
        frozen = mask | bool(state["linear_mu"])
        state["irls_mu"] = start_irls(state["beta_alt"], frozen,
                                      warm if warm is not None else state["beta_init"])
        state["disp_points"] = self.initial_disp_points(state)
        state["disp_fit"] = np.where(mask, np.nan, trend.trend_values(
            state["trend_coefficients"], state["base_mean"]))
        return state

    @remote_data
    @sends(ll=("G", "K0"), d1=("G", "K0"), d2=("G", "K0"), A=("G", "K0", "T"),
           A1=("G", "K0", "T"), A2=("G", "K0", "T"))
    def local_disp_pair(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """Sums at the gene-wise and the MAP candidates of this round."""
        return self._disp_sums(data_from_opener, shared_state["disp_points"],
                               shared_state["disp_active"])

    @remote
    def agg_refit_disp_start(self, shared_states: list[dict]) -> dict:
        """Start both searches from the first round's points (the MAP one with the prior)."""
        *messages, prev = shared_states
        tot = sum_messages(messages, list(DISP_SUMS), prev)
        lo, hi = log_bounds(prev["max_disp"])
        points, p = prev["disp_points"], self.study.n_coefs
        f, g, h = objective(tot, points, p)
        gw = optim1d.start(points, f, g, h, radius=3.0, lo=lo, hi=hi)
        state = dict(prev)
        state["prior"] = {"mean": np.log(prev["disp_fit"]), "var": prev["disp_prior_var"]}
        fm, gm, hm = objective(tot, points, p, state["prior"])
        mp = optim1d.start(points, fm, gm, hm, radius=3.0, lo=lo, hi=hi)
        for s in (gw, mp):
            s["done"] |= prev["all_zero"]
        state.update(gw_search=gw, map_search=mp, gw_start_f=f[:, 0], gw_start_g=g[:, 0],
                     gw_start_h=h[:, 0])
        _propose_pair(state, lo, hi)
        return state

    @remote
    def agg_refit_disp_step(self, shared_states: list[dict], last: bool = False) -> dict:
        """Update both searches; after the last round, the final dispersions."""
        *messages, prev = shared_states
        tot = sum_messages(messages, list(DISP_SUMS), prev)
        lo, hi = log_bounds(prev["max_disp"])
        points, p = prev["disp_points"], self.study.n_coefs
        K = points.shape[1] // 2
        half = [{k: v[:, :K] for k, v in tot.items()}, {k: v[:, K:] for k, v in tot.items()}]
        state = dict(prev)
        for key, part, pts, prior in (("gw_search", half[0], points[:, :K], None),
                                      ("map_search", half[1], points[:, K:], prev["prior"])):
            f, g, h = objective(part, pts, p, prior)
            state[key] = optim1d.update(prev[key], pts, f, g, h, lo, hi)
        if not last:
            _propose_pair(state, lo, hi)
            return state
        mask = state["all_zero"]
        state["disp_gene"] = genewise_estimates(state)
        disp_map = np.clip(np.exp(state["map_search"]["x"]), MIN_DISP, state["max_disp"])
        state["disp_map"] = np.where(mask, np.nan, disp_map)
        outlier = trend.disp_outliers(state["disp_gene"], state["disp_fit"],
                                      state["var_log_disp_ests"])
        state["disp_outlier"] = outlier
        state["dispersion"] = np.where(outlier, state["disp_gene"], state["disp_map"])
        warm = state["irls_mu"]["beta"] if state.get("irls_mu_rounds", 0) else state["beta_alt"]
        warm = np.where(np.isfinite(warm), warm, state["beta_init"])
        state["irls_final"] = start_irls(warm, mask, state["beta_init"])
        if "beta_init_reduced" in state:
            state["irls_reduced"] = start_irls(state["beta_init_reduced"], mask,
                                               state["beta_alt_reduced"])
        return state

    @remote
    def agg_refit_finish(self, shared_states: list[dict]) -> dict:
        """Last refit IRLS round; covariance at the accepted coefficients; merge."""
        state = self.agg_irls(shared_states, stage="final", _skip=True)
        fit, mask, p = state["irls_final"], state["all_zero"], self.study.n_coefs
        refit = state["refit"]["genes"]
        new = {
            "beta": np.where(mask[:, None], np.nan, fit["beta"]),
            "beta_cov": nb.wald_covariance(np.where(mask[:, None], nb.pack(np.eye(p)),
                                                    fit["xtwx_acc"]), nb.ridge(p)),
            "deviance": fit["dev_prev"],
            "beta_converged": (fit["deseq2_rule"] | fit["converged"]) & ~mask,
            "refitted_optim": np.zeros_like(mask),
        }
        if "irls_reduced" in state:
            new["lrt_stat"] = state["irls_reduced"]["dev_prev"] - fit["dev_prev"]
            new["lrt_converged"] = state["irls_reduced"]["converged"] & ~mask
        pass1 = state.pop("pass1")
        state.pop("compact_rows")
        for key in RESULT_KEYS:
            if key not in pass1:
                continue
            value = new.get(key, state.get(key))
            sel = refit.reshape((-1,) + (1,) * (np.ndim(pass1[key]) - 1))
            state[key] = np.where(sel, value, pass1[key])
        gone = state["refit"]["new_all_zero"]
        state["all_zero"] = pass1["all_zero"] | gone
        for key in RESULT_KEYS:
            if key in state and key != "base_mean" and np.ndim(state[key]) >= 1:
                val = np.asarray(state[key])
                if val.dtype == bool:
                    state[key] = val & ~gone.reshape((-1,) + (1,) * (val.ndim - 1))
                else:
                    state[key] = np.where(gone.reshape((-1,) + (1,) * (val.ndim - 1)), np.nan,
                                          val)
        state["base_mean"] = np.where(gone, 0.0, state["base_mean"])
        state["cooks_outlier"] = state["cooks_outlier"] & ~gone
        return state


def _propose_pair(state: dict, lo: float, hi: float) -> None:
    gw, mp = state["gw_search"], state["map_search"]
    state["disp_points"] = np.concatenate([optim1d.propose(gw, lo, hi),
                                           optim1d.propose(mp, lo, hi)], axis=1)
    state["disp_active"] = ~(gw["done"] & mp["done"])


def refit_start(tot: dict, state: dict, Xc: np.ndarray, Xrc: np.ndarray | None) -> dict:
    """DESeq2's starting values (moments, linear fit, rough dispersion, IRLS starts) of the
    replaced counts, from per-design-cell sums of normalised counts (genes x cells)."""
    n_c = np.asarray(state["cell_counts"], dtype=float)
    n, p = n_c.sum(), Xc.shape[1]
    s1, s2, lg = tot["cell_sum"], tot["cell_sumsq"], tot["cell_logsum"]
    mean = s1.sum(axis=1) / n
    var = (s2.sum(axis=1) - n * mean * mean) / (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        moments = (var - state["xim"] * mean) / mean**2
    xtx = Xc.T @ (n_c[:, None] * Xc)
    beta_lin = np.linalg.solve(xtx, (s1 @ Xc).T).T
    lin = beta_lin @ Xc.T  # genes x cells: the linear fit is one value per cell
    mu = np.maximum(lin, 1.0)
    rough = ((s2 - 2 * mu * s1 + n_c * mu * mu - n_c * mu) / mu**2).sum(axis=1)
    rough = np.maximum(rough / (n - p), 0.0)
    alpha_hat = np.clip(np.fmin(rough, moments), MIN_DISP, state["max_disp"])
    out = {"base_mean": mean, "moments_disp": moments, "beta_lin": beta_lin,
           "alpha_hat": alpha_hat,
           "beta_init": np.linalg.solve(xtx, (lg @ Xc).T).T,
           "beta_alt": np.linalg.solve(xtx, ((n_c * np.log(np.maximum(lin, 0.1))) @ Xc).T).T}
    if Xrc is not None:
        xrtxr = Xrc.T @ (n_c[:, None] * Xrc)
        out["beta_init_reduced"] = np.linalg.solve(xrtxr, (lg @ Xrc).T).T
        out["beta_alt_reduced"] = np.linalg.solve(
            xrtxr, ((n_c * np.log(np.maximum(lin, 0.1))) @ Xrc).T).T
    return out
