"""Federated fallback for genes whose IRLS did not converge (DESeq2's ``fitNbinomGLMsOptim``).

DESeq2 refits genes whose IRLS did not converge (or diverged) by maximising the
ridge-penalised NB log likelihood with L-BFGS-B, coefficients boxed in [-30, 30] on the log2
scale, means not floored. The same objective is maximised here by projected Newton steps with
the exact observed information, two step lengths tried per round:

Each round  local : at each candidate, the log likelihood, its gradient X'(y - mu)/(1 + a mu)
                    and the packed observed information X' diag(mu (1 + a y)/(1 + a mu)^2) X
            agg   : best candidate by penalised likelihood (ties below rounding noise go to
                    the full step), next projected Newton step
Genes that converged in IRLS are masked. ``betaConv`` stays FALSE for refitted genes, as in
DESeq2.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln
from substrafl.remote import remote, remote_data

from fed_de.core import nb
from fed_de.simulation.opener import SiteData
from fed_de.steps.base import sends, sum_messages
from fed_de.steps.irls import NOISE

BOX = 30.0 * nb.LN2  # DESeq2's large = 30 on the log2 scale
STEPS = (1.0, 0.25)


def start_fallback(fit: dict, all_zero: np.ndarray) -> dict:
    """Fallback status after the final IRLS: diverged or stagnating genes are refitted.

    Genes still converging steadily when the rounds run out keep their last IRLS iterate
    (flagged ``betaConv = FALSE``): DESeq2 would have finished them by IRLS, whose fixed point
    (means floored at 0.5) differs from optim's objective (means not floored).
    """
    active = ~fit["converged"] & (fit["diverged"] | fit["stagnant"]) & ~all_zero
    beta = np.clip(np.nan_to_num(fit["beta"]), -BOX, BOX)
    G, p = beta.shape
    return {"active": active, "beta": beta, "f": np.full(G, -np.inf),
            "candidates": np.repeat(beta[:, None, :], len(STEPS), axis=1),
            "scale": np.ones(G), "step": np.zeros((G, p)), "refitted": active.copy()}


class FallbackMixin:
    """Projected-Newton refit of the genes IRLS left unconverged."""

    @remote_data
    @sends(loglik=("G", "KF"), grad=("G", "KF", "p"), info=("G", "KF", "T"))
    def local_fallback(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """Log likelihood, gradient and observed information at each candidate."""
        fb = shared_state["fallback"]
        G, K, p = fb["candidates"].shape
        idx = np.flatnonzero(fb["active"])
        out = {"loglik": np.zeros((G, K)), "grad": np.zeros((G, K, p)),
               "info": np.zeros((G, K, nb.n_packed(p)))}
        if idx.size == 0:
            return out
        y = self.counts(data_from_opener)[:, idx]
        X, sf = self.local["design"], self.local["size_factors"]
        alpha = np.nan_to_num(shared_state["dispersion"][idx], nan=1.0)
        r = 1.0 / alpha
        lgy = gammaln(y + 1.0)
        for k in range(K):
            mu = sf[:, None] * np.exp(np.clip(X @ fb["candidates"][idx, k].T, -700, 700))
            with np.errstate(divide="ignore", invalid="ignore"):
                ll = (gammaln(y + r) - gammaln(r) - lgy - r * np.log1p(mu / r)
                      + np.where(y > 0, y * (np.log(mu) - np.log(mu + r)), 0.0))
            out["loglik"][idx, k] = ll.sum(axis=0)
            out["grad"][idx, k] = ((y - mu) / (1.0 + alpha * mu)).T @ X
            out["info"][idx, k] = nb.gram(X, mu * (1.0 + alpha * y) / (1.0 + alpha * mu) ** 2)
        return out

    @remote
    def agg_fallback(self, shared_states: list[dict]) -> dict:
        """Keep the best candidate; propose the next projected Newton step."""
        *messages, prev = shared_states
        tot = sum_messages(messages)
        state = dict(prev)
        state["fallback"] = fallback_update(prev["fallback"], tot, self.study.n_coefs)
        return state


def fallback_update(fb: dict, tot: dict, p: int) -> dict:
    """Aggregator update of the projected Newton refit."""
    fb = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in fb.items()}
    lam = nb.ridge(p)
    cands = fb["candidates"]
    rows = np.arange(cands.shape[0])
    f = tot["loglik"] - 0.5 * np.einsum("gkp,p,gkp->gk", cands, lam, cands)
    f = np.where(np.isfinite(f), f, -np.inf)
    noise = NOISE * (np.abs(np.nan_to_num(f[:, 0], neginf=0.0)) + 1.0)
    k = np.where(f.max(axis=1) > f[:, 0] + noise, np.argmax(f, axis=1), 0)
    best = f[rows, k]
    slack = NOISE * (np.abs(np.nan_to_num(best, neginf=0.0)) + 1.0)
    accept = fb["active"] & (best >= fb["f"] - slack)
    fb["beta"] = np.where(accept[:, None], cands[rows, k], fb["beta"])
    fb["f"] = np.where(accept, best, fb["f"])
    grad = tot["grad"][rows, k] - lam * cands[rows, k]
    info = nb.unpack(tot["info"][rows, k], p) + np.diag(lam)
    with np.errstate(invalid="ignore"):
        step = np.linalg.solve(np.where(accept[:, None, None], info, np.eye(p)),
                               np.where(accept[:, None], grad, 0.0)[..., None])[..., 0]
    fb["scale"] = np.where(accept, 1.0, fb["scale"] / 16.0)
    fb["step"] = np.where(accept[:, None], step, fb["step"])
    lengths = fb["scale"][:, None] * np.asarray(STEPS)[None, :]
    new = np.clip(fb["beta"][:, None, :] + lengths[..., None] * fb["step"][:, None, :],
                  -BOX, BOX)
    fb["active"] = fb["active"] & (np.abs(fb["step"]).max(axis=1) * fb["scale"] > 1e-10)
    fb["candidates"] = np.where(fb["active"][:, None, None], new, fb["beta"][:, None, :])
    return fb
