"""Cook's distances, outlier flags and count replacement (DESeq2), federated from sums.

Robust dispersion and replacement values run on a side chain of the plan that starts after
the size factors and rejoins before the closing round, so they add no sequential step:

Start     agg   : groups: design cells with >= 3 samples (trim and scale by cell size) and
                  "all samples" (trim 0.2, only when some cell has >= 7 samples); ranks
Search A  local : per active (gene, group, bounding rank), counts / sums / sums of squares of
                  the site's normalised counts in each sub-interval (order-statistic search,
                  :mod:`fed_de.core.order_stats`); only targets still open are sent
          agg   : refine the brackets
A parts   local : sums between the bounding values   agg : trimmed cell means q, and the
                                                           0.2-trimmed mean (replacement)
Search B  as A, on the squared errors (x - q_cell)^2   -> trimmed cell variances
B parts   ...                                          -> robust dispersion per gene
Closing round (``local_wald_cooks``): each site computes its samples' Cook's distances with the
global X'WX of the final fit and sends per-gene *counts* of its samples above the cutoff
(in cells of >= 3, non-replaceable among them, any sample, replaced), and per-design-cell
sums of its counts after replacing its own outliers (the refit's starting sums). A Cook's
value, a maximum or a single sample's count never leaves a site.
"""

from __future__ import annotations

import numpy as np
from substrafl.remote import remote, remote_data

from fed_de.core import cooks, order_stats
from fed_de.design import design_matrix
from fed_de.simulation.opener import SiteData
from fed_de.steps.base import sends, sum_messages
from fed_de.steps.dispersion_init import cell_index, design_cells
from fed_de.steps.irls import MIN_MU
from fed_de.steps.wald import final_beta

K_THRESHOLDS = 7


def cell_design_rows(study, model=None) -> np.ndarray:
    """Row of ``model``'s design matrix (default: the study's) for every declared cell of
    ``study`` (cells x coefficients)."""
    import pandas as pd

    obs = pd.DataFrame(design_cells(study), columns=list(study.levels))
    return design_matrix(model or study, obs, "cells")


def cooks_applicable(study) -> bool:
    """DESeq2 groups samples by identical design rows; fed_de does so for factor designs.

    With a continuous covariate every sample is taken as its own cell (DESeq2 agrees unless
    covariate values repeat exactly), so no Cook's filtering or replacement happens.
    """
    return bool(study.levels) and not study.continuous


class CooksMixin:
    """Robust dispersion side chain, Cook's closing round."""

    # -- side chain: exact trimmed statistics ---------------------------------------------
    @remote
    def agg_robust_start(self, shared_states: list[dict]) -> dict:
        """Groups, their trims and bounding ranks; first thresholds."""
        (prev,) = shared_states
        n_cells = np.asarray(prev["cell_counts"], dtype=float)
        n = int(round(prev["n_samples"]))
        p = self.study.n_coefs
        C = n_cells.size
        use_cells = (n_cells >= cooks.MIN_REPLICATES_COOKS) & (n > p)
        replace = bool((n_cells >= cooks.MIN_REPLICATES_REPLACE).any()) and n > p
        sizes = np.append(n_cells, n).astype(int)
        trims = [cooks.cell_trim(int(s))[0] for s in n_cells] + [cooks.REPLACE_TRIM]
        ranks = np.array([order_stats.trim_ranks(int(s), t) if s > 0 else (1, 1)
                          for s, t in zip(sizes, trims, strict=True)], dtype=float)
        active = np.append(use_cells, replace)
        return {"sf_scale": prev["sf_scale"], "base_mean": prev["base_mean"],
                "moments_disp": prev["moments_disp"],
                "robust": {"groups_active": active, "ranks": ranks, "C": C,
                           "scales": np.array([cooks.cell_trim(int(s))[1] for s in n_cells]),
                           "phase": "A"},
                "order_search": _start_search(prev["base_mean"], active, (-2.0, 2.0))}

    @remote_data
    @sends(count=("A", "K1"), sum=("A", "K1"), sumsq=("A", "K1"))
    def local_robust_sums(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """Sub-interval counts and sums for every open (gene, group, bounding rank)."""
        x = self._robust_values(data_from_opener, shared_state)
        search = shared_state["order_search"]
        groups = self.local["cells"]
        G, T, K = search["thresholds"].shape
        open_ = ~search["done"]
        self.dyn_dims = {"A": int(open_.sum())}
        full = {k: np.zeros((G, T, K + 1)) for k in ("count", "sum", "sumsq")}
        for g in range(T // 2):
            genes = np.flatnonzero(open_[:, 2 * g:2 * g + 2].any(axis=1))
            members = groups == g if g < T // 2 - 1 else np.ones(groups.size, dtype=bool)
            if genes.size == 0 or not members.any():
                continue
            part = order_stats.interval_sums(x[g][members][:, genes],
                                             search["thresholds"][genes, 2 * g:2 * g + 2])
            for key, value in part.items():
                full[key][genes, 2 * g:2 * g + 2] = value
        return {k: v[open_] for k, v in full.items()}

    @remote
    def agg_robust_refine(self, shared_states: list[dict]) -> dict:
        """Scatter the open targets' sums back and refine their brackets."""
        *messages, prev = shared_states
        tot = sum_messages(messages)
        search = prev["order_search"]
        G, T, K = search["thresholds"].shape
        open_ = ~search["done"]
        full = {}
        for key, value in tot.items():
            full[key] = np.zeros((G, T, K + 1))
            full[key][open_] = value
        ranks = np.broadcast_to(prev["robust"]["ranks"].reshape(1, T), (G, T))
        new = order_stats.refine(search["thresholds"], full, ranks, search["state"])
        state = dict(prev)
        state["order_search"] = {"thresholds": new["thresholds"],
                                 "done": search["done"] | new["done"], "state": new}
        return state

    @remote_data
    @sends(sum_inside=("G", "NG"), n_le_lo=("G", "NG"), n_lt_hi=("G", "NG"))
    def local_robust_parts(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """Per gene and group: sums between the two bounding values, counts below them."""
        x = self._robust_values(data_from_opener, shared_state)
        value = _values(shared_state["order_search"])
        groups = self.local["cells"]
        NG = value.shape[1] // 2
        G = value.shape[0]
        out = {k: np.zeros((G, NG)) for k in ("sum_inside", "n_le_lo", "n_lt_hi")}
        for g in range(NG):
            members = groups == g if g < NG - 1 else np.ones(groups.size, dtype=bool)
            if not shared_state["robust"]["groups_active"][g] or not members.any():
                continue
            part = order_stats.trimmed_sum_parts(x[g][members], np.nan_to_num(value[:, 2 * g]),
                                                 np.nan_to_num(value[:, 2 * g + 1]))
            for key, v in part.items():
                out[key][:, g] = v
        return out

    @remote
    def agg_robust_means(self, shared_states: list[dict]) -> dict:
        """Trimmed means of every group: phase A gives q and the replacement mean, B the
        trimmed variances and the robust dispersion."""
        *messages, prev = shared_states
        tot = sum_messages(messages)
        rob = dict(prev["robust"])
        search = prev["order_search"]
        value = _values(search)
        G, T = search["done"].shape
        NG = T // 2
        tm = np.full((G, NG), np.nan)
        for g in range(NG):
            if not rob["groups_active"][g]:
                continue
            lo, hi = (int(r) for r in rob["ranks"][g])
            parts = {k: v[:, g] for k, v in tot.items()}
            ok = search["done"][:, 2 * g] & search["done"][:, 2 * g + 1]
            tm[:, g] = np.where(ok, order_stats.trimmed_mean(parts, value[:, 2 * g],
                                                             value[:, 2 * g + 1], lo, hi),
                                np.nan)
        state = dict(prev)
        if rob["phase"] == "A":
            rob.update(phase="B", cell_means=tm[:, :NG - 1], replace_mean=tm[:, NG - 1])
            active_b = rob["groups_active"].copy()
            active_b[-1] = False  # B: cells only
            # squared errors scale with the variance (moments: mean + alpha mean^2)
            m = prev["base_mean"]
            var = np.maximum(np.nan_to_num(prev["moments_disp"]), 0.0) * m * m + m
            state["order_search"] = _start_search(var, active_b, (-3.0, 2.0))
        else:
            counted = rob["groups_active"][:NG - 1]
            cell_var = (rob["scales"][None, :] * tm[:, :NG - 1])[:, counted]
            rob["alpha"] = cooks.robust_dispersion(cell_var, prev["base_mean"])
            rob["unfinished"] = int((~search["done"]).any(axis=1).sum())
            state["robust_result"] = {k: rob[k] for k in ("alpha", "replace_mean",
                                                          "unfinished")}
        state["robust"] = rob
        return state

    def _robust_values(self, site: SiteData, shared_state: dict) -> list[np.ndarray]:
        """Per group: the values searched (normalised counts, or squared errors in phase B)."""
        if "cells" not in self.local:
            self.local["cells"] = cell_index(self.study, site)
        sf = self.local["size_factors_raw"] / shared_state["sf_scale"]
        norm = self.counts(site) / sf[:, None]
        rob = shared_state["robust"]
        NG = rob["groups_active"].size
        if rob["phase"] == "A":
            return [norm] * NG
        q = np.nan_to_num(rob["cell_means"])
        groups = self.local["cells"]
        out = [(norm - q[:, g][None, :]) ** 2 if (groups == g).any() else norm
               for g in range(NG - 1)]
        return [*out, norm]

    # -- closing round -------------------------------------------------------------------
    def _cooks_round(self, site: SiteData, shared_state: dict) -> dict:
        """Cook's counts of this site's samples, and its replaced counts' per-cell sums."""
        X, sf = self.local["design"], self.local["size_factors"]
        y = self.counts(site)
        p, C = X.shape[1], self.dims()["C"]
        G = y.shape[1]
        out = {k: np.zeros(G) for k in ("n_out", "n_out_kept", "n_any", "n_replaced")}
        ck = shared_state.get("cooks")
        cells = self.local.get("cells")
        if cells is None:
            cells = cell_index(self.study, site)
        norm_new = y / sf[:, None]
        if ck is not None and ck["active"]:
            beta, _ = final_beta(shared_state)
            alpha = np.nan_to_num(shared_state["dispersion"], nan=1.0)
            with np.errstate(over="ignore"):
                mu = sf[:, None] * np.exp(X @ beta.T)  # DESeq2's assay mu: not floored
            mu_w = np.maximum(mu, MIN_MU)
            h = cooks.hat_diagonals(X, mu_w / (1.0 + alpha * mu_w),
                                    shared_state["irls_final"]["xtwx_acc"])
            d = cooks.cooks_distance(y, mu, np.nan_to_num(ck["alpha"], nan=np.inf), h, p)
            above = (d > ck["cutoff"]) & ~shared_state["all_zero"][None, :]
            in3 = np.asarray(ck["cells_3"])[cells]
            repl = np.asarray(ck["cells_replace"])[cells]
            out["n_out"] = (above & in3[:, None]).sum(axis=0).astype(float)
            out["n_out_kept"] = (above & (in3 & ~repl)[:, None]).sum(axis=0).astype(float)
            out["n_any"] = above.sum(axis=0).astype(float)
            swap = above & repl[:, None] & np.isfinite(ck["replace_mean"])[None, :]
            out["n_replaced"] = swap.sum(axis=0).astype(float)
            if swap.any():
                new = np.where(swap, cooks.replacement_counts(
                    np.nan_to_num(ck["replace_mean"]), sf), y)
                self.local["replaced_counts"] = new
                self.local.pop("lgamma_y1", None)
                norm_new = new / sf[:, None]
        onehot = (cells[:, None] == np.arange(C)[None, :]).astype(float)  # n x C
        out["cell_sum"] = norm_new.T @ onehot
        out["cell_sumsq"] = (norm_new * norm_new).T @ onehot
        out["cell_logsum"] = np.log(norm_new + 0.1).T @ onehot
        return out

    @remote_data
    @sends(xtwx=("G", "T"), deviance=("G",), n_out=("G",), n_out_kept=("G",), n_any=("G",),
           n_replaced=("G",), cell_sum=("G", "C"), cell_sumsq=("G", "C"),
           cell_logsum=("G", "C"))
    def local_wald_cooks(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """:meth:`local_wald` plus Cook's counts and the refit's starting sums."""
        # the closing sums use the original counts: before any replacement
        out = self.local_wald(data_from_opener=data_from_opener, shared_state=shared_state,
                              _skip=True)
        out.update(self._cooks_round(data_from_opener, shared_state))
        return out

    @remote_data
    @sends(xtwx=("G", "T"), deviance=("G",), deviance_r=("G",), n_out=("G",),
           n_out_kept=("G",), n_any=("G",), n_replaced=("G",), cell_sum=("G", "C"),
           cell_sumsq=("G", "C"), cell_logsum=("G", "C"))
    def local_wald_lrt_cooks(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """:meth:`local_wald_lrt` plus Cook's counts and the refit's starting sums."""
        out = self.local_wald_lrt(data_from_opener=data_from_opener,
                                  shared_state=shared_state, _skip=True)
        out.update(self._cooks_round(data_from_opener, shared_state))
        return out

    @remote
    def agg_merge_robust(self, shared_states: list[dict], inner: str = "agg_fallback",
                         stage: str = "final") -> dict:
        """``inner`` aggregation of the main chain, joined by the side chain's result: what
        the closing round's Cook's distances need."""
        *messages, side, prev = shared_states
        params = {"stage": stage} if inner.startswith("agg_irls") else {}
        state = getattr(self, inner)([*messages, prev], _skip=True, **params)
        rob = side["robust_result"]
        n = int(round(state["n_samples"]))
        p = self.study.n_coefs
        n_cells = np.asarray(state["cell_counts"], dtype=float)
        cells_3 = n_cells >= cooks.MIN_REPLICATES_COOKS
        state["cooks"] = {
            "active": bool(n > p and cells_3.any()), "alpha": rob["alpha"],
            "replace_mean": rob["replace_mean"], "unfinished": rob["unfinished"],
            "cutoff": cooks.cooks_cutoff(p, n) if n > p else np.inf,
            "cells_3": cells_3, "cells_replace": n_cells >= cooks.MIN_REPLICATES_REPLACE,
        }
        return state


def _start_search(center: np.ndarray, groups_active: np.ndarray, decades: tuple) -> dict:
    G, T = center.size, 2 * groups_active.size
    done = np.broadcast_to(~np.repeat(groups_active, 2), (G, T)).copy()
    return {"thresholds": order_stats.scaled_thresholds(center, T, K_THRESHOLDS, *decades),
            "done": done, "state": None}


def _values(search: dict) -> np.ndarray:
    st = search["state"]
    G, T = search["done"].shape
    return st["value"] if st is not None else np.full((G, T), np.nan)
