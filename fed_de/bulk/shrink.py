"""LFC shrinkage after the fit (DESeq2's ``lfcShrink``), apeglm or the normal prior, federated.

Opening (no round)  agg : for each shrunk coefficient / contrast (a :class:`Target`): its
                          parametrisation, the prior from the MLEs and standard errors
                          (apeglm's Cauchy scale, or DESeq2's ``betaPriorVar``) and the first
                          candidates, with a free first step from the fit's Fisher information
                          (:func:`shrink_begin`)
Each round          site: at each candidate of each gene, in the design's own coefficients
                          (apeglm) the NB log likelihood, its gradient and Hessian, or (normal)
                          the score of DESeq2's ridge IRLS fixed point, its Jacobian and X'WX;
                          original counts (as ``lfcShrink`` reads ``counts(dds)``), final
                          dispersions, own size factors                  (:func:`site_sums`)
                    agg : one Newton round per target (:func:`shrink_step`)
Last round          agg : posterior SDs and DESeq2's columns (:func:`shrink_finish`)

A target is a design coefficient or a contrast ``(factor, level, reference)``. apeglm shrinks
a coefficient; a contrast whose reference is not the factor's base level is shrunk in the
parametrisation R's ``relevel`` gives (what DESeq2 advises), by mapping the sums at the
aggregator (:func:`fed_de.core.apeglm.relevel_transform`). The normal prior shrinks a
coefficient in the standard design and a contrast in DESeq2's expanded design, as
``lfcShrink(type="normal")`` does. The sites always evaluate in the standard coefficients; the
aggregator maps. The math is in :mod:`fed_de.core.apeglm`, :mod:`fed_de.core.normal_prior`
and :mod:`fed_de.core.posterior`; the rounds are run by :mod:`fed_de.bulk.postfit`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from fed_de.bulk.state import GeneResults, Refit, ShrinkFit, ShrinkTarget, Site
from fed_de.core import apeglm as ap
from fed_de.core import nb
from fed_de.core import normal_prior as npr
from fed_de.core import posterior as psum
from fed_de.core.testing import contrast_vector
from fed_de.design import Study, factor_contrast_levels
from fed_de.federation.calls import aggregator_step
from fed_de.federation.messages import Message, sums

TYPES = ("apeglm", "normal")
#: Rounds each type runs by default (measured: ``benchmarks/shrink_rounds.py``, README).
DEFAULT_ROUNDS = {"apeglm": 6, "normal": 8}
LN2 = nb.LN2
#: A site marks a candidate unusable when a sum is not finite or larger than this (a mean
#: overflowing at a wild candidate); secure aggregation cannot encode such values.
SUM_LIMIT = 1e20


class ApeglmSums(Message):
    """NB log likelihood, gradient and packed Hessian at each candidate (summed over samples);
    ``bad``: 1 where the site could not evaluate the candidate (counted over sites)."""

    ll: np.ndarray = sums("G", "KS")
    grad: np.ndarray = sums("G", "KS", "p")
    hess: np.ndarray = sums("G", "KS", "T")
    bad: np.ndarray = sums("G", "KS")


class RidgeSums(Message):
    """Score of DESeq2's ridge IRLS fixed point, its Jacobian and X'WX at each candidate."""

    score: np.ndarray = sums("G", "KS", "p")
    jac: np.ndarray = sums("G", "KS", "T")
    xtwx: np.ndarray = sums("G", "KS", "T")
    bad: np.ndarray = sums("G", "KS")


# -- what is shrunk --------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A shrunk coefficient (``coef``) or contrast ``(factor, level, reference)``."""

    coef: str | None = None
    contrast: tuple | None = None

    @property
    def key(self) -> str:
        """Plain-string form (plan options, lookups)."""
        if self.coef is not None:
            return f"coef:{self.coef}"
        return "contrast:" + "|".join(self.contrast)

    @classmethod
    def from_key(cls, key: str) -> Target:
        kind, _, value = key.partition(":")
        return cls(coef=value) if kind == "coef" else cls(contrast=tuple(value.split("|")))

    @property
    def label(self) -> str:
        """DESeq2's name of the shrunk quantity (``condition_B_vs_A``)."""
        if self.coef is not None:
            return self.coef
        f, level, ref = self.contrast
        return f"{f}_{level}_vs_{ref}"


def as_target(spec, study: Study, kind: str) -> Target:
    """The :class:`Target` a user's ``shrink_coef`` names, checked against the study.

    ``spec`` is a coefficient name or ``(factor, level, reference)``. For apeglm a contrast
    against the factor's base level is that level's coefficient (the same posterior).
    """
    names = study.coef_names
    if isinstance(spec, str):
        if ";" in spec:
            raise ValueError(f"shrink_coef {spec!r}: a coefficient name may not hold ';'")
        if spec not in names:
            raise ValueError(f"shrink_coef {spec!r} is not a coefficient of the design; "
                             f"coefficients are {names}")
        return Target(coef=spec)
    if isinstance(spec, (tuple, list)) and len(spec) == 3 and all(isinstance(s, str)
                                                                  for s in spec):
        factor, level, ref = spec
        levels = factor_contrast_levels(study, factor, level, ref, "shrink contrast")
        if level == ref:
            raise ValueError(f"shrink contrast {tuple(spec)}: level and reference are the same")
        _factor_columns(study, factor, kind)  # the factor must be a plain main effect
        if kind == "apeglm" and ref == levels[0]:
            return Target(coef=f"{factor}_{level}_vs_{ref}")
        for part in spec:
            if "|" in part or ";" in part:
                raise ValueError(f"shrink contrast {tuple(spec)}: names may not hold '|' or ';'")
        return Target(contrast=tuple(spec))
    raise ValueError(f"shrink_coef must be a coefficient name or (factor, level, reference); "
                     f"got {spec!r} (numeric contrasts cannot be shrunk: DESeq2's lfcShrink "
                     "takes a coefficient for apeglm and needs a results table for normal)")


def encode_targets(targets: list[Target]) -> str:
    """The ``shrink_coef`` option: targets' keys joined by ``;``."""
    return ";".join(t.key for t in targets)


def decode_targets(encoded: str) -> list[Target]:
    """Inverse of :func:`encode_targets`."""
    return [Target.from_key(k) for k in encoded.split(";") if k]


def _factor_columns(study: Study, factor: str, kind: str) -> list[int]:
    """Columns of a factor's non-base levels; a factor only in interactions is refused."""
    names = study.coef_names
    base = study.levels[factor][0]
    wanted = [f"{factor}_{lv}_vs_{base}" for lv in study.levels[factor][1:]]
    missing = [w for w in wanted if w not in names]
    if missing:
        raise ValueError(f"factor {factor!r} is not a main effect of {study.design!r} "
                         f"(no columns {missing}); shrink a coefficient by name instead")
    if kind == "normal" and any("." in n or ":" in n for n in names):
        raise ValueError("lfcShrink(type='normal') is not defined for designs with "
                         "interactions (as in DESeq2); use shrink='apeglm' with a coefficient")
    return [names.index(w) for w in wanted]


def _intercept(study: Study) -> int:
    if "Intercept" not in study.coef_names:
        raise ValueError(f"shrinkage needs a design with an intercept; {study.design!r} has none")
    return study.coef_names.index("Intercept")


def _mle(genes: GeneResults, c: np.ndarray, refit: Refit | None) -> tuple[np.ndarray, ...]:
    """The unshrunken LFC and lfcSE of contrast ``c`` as ``results()`` reports them (natural
    log): what DESeq2 hands to apeglm as ``mle``."""
    lfc = genes.beta @ c
    se = np.sqrt(np.einsum("i,gij,j->g", c, genes.beta_cov, c))
    if refit is not None:  # DESeq2: genes all zero after replacement report LFC 0, SE 0
        lfc, se = np.where(refit.new_all_zero, 0.0, lfc), np.where(refit.new_all_zero, 0.0, se)
    return lfc, se


def _fisher_info(genes: GeneResults, ok: np.ndarray, p: int) -> np.ndarray:
    """Packed Fisher information at the MLE, inverted from the Wald covariance (the first
    step's model only: the candidates keep the MLE itself)."""
    info = np.full((ok.size, nb.n_packed(p)), np.nan)
    cov = genes.beta_cov[ok]
    good = np.isfinite(cov).all(axis=(1, 2))
    idx = np.flatnonzero(ok)[good]
    info[idx] = nb.pack(np.linalg.pinv(cov[good], hermitian=True))  # robust to singular
    return info


def _map_packed(packed: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``M^T A M`` of packed symmetric matrices (any leading shape)."""
    A = nb.unpack(packed, M.shape[0])
    return nb.pack(np.einsum("pi,...pq,qj->...ij", M, A, M))


def build_target(target: Target, kind: str, study: Study, genes: GeneResults,
                 refit: Refit | None) -> ShrinkTarget:
    """A target's parametrisation, prior and search start (aggregator, no round)."""
    ok = (~genes.all_zero & np.isfinite(genes.beta).all(axis=1)
          & np.isfinite(genes.dispersions.final))
    info = _fisher_info(genes, ok, study.n_coefs)
    build = _apeglm_target if kind == "apeglm" else _normal_target
    return build(target, study, genes, refit, ok, info)


def _apeglm_target(target: Target, study: Study, genes: GeneResults, refit: Refit | None,
                   ok: np.ndarray, info: np.ndarray) -> ShrinkTarget:
    """apeglm: a coefficient, or a contrast in the parametrisation ``relevel`` gives; the
    Cauchy scale from the contrast's MLEs and SEs; Newton from the MLE."""
    names, p = study.coef_names, study.n_coefs
    T = np.eye(p)
    if target.coef is not None:
        column = names.index(target.coef)
        c_std = np.eye(p)[column]
    else:
        factor, level, ref = target.contrast
        levels = study.levels[factor]
        cols = _factor_columns(study, factor, "apeglm")
        new_ref = cols[levels.index(ref) - 1]
        T = ap.relevel_transform(p, _intercept(study), cols, new_ref)
        column = new_ref if level == levels[0] else cols[levels.index(level) - 1]
        c_std = contrast_vector(names, factor, level, ref, levels[0])
    to_std = np.linalg.inv(T)
    scale = ap.apeglm_prior(*_mle(genes, c_std, refit))
    beta_t = np.where(ok[:, None], genes.beta @ T.T, np.nan)
    search = ap.newton_init(beta_t, active=ok, xtwx=_map_packed(info, to_std), shrink=column,
                            scale=scale)
    return ShrinkTarget(key=target.key, name=target.label, to_standard=to_std,
                        contrast=np.eye(p)[column], column=column, scale=scale, search=search)


def _normal_target(target: Target, study: Study, genes: GeneResults, refit: Refit | None,
                   ok: np.ndarray, info: np.ndarray) -> ShrinkTarget:
    """normal: DESeq2's betaPriorVar from the MLEs (log2), in the standard design for a
    coefficient, the expanded design for a contrast; Newton on the ridge IRLS fixed point."""
    names, p = study.coef_names, study.n_coefs
    intercept = _intercept(study)
    beta_log2 = np.where(ok[:, None], genes.beta, np.nan) / LN2
    base_mean, disp_fit = genes.base_mean, genes.dispersions.fit
    if target.coef is not None:
        M = E = np.eye(p)
        var = npr.normal_prior_var(beta_log2, base_mean, disp_fit, intercept=intercept)
        column = names.index(target.coef)
        contrast = np.eye(p)[column]
    else:
        factors = {f: _factor_columns(study, f, "normal") for f in study.levels}
        M, E = npr.expanded_map(np.zeros((1, p)), factors, intercept)
        _, groups = npr.expanded_design(np.zeros((1, p)), factors, intercept)
        var = npr.expanded_prior_var(beta_log2, base_mean, disp_fit, factors, M.shape[1],
                                     groups, intercept)
        factor, level, ref = target.contrast
        levels, column = study.levels[factor], -1
        contrast = np.zeros(M.shape[1])
        contrast[groups[factor][levels.index(level)]] = 1.0
        contrast[groups[factor][levels.index(ref)]] = -1.0
    lam = npr.ridge_lambda(var)
    beta_t = np.where(ok[:, None], genes.beta @ E.T, np.nan)
    search = npr.ridge_newton_init(beta_t, lam, xtwx=_map_packed(info, M), active=ok)
    return ShrinkTarget(key=target.key, name=target.label, to_standard=M, contrast=contrast,
                        column=column, prior_var=var, search=search)


def _fit(kind: str, targets: list[ShrinkTarget], rounds: int = 0) -> ShrinkFit:
    """The fit's candidates in the standard coefficients, stacked over targets."""
    cands = [t.search["candidates"] @ t.to_standard.T for t in targets]
    active = np.logical_or.reduce([t.search["active"] for t in targets])
    return ShrinkFit(type=kind, targets=targets, candidates=np.concatenate(cands, axis=1),
                     active=active, rounds=rounds)


@aggregator_step(writes=("shrink",))
def shrink_begin(genes: GeneResults, refit: Refit | None, study, options) -> dict:
    """Every target's prior and first candidates, from the final fit (no round)."""
    targets = [build_target(t, options.shrink, study, genes, refit)
               for t in decode_targets(options.shrink_coef)]
    return {"shrink": _fit(options.shrink, targets)}


# -- site side --------------------------------------------------------------------------------
def site_sums(site: Site, shrink: ShrinkFit, genes: GeneResults) -> ApeglmSums | RidgeSums:
    """The sums at every candidate of the genes still searching (zeros elsewhere)."""
    G, K, p = shrink.candidates.shape
    T = p * (p + 1) // 2
    idx = np.flatnonzero(shrink.active)
    if idx.size == 0:  # every search has ended: the same shapes, all zeros
        if shrink.type == "apeglm":
            return ApeglmSums(ll=np.zeros((G, K)), grad=np.zeros((G, K, p)),
                              hess=np.zeros((G, K, T)), bad=np.zeros((G, K)))
        return RidgeSums(score=np.zeros((G, K, p)), jac=np.zeros((G, K, T)),
                         xtwx=np.zeros((G, K, T)), bad=np.zeros((G, K)))
    X, log_sf = site.kept.design, np.log(site.kept.size_factors)
    y = site.original_counts()[:, idx]
    alpha = genes.dispersions.final[idx]
    cands = shrink.candidates[idx]
    if shrink.type == "apeglm":
        ll, grad, hess = ap.nb_loglik_grad_hess(y, X, log_sf, cands, alpha)
        part = {"ll": ll, "grad": grad, "hess": hess}
    else:
        part = npr.ridge_fixed_point_summands(y, X, log_sf, cands, alpha)
    bad = np.zeros((idx.size, K), dtype=bool)
    for value in part.values():
        v = value.reshape(idx.size, K, -1)
        bad |= ~(np.abs(v) <= SUM_LIMIT).all(axis=2)  # NaN fails the comparison too
    out = {"bad": np.zeros((G, K))}
    out["bad"][idx] = bad
    for key, value in part.items():
        full = np.zeros((G,) + value.shape[1:])
        full[idx] = np.where(bad.reshape(bad.shape + (1,) * (value.ndim - 2)), 0.0, value)
        out[key] = full
    return ApeglmSums(**out) if shrink.type == "apeglm" else RidgeSums(**out)


# -- aggregator side --------------------------------------------------------------------------
def _apeglm_round(t: ShrinkTarget, s: ApeglmSums, sl: slice) -> dict:
    M = t.to_standard
    bad = s.bad[:, sl] > 0
    ll = np.where(bad, -np.inf, s.ll[:, sl])
    grad = s.grad[:, sl] @ M
    hess = _map_packed(s.hess[:, sl], M)
    return ap.penalised_newton_step(t.search, ll, grad, hess, t.column, t.scale)


def _normal_round(t: ShrinkTarget, s: RidgeSums, sl: slice) -> dict:
    M = t.to_standard
    bad = (s.bad[:, sl] > 0)[..., None]
    part = {"score": np.where(bad, np.nan, s.score[:, sl] @ M),
            "jac": _map_packed(s.jac[:, sl], M), "xtwx": _map_packed(s.xtwx[:, sl], M)}
    return npr.ridge_newton_step(t.search, part, npr.ridge_lambda(t.prior_var))


@aggregator_step(writes=("shrink",))
def shrink_step(sums, shrink: ShrinkFit) -> dict:
    """One Newton round of every target's search from the summed sums."""
    part = sums.apeglm if shrink.type == "apeglm" else sums.normal
    step = _apeglm_round if shrink.type == "apeglm" else _normal_round
    targets, start = [], 0
    for t in shrink.targets:
        k = t.search["candidates"].shape[1]
        targets.append(replace(t, search=step(t, part, slice(start, start + k))))
        start += k
    return {"shrink": _fit(shrink.type, targets, shrink.rounds + 1)}


def last_step(t: ShrinkTarget) -> np.ndarray:
    """Per gene, the size of the step the search would take next (natural log): how far a
    gene that did not meet the 1e-10 stopping rule may still be from its optimum."""
    step = t.search["step"] if "step" in t.search else t.search["newton"]
    return np.abs(step).max(axis=1)


def _finish_target(t: ShrinkTarget, kind: str) -> ShrinkTarget:
    st, c = t.search, t.contrast
    q = c.size
    fitted = st["fitted"]
    if kind == "apeglm":
        sd, _ = ap.posterior_sd(st["hess"], q)
        lfc = st["beta"][:, t.column] / LN2
        se = sd[:, t.column] / LN2
        post_sd = se
    else:
        lam = npr.ridge_lambda(t.prior_var)
        _, cov = npr.ridge_se(st["xtwx"], lam)
        lfc = st["beta"] @ c / LN2
        se = np.sqrt(np.einsum("i,gij,j->g", c, cov, c)) / LN2
        # the Laplace posterior of the ridge fit: N(mode, (X'WX + L)^-1)
        A = nb.unpack(np.nan_to_num(st["xtwx"]), q) + np.diag(lam)
        cs = np.broadcast_to(c, (A.shape[0], q))
        post_var = np.einsum("gi,gi->g", np.linalg.solve(A, cs[..., None])[..., 0], cs)
        post_sd = np.sqrt(post_var) / LN2
    nan = ~fitted | ~np.isfinite(se)
    return replace(t, lfc=np.where(nan, np.nan, lfc), lfc_se=np.where(nan, np.nan, se),
                   posterior_sd=np.where(nan, np.nan, post_sd),
                   converged=st["converged"] & fitted)


@aggregator_step(writes=("shrink",))
def shrink_finish(shrink: ShrinkFit) -> dict:
    """Each target's shrunken LFC, lfcSE and posterior SD (log2); genes not fitted (all zero,
    no dispersion) are NaN."""
    return {"shrink": replace(shrink, targets=[_finish_target(t, shrink.type)
                                               for t in shrink.targets])}


# -- tables (DESeq2Result.lfc_shrink / posterior) -----------------------------------------------
class ShrinkNotComputedError(ValueError):
    """The run did not shrink what is asked (shrinkage needs rounds over the sites' data)."""


def find_target(shrink: ShrinkFit | None, target: Target, kind: str | None) -> ShrinkTarget:
    """The run's result for ``target``; :class:`ShrinkNotComputedError` names what the run did and
    how to get the rest."""
    done = [] if shrink is None else [t.name for t in shrink.targets]
    if shrink is not None and kind in (None, shrink.type):
        for t in shrink.targets:
            if t.key == target.key:
                return t
    what = f"type={kind or (shrink.type if shrink else 'apeglm')!r} of {target.label!r}"
    did = (f"this run shrank {done} with {shrink.type!r}" if shrink is not None
           else "this run did not shrink")
    raise ShrinkNotComputedError(
        f"lfc_shrink {what}: {did}. Shrinkage needs rounds over the sites' data, so it is "
        "computed during the run, not afterwards: run again with fed_de.deseq2(..., "
        "shrink='apeglm' or 'normal', shrink_coef=[...]) (fed-de run --shrink TYPE "
        "--shrink-coef ...)")


def shrink_table(base: pd.DataFrame, t: ShrinkTarget, kind: str, svalue_col: bool,
                 svalues: np.ndarray | None = None) -> pd.DataFrame:
    """DESeq2's ``lfcShrink`` table from the unshrunken ``results()`` table ``base``.

    apeglm: baseMean, log2FoldChange, lfcSE (posterior SD), pvalue, padj; with ``svalue``:
    baseMean, log2FoldChange, lfcSE, svalue (DESeq2 drops the p-values then). normal:
    ``results()``'s columns with log2FoldChange and lfcSE replaced.
    """
    out = base.copy()
    out["log2FoldChange"] = t.lfc
    out["lfcSE"] = t.lfc_se
    if kind == "apeglm":
        if svalue_col:
            out = out[["baseMean", "log2FoldChange", "lfcSE"]].copy()
            out["svalue"] = svalues
            return out
        return out[["baseMean", "log2FoldChange", "lfcSE", "pvalue", "padj"]]
    return out


def _resolve(res, contrast, kind: str | None) -> tuple[ShrinkTarget, str, object]:
    """The run's shrunk target for ``contrast`` (default: the run's first), its type, and
    the contrast ``results()`` takes for the unshrunken columns."""
    sh = res.state.shrink
    if contrast is None and sh is not None and kind in (None, sh.type):
        target = Target.from_key(sh.targets[0].key)
    else:
        if contrast is None:
            contrast = res.contrasts[0] if res.contrasts else res.study.coef_names[-1]
        target = as_target(contrast, res.study, kind or (sh.type if sh else "apeglm"))
    found = find_target(sh, target, kind)
    return found, sh.type, target.coef if target.coef is not None else target.contrast


def lfc_shrink(res, contrast=None, kind: str | None = None, svalue: bool = False
               ) -> pd.DataFrame:
    """``DESeq2Result.lfc_shrink``: DESeq2's ``lfcShrink`` table from what the run computed."""
    t, kind, asked = _resolve(res, contrast, kind)
    if svalue and kind != "apeglm":
        raise ValueError("svalue=True is defined for apeglm only (as in DESeq2)")
    base = res.results(asked)
    lfsr = psum.posterior_summaries(t.lfc, t.posterior_sd)["lfsr"]
    return shrink_table(base, t, kind, svalue, psum.svalue(lfsr))


#: Columns :func:`posterior` adds, in order.
POSTERIOR_COLUMNS = ("posteriorMean", "posteriorSD", "lfsr", "svalue", "probAbsLFCgt",
                     "credLower", "credUpper")


def posterior(res, contrast=None, kind: str | None = None, threshold: float = 0.0,
              level: float = 0.9) -> pd.DataFrame:
    """``DESeq2Result.posterior``: per gene, the Laplace posterior of the shrunken LFC (log2):
    mean, SD, local false sign rate, s-value, P(|LFC| > ``threshold``) and the central
    ``level`` credible interval."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (a |LFC|, log2), got {threshold!r}")
    t, kind, _ = _resolve(res, contrast, kind)
    post = psum.posterior_summaries(t.lfc, t.posterior_sd, threshold, level)
    frame = pd.DataFrame({"baseMean": res.gene_results.base_mean,
                          "posteriorMean": post["mean"], "posteriorSD": post["sd"],
                          "lfsr": post["lfsr"], "svalue": post["svalue"],
                          "probAbsLFCgt": post["p_gt"], "credLower": post["lower"],
                          "credUpper": post["upper"]}, index=res.genes)
    frame.index.name = "gene"
    frame.attrs.update(contrast=t.name, type=kind, threshold=float(threshold),
                       level=float(level))
    return frame
