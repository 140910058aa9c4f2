"""The Python entry points: ``fed_de.size_factors`` and ``fed_de.deseq2``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fed_de.design import Study, formula_variables, make_study
from fed_de.simulation.opener import SiteData, load_site
from fed_de.simulation.strict import run_strict

BACKENDS = ("simulation",)


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
    from fed_de.strategies.size_factors import SizeFactorsStrategy

    _check_backend(backend)
    loaded = load_sites(sites)
    study = declare_study(loaded, design, levels, genes)
    strategy = SizeFactorsStrategy(study.to_dict(), size_factors=kind, min_cell_size=min_cell_size)
    run = run_strict(strategy, loaded)
    sf = {s.name: pd.Series(run.local_states[s.name]["size_factors"], index=list(s.samples),
                            name="size_factor") for s in loaded}
    bm = pd.Series(np.asarray(run.shared_state["base_mean"]), index=study.genes, name="baseMean")
    return SizeFactorResult(size_factors=sf, base_mean=bm, facts=run.ledger.facts())


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available; choose one of {BACKENDS}")
