"""Federated IRLS for the NB GLM (DESeq2's ``fitBeta``), unrolled to a fixed number of rounds.

Each round  local : at every candidate betas of a gene, the packed X^T W X, X^T W z and the
                    deviance (DESeq2's ``fitBeta`` sums, ``mu`` floored at 0.5)
            agg   : keeps the candidate with the lowest penalised deviance (a parallel
                    step-halving: the full IRLS step and a quarter step are tried at once,
                    so an overshooting step costs no extra round); DESeq2's stopping rule
                    (relative deviance change < 1e-8 between accepted iterates, from the
                    second update on); the next ridge-penalised IRLS step from the kept point
When the full step is the better candidate, which is what happens for well-behaved genes,
the iterates are exactly DESeq2's. A gene whose |beta| exceeds 30 stops (not converged). The
plan is static: converged genes are masked, not skipped. ``stage`` names the fit: ``"mu"``
(means for the dispersion estimates, with the rough dispersions) or ``"final"`` (reported
coefficients, with the final dispersions).
"""

from __future__ import annotations

import numpy as np
from substrafl.remote import remote, remote_data

from fed_de.core import nb
from fed_de.simulation.opener import SiteData
from fed_de.steps.base import sends, sum_messages

IRLS_TOL = 1e-8
LARGE_BETA = 30.0
MIN_MU = 0.5
STEP_LENGTHS = (1.0, 0.25)  # candidates per round: full IRLS step and a quarter step
MIN_SCALE = 1e-6
# iterate past DESeq2's deviance rule until the step itself is this small (natural-log
# units): the answer then no longer depends on which round the rule fired in, so sums taken
# in another order (other sites) give the same coefficients to ~1e-8
BETA_TOL = 1e-8
NOISE = 1e-11  # relative size of rounding noise in summed deviances


def irls_alpha(state: dict, stage: str) -> np.ndarray:
    """Dispersions a stage fits with."""
    return state["alpha_hat"] if stage == "mu" else state["dispersion"]


def start_irls(beta0: np.ndarray, frozen: np.ndarray, beta_alt: np.ndarray | None = None) -> dict:
    """IRLS status before the first round.

    The first round evaluates two starting points, ``beta0`` (DESeq2's) and ``beta_alt``;
    the one with the lower deviance starts the iterations.
    """
    G, p = beta0.shape
    beta0 = np.where(frozen[:, None], 0.0, np.nan_to_num(beta0))
    cands = np.repeat(beta0[:, None, :], len(STEP_LENGTHS), 1)
    if beta_alt is not None:
        ok = np.isfinite(beta_alt).all(axis=1) & (np.abs(beta_alt) <= LARGE_BETA).all(axis=1)
        cands[:, 1] = np.where((ok & ~frozen)[:, None], beta_alt, beta0)
    return {"beta": beta0, "candidates": cands,
            "iter": 0, "accepted": np.zeros(G, dtype=int), "pen_dev": np.full(G, np.inf),
            "dev_prev": np.full(G, np.nan), "direction": np.zeros((G, p)),
            "scale": np.ones(G), "converged": frozen.copy(), "stopped": frozen.copy(),
            "deseq2_rule": frozen.copy(),
            "xtwx": np.full((G, nb.n_packed(p)), np.nan), "deviance": np.full(G, np.nan)}


class IRLSMixin:
    """IRLS rounds of the NB GLM fit."""

    @remote_data
    @sends(xtwx=("G", "KB", "T"), xtwz=("G", "KB", "p"), deviance=("G", "KB"))
    def local_irls(self, data_from_opener: SiteData, shared_state: dict, stage: str = "final"):
        """IRLS sums at each candidate of ``stage``."""
        fit = shared_state[f"irls_{stage}"]
        # only genes still iterating are computed; the others are sent as zeros (fixed shape)
        idx = np.flatnonzero(~fit["stopped"])
        cands = fit["candidates"][idx]
        G, K, p = fit["candidates"].shape
        alpha = np.nan_to_num(irls_alpha(shared_state, stage), nan=1.0)[idx]
        y = self.counts(data_from_opener)[:, idx]
        X, sf = self.local["design"], self.local["size_factors"]
        lgy1 = self.lgamma_y1(data_from_opener)[idx]
        out = {"xtwx": np.zeros((G, K, nb.n_packed(p))), "xtwz": np.zeros((G, K, p)),
               "deviance": np.zeros((G, K))}
        for k in range(K):
            part = nb.irls_summands(y, X, sf, cands[:, k], alpha, MIN_MU, lgy1)
            for key, value in part.items():
                out[key][idx, k] = value
        return out

    def lgamma_y1(self, site: SiteData) -> np.ndarray:
        """Per-gene sum of lgamma(y + 1) at this site (a constant of the deviance), cached."""
        if "lgamma_y1" not in self.local:
            from scipy.special import gammaln

            self.local["lgamma_y1"] = gammaln(self.counts(site) + 1.0).sum(axis=0)
        return self.local["lgamma_y1"]

    @remote
    def agg_irls(self, shared_states: list[dict], stage: str = "final") -> dict:
        """Keep the best candidate, test convergence, propose the next candidates."""
        *messages, prev = shared_states
        tot = sum_messages(messages)
        state = dict(prev)
        state[f"irls_{stage}"] = irls_update(prev[f"irls_{stage}"], tot, self.study.n_coefs)
        return state


def irls_update(fit: dict, tot: dict, p: int) -> dict:
    """One aggregator update of an IRLS status from the summed candidate sums."""
    fit = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in fit.items()}
    lam = nb.ridge(p)
    G = fit["beta"].shape[0]
    rows = np.arange(G)
    cands = fit["candidates"]
    pen = tot["deviance"] + np.einsum("gkp,p,gkp->gk", cands, lam, cands)
    pen = np.where(np.isfinite(pen), pen, np.inf)
    # ties within rounding noise are decided the same way whatever the order of the sums:
    # the full step wins unless another candidate is better by more than the noise
    noise = NOISE * (np.abs(pen[:, 0]) + 1.0)
    k = np.where(pen.min(axis=1) < pen[:, 0] - noise, np.argmin(pen, axis=1), 0)
    best_pen, best_dev = pen[rows, k], tot["deviance"][rows, k]
    active = ~fit["stopped"]
    prev = np.where(np.isfinite(fit["pen_dev"]), fit["pen_dev"], np.inf)
    accept = active & (best_pen <= prev + NOISE * (np.abs(best_pen) + 1.0))
    # DESeq2's rule on accepted iterates: the start point counts as iterate 0
    change = np.abs(best_dev - fit["dev_prev"]) / (np.abs(best_dev) + 0.1)
    newly = accept & (fit["accepted"] >= 2) & (change < IRLS_TOL)
    fit["beta"] = np.where(accept[:, None], cands[rows, k], fit["beta"])
    fit["xtwx"] = np.where(accept[:, None], tot["xtwx"][rows, k], fit["xtwx"])
    fit["deviance"] = np.where(accept, best_dev, fit["deviance"])
    fit["dev_prev"] = np.where(accept, best_dev, fit["dev_prev"])
    fit["pen_dev"] = np.where(accept, best_pen, fit["pen_dev"])
    fit["accepted"] = fit["accepted"] + accept
    fit["deseq2_rule"] |= newly  # DESeq2's convergence flag (betaConv)
    # no candidate improved: backtrack along the same direction
    fit["scale"] = np.where(accept, 1.0, fit["scale"] / 16.0)
    xtwz = np.where(accept[:, None], tot["xtwz"][rows, k], np.nan)
    with np.errstate(invalid="ignore"):
        step = nb.solve_ridge(np.where(accept[:, None], fit["xtwx"], 1.0),
                              np.nan_to_num(xtwz), lam) - fit["beta"]
    fit["direction"] = np.where(accept[:, None], step, fit["direction"])
    tiny = np.abs(fit["direction"]).max(axis=1) * fit["scale"] < BETA_TOL
    # stop when DESeq2's rule has fired and the next step is negligible, or when no step
    # improves the penalised deviance any more (the optimum within precision)
    done = active & ((fit["deseq2_rule"] & tiny) | (~accept & (tiny | (fit["scale"] < MIN_SCALE))))
    fit["converged"] |= done
    fit["deseq2_rule"] |= done
    fit["stopped"] |= done
    active = ~fit["stopped"]
    lengths = fit["scale"][:, None] * np.asarray(STEP_LENGTHS)[None, :]
    new = fit["beta"][:, None, :] + lengths[..., None] * fit["direction"][:, None, :]
    diverged = active & ~(np.abs(new[:, 0]) <= LARGE_BETA).all(axis=1)
    fit["stopped"] |= diverged
    new = np.where(fit["stopped"][:, None, None], fit["beta"][:, None, :], new)
    fit["candidates"] = new
    fit["iter"] += 1
    return fit
