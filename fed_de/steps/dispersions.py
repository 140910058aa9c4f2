"""Gene-wise, trend and MAP dispersions (DESeq2's ``estimateDispersions``), federated.

Gene-wise: the Cox-Reid adjusted profile likelihood in log(alpha) is maximised per gene.
Each round the sites evaluate, at a few points per gene, the likelihood sums and the packed
X^T W X with its two derivatives; the aggregator adds them up, forms the exact objective,
gradient and curvature (the Cox-Reid term needs the *global* X^T W X, so it is computed only
there), and runs a safeguarded Newton search with a parallel line search
(:mod:`fed_de.core.optim1d`).

Round G0  local : fitted means of the dispersion fit (kept at the site), sums at the start
                  point and a few spread points         agg : best point, first Newton step
Round Gk  local : sums at the candidates                agg : accept/shrink, next step
After the last gene-wise round the aggregator fits the trend (parametric, DESeq2's filter of
genes above 100 * minDisp), the prior variance, and starts the MAP search from the gene-wise
optimum with the prior added (zero extra rounds).
Round Mk  local : sums at the candidates                agg : MAP Newton update
After the last MAP round: bounds, dispersion outliers keep their gene-wise value.
"""

from __future__ import annotations

import warnings

import numpy as np
from substrafl.remote import remote, remote_data

from fed_de.core import nb, optim1d, trend
from fed_de.simulation.opener import SiteData
from fed_de.steps.base import sends, sum_messages
from fed_de.steps.dispersion_init import MIN_DISP
from fed_de.steps.irls import MIN_MU, start_irls

# first gene-wise round: the start point, two points beside it, and anchors across the range
# (lower bound, alpha = 1e-2, upper bound) so genes whose optimum is at a bound or far from
# the rough estimate are found at once
START_OFFSETS = (0.0, -1.5, 1.5)
ANCHORS = (None, float(np.log(1e-2)), None)
DISP_SUMS = ("ll", "d1", "d2", "A", "A1", "A2")


def log_bounds(max_disp: float) -> tuple[float, float]:
    """Search range of log(alpha): DESeq2's ``log(minDisp/10)`` to ``log(maxDisp)``."""
    return float(np.log(MIN_DISP / 10)), float(np.log(max_disp))


def objective(tot: dict, points: np.ndarray, p: int, prior: dict | None = None):
    """Objective, gradient, curvature at ``points`` from summed site messages."""
    cr, cr1, cr2 = nb.cox_reid(tot["A"], tot["A1"], tot["A2"], p)
    f, g, h = tot["ll"] + cr, tot["d1"] + cr1, tot["d2"] + cr2
    return optim1d.add_log_normal_prior(f, g, h, points, prior)


class DispersionsMixin:
    """Gene-wise, trend and MAP dispersions."""

    # -- site side ---------------------------------------------------------------------------
    @remote_data
    @sends(ll=("G", "K0"), d1=("G", "K0"), d2=("G", "K0"), A=("G", "K0", "T"),
           A1=("G", "K0", "T"), A2=("G", "K0", "T"))
    def local_disp_start(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """Fitted means for the dispersion fit (kept here) and sums at the start points."""
        X, sf = self.local["design"], self.local["size_factors"]
        if shared_state["linear_mu"]:
            mu = np.maximum(sf[:, None] * (X @ shared_state["beta_lin"].T), MIN_MU)
        else:
            mu = nb.fitted_mu(X, np.nan_to_num(shared_state["irls_mu"]["beta"]), sf, MIN_MU)
        self.local["mu_disp"] = mu
        return self._disp_sums(data_from_opener, shared_state["disp_points"],
                               ~shared_state["all_zero"])

    @remote_data
    @sends(ll=("G", "K"), d1=("G", "K"), d2=("G", "K"), A=("G", "K", "T"),
           A1=("G", "K", "T"), A2=("G", "K", "T"))
    def local_disp_eval(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """Sums at this round's candidate points."""
        return self._disp_sums(data_from_opener, shared_state["disp_points"],
                               shared_state["disp_active"])

    def _disp_sums(self, site: SiteData, points: np.ndarray, active: np.ndarray) -> dict:
        # genes whose search is over are sent as zeros: same shape, no work
        idx = np.flatnonzero(active)
        part = nb.disp_summands(self.counts(site)[:, idx], self.local["mu_disp"][:, idx],
                                self.local["design"], np.nan_to_num(points[idx]))
        G, K = points.shape
        out = {}
        for key, value in part.items():
            out[key] = np.zeros((G,) + value.shape[1:])
            out[key][idx] = value
        return out

    # -- aggregator side ---------------------------------------------------------------------
    @remote
    def agg_disp_start(self, shared_states: list[dict]) -> dict:
        """Best of the start points; first Newton candidates."""
        *messages, prev = shared_states
        tot = sum_messages(messages, list(DISP_SUMS))
        lo, hi = log_bounds(prev["max_disp"])
        points = prev["disp_points"]
        f, g, h = objective(tot, points, self.study.n_coefs)
        search = optim1d.start(points, f, g, h, radius=3.0, lo=lo, hi=hi)
        search["done"] |= prev["all_zero"]
        state = dict(prev)
        state.update(gw_search=search, gw_start_f=f[:, 0], gw_start_g=g[:, 0],
                     gw_start_h=h[:, 0],
                     disp_points=optim1d.propose(search, lo, hi), disp_active=~search["done"])
        return state

    @remote
    def agg_disp_step(self, shared_states: list[dict], phase: str = "genewise") -> dict:
        """One Newton update of the gene-wise (``phase="genewise"``) or MAP search."""
        *messages, prev = shared_states
        tot = sum_messages(messages, list(DISP_SUMS))
        lo, hi = log_bounds(prev["max_disp"])
        key = "gw_search" if phase == "genewise" else "map_search"
        prior = prev.get("prior") if phase == "map" else None
        points = prev["disp_points"]
        f, g, h = objective(tot, points, self.study.n_coefs, prior)
        search = optim1d.update(prev[key], points, f, g, h, lo, hi)
        state = dict(prev)
        state[key] = search
        state["disp_points"] = optim1d.propose(search, lo, hi)
        state["disp_active"] = ~search["done"]
        return state

    def initial_disp_points(self, state: dict) -> np.ndarray:
        """Start point (log alpha_hat) and spread points of the first gene-wise round."""
        lo, hi = log_bounds(state["max_disp"])
        x0 = np.nan_to_num(np.log(state["alpha_hat"]))
        pts = x0[:, None] + np.asarray(START_OFFSETS)[None, :]
        anchors = [lo if a is None and i == 0 else hi if a is None else a
                   for i, a in enumerate(ANCHORS)]
        pts = np.column_stack([pts, np.broadcast_to(anchors, (x0.shape[0], len(anchors)))])
        return np.clip(pts, lo, hi)

    @remote
    def agg_disp_finish_genewise(self, shared_states: list[dict]) -> dict:
        """Last gene-wise update, then trend, prior and the start of the MAP search."""
        state = self.agg_disp_step(shared_states, phase="genewise", _skip=True)
        finish_genewise(state, self.study.n_coefs, self.options.get("fit_type", "parametric"))
        lo, hi = log_bounds(state["max_disp"])
        state["disp_points"] = optim1d.propose(state["map_search"], lo, hi)
        state["disp_active"] = ~state["map_search"]["done"]
        return state

    @remote
    def agg_disp_finish_map(self, shared_states: list[dict]) -> dict:
        """Last MAP update; final dispersions; start of the final IRLS."""
        state = self.agg_disp_step(shared_states, phase="map", _skip=True)
        finish_map(state)
        # warm start from the dispersion-fit means' betas, or the cell-means start
        warm = state["irls_mu"]["beta"] if state.get("irls_mu_rounds", 0) else state["beta_alt"]
        warm = np.where(np.isfinite(warm), warm, state["beta_init"])
        state["irls_final"] = start_irls(warm, state["all_zero"], state["beta_init"])
        if "beta_init_reduced" in state:  # LRT: the reduced fit runs in the same rounds
            state["irls_reduced"] = start_irls(state["beta_init_reduced"], state["all_zero"],
                                               state["beta_alt_reduced"])
        return state


def finish_genewise(state: dict, p: int, fit_type: str) -> None:
    """Gene-wise estimates, trend, prior variance, and the MAP search's starting state."""
    search, all_zero = state["gw_search"], state["all_zero"]
    max_disp = state["max_disp"]
    disp_gene = genewise_estimates(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = trend.fit_dispersion_trend(
            np.where(all_zero, np.nan, state["base_mean"]), disp_gene, MIN_DISP, fit_type,
            n_samples=int(state["n_samples"]), n_coefs=p,
        )
    state["trend_warnings"] = [str(w.message) for w in caught]
    disp_fit = np.where(all_zero, np.nan, fit["disp_fit"])
    prior_var = float(fit["disp_prior_var"])
    state.update(disp_gene=disp_gene, disp_fit=disp_fit, trend_type=fit["fit_type"],
                 trend_coefficients=np.asarray(fit["coefficients"], dtype=float),
                 var_log_disp_ests=float(fit["var_log_disp_ests"]), disp_prior_var=prior_var)
    prior = {"mean": np.log(disp_fit), "var": prior_var}
    state["prior"] = prior
    # the MAP objective at the gene-wise optimum is known: add the prior to f, g, h
    x = search["x"]
    dev = x - prior["mean"]
    map_search = {
        "x": x, "f": search["f"] - 0.5 * dev**2 / prior_var,
        "g": search["g"] - dev / prior_var, "h": search["h"] - 1.0 / prior_var,
        "radius": np.full(x.shape, 3.0), "done": all_zero.copy(),
    }
    lo, hi = log_bounds(max_disp)
    map_search["done"] |= optim1d._converged(map_search, lo, hi)
    state["map_search"] = map_search


def genewise_estimates(state: dict) -> np.ndarray:
    """Gene-wise dispersions from the finished search (DESeq2's ``noIncrease`` rule)."""
    search, max_disp = state["gw_search"], state["max_disp"]
    alpha = np.exp(search["x"])
    # DESeq2 keeps the rough estimate when the optimum does not beat the start by 1e-6
    start_f = state["gw_start_f"]
    no_increase = search["f"] < start_f + np.abs(start_f) / 1e6
    stops = deseq2_stops_at_start(state["gw_start_g"], state["gw_start_h"])
    alpha = np.where(no_increase | stops, state["alpha_init"], np.minimum(alpha, max_disp))
    return np.where(state["all_zero"], np.nan, np.clip(alpha, MIN_DISP, max_disp))


def deseq2_stops_at_start(g0: np.ndarray, h0: np.ndarray, tol: float = 1e-6,
                          epsilon: float = 1e-4) -> np.ndarray:
    """Genes whose DESeq2 line search (``fitDisp``) ends at its first step.

    DESeq2 proposes ``a0 + kappa * dlp`` with ``kappa = 1``, accepts it under the Armijo rule
    (gain >= epsilon * kappa * dlp^2) and stops when the accepted step gains less than
    ``dispTol = 1e-6`` in log posterior; ``noIncrease`` then restores the rough estimate.
    This happens where the likelihood is flat at the start (typically a rough estimate at
    the 1e-8 floor for a nearly empty gene). The gain of that first step is predicted
    exactly enough by the second-order expansion at the start: the step is < 1e-3 there.
    """
    gain = g0 * g0 + 0.5 * h0 * g0 * g0
    return (gain >= epsilon * g0 * g0) & (gain < tol)


def finish_map(state: dict) -> None:
    """MAP dispersions, bounds, and DESeq2's dispersion outliers (keep gene-wise values)."""
    all_zero, max_disp = state["all_zero"], state["max_disp"]
    disp_map = np.clip(np.exp(state["map_search"]["x"]), MIN_DISP, max_disp)
    disp_map = np.where(all_zero, np.nan, disp_map)
    outlier = trend.disp_outliers(state["disp_gene"], state["disp_fit"],
                                  state["var_log_disp_ests"])
    state.update(disp_map=disp_map, disp_outlier=outlier,
                 dispersion=np.where(outlier, state["disp_gene"], disp_map))
