"""The Python entry points of the bulk pipeline: ``fed_de.size_factors`` and ``fed_de.deseq2``."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fed_de.backends import check_backend, n_declared_sites, run, secure_option
from fed_de.bulk.results import DESeq2Result
from fed_de.design import Study, formula_variables, make_study
from fed_de.site import SiteData, load_site


def load_sites(sites: Mapping) -> list[SiteData]:
    """Load every site (AnnData, ``.h5ad`` path or CSV folder), keeping the mapping's order."""
    if not sites:
        raise ValueError("no site given: pass a mapping of site names to AnnData objects or paths")
    return [load_site(src, str(name)) for name, src in sites.items()]


def declare_study(
    sites: list[SiteData],
    design: str,
    levels: Mapping[str, list] | None = None,
    genes: list[str] | None = None,
) -> Study:
    """The study for a run where the caller holds every site (simulation, tests, demos).

    Levels not declared are taken from the sites' metadata in sorted order (R's default
    factor order) and the gene list from the first site. On a real network the study is
    declared by the user and never read from sites: pass ``levels`` and ``genes``.
    """
    levels = {k: [str(x) for x in v] for k, v in (levels or {}).items()}
    for var in formula_variables(design):
        if var in levels:
            continue
        values = pd.concat([s.obs[var] for s in sites if var in s.obs.columns])
        if values.empty or pd.api.types.is_numeric_dtype(values):
            continue
        levels[var] = sorted(values.dropna().astype(str).unique())
    return make_study(design, list(genes) if genes is not None else list(sites[0].genes), levels)


@dataclass
class SizeFactorResult:
    """Size factors (one Series per site, as each site holds them) and baseMean."""

    size_factors: dict[str, pd.Series]
    base_mean: pd.Series
    facts: dict = field(default_factory=dict)


def size_factors(
    sites: Mapping,
    design: str = "~ 1",
    *,
    levels: Mapping[str, list] | None = None,
    genes: list[str] | None = None,
    kind: str = "ratio",
    min_cell_size: int = 3,
    backend: str = "simulation",
) -> SizeFactorResult:
    """Federated median-of-ratios size factors (``kind="ratio"`` or ``"poscounts"``)."""
    from fed_de.bulk.strategy import SizeFactorsStrategy

    if backend != "simulation":
        raise ValueError("size_factors() runs in simulation; the substra backends run the "
                         "full pipeline through deseq2(backend=...)")
    loaded = load_sites(sites)
    study = declare_study(loaded, design, levels, genes)
    strategy = SizeFactorsStrategy(study.to_dict(), size_factors=kind, min_cell_size=min_cell_size,
                                   n_sites=len(loaded))
    done = run(strategy, loaded)
    sf = {s.name: pd.Series(done.local_states[s.name].size_factors, index=list(s.samples),
                            name="size_factor") for s in loaded}
    bm = pd.Series(np.asarray(done.state.start.base_mean), index=study.genes, name="baseMean")
    return SizeFactorResult(size_factors=sf, base_mean=bm, facts=done.facts)


def check_disclosure_options(min_cell_size: int, min_pooled_cell_size: int,
                             n_sites: int) -> None:
    """Refuse a pooled-cell minimum the attack breaks; warn between 10 and 14."""
    if min_cell_size <= 0 or n_sites < 2 or min_pooled_cell_size >= 15:
        return
    if min_pooled_cell_size < 10:
        raise ValueError(
            f"min_pooled_cell_size={min_pooled_cell_size}: below 10 samples per pooled design "
            "cell the aggregator can solve the sums for the samples' counts (docs/privacy.md). "
            "Use 10 or more, or min_cell_size=0 to turn disclosure control off (an audited "
            "study only)")
    warnings.warn(f"min_pooled_cell_size={min_pooled_cell_size}: pooled design cells of 10-14 "
                  "samples are at the edge of what the attack recovers (docs/privacy.md)",
                  stacklevel=3)


def _needs_levels(design: str) -> bool:
    return bool(formula_variables(design))


def deseq2(
    sites: Mapping,
    design: str,
    *,
    contrasts: list | None = None,
    alpha: float = 0.1,
    levels: Mapping[str, list] | None = None,
    genes: list[str] | None = None,
    size_factors: str = "ratio",
    fit_type: str = "parametric",
    min_cell_size: int = 3,
    min_pooled_cell_size: int = 15,
    min_nonzero: int = 2,
    round_counts: bool = False,
    backend: str = "simulation",
    progress=None,
    record_messages: bool = False,
    rounds: Mapping[str, int] | None = None,
    test: str = "Wald",
    reduced: str | None = None,
    cooks: bool = True,
    workdir: str | Path | None = None,
    credentials=None,
    keys=None,
    timeout: float | None = None,
    secure_aggregation: bool = True,
    shrink: str | None = None,
    shrink_coef=None,
    pca: bool = False,
    pca_genes: int = 500,
    pca_group: str | None = None,
) -> DESeq2Result:
    """Federated DESeq2 Wald pipeline; the answer equals DESeq2 on the pooled data.

    Parameters
    ----------
    sites
        Site name -> AnnData, ``.h5ad`` path, or folder with counts.csv + metadata.csv.
    design
        Formula, e.g. ``"~ batch + condition"``.
    contrasts
        Contrasts of interest: ``(factor, level, reference)``, coefficient names or numeric
        vectors. Any other contrast can be asked later from the same fit.
    alpha
        Significance level used by independent filtering.
    levels, genes
        The study's declared factor levels (reference first) and gene list.
    size_factors, fit_type
        DESeq2's ``sfType`` (``ratio``/``poscounts``) and ``fitType`` (``parametric``/``mean``).
    min_cell_size, min_pooled_cell_size, min_nonzero
        Disclosure control. A site refuses when one of its non-empty design cells holds fewer
        than ``min_cell_size`` samples. From two sites on, the study refuses a pooled design
        cell of fewer than ``min_pooled_cell_size`` samples (15: below it the attack in
        tests/test_attacks.py solves the sums for counts; 10 to 14 runs with a warning), and
        withholds (no result) genes with a pooled cell of 1 to ``min_nonzero - 1`` non-zero
        counts (a sum with one non-zero count is that count). ``min_cell_size=0`` turns every
        rule off: an analysis of one's own data, or an audited study.
    round_counts
        Round non-integer counts (e.g. salmon estimates) instead of refusing them.
    backend
        ``"simulation"`` (strict in-process, default), ``"subprocess"`` (substra's
        subprocess backend: real registered functions, datasets and tasks on this machine),
        or ``"remote"`` (a Substra network: ``credentials`` and ``keys`` YAML files; the data
        stays at the hospitals, so ``sites`` is not given and ``levels`` and ``genes`` must be).
    workdir
        Run directory of the substra backends (site folders, wheel, substra's files).
    credentials, keys, timeout
        Remote backend: credentials YAML, dataset keys YAML (``fed-de register-site``),
        seconds to wait for the compute plan.
    progress
        Callable ``(step, organisation, round_idx)`` called before each task.
    record_messages
        Keep every message in ``facts['messages']`` (privacy audits).
    rounds
        Override the unrolled round counts: keys ``mu``, ``genewise``, ``map``, ``final``,
        ``fallback``.
    test, reduced
        ``"Wald"`` (default) or ``"LRT"`` with a nested ``reduced`` formula, e.g.
        ``reduced="~ batch"``: the statistic is the deviance difference, chi-squared with the
        difference in coefficients; log2FoldChange/lfcSE stay the full model's (as DESeq2).
    cooks
        DESeq2's Cook's outlier handling (default): p-values of genes with an outlier in a
        design cell of >= 3 samples are NA; outliers in cells of >= 7 samples are replaced
        and the gene refitted. ``False``: the plan without it (fewer steps and bytes).
    secure_aggregation
        Mask every message (pairwise masks that cancel in the sum over sites), so the
        aggregator sees only cross-site totals; on by default from two sites (with two, each
        site can infer the other's sums: a warning says so). ``False`` is for audits that
        need each site's own messages.
    """
    from fed_de.bulk.strategy import DESeq2Strategy

    check_backend(backend)
    if backend == "remote":
        if sites:
            raise ValueError("backend='remote': the data stays at the hospitals; give keys= "
                             "(datasets registered with fed-de register-site), not sites")
        if genes is None or (levels is None and _needs_levels(design)):
            raise ValueError("backend='remote' needs the study declared: genes= and levels=")
        loaded = []
        study = make_study(design, list(genes), dict(levels or {}))
    else:
        loaded = load_sites(sites)
        study = declare_study(loaded, design, levels, genes)
    n_sites = n_declared_sites(loaded, keys)
    check_disclosure_options(min_cell_size, min_pooled_cell_size, n_sites)
    post = postfit_options(study, contrasts, shrink, shrink_coef, pca, pca_genes, pca_group,
                           site_names(loaded, keys))
    strategy = DESeq2Strategy(study.to_dict(), size_factors=size_factors, fit_type=fit_type,
                              min_cell_size=min_cell_size, round_counts=round_counts,
                              test=test, reduced=reduced, cooks=cooks,
                              min_pooled_cell_size=min_pooled_cell_size,
                              min_nonzero=min_nonzero,
                              secure_aggregation=secure_option(secure_aggregation, n_sites),
                              n_sites=n_sites, **post,
                              **{f"{k}_rounds": int(v) for k, v in (rounds or {}).items()})
    done = run(strategy, loaded, backend, workdir=workdir, credentials=credentials, keys=keys,
               timeout=timeout, progress=progress,
               record_messages=record_messages and backend == "simulation")
    facts = done.facts
    facts.update(n_sites=len(facts["bytes_sent_by_site"]), n_genes=len(study.genes),
                 min_cell_size=min_cell_size, min_pooled_cell_size=min_pooled_cell_size,
                 min_nonzero=min_nonzero,
                 genes_withheld=int(np.sum(done.state.genes.withheld))
                 if getattr(done.state, "genes", None) is not None
                 and done.state.genes.withheld is not None else 0,
                 secure_aggregation=strategy.masks(n_sites),
                 bytes_per_gene_by_site={k: v / len(study.genes)
                                         for k, v in facts["bytes_sent_by_site"].items()})
    site_pca = postfit_facts(facts, strategy, done, loaded)
    result = DESeq2Result(study=study, state=done.state, facts=facts,
                          contrasts=list(contrasts or []), alpha=alpha, test=test,
                          site_pca=site_pca)
    for c in result.contrasts:
        result.contrast_vector(c)  # fail now on an unknown factor/level
    return result


# -- the post-fit phase: shrinkage, VST + PCA (fed_de.bulk.postfit) -------------------------------
def site_names(loaded: list[SiteData], keys=None) -> tuple[str, ...]:
    """The study's site names, as the sites know themselves (per-site PCA centroids)."""
    if loaded:
        return tuple(s.name for s in loaded)
    if keys is None:
        return ()
    from fed_de.backends.substra import _load_yaml

    return tuple((_load_yaml(keys) or {}).get("sites") or {})


def postfit_options(study: Study, contrasts, shrink, shrink_coef, pca: bool, pca_genes: int,
                    pca_group, names: tuple) -> dict:
    """The strategy's post-fit options, every name checked against the study now (before
    anything is sent)."""
    from fed_de.bulk import shrink as shrink_steps

    out: dict = {}
    if shrink is not None:
        if shrink not in shrink_steps.TYPES:
            raise ValueError(f"shrink must be one of {shrink_steps.TYPES} (or None), "
                             f"not {shrink!r}")
        if shrink_coef is None:
            first = next(iter(contrasts or []), None)
            shrink_coef = first if first is not None else study.coef_names[-1]
        many = isinstance(shrink_coef, list) and not (
            len(shrink_coef) == 3 and all(isinstance(s, str) for s in shrink_coef)
            and shrink_coef[0] in study.levels)
        specs = shrink_coef if many else [shrink_coef]
        targets = [shrink_steps.as_target(s, study, shrink) for s in specs]
        out.update(shrink=shrink, shrink_coef=shrink_steps.encode_targets(list(dict.fromkeys(
            targets))))
    if pca:
        if pca_genes < 2:
            raise ValueError(f"pca_genes must be at least 2, got {pca_genes}")
        if pca_group is None:
            first = next((c for c in contrasts or [] if isinstance(c, (tuple, list))
                          and len(c) == 3 and c[0] in study.levels), None)
            pca_group = first[0] if first else (list(study.levels)[-1] if study.levels else "")
        if pca_group and pca_group not in study.levels:
            raise ValueError(f"pca_group {pca_group!r} is not a factor of the design "
                             f"(factors: {list(study.levels)})")
        out.update(pca=True, pca_genes=int(pca_genes), pca_group=pca_group or "",
                   site_names=tuple(names))
    return out


def postfit_facts(facts: dict, strategy, done, loaded: list[SiteData]) -> dict:
    """Rounds and bytes the post-fit phase added, its warnings (into ``facts``); each site's
    PCA coordinates as the site keeps them (simulation only: on a network they stay there)."""
    from fed_de.bulk import pca as pca_steps
    from fed_de.bulk import postfit
    from fed_de.bulk import shrink as shrink_steps

    o, state = strategy.options, done.state
    if postfit.n_rounds(o) == 0:
        return {}
    n = int(state.totals.n_samples)
    per_round = postfit.payload_bytes(o, strategy.study, n)
    warnings = facts.setdefault("warnings", [])
    post = {"rounds": postfit.n_rounds(o), "sequential_steps": 2 * postfit.n_rounds(o),
            "payload_bytes_per_site": int(sum(per_round)),
            "payload_bytes_per_site_per_gene": sum(per_round) / len(strategy.study.genes),
            "payload_bytes_per_round": per_round,
            "encoding": ("secure aggregation: three 64-bit words per value"
                         if strategy.masks(strategy.n_sites) else "float64")}
    facts["postfit"] = post
    if state.shrink is not None:
        sh = state.shrink
        facts["shrink"] = {
            "type": sh.type, "rounds": postfit.shrink_rounds(o),
            "targets": {t.name: {"prior_scale": t.scale} if sh.type == "apeglm" else
                        {"prior_var_log2": [float(v) for v in t.prior_var]}
                        for t in sh.targets},
            "unconverged_genes": {}, "genes_moving_over_1e-6": {}}
        for t in sh.targets:
            open_ = t.search["fitted"] & ~t.converged
            moving = int((open_ & (shrink_steps.last_step(t) > 1e-6)).sum())
            facts["shrink"]["unconverged_genes"][t.name] = int(open_.sum())
            facts["shrink"]["genes_moving_over_1e-6"][t.name] = moving
            if moving:
                warnings.append(f"shrinkage of {t.name}: {moving} gene(s) still moving by more "
                                f"than 1e-6 after {postfit.shrink_rounds(o)} rounds (values at "
                                "the best point reached; raise rounds={'shrink': ...})")
    site_pca = {}
    if state.pca is not None:
        p = state.pca
        # a block as wide as the rank of the covariance (samples - 1, or genes): exact
        exact = p.V.shape[1] >= min(n - 1, len(p.genes))
        facts["pca"] = {"genes": len(p.genes), "axes": int(p.n_axes), "block": p.V.shape[1],
                        "rounds": int(o.pca_rounds), "exact_block": bool(exact),
                        "percent_var": [float(v) for v in pca_steps.percent_var(p)],
                        "axis_error_estimate": None if exact else pca_steps.error_estimate(p),
                        "group": p.group}
        err = facts["pca"]["axis_error_estimate"]
        if not exact and (err is None or err > 1e-6):
            size = "an unknown amount" if err is None else f"~{err:.1e}"
            warnings.append(f"PCA: axis loadings may be off by {size} after "
                            f"{o.pca_rounds} subspace rounds; raise rounds={{'pca': ...}}")
        for site in loaded:
            kept = done.local_states.get(site.name)
            if getattr(kept, "pca_coords", None) is None:
                continue
            frame = pd.DataFrame(kept.pca_coords, index=list(site.samples),
                                 columns=[f"PC{i + 1}" for i in range(p.n_axes)])
            frame["group"] = site.obs[p.group].astype(str).to_numpy() if p.group else "all"
            site_pca[site.name] = frame
    return site_pca
