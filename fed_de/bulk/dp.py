"""Differential privacy of the DESeq2 pipeline (opt-in: ``dp_epsilon``).

Every message a site sends is a sum over its samples of per-sample contributions. A sample's
contribution is the site step evaluated on a **one-sample view** of the site (its counts row,
its metadata row, its rows of every per-sample array the site keeps); ``tests/test_dp.py``
checks, for every step of a run, that these contributions add up to the step's message. Under
DP each site releases, per array, its contributions clipped row by row to a public bound, summed,
plus its share of Gaussian noise (:mod:`fed_de.federation.dp`); the aggregator post-processes
the noisy totals (:func:`postprocess`) so the fit stays defined. The dispersion searches'
log likelihoods are released centred at a public reference point per gene
(:func:`centre_loglik`), which keeps their bound small.

Which arrays are released with noise, sent exactly (they depend on the public design only) or
not sent at all is declared here (:data:`PUBLIC`, :data:`DROPPED`, :data:`BOUNDS`); a message
field declared nowhere is refused, so a new field cannot travel unprotected.
"""

from __future__ import annotations

import copy
import math
from dataclasses import fields, replace

import numpy as np

from fed_de.bulk.state import Site, SiteState
from fed_de.federation import dp
from fed_de.federation.calls import aggregator_step, decode
from fed_de.federation.messages import Message, arrays, declared_shapes, type_hints
from fed_de.federation.secure import from_arrays
from fed_de.site import SiteData

#: SiteState fields holding one row per sample (sliced in a one-sample view).
PER_SAMPLE = ("design", "design_reduced", "cells", "size_factors_raw", "size_factors",
              "mu_disp", "replaced_counts", "pca_coords")
#: SiteState fields that cache a sum over the site's samples (recomputed in a view).
CACHES = ("lgamma_y1", "lgamma_ratio")

#: Arrays that depend on the public design alone (sample counts, X'X): sent exactly; a count
#: change cannot move them (``tests/test_dp.py`` checks it).
PUBLIC = frozenset({
    ("LogSums", "n_samples"), ("LogSums", "cell_counts"),
    ("MomentSums", "n_samples"), ("MomentSums", "xtx"),
    ("NormalisedSums", "n_samples"), ("RoughSums", "reduced.xrtxr"),
})
#: Arrays not sent under DP (zeros): the ``min_nonzero`` rule they serve is off (the noise
#: covers a sum with a single non-zero contributor; a noisy count would withhold genes at
#: random).
DROPPED = frozenset({("LogSums", "cell_nonzero")})

#: Public per-row L2 clip bounds of one sample's contribution (a row: one gene, or one
#: requested (gene, dispersion) point). Chosen once on the simulated demo study
#: (``benchmarks/privacy/dp_accuracy.py --calibrate``: about the 95th percentile of the
#: per-sample row norms, rounded up to 1, 2 or 5 times a power of ten), never on the study
#: analysed. ``dp_clip`` scales them all.
BOUNDS = {
    ("LogSums", "sum_log"): 10.0,
    ("LogSums", "n_zero"): 1.0,
    ("MomentSums", "sum_norm"): 2000.0,
    ("MomentSums", "sum_norm_sq"): 2e6,
    ("MomentSums", "sum_inv_sf"): 2.0,
    ("MomentSums", "sum_log_sf"): 0.5,
    ("MomentSums", "xty"): 5000.0,
    ("MomentSums", "cell_norm"): 2000.0,
    ("MomentSums", "cells.sumsq"): 2e6,  # as sum_norm_sq and xt_logy (one cell per sample)
    ("MomentSums", "cells.logsum"): 20.0,
    ("RoughSums", "rough"): 1.0,
    ("RoughSums", "xt_logy"): 20.0,
    ("RoughSums", "xt_loglin"): 20.0,
    ("IRLSSums", "full.xtwx"): 100.0,
    ("IRLSSums", "full.xtwz"): 500.0,
    ("IRLSSums", "full.deviance"): 50.0,
    ("IRLSSums", "full.xtwx_obs"): 100.0,
    ("DispSums", "ll"): 10.0,  # centred (centre_loglik)
    ("DispSums", "d1"): 2.0,
    ("DispSums", "d2"): 2.0,
    ("DispSums", "A"): 500.0,
    ("DispSums", "A1"): 200.0,
    ("DispSums", "A2"): 100.0,
    ("FallbackSums", "loglik"): 50.0,  # fallback: not reached on the demo; set like IRLS
    ("FallbackSums", "grad"): 100.0,
    ("FallbackSums", "info"): 100.0,
    ("ClosingSums", "xtwx"): 100.0,
    ("ClosingSums", "deviance"): 20.0,
    ("BoxedSums", "loglik"): 50.0,  # as the fallback's and the closing sums
    ("BoxedSums", "grad"): 100.0,
    ("BoxedSums", "info"): 100.0,
    ("BoxedSums", "xtwx"): 100.0,
    ("BoxedSums", "deviance"): 20.0,
    ("BoxedSums", "deviance_free"): 20.0,
}
#: Packed X'WX-like arrays the aggregator projects onto positive definite matrices.
GRAMS = {("IRLSSums", "full.xtwx"), ("DispSums", "A"), ("ClosingSums", "xtwx"),
         ("BoxedSums", "xtwx")}
#: Sums of non-negative terms the aggregator clamps at 0.
NONNEG = {("LogSums", "n_zero"), ("MomentSums", "sum_norm"), ("MomentSums", "sum_norm_sq"),
          ("MomentSums", "sum_inv_sf"), ("MomentSums", "cell_norm"), ("MomentSums", "cells.sumsq"),
          ("IRLSSums", "full.deviance"), ("ClosingSums", "deviance"), ("BoxedSums", "deviance"),
          ("BoxedSums", "deviance_free")}
#: Optional message parts no DP run sends (LRT, Cook's and refit are refused or off under DP).
UNUSED_PARTS = ("reduced.", "raw.", "cooks.")


#: Messages that carry other steps' messages as parts (a fused round): their arrays take the
#: rules of the part's own message.
FUSED = {"ClosingFitSums": {"fit": "IRLSSums", "closing": "BoxedSums"}}


def resolve(kind: str, key: str) -> tuple[str, str]:
    """The (message, array) whose rules an array follows: itself, or in a fused message the
    part's own message and key."""
    head, _, rest = key.partition(".")
    if kind in FUSED and head in FUSED[kind]:
        return FUSED[kind][head], rest
    return kind, key


def rule(kind: str, key: str) -> str:
    """``"public"``, ``"dropped"`` or ``"noised"``; an undeclared array raises."""
    kind, key = resolve(kind, key)
    if (kind, key) in PUBLIC:
        return "public"
    if (kind, key) in DROPPED:
        return "dropped"
    if (kind, key) in BOUNDS:
        return "noised"
    raise ValueError(f"{kind}.{key} has no differential-privacy rule (fed_de.bulk.dp): "
                     "declare it public, dropped or give it a clip bound")


# -- one-sample views ------------------------------------------------------------------------------
def sample_view(site: Site, kept: SiteState, j: int, counts: np.ndarray) -> Site:
    """The site as if it held sample ``j`` alone: its data row, its rows of every per-sample
    array ``kept`` holds, caches emptied. ``counts`` are the site's analysed counts."""
    data = site.data
    one = SiteData(name=data.name, counts=data.counts[j:j + 1], genes=data.genes,
                   samples=data.samples[j:j + 1], _obs=data._obs.iloc[j:j + 1],
                   count_layers=data.count_layers)
    values = {}
    for f in fields(SiteState):
        value = getattr(kept, f.name)
        if f.name in CACHES or value is None:
            values[f.name] = None
        elif f.name in PER_SAMPLE:
            values[f.name] = value[j:j + 1]
        else:
            raise TypeError(f"SiteState.{f.name} is neither per-sample nor a cache "
                            "(fed_de.bulk.dp.PER_SAMPLE / CACHES)")
    values["replaced_counts"] = counts[j:j + 1]  # the analysed counts (a cache of counts())
    return replace(site, data=one, kept=SiteState(**values), one_sample=True)


def contributions(fn, state, provided: dict, params: dict, kept: SiteState,
                  invoke) -> list[dict[str, np.ndarray]]:
    """Each sample's contribution to the message of ``fn``: the step evaluated on its
    one-sample view (from the local state ``kept`` the step started from)."""
    site = provided["site"]
    counts = Site(data=site.data, kept=kept, study=site.study, options=site.options,
                  reduced=site.reduced).counts()
    out = []
    for j in range(site.data.n_samples):
        view = sample_view(site, kept, j, counts)
        out.append(arrays(invoke(fn, state, {**provided, "site": view}, params)))
    return out


def private_message(fn, state, provided: dict, params: dict, invoke, z: float,
                    n_sites: int, rng: np.random.Generator | None = None) -> Message:
    """The message of site step ``fn`` under DP: public arrays exact, dropped arrays zero,
    every other array clipped per sample, summed and noised (this site's noise share)."""
    site = provided["site"]
    before = copy.copy(site.kept)
    message = invoke(fn, state, provided, params)  # the real step: checks, keeps its state
    flat = arrays(message)
    kind = type(message).__name__
    if not any(rule(kind, k) == "noised" for k in flat):
        return message
    # centred whenever noise or clipping acts (the bound is for centred values); raw only in
    # the exact mode (no noise, no clipping) that reproduces the plain run
    scale = site.options.dp_clip
    parts = released_contributions(kind, fn, state, provided, params, before, invoke,
                                   centre=z > 0 or math.isfinite(scale))
    rng = rng if rng is not None else np.random.default_rng()
    out = {}
    for key, value in flat.items():
        how = rule(kind, key)
        if how == "public":
            out[key] = value
        elif how == "dropped":
            out[key] = np.zeros_like(value)
        else:
            stacked = np.stack([np.asarray(p[key], dtype=np.float64) for p in parts])
            out[key] = dp.release(stacked, BOUNDS[resolve(kind, key)] * scale, z, n_sites,
                                  rng)
    return from_arrays(type(message), out)


def released_contributions(kind: str, fn, state, provided: dict, params: dict,
                           kept: SiteState, invoke, centre: bool = True
                           ) -> list[dict[str, np.ndarray]]:
    """The per-sample contributions a site clips and releases: :func:`contributions`, with
    (``centre``) the dispersion searches' log likelihoods centred (:func:`centre_loglik`)."""
    parts = contributions(fn, state, provided, params, kept, invoke)
    if centre and kind == "DispSums":
        centre_loglik(parts, fn, state, provided, params, kept, invoke)
    return parts


def reference_log_alpha(state) -> np.ndarray:
    """A public log dispersion per gene, fixed for the whole run: DESeq2's starting estimate
    ``alpha_hat`` (1 for genes out of the fit)."""
    start = state.start
    alpha = np.where(start.skip, 1.0, np.nan_to_num(start.alpha_hat, nan=1.0))
    return np.log(np.clip(alpha, 1e-8, 1e4))


def centre_loglik(parts: list, fn, state, provided: dict, params: dict, kept: SiteState,
                  invoke) -> None:
    """Each sample's log likelihood at a (gene, log alpha) point minus its own at the gene's
    reference point (:func:`reference_log_alpha`), in place.

    The dispersion searches compare a gene's objective between points, so a per-gene constant
    changes none of their moves (only the scale of two relative tolerances); the centred
    values are a few units where the raw ones reach thousands, so their clip bound, and the
    noise, are hundreds of times smaller. Still a function of the sample alone.
    """
    disp = state.disp
    ref = replace(disp, pair_point=reference_log_alpha(state)[disp.pair_gene])
    at_ref = contributions(fn, replace(state, disp=ref), provided, params, kept, invoke)
    for part, base in zip(parts, at_ref, strict=True):
        part["ll"] = part["ll"] - base["ll"]


# -- a DP-only estimator choice --------------------------------------------------------------
@aggregator_step(writes=("dispersions",))
def floor_at_trend(dispersions) -> dict:
    """Under DP, final dispersions no lower than the trend (post-processing; not DESeq2's).

    Noise sends gene-wise estimates to the lower bound and the MAP after them, and the Wald
    test then takes a far too small dispersion as exact; the trend, fitted over all genes,
    is the stable part (``benchmarks/privacy/README.md``)."""
    final = np.fmax(dispersions.final, dispersions.fit)
    return {"dispersions": replace(dispersions, final=final)}


# -- the aggregator's post-processing ------------------------------------------------------------
def postprocess(sums: Message, p: int) -> Message:
    """Noisy totals made usable (post-processing: free under DP): X'WX-like sums projected
    onto positive definite matrices, sums of non-negative terms clamped at 0, zero counts
    rounded to whole numbers."""
    if sums is None:
        return sums
    kind = type(sums).__name__
    flat = arrays(sums)
    out = {}
    for key, value in flat.items():
        value = np.asarray(value, dtype=np.float64)
        if resolve(kind, key) in GRAMS:
            value = dp.nearest_psd_packed(value, p)
        if resolve(kind, key) in NONNEG:
            value = np.maximum(value, 0.0)
        if (kind, key) == ("LogSums", "n_zero"):
            value = np.minimum(np.round(value), float(flat["n_samples"]))
        out[key] = value
    return from_arrays(type(sums), out)


# -- the accountant's plan -------------------------------------------------------------------------
def releases(message_type: type, dims: dict[str, int]) -> int:
    """Noised arrays one site step's message releases (parts no DP run sends left out)."""
    if message_type is None:
        return 0
    kind = message_type.__name__
    return sum(1 for key in declared_shapes(message_type, dims)
               if not resolve(kind, key)[1].startswith(UNUSED_PARTS)
               and rule(kind, key) == "noised")


def step_message_type(step) -> type | None:
    """The message class a plan's site step (a Call or function) returns."""
    from fed_de.federation.calls import as_call

    ((fn, _),) = decode(as_call(step).encode(), "site")
    return type_hints(fn).get("return")


def phase_releases(phases, dims: dict[str, int]) -> dict[str, int]:
    """Noised arrays released per phase of the plan (the plan is static: known up front)."""
    out: dict[str, int] = {}
    for phase in phases:
        count = sum(releases(step_message_type(r.local), dims) for r in phase.rounds)
        out[phase.name] = out.get(phase.name, 0) + count
    return out


def budget(epsilon: float, delta: float, per_phase: dict[str, int], n_sites: int,
           clip: float) -> dict:
    """The run's privacy accounting: total and per-phase (rho, epsilon) at ``delta``, the
    noise multiplier, and what ``t`` colluding sites leave of the guarantee."""
    rho = dp.rho_from_epsilon(epsilon, delta)
    n = sum(per_phase.values())
    z = dp.noise_multiplier(n, rho)
    each = dp.gaussian_rho(1.0, z) if z else math.inf
    phases = {name: {"releases": k, "rho": k * each,
                     "epsilon": dp.epsilon_from_rho(k * each, delta) if k else 0.0}
              for name, k in per_phase.items()}
    collude = {}
    for t in range(1, max(n_sites, 1)):
        r = rho * n_sites / (n_sites - t)
        collude[str(t)] = {"rho": r, "epsilon": dp.epsilon_from_rho(r, delta)}
    return {"epsilon": epsilon, "delta": delta, "rho": rho, "noise_multiplier": z,
            "releases": n, "per_phase": phases, "clip_scale": clip,
            "clip_bounds": {f"{kind}.{key}": bound * clip
                            for (kind, key), bound in BOUNDS.items()},
            "public": sorted(f"{kind}.{key}" for kind, key in PUBLIC),
            "not_sent": sorted(f"{kind}.{key}" for kind, key in DROPPED),
            "neighbouring": "one sample's counts replaced (metadata and design public)",
            "if_t_sites_collude": collude}
