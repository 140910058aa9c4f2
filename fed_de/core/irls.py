"""DESeq2's IRLS (``fitBeta``) as an aggregator-side update over rounds of summed sums.

DESeq2's IRLS is the fixed-point iteration ``beta <- G(beta) = (X'WX + L)^-1 X'Wz`` with means
floored at 0.5; it stops when the deviance changes by less than 1e-8 (relative) and iterates
up to 100 times. With a fixed, small number of rounds the iteration is accelerated without
moving its fixed point: each round the sites return the ``fitBeta`` sums (packed X'WX, X'Wz,
deviance, and the observed information) at every candidate of a gene; :func:`irls_update`
computes G(c) for each candidate, keeps the candidate with the clearly smaller fixed-point
residual |G(c) - c| (else the plain IRLS iterate), applies DESeq2's deviance rule, and proposes
the next candidates: the plain IRLS step G(x), an Anderson-accelerated step (a half step in
the first round, which also guards against overshooting from a poor start), and a Newton step
on the same pseudo-score with the observed instead of the expected information (quadratic
where the means are not floored: IRLS is slow for genes with large dispersions; Anderson
keeps floored genes moving).

Because candidates are judged by the fixed-point residual, the answer is the point DESeq2's
IRLS converges to. A gene stops once DESeq2's rule has fired and the next step is below 1e-8,
so the result does not depend on which round the rule fired in (sites summing in another order
give the same coefficients). |beta| > 30 stops a gene as diverged (DESeq2's ``large``).
Stopped genes are masked, not skipped (the plan is static).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from fed_de.core import nb

IRLS_TOL = 1e-8
LARGE_BETA = 30.0
MIN_MU = 0.5
N_CANDIDATES = 3  # plain IRLS step, an accelerated (or damped) step, a Newton step
BETA_TOL = 1e-8  # stop once the next step is below this (natural-log units)
CLEARLY_BETTER = 0.5  # the accelerated candidate must halve the residual to be preferred
MAX_THETA = 4.0  # largest Anderson mixing weight trusted
FAR = 1e-3  # deviances differing by more than this (relative): far from the fixed point
NOISE = 1e-11  # relative rounding noise of summed deviances


@dataclass
class IRLSFit:
    """Where one IRLS fit stands (genes first).

    ``beta`` the accepted coefficients; ``candidates`` (G x K x p) what the sites evaluate
    next; ``accepted`` how many iterates each gene took; ``resid``/``beta_prev``/``resid_prev``
    the Anderson history; ``dev_prev`` the last accepted deviance; ``deseq2_rule`` DESeq2's
    stopping rule has fired; ``converged``/``diverged``/``stopped``/``stagnant`` the gene's
    status; ``xtwx_acc`` packed X'WX at the accepted betas (Cook's hat diagonals and the
    covariance need it; no columns in a fit that keeps none, :func:`start_irls`).
    """

    beta: np.ndarray
    candidates: np.ndarray
    accepted: np.ndarray
    resid: np.ndarray
    beta_prev: np.ndarray
    resid_prev: np.ndarray
    dev_prev: np.ndarray
    converged: np.ndarray
    stopped: np.ndarray
    deseq2_rule: np.ndarray
    diverged: np.ndarray
    stagnant: np.ndarray
    xtwx_acc: np.ndarray
    picked: np.ndarray


def start_irls(beta0: np.ndarray, frozen: np.ndarray,
               beta_alt: np.ndarray | None = None, *, keep_xtwx: bool = True) -> IRLSFit:
    """IRLS status before the first round: candidates ``beta0`` (DESeq2's) and ``beta_alt``.

    ``frozen`` genes (all zero, or out of this fit) are stopped from the start. Without
    ``keep_xtwx`` the fit keeps no X'WX at its accepted coefficients (``xtwx_acc`` has no
    columns): for a fit whose covariance and hat diagonals nobody reads.
    """
    G, p = beta0.shape
    beta0 = np.where(frozen[:, None], 0.0, np.nan_to_num(beta0))
    cands = np.repeat(beta0[:, None, :], N_CANDIDATES, 1)
    if beta_alt is not None and N_CANDIDATES > 1:
        ok = np.isfinite(beta_alt).all(axis=1) & (np.abs(beta_alt) <= LARGE_BETA).all(axis=1)
        cands[:, 1] = np.where((ok & ~frozen)[:, None], beta_alt, beta0)
    return IRLSFit(beta=beta0, candidates=cands, accepted=np.zeros(G, dtype=int),
                   resid=np.zeros((G, p)), beta_prev=np.zeros((G, p)),
                   resid_prev=np.zeros((G, p)), dev_prev=np.full(G, np.nan),
                   converged=frozen.copy(), stopped=frozen.copy(), deseq2_rule=frozen.copy(),
                   diverged=np.zeros(G, dtype=bool), stagnant=np.zeros(G, dtype=bool),
                   xtwx_acc=np.zeros((G, nb.n_packed(p) if keep_xtwx else 0)),
                   picked=np.zeros(G, dtype=int))


def settled(fit: IRLSFit) -> IRLSFit:
    """A finished fit as later steps read it: its coefficients and per-gene flags, with the
    candidates and the iteration history emptied (their per-gene columns dropped)."""
    return replace(fit, **{f.name: getattr(fit, f.name)[:, :0] for f in fields(fit)
                           if f.name != "beta" and getattr(fit, f.name).ndim > 1})


def at_accepted(values: np.ndarray, fit: IRLSFit | None) -> np.ndarray:
    """Per gene, the value (of an array over the candidates a round evaluated) at the
    candidate the last update accepted: its coefficients. ``fit`` None: a model fitted
    without IRLS (the LRT's ``~ 1``), one point for every candidate: the first column."""
    if fit is None:
        return values[:, 0]
    return values[np.arange(values.shape[0]), fit.picked]


def converged_outside(fit: IRLSFit | None, skip: np.ndarray) -> np.ndarray:
    """Per gene, whether the fit converged, ``False`` for the genes ``skip``; ``fit`` None: a
    model fitted without IRLS (the LRT's ``~ 1``), exact for every gene."""
    conv = np.ones_like(skip) if fit is None else fit.converged
    return conv & ~skip


def irls_update(fit: IRLSFit, xtwx: np.ndarray, xtwz: np.ndarray, deviance: np.ndarray,
                p: int, xtwx_obs: np.ndarray | None = None) -> IRLSFit:
    """One aggregator update of an IRLS fit from the summed candidate sums.

    Parameters
    ----------
    fit
        The fit the sites evaluated (its ``candidates``).
    xtwx, xtwz, deviance
        Summed over sites: packed X'WX (G x K x T), X'Wz (G x K x p), deviance (G x K).
    p
        Number of coefficients.
    """
    fit = {f.name: np.array(getattr(fit, f.name), copy=True) for f in fields(IRLSFit)}
    lam = nb.ridge(p)
    cands = fit["candidates"]
    G, K, _ = cands.shape
    rows = np.arange(G)
    active = ~fit["stopped"]
    # masked genes get an identity system (their sums are zeros)
    xtwx_solve = np.where(active[:, None, None], xtwx, nb.pack(np.eye(p)))
    with np.errstate(invalid="ignore", over="ignore"):
        nxt = nb.solve_ridge(xtwx_solve, xtwz, lam)
    resid = nxt - cands
    size = np.abs(resid).max(axis=2)
    size = np.where(np.isfinite(size), size, np.inf)
    k = _choose(deviance, cands, size, lam) if K > 1 else np.zeros(G, dtype=int)
    x, r, dev = cands[rows, k], resid[rows, k], deviance[rows, k]
    fit["picked"] = np.where(active, k, 0)

    def upd(key, new):
        return np.where(active.reshape((-1,) + (1,) * (np.ndim(new) - 1)), new, fit[key])

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
    if fit["xtwx_acc"].shape[1]:  # a fit started without it keeps none
        fit["xtwx_acc"] = upd("xtwx_acc", xtwx[rows, k])
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
    cands_next = [plain, second]
    if xtwx_obs is not None:
        # Newton: the same pseudo-score, the observed instead of the expected information
        obs = nb.unpack(xtwx_obs[rows, k], p) + np.diag(lam)
        exp = nb.unpack(xtwx[rows, k], p) + np.diag(lam)
        with np.errstate(invalid="ignore", over="ignore"):
            rhs = np.einsum("gij,gj->gi", exp, r)
            ok = np.isfinite(obs).all(axis=(1, 2)) & np.isfinite(rhs).all(axis=1)
            step = np.linalg.solve(np.where(ok[:, None, None], obs, np.eye(p)),
                                   np.where(ok[:, None], rhs, 0.0)[..., None])[..., 0]
        cands_next.append(np.where(ok[:, None], x + step, plain))
    cands_next += [plain] * (K - len(cands_next))  # no observed information: plain again
    new = np.stack(cands_next, axis=1)[:, :K]
    still = ~fit["stopped"]
    # an accelerated candidate far beyond DESeq2's divergence bound (its exp overflows at the
    # sites) is evaluated at the bound; a plain step beyond it has already stopped the gene
    bounded = np.clip(np.nan_to_num(new), -LARGE_BETA, LARGE_BETA)
    fit["candidates"] = np.where(still[:, None, None], bounded, fit["beta"][:, None, :])
    return IRLSFit(**fit)


def _choose(deviance: np.ndarray, cands: np.ndarray, size: np.ndarray,
            lam: np.ndarray) -> np.ndarray:
    """Which candidate each gene keeps (index into the candidates).

    Far from the solution (candidates' penalised deviances differ by more than 1e-3,
    relative) the deviance judges them: it catches an overshooting step; near the solution
    the fixed-point residual does, so the iteration ends at DESeq2's fixed point even where
    floored means make the deviance non-stationary there. Ties go to the plain IRLS step.
    """
    pen = deviance + np.einsum("gkp,p,gkp->gk", cands, lam, cands)
    pen = np.where(np.isfinite(pen), pen, np.inf)
    by_dev = np.where(pen[:, 1:].min(axis=1) < pen[:, 0] - NOISE * (np.abs(pen[:, 0]) + 1.0),
                      1 + np.argmin(pen[:, 1:], axis=1), 0)
    by_res = np.where(size[:, 1:].min(axis=1) < CLEARLY_BETTER * size[:, 0],
                      1 + np.argmin(size[:, 1:], axis=1), 0)
    far = np.abs(pen[:, 0] - pen.min(axis=1)) > FAR * (np.abs(pen[:, 0]) + 1.0)
    return np.where(far, by_dev, by_res)
