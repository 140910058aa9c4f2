"""The Python entry points of the bulk pipeline: ``fed_de.size_factors`` and ``fed_de.deseq2``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fed_de.backends import (
    check_backend,
    declared_site_names,
    n_declared_sites,
    run,
    secure_option,
)
from fed_de.bulk.results import DESeq2Result, contrast_list, study_contrast_vector
from fed_de.core.size_factors import SIZE_FACTOR_TYPES
from fed_de.design import (
    Study,
    closest_name,
    formula_variables,
    level_spellings,
    make_study,
    missing_column_message,
)
from fed_de.errors import DesignError, FitWarning
from fed_de.site import SiteData, load_site

log = logging.getLogger("fed_de")

#: DESeq2's ``fitType`` values fed_de runs.
FIT_TYPES = ("parametric", "local", "mean")
#: Name of the site when one site is given without a name.
SINGLE_SITE = "site"


def as_site_mapping(sites, metadata=None):
    """Site name -> source: a mapping as given, or one unnamed site (an AnnData, a path, a
    ``(counts, metadata)`` pair, or a counts DataFrame with ``metadata``) named ``"site"``."""
    if metadata is not None:
        if isinstance(sites, Mapping):
            raise ValueError("metadata= goes with one counts DataFrame, not a mapping of "
                             "sites; give each site as (counts, metadata)")
        return {SINGLE_SITE: (sites, metadata)}
    if sites is None or isinstance(sites, Mapping):
        return sites
    return {SINGLE_SITE: sites}


def load_sites(sites, layer: str | Mapping[str, str] | None = None) -> list[SiteData]:
    """Load every site (AnnData, ``.h5ad`` path, ``(counts, metadata)`` pair or folder of
    tables), keeping the mapping's order.

    ``layer`` names the AnnData layer of raw counts: one name for every AnnData site, or a
    mapping site name -> layer (sites not in it use ``X``).
    """
    sites = as_site_mapping(sites)
    if not sites:
        raise ValueError("no site given: pass a mapping of site names to AnnData objects, "
                         "paths or (counts, metadata) pairs")
    if isinstance(layer, Mapping):
        unknown = [k for k in layer if k not in sites]
        if unknown:
            raise ValueError(f"layer= names site(s) {unknown} that are not in the study "
                             f"(sites: {list(sites)})")
        return [load_site(src, str(name), layer.get(name)) for name, src in sites.items()]
    return [load_site(src, str(name), layer) for name, src in sites.items()]


def declare_study(
    sites: list[SiteData],
    design: str,
    levels: Mapping[str, list] | None = None,
    genes: list[str] | None = None,
) -> Study:
    """The study for a run where the caller holds every site (simulation, tests, demos).

    Levels not declared are taken from the sites' metadata in sorted order (R's default
    factor order) and the gene list from the first site; levels spelled differently across
    sites only by case or whitespace are refused. On a real network the study is declared
    by the user and never read from sites: pass ``levels`` and ``genes``.
    """
    levels = {k: [str(x) for x in v] for k, v in (levels or {}).items()}
    variables = formula_variables(design)
    # a factor the formula does not use still shapes the design cells (disclosure rule);
    # one spelled like an undeclared formula variable is a typo
    typos = {k: c for k in levels if k not in variables
             and (c := closest_name(k, [v for v in variables if v not in levels]))}
    if typos:
        hints = "".join(f" Did you mean {c!r} for {k!r}?" for k, c in typos.items())
        raise DesignError(f"levels are declared for {list(typos)}, which the design "
                          f"{design!r} does not use (its variables: {variables}).{hints}")
    for var in variables:
        if var in levels:
            continue
        lacking = [s for s in sites if var not in s.obs.columns]
        if lacking:
            raise DesignError(missing_column_message([var], list(lacking[0].obs.columns),
                                                     lacking[0].name, design))
        values = pd.concat([s.obs[var] for s in sites])
        if values.empty or pd.api.types.is_numeric_dtype(values):
            continue
        per_site = {s.name: sorted(s.obs[var].dropna().astype(str).unique()) for s in sites}
        level_spellings(per_site, var)
        levels[var] = sorted(set().union(*per_site.values()))
    return make_study(design, list(genes) if genes is not None else list(sites[0].genes), levels)


def check_options(study: Study, *, contrasts=None, alpha: float = 0.1,
                  size_factors: str = "ratio", fit_type: str = "parametric",
                  min_cell_size: int = 3, round_counts: bool | str = False,
                  test: str = "Wald", reduced: str | None = None) -> None:
    """Refuse, before the first round, options and contrasts that cannot work with the
    declared study, naming the valid values (a wrong contrast otherwise shows only after
    the whole federated fit)."""
    from fed_de.bulk.strategy import TESTS
    from fed_de.design import reduced_study
    from fed_de.validation import FORCE_ROUND

    if size_factors not in SIZE_FACTOR_TYPES:
        raise ValueError(f"size_factors {size_factors!r} unknown; use one of "
                         f"{list(SIZE_FACTOR_TYPES)}")
    if fit_type not in FIT_TYPES:
        raise ValueError(f"fit_type {fit_type!r} unknown; use one of {list(FIT_TYPES)}")
    if test not in TESTS:
        raise ValueError(f"test {test!r} unknown; use one of {list(TESTS)}")
    if test == "LRT":
        if not reduced:
            raise ValueError("test='LRT' needs a reduced design, e.g. reduced='~ batch'")
        reduced_study(study, reduced)
    elif reduced:
        raise ValueError(f"reduced={reduced!r} is for test='LRT'; the Wald test has none")
    if not 0 < float(alpha) < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if int(min_cell_size) != min_cell_size or min_cell_size < 0:
        raise ValueError(f"min_cell_size must be a non-negative integer, got {min_cell_size!r}")
    if round_counts not in (True, False, FORCE_ROUND):
        raise ValueError(f"round_counts must be True, False or {FORCE_ROUND!r}, "
                         f"not {round_counts!r}")
    for c in contrast_list(study, contrasts) if contrasts else []:
        study_contrast_vector(study, c)


@dataclass
class SizeFactorResult:
    """Size factors (one Series per site, as each site holds them) and baseMean."""

    size_factors: dict[str, pd.Series]
    base_mean: pd.Series
    facts: dict = field(default_factory=dict)


def size_factors(
    sites,
    design: str = "~ 1",
    *,
    levels: Mapping[str, list] | None = None,
    genes: list[str] | None = None,
    kind: str = "ratio",
    min_cell_size: int = 3,
    backend: str = "simulation",
    layer: str | None = None,
) -> SizeFactorResult:
    """Federated median-of-ratios size factors (``kind="ratio"`` or ``"poscounts"``)."""
    from fed_de.bulk.strategy import SizeFactorsStrategy

    if backend != "simulation":
        raise ValueError("size_factors() runs in simulation; the substra backends run the "
                         "full pipeline through deseq2(backend=...)")
    loaded = load_sites(sites, layer)
    study = declare_study(loaded, design, levels, genes)
    check_options(study, size_factors=kind, min_cell_size=min_cell_size)
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


def check_rounds(rounds: Mapping[str, int] | None) -> None:
    """Refuse an unknown round key or a negative count, naming the keys there are."""
    from dataclasses import fields as dc_fields

    from fed_de.bulk.state import DESeq2Options

    known = sorted(f.name[:-len("_rounds")] for f in dc_fields(DESeq2Options)
                   if f.name.endswith("_rounds"))
    for key, value in (rounds or {}).items():
        if key not in known:
            raise ValueError(f"rounds={{{key!r}: ...}}: unknown round count; keys: {known}")
        if int(value) != value or value < 0:
            raise ValueError(f"rounds[{key!r}] must be a non-negative integer, got {value!r}")


def _needs_levels(design: str) -> bool:
    return bool(formula_variables(design))


def deseq2(
    sites,
    design: str,
    *,
    metadata: pd.DataFrame | None = None,
    contrasts: list | None = None,
    alpha: float = 0.1,
    levels: Mapping[str, list] | None = None,
    genes: list[str] | None = None,
    size_factors: str = "ratio",
    fit_type: str = "parametric",
    min_cell_size: int = 3,
    min_pooled_cell_size: int = 15,
    min_nonzero: int = 2,
    round_counts: bool | str = False,
    layer: str | Mapping[str, str] | None = None,
    backend: str = "simulation",
    progress=None,
    record_messages: bool = False,
    rounds: Mapping[str, int] | None = None,
    test: str = "Wald",
    reduced: str | None = None,
    cooks: bool = True,
    min_replicates_for_replace: float | None = None,
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
    n_jobs: int | None = 1,
    spill_dir: str | Path | None = None,
    attach: str | None = None,
    checkpoint: str | Path | None = None,
    dp_epsilon: float | None = None,
    dp_delta: float = 1e-6,
    dp_clip: float = 1.0,
    dp_floor: bool = True,
    resume_from=None,
) -> DESeq2Result:
    """Federated DESeq2 Wald pipeline; the answer equals DESeq2 on the pooled data.

    Parameters
    ----------
    sites
        Site name -> AnnData, ``.h5ad`` path, folder of tables (counts + metadata, CSV, TSV or
        featureCounts output) or a ``(counts, metadata)`` pair of DataFrames. One site may be
        given alone (an AnnData, a path, a pair, or a counts DataFrame with ``metadata=``,
        as PyDESeq2 takes them); it is named ``"site"``.
    design
        Formula, e.g. ``"~ batch + condition"``.
    metadata
        Sample metadata of a single counts DataFrame given as ``sites``.
    contrasts
        Contrasts of interest: ``(factor, level, reference)``, coefficient names or numeric
        vectors; checked against the study before the first round. Any other contrast can be
        asked later from the same fit.
    alpha
        Significance level used by independent filtering.
    levels, genes
        The study's declared factor levels (reference first) and gene list. Levels not
        declared are read from the sites (simulation only): sorted, as R, and recorded in
        ``facts["options"]["levels_inferred"]``.
    size_factors, fit_type
        DESeq2's ``sfType`` (``ratio``/``poscounts``) and ``fitType``
        (``parametric``/``local``/``mean``).
    min_cell_size, min_pooled_cell_size, min_nonzero
        Disclosure control. A site refuses when one of its non-empty design cells holds fewer
        than ``min_cell_size`` samples. From two sites on, the study refuses a pooled design
        cell of fewer than ``min_pooled_cell_size`` samples (15: below it the attack in
        tests/test_attacks.py solves the sums for counts; 10 to 14 runs with a warning), and
        withholds (no result) genes with a pooled cell of 1 to ``min_nonzero - 1`` non-zero
        counts (a sum with one non-zero count is that count). ``min_cell_size=0`` turns every
        rule off: an analysis of one's own data, or an audited study.
    round_counts
        Round non-integer counts (e.g. salmon estimates) instead of refusing them; counts
        that look log-transformed are still refused unless ``round_counts="force"``.
    layer
        The AnnData layer holding raw counts (e.g. ``"counts"`` beside a normalised ``X``):
        one name for every AnnData site, or a mapping site name -> layer.
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
        ``True``: a progress bar on stderr (tasks done of the plan's total, percentage, time
        left); or a callable ``(step, organisation, round_idx)`` called before each task.
    record_messages
        Keep every message in ``facts['messages']`` (privacy audits).
    rounds
        Override the unrolled round counts: keys ``mu``, ``genewise``, ``map``, ``final``,
        ``fallback``, ``robust`` (Cook's searches), ``refit_mu``, ``refit_final``, ``shrink``,
        ``pca``.
    test, reduced
        ``"Wald"`` (default) or ``"LRT"`` with a nested ``reduced`` formula, e.g.
        ``reduced="~ batch"``: the statistic is the deviance difference, chi-squared with the
        difference in coefficients; log2FoldChange/lfcSE stay the full model's (as DESeq2).
    cooks
        DESeq2's Cook's outlier handling (default): p-values of genes with an outlier in a
        design cell of >= 3 samples are NA; outliers in cells of >= 7 samples are replaced
        and the gene refitted. ``False``: the plan without it (fewer steps and bytes).
    min_replicates_for_replace
        DESeq2's ``minReplicatesForReplace``. Default: 7 (DESeq2's) for one site or with the
        disclosure rules off; from two sites on, ``inf``: outliers are not replaced and their
        genes keep p-value NA (a refit's sums minus the first fit's would give the aggregator
        a single outlier's value). Setting 7 there restores DESeq2's refit, with a warning.
    secure_aggregation
        Mask every message (pairwise masks that cancel in the sum over sites), so the
        aggregator sees only cross-site totals; on by default from two sites (with two, each
        site can infer the other's sums: a warning says so). ``False`` is for audits that
        need each site's own messages.
    shrink, shrink_coef
        After the fit, DESeq2's ``lfcShrink``: ``"apeglm"`` or ``"normal"``, of a coefficient
        name or ``(factor, level, reference)`` contrast, or a list of them (default: the first
        contrast); read with :meth:`DESeq2Result.lfc_shrink` and ``posterior``.
    pca, pca_genes, pca_group
        After the fit, the VST at each site and a federated PCA of the ``pca_genes`` most
        variable genes (DESeq2's ``plotPCA``): axes, variance, centroids per level of
        ``pca_group``; each site keeps its own samples' coordinates.
    n_jobs
        Simulation: worker processes that run the site tasks of a round at once (joblib's
        loky; ``-1``: every CPU; default 1, in this process). The answer is identical.
    spill_dir
        Simulation: keep the messages and run states between tasks as files in a temporary
        folder under this directory (removed at the end) rather than in memory.
    attach
        Remote: the key of a compute plan submitted before with the same study and options
        (printed at submission); wait for it and download its result instead of submitting.
    checkpoint
        Simulation: a folder keeping the run's frontier after every task (the last run
        state, each site's last local state). A run that fails or is interrupted resumes
        when called again with the same arguments: finished tasks are not run again, and
        ``facts["checkpoint"]`` says how many were reused. Removed when the run ends well.
    dp_epsilon, dp_delta, dp_clip
        Opt-in differential privacy (docs/privacy.md, ``fed_de.bulk.dp``): every site clips
        each sample's contribution to every message to public bounds (scaled by ``dp_clip``)
        and adds its share of Gaussian noise, so everything the aggregator sees, and so the
        results, is ``(dp_epsilon, dp_delta)``-DP for one sample's counts; the budget per
        phase is in ``facts["privacy"]``. ``dp_floor`` (default): final dispersions no lower
        than the trend (noise drives gene-wise estimates to the lower bound). Turns Cook's
        off (with a warning); refuses LRT, shrinkage and PCA. Costs accuracy: see
        benchmarks/privacy/README.md.
    resume_from
        Any backend: a failed compute plan's downloaded state (a run folder holding
        ``resume.pkl``, or a :class:`fed_de.federation.resume.Seed`; a failed substra run's
        error carries it as ``err.resume``): a new plan runs only the rounds after it, with
        the same arguments otherwise (:mod:`fed_de.backends.resume`);
        ``facts["resumed"]`` names the plan and round it continued.

    Warns
    -----
    FitWarning
        The dispersion trend fell back to another type, genes did not converge, or Cook's
        step filtered, replaced or refitted genes; also in ``facts["warnings"]``.
    """
    from fed_de.backends.plan import record_plan
    from fed_de.bulk.strategy import DESeq2Strategy
    from fed_de.progress import progress_callback
    from fed_de.provenance import run_provenance

    started = run_provenance()
    check_backend(backend)
    sites = as_site_mapping(sites, metadata)
    if backend == "remote":
        if sites:
            raise ValueError("backend='remote': the data stays at the hospitals; give keys= "
                             "(datasets registered with fed-de register-site), not sites")
        if genes is None or (levels is None and _needs_levels(design)):
            raise ValueError("backend='remote' needs the study declared: genes= and levels=")
        check_remote_inputs(credentials, keys)
        loaded = []
        study = make_study(design, list(genes), dict(levels or {}))
    else:
        loaded = load_sites(sites, layer)
        study = declare_study(loaded, design, levels, genes)
    inferred = [k for k in study.levels if k not in (levels or {})]
    if inferred:
        log.info("levels read from the sites (declare them to fix the reference): %s",
                 "; ".join(f"{k}={','.join(study.levels[k])}" for k in inferred))
    check_options(study, contrasts=contrasts, alpha=alpha, size_factors=size_factors,
                  fit_type=fit_type, min_cell_size=min_cell_size, round_counts=round_counts,
                  test=test, reduced=reduced)
    check_rounds(rounds)
    n_sites = n_declared_sites(loaded, keys)
    check_disclosure_options(min_cell_size, min_pooled_cell_size, n_sites)
    if (min_replicates_for_replace is not None and np.isfinite(min_replicates_for_replace)
            and cooks and min_cell_size > 0 and n_sites > 1):
        warnings.warn(f"min_replicates_for_replace={min_replicates_for_replace}: outliers are "
                      "replaced and their genes refitted; the refit's sums minus the first "
                      "fit's give the aggregator the replaced samples' values (a single "
                      "outlier's, when one is replaced in a design cell; docs/privacy.md)",
                      stacklevel=2)
    post = postfit_options(study, contrasts, shrink, shrink_coef, pca, pca_genes, pca_group,
                           declared_site_names(loaded, keys))
    cooks = dp_cooks(cooks, dp_epsilon)
    strategy = DESeq2Strategy(study.to_dict(), size_factors=size_factors, fit_type=fit_type,
                              min_cell_size=min_cell_size, round_counts=round_counts,
                              test=test, reduced=reduced, cooks=cooks,
                              min_replicates_for_replace=min_replicates_for_replace,
                              min_pooled_cell_size=min_pooled_cell_size,
                              min_nonzero=min_nonzero,
                              secure_aggregation=secure_option(secure_aggregation, n_sites),
                              n_sites=n_sites, **post, **dp_options(dp_epsilon, dp_delta,
                                                                     dp_clip, dp_floor),
                              **{f"{k}_rounds": int(v) for k, v in (rounds or {}).items()})
    total = 0
    if progress is True:
        total = len(record_plan(strategy, list(declared_site_names(loaded, keys))).tasks)
    with progress_callback(progress, total) as callback:
        done = run(strategy, loaded, backend, workdir=workdir, credentials=credentials,
                   keys=keys, timeout=timeout, progress=callback,
                   record_messages=record_messages and backend == "simulation",
                   n_jobs=n_jobs, spill_dir=spill_dir,
                   **({"attach": attach} if attach is not None else {}),
                   **({"checkpoint": checkpoint} if checkpoint is not None else {}),
                   **({"resume": resume_from} if resume_from is not None else {}))
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
    facts["options"] = {
        "design": design, "test": test, "reduced": reduced, "levels": study.levels,
        "levels_inferred": inferred, "continuous": study.continuous,
        "size_factors": size_factors, "fit_type": fit_type,
        "fit_type_used": done.state.trend.fit_type, "alpha": alpha, "cooks": bool(cooks),
        "min_replicates_for_replace": strategy.options.min_replicates_for_replace,
        "round_counts": round_counts, "layer": layer, "min_cell_size": min_cell_size,
        "min_pooled_cell_size": min_pooled_cell_size, "min_nonzero": min_nonzero,
        "disclosure_rule_applied": bool(min_cell_size) and n_sites != 1,
        "backend": backend, "rounds": dict(rounds or {})}
    facts.update(started)
    if strategy.dp_budget is not None:
        facts.setdefault("privacy", {})["differential_privacy"] = strategy.dp_budget
    site_pca = postfit_facts(facts, strategy, done, loaded)
    result = DESeq2Result(study=study, state=done.state, facts=facts,
                          contrasts=contrast_list(study, contrasts) if contrasts else [],
                          alpha=alpha, test=test, reduced=reduced if test == "LRT" else None,
                          site_pca=site_pca)
    cooks_facts = result.cooks
    if cooks_facts:
        facts.update(cooks_outliers_filtered=int(np.sum(cooks_facts["outlier"])),
                     genes_refitted=int(np.sum(cooks_facts["refitted"])),
                     genes_replaced_now_zero=int(np.sum(cooks_facts["new_all_zero"])))
    withheld = facts["genes_withheld"]
    if withheld:
        facts.setdefault("warnings", []).append(
            f"{withheld} gene(s) withheld for disclosure control: a pooled design cell holds "
            f"fewer than min_nonzero={min_nonzero} non-zero counts (results NaN)")
    facts["warnings"] = facts.get("warnings", []) + result.fit_warnings()
    for message in facts["warnings"]:
        warnings.warn(message, FitWarning, stacklevel=2)
    return result


# -- differential privacy (fed_de.bulk.dp) -------------------------------------------------------
def dp_cooks(cooks: bool, dp_epsilon: float | None) -> bool:
    """Cook's step under DP: off, with a warning when it was asked for (its threshold
    searches assume exact counts, and their rounds would spend budget)."""
    if dp_epsilon is None or not cooks:
        return cooks
    warnings.warn("dp_epsilon: Cook's outlier filtering is off (its order-statistic searches "
                  "need exact counts and would spend privacy budget); pass cooks=False to "
                  "silence this", FitWarning, stacklevel=3)
    return False


def dp_options(dp_epsilon: float | None, dp_delta: float, dp_clip: float,
               dp_floor: bool = True) -> dict:
    """The strategy's DP options, checked (nothing when DP is off)."""
    if dp_epsilon is None:
        return {}
    if not dp_epsilon > 0:
        raise ValueError(f"dp_epsilon must be positive (inf: no noise), not {dp_epsilon}")
    if not 0 < dp_delta < 1:
        raise ValueError(f"dp_delta must lie in (0, 1), not {dp_delta}")
    if not dp_clip > 0:
        raise ValueError(f"dp_clip must be positive (inf: no clipping), not {dp_clip}")
    return {"dp_epsilon": float(dp_epsilon), "dp_delta": float(dp_delta),
            "dp_clip": float(dp_clip), "dp_floor": bool(dp_floor)}


# -- the post-fit phase: shrinkage, VST + PCA (fed_de.bulk.postfit) -------------------------------
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


def check_remote_inputs(credentials, keys, submitter: str = "aggregator") -> None:
    """Before anything is built or sent: the credentials hold a real entry for the
    submitter (no template placeholder) and the keys file lists sites with their keys."""
    from fed_de.backends.substra import _load_yaml, check_credentials_entry
    from fed_de.errors import FedDEError

    if credentials is None or keys is None:
        raise FedDEError("backend='remote' needs credentials= (YAML of the Substra API "
                         "entries) and keys= (the datasets, written by fed-de register-site)")
    creds = _load_yaml(credentials)
    if submitter not in creds:
        raise FedDEError(f"credentials have no entry {submitter!r} (entries: {list(creds)}); "
                         f"the {submitter!r} entry submits the compute plan")
    check_credentials_entry(creds[submitter], submitter)
    sites = (_load_yaml(keys) or {}).get("sites") or {}
    if not sites:
        raise FedDEError("the keys file lists no site (each hospital writes its entry with "
                         "fed-de register-site; the coordinator merges them)")
