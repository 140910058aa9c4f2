"""The Python entry points of the bulk pipeline: ``fed_de.size_factors`` and ``fed_de.deseq2``."""

from __future__ import annotations

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
    n_jobs: int | None = 1,
    spill_dir: str | Path | None = None,
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
    min_cell_size
        Disclosure control: a site refuses when a non-empty design cell holds fewer samples.
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
    n_jobs
        Simulation: worker processes that run the site tasks of a round at once (joblib's
        loky; ``-1``: every CPU; default 1, in this process). The answer is identical.
    spill_dir
        Simulation: keep the messages and run states between tasks as files in a temporary
        folder under this directory (removed at the end) rather than in memory.
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
    strategy = DESeq2Strategy(study.to_dict(), size_factors=size_factors, fit_type=fit_type,
                              min_cell_size=min_cell_size, round_counts=round_counts,
                              test=test, reduced=reduced, cooks=cooks,
                              secure_aggregation=secure_option(secure_aggregation, n_sites),
                              n_sites=n_sites,
                              **{f"{k}_rounds": int(v) for k, v in (rounds or {}).items()})
    done = run(strategy, loaded, backend, workdir=workdir, credentials=credentials, keys=keys,
               timeout=timeout, progress=progress,
               record_messages=record_messages and backend == "simulation",
               n_jobs=n_jobs, spill_dir=spill_dir)
    facts = done.facts
    facts.update(n_sites=len(facts["bytes_sent_by_site"]), n_genes=len(study.genes),
                 min_cell_size=min_cell_size,
                 secure_aggregation=strategy.masks(n_sites),
                 bytes_per_gene_by_site={k: v / len(study.genes)
                                         for k, v in facts["bytes_sent_by_site"].items()})
    result = DESeq2Result(study=study, state=done.state, facts=facts,
                          contrasts=list(contrasts or []), alpha=alpha, test=test)
    for c in result.contrasts:
        result.contrast_vector(c)  # fail now on an unknown factor/level
    return result
