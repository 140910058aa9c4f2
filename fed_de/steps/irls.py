"""Federated IRLS for the NB GLM (DESeq2's ``fitBeta``), unrolled to a fixed number of rounds.

Each round  local : at the current betas, the packed X^T W X, X^T W z and the deviance
            agg   : the ridge-penalised update ``(X^T W X + L)^{-1} X^T W z``; DESeq2's stopping
                    rule (relative deviance change < 1e-8 after the first update) freezes a
                    gene; a gene whose |beta| exceeds 30 is stopped and left to the fallback
The plan is static: converged genes are masked, not skipped. ``stage`` names which fit runs:
``"mu"`` (means for the dispersion estimates, with the rough dispersions) or ``"final"``
(the coefficients reported, with the final dispersions).
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


def irls_alpha(state: dict, stage: str) -> np.ndarray:
    """Dispersions a stage fits with."""
    return state["alpha_hat"] if stage == "mu" else state["dispersion"]


def start_irls(state: dict, stage: str, beta0: np.ndarray, frozen: np.ndarray) -> dict:
    """Initial IRLS status of a stage: every gene not ``frozen`` iterates from ``beta0``."""
    G = beta0.shape[0]
    return {"beta": np.where(frozen[:, None], 0.0, beta0), "iter": 0,
            "dev_prev": np.full(G, np.nan), "converged": frozen.copy(),
            "stopped": frozen.copy(), "xtwx": np.full((G, nb.n_packed(beta0.shape[1])), np.nan),
            "deviance": np.full(G, np.nan)}


class IRLSMixin:
    """IRLS rounds of the NB GLM fit."""

    @remote_data
    @sends(xtwx=("G", "T"), xtwz=("G", "p"), deviance=("G",))
    def local_irls(self, data_from_opener: SiteData, shared_state: dict, stage: str = "final"):
        """IRLS sums at the current betas of ``stage``."""
        fit = shared_state[f"irls_{stage}"]
        beta = np.nan_to_num(fit["beta"])
        alpha = np.nan_to_num(irls_alpha(shared_state, stage), nan=1.0)
        return nb.irls_summands(self.counts(data_from_opener), self.local["design"],
                                self.local["size_factors"], beta, alpha, MIN_MU)

    @remote
    def agg_irls(self, shared_states: list[dict], stage: str = "final") -> dict:
        """Stopping rule, then the ridge-penalised update for genes still iterating."""
        *messages, prev = shared_states
        tot = sum_messages(messages)
        fit = {k: (v.copy() if isinstance(v, np.ndarray) else v)
               for k, v in prev[f"irls_{stage}"].items()}
        state = dict(prev)
        state[f"irls_{stage}"] = irls_update(fit, tot, self.study.n_coefs)
        return state


def irls_update(fit: dict, tot: dict, p: int) -> dict:
    """One aggregator update of an IRLS status from the summed sums at ``fit['beta']``."""
    active = ~fit["stopped"]
    dev = tot["deviance"]
    # sums at the current betas: keep them for the genes that stop here
    fit["xtwx"] = np.where(active[:, None], tot["xtwx"], fit["xtwx"])
    fit["deviance"] = np.where(active, dev, fit["deviance"])
    if fit["iter"] >= 2:
        with np.errstate(invalid="ignore", divide="ignore"):
            change = np.abs(dev - fit["dev_prev"]) / (np.abs(dev) + 0.1)
        newly = active & (change < IRLS_TOL)
        bad = active & ~np.isfinite(change)
        fit["converged"] = fit["converged"] | newly
        fit["stopped"] = fit["stopped"] | newly | bad
    active = ~fit["stopped"]
    fit["dev_prev"] = np.where(active, dev, fit["dev_prev"])
    with np.errstate(invalid="ignore"):
        new_beta = nb.solve_ridge(np.where(active[:, None], tot["xtwx"], 1.0),
                                  tot["xtwz"], nb.ridge(p))
    diverged = active & ~(np.abs(new_beta) <= LARGE_BETA).all(axis=1)
    fit["beta"] = np.where(active[:, None], new_beta, fit["beta"])
    fit["stopped"] = fit["stopped"] | diverged
    fit["iter"] += 1
    return fit
