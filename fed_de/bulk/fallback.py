"""Federated refit of genes whose IRLS did not converge (DESeq2's ``fitNbinomGLMsOptim``).

Each round  site : log likelihood, gradient and observed information at each candidate
                   (:func:`fallback_sums`); genes that converged in IRLS are sent as zeros
            agg  : best candidate, next projected Newton step (:mod:`fed_de.core.fallback`)
A refitted gene's ``betaConv`` is TRUE once its search has converged, as DESeq2 1.38 sets it
when ``optim`` converges (``fitNbinomGLMsOptim``).
"""

from __future__ import annotations

import numpy as np

from fed_de.bulk.state import Dispersions, FitStart, Site
from fed_de.core import nb
from fed_de.core.fallback import FallbackFit, fallback_update, start_fallback
from fed_de.core.fallback import fallback_sums as site_fallback_sums
from fed_de.core.irls import IRLSFit
from fed_de.federation.calls import aggregator_step, site_step
from fed_de.federation.messages import Message, sums


class FallbackSums(Message):
    """Log likelihood, gradient and packed observed information at each candidate."""

    loglik: np.ndarray = sums("G", "KF", narrow=True)
    grad: np.ndarray = sums("G", "KF", "p", narrow=True)
    info: np.ndarray = sums("G", "KF", "T", narrow=True)


@site_step
def fallback_sums(site: Site, fallback: FallbackFit, dispersions: Dispersions) -> FallbackSums:
    """Log likelihood, gradient and observed information at each candidate."""
    G, K, p = fallback.candidates.shape
    idx = np.flatnonzero(fallback.active)
    out = {"loglik": np.zeros((G, K)), "grad": np.zeros((G, K, p)),
           "info": np.zeros((G, K, nb.n_packed(p)))}
    if idx.size:
        alpha = np.nan_to_num(dispersions.final[idx], nan=1.0)
        part = site_fallback_sums(site.counts()[:, idx], site.kept.design,
                                  site.kept.size_factors, alpha, fallback.candidates[idx])
        for key, value in part.items():
            out[key][idx] = value
    return FallbackSums(**out)


@aggregator_step(writes=("fallback",))
def fallback_begin(irls_final: IRLSFit, start: FitStart) -> dict:
    """After the final IRLS: diverged or stagnating genes go to the fallback."""
    f = irls_final
    return {"fallback": start_fallback(f.beta, f.converged, f.diverged, f.stagnant,
                                       start.skip)}


@aggregator_step(writes=("fallback",))
def fallback_step(sums: FallbackSums, fallback: FallbackFit, study) -> dict:
    """Keep the best candidate; propose the next projected Newton step."""
    return {"fallback": fallback_update(fallback, sums.loglik, sums.grad, sums.info,
                                        study.n_coefs)}
