"""Federated IRLS for the NB GLM (DESeq2's ``fitBeta``), unrolled to a fixed number of rounds.

Each round  site : at every candidate betas of a gene, the packed X'WX, X'Wz and the deviance
                   (the ``fitBeta`` sums, :func:`irls_sums`); genes that stopped are sent as
                   zeros (fixed shape)
            agg  : :func:`fed_de.core.irls.irls_update` (the acceleration and stopping rules
                   are documented there)
``stage`` names the fit: ``"mu"`` (the means of the dispersion estimates, with the rough
dispersions) or ``"final"`` (with the final dispersions; the LRT's reduced model advances in
the same rounds, its sums in the ``reduced`` part of the message).
"""

from __future__ import annotations

import numpy as np

from fed_de.bulk import fallback, rough
from fed_de.bulk.state import Dispersions, FitStart, Site, Totals
from fed_de.core import lrt, nb
from fed_de.core.irls import MIN_MU, IRLSFit, irls_update, settled, start_irls
from fed_de.federation.calls import aggregator_step, call, reads_except, site_step
from fed_de.federation.messages import Message, part, sums
from fed_de.federation.strategy import Phase, Round


class FitSums(Message):
    """``fitBeta`` sums at each candidate of each gene, and the observed information."""

    xtwx: np.ndarray = sums("G", "KB", "T", narrow=True)
    xtwz: np.ndarray = sums("G", "KB", "p", narrow=True)
    deviance: np.ndarray = sums("G", "KB", narrow=True)
    xtwx_obs: np.ndarray = sums("G", "KB", "T", narrow=True)


class ReducedFitSums(Message):
    """The same for the LRT's reduced model."""

    xtwx: np.ndarray = sums("G", "KB", "Tr", narrow=True)
    xtwz: np.ndarray = sums("G", "KB", "pr", narrow=True)
    deviance: np.ndarray = sums("G", "KB", narrow=True)
    xtwx_obs: np.ndarray = sums("G", "KB", "Tr", narrow=True)


class RawDeviances(Message):
    """-2 log likelihood with unfloored means (R's ``logLike``) at each candidate of the full
    and the reduced model: the LRT of a fit that ends without a closing round (the refit)."""

    full: np.ndarray = sums("G", "KB", narrow=True)
    reduced: np.ndarray = sums("G", "KB", narrow=True)


class IRLSSums(Message):
    """One IRLS round: the fit's sums, and the reduced model's (LRT, final stage)."""

    full: FitSums = part()
    reduced: ReducedFitSums | None = part()
    raw: RawDeviances | None = part()


def _fit_sums(site: Site, fit: IRLSFit, alpha: np.ndarray, X: np.ndarray) -> dict:
    """The sums of one fit; only genes still iterating are computed."""
    idx = np.flatnonzero(~fit.stopped)
    G, K, p = fit.candidates.shape
    alpha = np.nan_to_num(alpha, nan=1.0)
    out = {"xtwx": np.zeros((G, K, nb.n_packed(p))), "xtwz": np.zeros((G, K, p)),
           "deviance": np.zeros((G, K)), "xtwx_obs": np.zeros((G, K, nb.n_packed(p)))}
    sums = nb.irls_candidate_sums(site.counts(), idx, X, site.kept.size_factors,
                                  fit.candidates[idx], alpha[idx], MIN_MU,
                                  site.lgamma_y1()[idx], site.lgamma_ratio(alpha)[idx])
    for key, value in sums.items():
        out[key][idx] = value
    return out


def fit_alpha(stage: str, start: FitStart, dispersions: Dispersions | None) -> np.ndarray:
    """Dispersions a stage fits with: the rough ones (``mu``) or the final ones."""
    return start.alpha_hat if stage == "mu" else dispersions.final


def _raw_deviances(site: Site, start: FitStart, fit: IRLSFit, irls_reduced: IRLSFit | None,
                   alpha: np.ndarray) -> RawDeviances:
    """Unfloored deviances of both models at every candidate (genes of this fit pass)."""
    G, K, _ = fit.candidates.shape
    out = {"full": np.zeros((G, K)), "reduced": np.zeros((G, K))}
    idx = np.flatnonzero(~start.skip)
    alpha = np.nan_to_num(alpha, nan=1.0)[idx]
    y, sf = site.counts()[:, idx], site.kept.size_factors
    X, Xr = site.kept.design, site.kept.design_reduced
    for k in range(K):
        beta_r = None if irls_reduced is None else irls_reduced.candidates[idx, k]
        dev = lrt.lrt_site_deviances(y, sf, X, fit.candidates[idx, k],
                                     None if beta_r is None else Xr, beta_r, alpha)
        out["full"][idx, k] = dev["deviance"]
        if beta_r is not None:
            out["reduced"][idx, k] = dev["deviance_r"]
    if irls_reduced is None:  # ``~ 1``: one point for every candidate, computed once
        out["reduced"][idx] = lrt.lrt_site_deviances(
            y, sf, Xr, lrt.intercept_only_beta(start.base_mean[idx]), None, None,
            alpha)["deviance"][:, None]
    return RawDeviances(**out)


def _other_stage(params: dict) -> set[str]:
    """The IRLS fit a stage's steps do not read: the final fit's while the dispersion-fit
    means are fitted, then the means' (dead once the final fit has started)."""
    return {"irls_final"} if params.get("stage", "final") == "mu" else {"irls_mu"}


@reads_except(_other_stage)
@site_step
def irls_sums(site: Site, start: FitStart, dispersions: Dispersions | None,
              irls_mu: IRLSFit | None, irls_final: IRLSFit | None,
              irls_reduced: IRLSFit | None, stage: str = "final",
              raw: bool = False) -> IRLSSums:
    """IRLS sums at each candidate of ``stage`` (and of the reduced model, LRT); with
    ``raw``, both models' unfloored deviances at the candidates too."""
    fit = irls_mu if stage == "mu" else irls_final
    alpha = fit_alpha(stage, start, dispersions)
    full = FitSums(**_fit_sums(site, fit, alpha, site.kept.design))
    reduced = None
    if stage == "final" and irls_reduced is not None:
        reduced = ReducedFitSums(**_fit_sums(site, irls_reduced, dispersions.final,
                                             site.kept.design_reduced))
    raw_part = _raw_deviances(site, start, fit, irls_reduced, alpha) if raw else None
    return IRLSSums(full=full, reduced=reduced, raw=raw_part)


@reads_except(_other_stage)
@aggregator_step(writes=("irls_mu", "irls_final", "irls_reduced"))
def irls_step(sums: IRLSSums, irls_mu: IRLSFit | None, irls_final: IRLSFit | None,
              irls_reduced: IRLSFit | None, study, reduced, stage: str = "final") -> dict:
    """Keep the best candidate, test convergence, propose the next candidates."""
    fit = irls_mu if stage == "mu" else irls_final
    s = sums.full
    out = {f"irls_{stage}": irls_update(fit, s.xtwx, s.xtwz, s.deviance, study.n_coefs,
                                        s.xtwx_obs)}
    if sums.reduced is not None:  # LRT: the reduced model's fit advances in the same round
        r = sums.reduced
        out["irls_reduced"] = irls_update(irls_reduced, r.xtwx, r.xtwz, r.deviance,
                                          reduced.n_coefs, r.xtwx_obs)
    return out


@aggregator_step(writes=("irls_mu",))
def start_mu_fit(totals: Totals, start: FitStart) -> dict:
    """The IRLS of the dispersion-fit means, unless the linear fit serves (cell means)."""
    frozen = start.skip | bool(totals.linear_mu)
    return {"irls_mu": start_irls(start.beta_init, frozen, start.beta_alt, keep_xtwx=False)}


@aggregator_step(writes=("irls_mu",))
def settle_mu_fit(irls_mu: IRLSFit) -> dict:
    """The dispersion-fit means' fit once its rounds are over: later steps read its
    coefficients only (the means of the dispersion rounds, of a resumed site, the final fit's
    start), so its candidates and history stop travelling."""
    return {"irls_mu": settled(irls_mu)}


@aggregator_step(writes=("irls_final", "irls_reduced"))
def start_final_fit(start: FitStart, irls_mu: IRLSFit) -> dict:
    """The final IRLS, warm-started from the dispersion-fit betas (or the cell-means start);
    the LRT's reduced fit runs in the same rounds."""
    warm = irls_mu.beta if start.mu_rounds else start.beta_alt
    warm = np.where(np.isfinite(warm), warm, start.beta_init)
    out = {"irls_final": start_irls(warm, start.skip, start.beta_init)}
    if start.beta_init_reduced is not None:
        out["irls_reduced"] = start_irls(start.beta_init_reduced, start.skip,
                                         start.beta_alt_reduced)
    return out


def mu_fit_phase(mu_rounds: int, from_cells: bool = False) -> Phase:
    """Rough dispersions and IRLS starts, then the IRLS of the dispersion-fit means;
    ``from_cells``: the starts from the moments round's cell sums (no rough round)."""
    mu = [Round(call(irls_sums, stage="mu"), [call(irls_step, stage="mu")])] * mu_rounds
    if from_cells:
        return Phase("mu_fit", opening=[call(rough.rough_from_cells, mu_rounds=mu_rounds),
                                        start_mu_fit], rounds=mu, closing=[settle_mu_fit])
    return Phase("mu_fit", rounds=[
        Round(rough.rough_sums, [call(rough.rough_start, mu_rounds=mu_rounds), start_mu_fit]),
        *mu], closing=[settle_mu_fit])


def final_fit_phase(final_rounds: int, fallback_rounds: int,
                    last: Round | None = None) -> Phase:
    """The final IRLS (from the final dispersions), then the fallback of unconverged genes;
    ``last`` replaces the last IRLS round and the one fallback round (a round that runs
    both and closes the fit)."""
    step = Round(call(irls_sums, stage="final"), [call(irls_step, stage="final")])
    rounds = [Round(step.local, list(step.steps)) for _ in range(final_rounds)]
    if last is not None:
        if fallback_rounds != 1:
            raise ValueError("a closing IRLS round runs exactly one fallback round")
        return Phase("final_fit", opening=[start_final_fit], rounds=[*rounds[:-1], last])
    rounds[-1].steps.append(fallback.fallback_begin)
    rounds += [Round(fallback.fallback_sums, [fallback.fallback_step])
               for _ in range(fallback_rounds)]
    return Phase("final_fit", opening=[start_final_fit], rounds=rounds)
