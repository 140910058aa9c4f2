"""Federated IRLS for the NB GLM (DESeq2's ``fitBeta``), unrolled to a fixed number of rounds.

DESeq2's IRLS is the fixed-point iteration ``beta <- G(beta) = (X'WX + L)^-1 X'Wz`` with means
floored at 0.5; it stops when the deviance changes by less than 1e-8 (relative) and iterates
up to 100 times. With a fixed, small number of rounds the iteration is accelerated without
moving its fixed point:

Each round  local : at every candidate betas of a gene, the packed X'WX, X'Wz and the
                    deviance (the ``fitBeta`` sums)
            agg   : G(c) for each candidate c; keeps the candidate with the clearly smaller
                    fixed-point residual |G(c) - c| (else the plain IRLS iterate); DESeq2's
                    deviance rule; next candidates: the plain IRLS step G(x) and an
                    Anderson-accelerated step (a half step in the first round, which also
                    guards against overshooting from a poor start)
Because candidates are judged by the fixed-point residual, the answer is the point DESeq2's
IRLS converges to. A gene stops once DESeq2's rule has fired and the next step is below
1e-8, so the result does not depend on which round the rule fired in (sites summing in another
order give the same coefficients). |beta| > 30 stops a gene as diverged (DESeq2's ``large``).
The plan is static: stopped genes are masked, not skipped. ``stage`` names the fit: ``"mu"``
(means for the dispersion estimates, with the rough dispersions) or ``"final"``.
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
N_CANDIDATES = 2  # plain IRLS step and an accelerated (or damped) step
BETA_TOL = 1e-8  # stop once the next step is below this (natural-log units)
CLEARLY_BETTER = 0.5  # the accelerated candidate must halve the residual to be preferred
MAX_THETA = 4.0  # largest Anderson mixing weight trusted
FAR = 1e-3  # deviances differing by more than this (relative): far from the fixed point
NOISE = 1e-11  # relative rounding noise of summed deviances


def irls_alpha(state: dict, stage: str) -> np.ndarray:
    """Dispersions a stage fits with."""
    return state["alpha_hat"] if stage == "mu" else state["dispersion"]


def start_irls(beta0: np.ndarray, frozen: np.ndarray, beta_alt: np.ndarray | None = None) -> dict:
    """IRLS status before the first round: candidates ``beta0`` (DESeq2's) and ``beta_alt``."""
    G, p = beta0.shape
    beta0 = np.where(frozen[:, None], 0.0, np.nan_to_num(beta0))
    cands = np.repeat(beta0[:, None, :], N_CANDIDATES, 1)
    if beta_alt is not None:
        ok = np.isfinite(beta_alt).all(axis=1) & (np.abs(beta_alt) <= LARGE_BETA).all(axis=1)
        cands[:, 1] = np.where((ok & ~frozen)[:, None], beta_alt, beta0)
    return {"beta": beta0, "candidates": cands, "accepted": np.zeros(G, dtype=int),
            "resid": np.zeros((G, p)), "beta_prev": np.zeros((G, p)),
            "resid_prev": np.zeros((G, p)), "dev_prev": np.full(G, np.nan),
            "converged": frozen.copy(), "stopped": frozen.copy(), "deseq2_rule": frozen.copy(),
            "diverged": np.zeros(G, dtype=bool), "stagnant": np.zeros(G, dtype=bool),
            "xtwx_acc": np.zeros((G, nb.n_packed(p)))}


class IRLSMixin:
    """IRLS rounds of the NB GLM fit."""

    @remote_data
    @sends(xtwx=("G", "KB", "T"), xtwz=("G", "KB", "p"), deviance=("G", "KB"))
    def local_irls(self, data_from_opener: SiteData, shared_state: dict, stage: str = "final"):
        """IRLS sums at each candidate of ``stage``."""
        # only genes still iterating are computed; the others are sent as zeros (fixed shape)
        return self._irls_sums(data_from_opener, shared_state[f"irls_{stage}"],
                               irls_alpha(shared_state, stage), self.local["design"])

    @remote_data
    @sends(xtwx=("G", "KB", "T"), xtwz=("G", "KB", "p"), deviance=("G", "KB"),
           xtwx_r=("G", "KB", "Tr"), xtwz_r=("G", "KB", "pr"), deviance_r=("G", "KB"))
    def local_irls_lrt(self, data_from_opener: SiteData, shared_state: dict,
                       stage: str = "final"):
        """Final-fit IRLS sums for the full and the reduced model (LRT), in one task."""
        out = self.local_irls(data_from_opener=data_from_opener, shared_state=shared_state,
                              stage=stage, _skip=True)
        red = self._irls_sums(data_from_opener, shared_state["irls_reduced"],
                              shared_state["dispersion"], self.local["design_reduced"])
        out.update({f"{k}_r": v for k, v in red.items()})
        return out

    def _irls_sums(self, site: SiteData, fit: dict, alpha: np.ndarray, X: np.ndarray) -> dict:
        idx = np.flatnonzero(~fit["stopped"])
        G, K, p = fit["candidates"].shape
        cands = fit["candidates"][idx]
        alpha = np.nan_to_num(alpha, nan=1.0)[idx]
        y = self.counts(site)[:, idx]
        sf = self.local["size_factors"]
        lgy1 = self.lgamma_y1(site)[idx]
        lgr = nb.nb_lgamma_ratio(y, alpha)  # mean-free part: once for every candidate
        out = {"xtwx": np.zeros((G, K, nb.n_packed(p))), "xtwz": np.zeros((G, K, p)),
               "deviance": np.zeros((G, K))}
        for k in range(K):
            part = nb.irls_summands(y, X, sf, cands[:, k], alpha, MIN_MU, lgy1, lgr)
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
        tot = sum_messages(messages, prev=prev)
        state = dict(prev)
        state[f"irls_{stage}"] = irls_update(prev[f"irls_{stage}"], tot, self.study.n_coefs)
        if "xtwx_r" in tot:  # LRT: the reduced model's fit advances in the same round
            red = {k[:-2]: v for k, v in tot.items() if k.endswith("_r")}
            state["irls_reduced"] = irls_update(prev["irls_reduced"], red,
                                                self.reduced.n_coefs)
        return state


    @remote
    def agg_irls_finish(self, shared_states: list[dict], stage: str = "final") -> dict:
        """Last IRLS round of the final fit; genes still not converged go to the fallback."""
        from fed_de.steps.fallback import start_fallback

        state = self.agg_irls(shared_states, stage=stage, _skip=True)
        state["fallback"] = start_fallback(state["irls_final"], state["all_zero"])
        return state


def irls_update(fit: dict, tot: dict, p: int) -> dict:
    """One aggregator update of an IRLS status from the summed candidate sums."""
    fit = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in fit.items()}
    lam = nb.ridge(p)
    cands = fit["candidates"]
    G, K, _ = cands.shape
    rows = np.arange(G)
    active = ~fit["stopped"]
    # masked genes get an identity system (their sums are zeros)
    xtwx = np.where(active[:, None, None], tot["xtwx"], nb.pack(np.eye(p)))
    with np.errstate(invalid="ignore", over="ignore"):
        nxt = nb.solve_ridge(xtwx, tot["xtwz"], lam)
    resid = nxt - cands
    size = np.abs(resid).max(axis=2)
    size = np.where(np.isfinite(size), size, np.inf)
    # far from the solution (candidates' penalised deviances differ by more than 1e-3,
    # relative) the deviance judges them: it catches an overshooting step; near the solution
    # the fixed-point residual does, so the iteration ends at DESeq2's fixed point even where
    # floored means make the deviance non-stationary there. Ties go to the plain IRLS step.
    pen = tot["deviance"] + np.einsum("gkp,p,gkp->gk", cands, lam, cands)
    pen = np.where(np.isfinite(pen), pen, np.inf)
    by_dev = np.where(pen[:, 1:].min(axis=1) < pen[:, 0] - NOISE * (np.abs(pen[:, 0]) + 1.0),
                      1 + np.argmin(pen[:, 1:], axis=1), 0)
    by_res = np.where(size[:, 1:].min(axis=1) < CLEARLY_BETTER * size[:, 0],
                      1 + np.argmin(size[:, 1:], axis=1), 0)
    far = np.abs(pen[:, 0] - pen.min(axis=1)) > FAR * (np.abs(pen[:, 0]) + 1.0)
    k = np.where(far, by_dev, by_res) if K > 1 else np.zeros(G, dtype=int)
    x, r, dev = cands[rows, k], resid[rows, k], tot["deviance"][rows, k]
    upd = lambda key, new: np.where(  # noqa: E731
        active.reshape((-1,) + (1,) * (np.ndim(new) - 1)), new, fit[key])
    first = fit["accepted"] == 0
    # a gene whose fixed-point residual no longer shrinks is stagnating (DESeq2 would hit
    # maxit and refit it with optim)
    prev_size = np.abs(fit["resid"]).max(axis=1)
    fit["stagnant"] = upd("stagnant", ~first & (size[rows, k] >= 0.9 * prev_size))
    fit["beta_prev"] = upd("beta_prev", np.where(first[:, None], x, fit["beta"]))
    fit["resid_prev"] = upd("resid_prev", np.where(first[:, None], r, fit["resid"]))
    fit["beta"], fit["resid"] = upd("beta", x), upd("resid", r)
    # DESeq2's rule between successive iterates; the start point is iterate 0
    change = np.abs(dev - fit["dev_prev"]) / (np.abs(dev) + 0.1)
    rule = active & (fit["accepted"] >= 2) & (change < IRLS_TOL)
    fit["deseq2_rule"] |= rule
    fit["dev_prev"] = upd("dev_prev", dev)
    # X'WX at the accepted betas: the hat diagonals of Cook's distances need it
    fit["xtwx_acc"] = upd("xtwx_acc", tot["xtwx"][rows, k])
    fit["accepted"] = fit["accepted"] + active
    with np.errstate(invalid="ignore"):
        done = active & fit["deseq2_rule"] & (np.abs(r).max(axis=1) < BETA_TOL)
    plain = x + r
    diverged = active & ~done & ~(np.abs(plain) <= LARGE_BETA).all(axis=1)
    fit["converged"] |= done
    fit["diverged"] |= diverged
    fit["stopped"] |= done | diverged
    # next candidates: plain step, and Anderson(1) (a half step when no history yet)
    dr = r - fit["resid_prev"]
    dx = x - fit["beta_prev"]
    denom = (dr * dr).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        theta = np.where(denom > 0, (dr * r).sum(axis=1) / denom, np.nan)
    anderson = plain - theta[:, None] * (dx + dr)
    # Anderson with a bounded mixing weight; otherwise (no history, or a wild weight) a half
    # step, which guards against overshooting
    tame = np.isfinite(theta) & (np.abs(theta) <= MAX_THETA) & ~first
    second = np.where(tame[:, None], anderson, x + 0.5 * r)
    new = np.stack([plain, second], axis=1)[:, :K]
    still = ~fit["stopped"]
    fit["candidates"] = np.where(still[:, None, None], np.nan_to_num(new),
                                 fit["beta"][:, None, :])
    return fit
