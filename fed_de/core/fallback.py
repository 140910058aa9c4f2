"""DESeq2's refit of genes IRLS left unconverged (``fitNbinomGLMsOptim``), as an
aggregator-side projected Newton search over rounds of summed sums.

DESeq2 refits genes whose IRLS did not converge (or diverged) by maximising the
ridge-penalised NB log likelihood with L-BFGS-B, coefficients boxed in [-30, 30] on the log2
scale, means not floored. The same objective is maximised here by projected Newton steps with
the exact observed information, two step lengths tried per round: each round the sites return
the log likelihood, its gradient X'(y - mu)/(1 + a mu) and the packed observed information
X' diag(mu (1 + a y)/(1 + a mu)^2) X at every candidate (:func:`fallback_sums`); the aggregator
keeps the best candidate by penalised likelihood (ties below rounding noise go to the full
step) and proposes the next projected Newton step (:func:`fallback_update`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy.special import gammaln

from fed_de.core import nb
from fed_de.core.irls import NOISE

BOX = 30.0 * nb.LN2  # DESeq2's large = 30 on the log2 scale
STEPS = (1.0, 0.25)


@dataclass
class FallbackFit:
    """Where the refit stands: genes still searching (``active``), accepted ``beta`` and its
    penalised likelihood ``f``, the next ``candidates`` (G x K x p), the Newton ``step`` and
    its ``scale``, and which genes are ``refitted`` (betaConv TRUE once ``active`` ends, as
    DESeq2 1.38 sets it when optim converges)."""

    active: np.ndarray
    beta: np.ndarray
    f: np.ndarray
    candidates: np.ndarray
    scale: np.ndarray
    step: np.ndarray
    refitted: np.ndarray


def start_fallback(beta: np.ndarray, converged: np.ndarray, diverged: np.ndarray,
                   stagnant: np.ndarray, all_zero: np.ndarray) -> FallbackFit:
    """Fallback status after the final IRLS: diverged or stagnating genes are refitted.

    Genes still converging steadily when the rounds run out keep their last IRLS iterate
    (flagged ``betaConv = FALSE``): DESeq2 would have finished them by IRLS, whose fixed point
    (means floored at 0.5) differs from optim's objective (means not floored).
    """
    active = ~converged & (diverged | stagnant) & ~all_zero
    beta = np.clip(np.nan_to_num(beta), -BOX, BOX)
    G, p = beta.shape
    return FallbackFit(active=active, beta=beta, f=np.full(G, -np.inf),
                       candidates=np.repeat(beta[:, None, :], len(STEPS), axis=1),
                       scale=np.ones(G), step=np.zeros((G, p)), refitted=active.copy())


def fallback_sums(y: np.ndarray, X: np.ndarray, sf: np.ndarray, alpha: np.ndarray,
                  candidates: np.ndarray) -> dict:
    """Site sums at each candidate (genes in ``y``'s columns): log likelihood (G x K),
    gradient (G x K x p), packed observed information (G x K x T)."""
    G, K, p = candidates.shape
    out = {"loglik": np.zeros((G, K)), "grad": np.zeros((G, K, p)),
           "info": np.zeros((G, K, nb.n_packed(p)))}
    r = 1.0 / alpha
    lgy = gammaln(y + 1.0)
    for k in range(K):
        mu = sf[:, None] * np.exp(np.clip(X @ candidates[:, k].T, -700, 700))
        with np.errstate(divide="ignore", invalid="ignore"):
            ll = (gammaln(y + r) - gammaln(r) - lgy - r * np.log1p(mu / r)
                  + np.where(y > 0, y * (np.log(mu) - np.log(mu + r)), 0.0))
        out["loglik"][:, k] = ll.sum(axis=0)
        out["grad"][:, k] = ((y - mu) / (1.0 + alpha * mu)).T @ X
        out["info"][:, k] = nb.gram(X, mu * (1.0 + alpha * y) / (1.0 + alpha * mu) ** 2)
    return out


def fallback_update(fb: FallbackFit, loglik: np.ndarray, grad: np.ndarray, info: np.ndarray,
                    p: int) -> FallbackFit:
    """Keep the best candidate; propose the next projected Newton step."""
    fb = {f.name: np.array(getattr(fb, f.name), copy=True) for f in fields(FallbackFit)}
    lam = nb.ridge(p)
    cands = fb["candidates"]
    rows = np.arange(cands.shape[0])
    f = loglik - 0.5 * np.einsum("gkp,p,gkp->gk", cands, lam, cands)
    f = np.where(np.isfinite(f), f, -np.inf)
    noise = NOISE * (np.abs(np.nan_to_num(f[:, 0], neginf=0.0)) + 1.0)
    k = np.where(f.max(axis=1) > f[:, 0] + noise, np.argmax(f, axis=1), 0)
    best = f[rows, k]
    slack = NOISE * (np.abs(np.nan_to_num(best, neginf=0.0)) + 1.0)
    accept = fb["active"] & (best >= fb["f"] - slack)
    fb["beta"] = np.where(accept[:, None], cands[rows, k], fb["beta"])
    fb["f"] = np.where(accept, best, fb["f"])
    g = grad[rows, k] - lam * cands[rows, k]
    h = nb.unpack(info[rows, k], p) + np.diag(lam)
    with np.errstate(invalid="ignore"):
        step = np.linalg.solve(np.where(accept[:, None, None], h, np.eye(p)),
                               np.where(accept[:, None], g, 0.0)[..., None])[..., 0]
    fb["scale"] = np.where(accept, 1.0, fb["scale"] / 16.0)
    fb["step"] = np.where(accept[:, None], step, fb["step"])
    lengths = fb["scale"][:, None] * np.asarray(STEPS)[None, :]
    new = np.clip(fb["beta"][:, None, :] + lengths[..., None] * fb["step"][:, None, :],
                  -BOX, BOX)
    fb["active"] = fb["active"] & (np.abs(fb["step"]).max(axis=1) * fb["scale"] > 1e-10)
    fb["candidates"] = np.where(fb["active"][:, None, None], new, fb["beta"][:, None, :])
    return FallbackFit(**fb)
