"""``fed_de.screen``: every perturbation of a screen against the shared control, across sites.

Examples
--------
>>> from fed_de.screening.data import make_screen
>>> scr = make_screen(n_cells=1500, n_genes=60, n_perturbations=4, seed=1)
>>> res = screen(scr.sites, perturbation_column="perturbation", control="non-targeting")
>>> res["P0001"].columns.tolist()
['baseMean', 'log2FoldChange', 'lfcSE', 'stat', 'pvalue', 'padj']
>>> res.to_anndata().shape
(4, 60)
"""

from __future__ import annotations

import json
import time
import tracemalloc
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from fed_de import files
from fed_de.backends import run
from fed_de.core.screen_sums import MIN_MU
from fed_de.errors import DesignError, FitWarning
from fed_de.provenance import json_default
from fed_de.screening.data import (
    DEFAULT_CHUNK_SIZE,
    SCREEN_OPENER_SOURCE,
    ScreenSite,
    load_screen_site,
    write_screen_site_folder,
)
from fed_de.screening.study import SITE_FACTOR, ScreenStudy

COLUMNS = ("baseMean", "log2FoldChange", "lfcSE", "stat", "pvalue", "padj")
METHOD_NAMES = {"nb_glm": "nb_glm", "wilcoxon": "wilcoxon", "t_test": "t-test"}


@dataclass
class ScreenResult(Mapping):
    """A federated screen: perturbation -> DataFrame of per-gene results.

    Attributes
    ----------
    study
        The declared screen study.
    method
        ``"nb_glm"``, ``"wilcoxon"`` or ``"t_test"``.
    arrays
        ``baseMean, log2FoldChange, lfcSE, stat, pvalue, padj``: perturbations x genes.
    tested
        Pairs that passed the expression filters (the others are NaN and out of BH).
    n_cells
        Cells of each perturbation (all sites) and ``n_control``.
    gene_table
        Gene-level quantities (control mean; dispersions for ``nb_glm``).
    facts
        Run facts: sequential steps, tasks, bytes and peak memory per site, wall time.
    """

    study: ScreenStudy
    method: str
    arrays: dict
    tested: np.ndarray
    n_cells: pd.Series
    n_control: int
    gene_table: pd.DataFrame
    facts: dict = field(default_factory=dict)
    converged: np.ndarray | None = None
    params: dict = field(default_factory=dict)

    # -- Mapping -----------------------------------------------------------------------------
    def __getitem__(self, perturbation: str) -> pd.DataFrame:
        try:
            i = self.study.perturbations.index(perturbation)
        except ValueError:
            raise KeyError(f"perturbation {perturbation!r} is not in the study") from None
        frame = pd.DataFrame({k: self.arrays[k][i] for k in COLUMNS},
                             index=pd.Index(self.study.genes, name="gene"))
        return frame

    def __iter__(self) -> Iterator[str]:
        return iter(self.study.perturbations)

    def __len__(self) -> int:
        return len(self.study.perturbations)

    # -- tables ------------------------------------------------------------------------------
    @property
    def genes(self) -> list[str]:
        """The study's genes."""
        return list(self.study.genes)

    def to_long(self) -> pd.DataFrame:
        """Long table: perturbation, gene, baseMean, log2FoldChange, lfcSE, stat, pvalue, padj."""
        P, G = len(self.study.perturbations), len(self.study.genes)
        frame = pd.DataFrame({
            "perturbation": np.repeat(self.study.perturbations, G),
            "gene": np.tile(self.study.genes, P),
            **{k: self.arrays[k].ravel() for k in COLUMNS},
        })
        return frame

    def significant(self, alpha: float = 0.05) -> pd.Series:
        """Number of genes with ``padj < alpha`` per perturbation."""
        with np.errstate(invalid="ignore"):
            n = (self.arrays["padj"] < alpha).sum(axis=1)
        return pd.Series(n, index=self.study.perturbations, name=f"padj<{alpha}")

    def rank_genes_groups(self) -> dict:
        """scanpy's ``uns['rank_genes_groups']`` layout: per perturbation, genes sorted by
        score (untested genes last), as record arrays with one field per perturbation."""
        perts = self.study.perturbations
        genes = np.asarray(self.study.genes, dtype=object)
        score = self.arrays["stat"]
        fields = {"names": [], "scores": [], "pvals": [], "pvals_adj": [], "logfoldchanges": []}
        for i in range(len(perts)):
            s = np.where(np.isfinite(score[i]), score[i], -np.inf)
            order = np.argsort(-s, kind="stable")
            fields["names"].append(genes[order])
            fields["scores"].append(score[i][order].astype(np.float32))
            fields["pvals"].append(self.arrays["pvalue"][i][order])
            fields["pvals_adj"].append(self.arrays["padj"][i][order])
            fields["logfoldchanges"].append(self.arrays["log2FoldChange"][i][order]
                                            .astype(np.float32))
        out: dict = {"params": {"groupby": self.study.perturbation_column,
                                "reference": self.study.control,
                                "method": METHOD_NAMES[self.method], "use_raw": False,
                                "layer": "None", "corr_method": "benjamini-hochberg"}}
        for key, cols in fields.items():
            dtype = [(p, "O" if key == "names" else cols[0].dtype) for p in perts]
            rec = np.rec.fromarrays(cols, dtype=dtype) if perts else np.rec.array([])
            out[key] = rec
        return out

    def to_anndata(self) -> ad.AnnData:
        """Perturbations x genes, layers ``log2FoldChange, lfcSE, stat, pvalue, padj,
        baseMean``, ``X`` the log2 fold changes, and ``uns['rank_genes_groups']``."""
        obs = pd.DataFrame({"n_cells": self.n_cells.to_numpy(dtype=np.int64),
                            "n_significant": self.significant(0.05).to_numpy()},
                           index=pd.Index(self.study.perturbations, name="perturbation"))
        var = self.gene_table.copy()
        var.index = pd.Index(self.study.genes, name="gene")
        layers = {k: np.asarray(self.arrays[k], dtype=np.float64) for k in COLUMNS}
        out = ad.AnnData(X=np.nan_to_num(layers["log2FoldChange"]), obs=obs, var=var,
                         layers=layers)
        out.layers["tested"] = self.tested.astype(np.int8)
        out.uns["rank_genes_groups"] = self.rank_genes_groups()
        out.uns["fed_de"] = {"method": self.method, "control": self.study.control,
                             "n_control": int(self.n_control),
                             "facts": json.dumps(self.facts, default=str),
                             "params": json.dumps(self.params, default=str)}
        return out

    def write(self, out: str | Path, wall_seconds: float | None = None) -> dict[str, Path]:
        """Write ``results.csv`` (long), ``screen.h5ad`` and ``run.json`` (``status: "ok"``)
        into ``out``, each through a temporary file and a rename (:mod:`fed_de.files`)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"results": out / "results.csv", "h5ad": out / "screen.h5ad",
                 "run": out / "run.json"}
        files.write_csv(self.to_long(), paths["results"], index=False)
        files.write_h5ad(self.to_anndata(), paths["h5ad"])
        facts = dict(self.facts)
        if wall_seconds is not None:
            facts["wall_seconds"] = round(wall_seconds, 3)
        run = {"status": "ok", "method": self.method,
               "perturbations": len(self.study.perturbations), "genes": len(self.study.genes),
               "control_cells": int(self.n_control), **facts, "params": self.params}
        files.write_json(paths["run"], run, default=json_default)
        return paths


def load_screen_sites(sites: Mapping, chunk_size: int = DEFAULT_CHUNK_SIZE,
                      backed: bool = False, layer: str | None = None) -> list[ScreenSite]:
    """Load every site (AnnData or ``.h5ad`` path), keeping the mapping's order; ``layer``
    names the AnnData layer of raw counts."""
    if not sites:
        raise ValueError("no site given: pass a mapping of site names to AnnData objects or "
                         ".h5ad paths")
    return [load_screen_site(src, str(name), chunk_size, backed, layer)
            for name, src in sites.items()]


def declare_screen(sites: list[ScreenSite], perturbation_column: str, control: str, *,
                   covariates: list[str] | None = None, perturbations: list[str] | None = None,
                   genes: list[str] | None = None, levels: Mapping | None = None,
                   site_effects: bool = True) -> ScreenStudy:
    """The screen study where the caller holds every site (simulation, tests).

    Perturbations, gene list and covariate levels not given are read from the sites (sorted);
    on a real network the study is declared by the user and never read from sites.
    """
    if perturbations is None:
        labels = set()
        for s in sites:
            labels |= set(s.obs_column(perturbation_column).unique())
        if control not in labels:
            raise DesignError(f"no cell is labelled {control!r} in column "
                              f"{perturbation_column!r} at any site")
        perturbations = sorted(labels - {control})
    perturbations = [str(p) for p in perturbations]
    if control in perturbations:
        raise DesignError(f"the control label {control!r} is also listed as a perturbation")
    if len(set(perturbations)) != len(perturbations):
        raise DesignError("the perturbation list has duplicates")
    if not perturbations:
        raise DesignError("no perturbation to test")
    genes = [str(g) for g in (genes if genes is not None else sites[0].genes)]
    if len(set(genes)) != len(genes):
        raise DesignError("the study's gene list has duplicates")
    factors = []
    names = [s.name for s in sites]
    covariates = list(covariates or [])
    if site_effects and len(sites) > 1:
        if SITE_FACTOR in covariates:
            raise DesignError("covariate 'site' clashes with the site effect; rename it or "
                              "pass site_effects=False")
        factors.append([SITE_FACTOR, names])
    levels = dict(levels or {})
    for cov in covariates:
        if cov in levels:
            lv = [str(x) for x in levels[cov]]
        else:
            lv = sorted(set().union(*[set(s.obs_column(cov).unique()) for s in sites]))
        if len(lv) < 2:
            continue  # a constant covariate has no effect to fit
        factors.append([cov, lv])
    return ScreenStudy(genes=genes, perturbations=perturbations, control=str(control),
                       perturbation_column=perturbation_column, factors=factors,
                       site_factor=bool(factors) and factors[0][0] == SITE_FACTOR
                       and site_effects and len(sites) > 1)


def _declared_remote_study(keys, perturbation_column: str, control: str, covariates,
                           perturbations, genes, levels, site_effects: bool) -> ScreenStudy:
    """The screen study of a remote network: declared by the user, site names from keys."""
    from fed_de.backends import declared_site_names

    if perturbations is None or genes is None:
        raise ValueError("backend='remote' needs the study declared: perturbations= and genes=")
    site_names = list(declared_site_names([], keys))
    if not site_names:
        raise ValueError("the keys file lists no site (write it with fed-de register-site)")
    factors = []
    if site_effects and len(site_names) > 1:
        factors.append([SITE_FACTOR, site_names])
    for cov in covariates or []:
        if not levels or cov not in levels:
            raise ValueError(f"backend='remote' needs the levels of covariate {cov!r}")
        factors.append([cov, [str(x) for x in levels[cov]]])
    return ScreenStudy(genes=[str(g) for g in genes],
                       perturbations=[str(p) for p in perturbations], control=str(control),
                       perturbation_column=perturbation_column, factors=factors,
                       site_factor=bool(factors) and factors[0][0] == SITE_FACTOR)


def _report_genes_withheld(facts: dict, scale, genes: list[str], min_nonzero: int) -> None:
    """``facts["genes_withheld"]`` and a warning: genes whose controls in some design cell
    hold 1 .. ``min_nonzero - 1`` expressing cells (every pair of them NaN, untested)."""
    flags = scale.genes_withheld
    names = [g for g, w in zip(genes, flags, strict=True) if w] if flags is not None else []
    facts["genes_withheld"] = len(names)
    if names:
        warnings.warn(f"{len(names)} gene(s) withheld for disclosure control: the control "
                      f"cells of a design cell include some, but fewer than "
                      f"min_nonzero={min_nonzero}, expressing them, so their control sums "
                      f"would be single cells' counts (results NaN): {names[:5]}",
                      FitWarning, stacklevel=3)


def screen(
    sites: Mapping,
    *,
    perturbation_column: str,
    control: str,
    covariates: list[str] | None = None,
    method: str = "nb_glm",
    perturbations: list[str] | None = None,
    genes: list[str] | None = None,
    levels: Mapping | None = None,
    site_effects: bool | None = None,
    size_factors: str = "library",
    dispersion: str = "cox-reid",
    dispersion_cells: str = "control",
    shrink: bool = True,
    fit_type: str = "parametric",
    min_mu: float = MIN_MU,
    min_cell_size: int = 3,
    min_pooled_group: int = 15,
    min_nonzero: int = 2,
    min_pct_ctrl: float = 0.01,
    min_pct_pert: float = 0.002,
    min_mean_ctrl: float = 0.05,
    min_mean_pert: float = 0.005,
    min_cells_ctrl: int = 1,
    min_cells_pert: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backed: bool = False,
    rounds: Mapping[str, int] | None = None,
    measure_memory: bool = False,
    record_messages: bool = False,
    progress=None,
    backend: str = "simulation",
    workdir=None,
    credentials=None,
    keys=None,
    timeout: float | None = None,
    secure_aggregation: bool = True,
    layer: str | None = None,
    n_jobs: int | None = 1,
    spill_dir=None,
) -> ScreenResult:
    """Test every perturbation against the shared control across sites, moving no cell.

    Parameters
    ----------
    sites
        Site name -> AnnData (cells x genes, raw UMI counts in a sparse ``X``) or ``.h5ad``.
    perturbation_column, control
        ``obs`` column of the perturbation labels, and the control label.
    covariates
        Categorical ``obs`` columns added to the control fit (``nb_glm``; strata of the
        ``wilcoxon`` test).
    method
        ``"nb_glm"`` (NB GLM against frozen control statistics, Wald test), ``"wilcoxon"``
        (van Elteren: ranks within site) or ``"t_test"`` (Welch on ``log1p(y / s)``).
    perturbations, genes, levels
        The declared perturbation list, gene list and covariate levels (reference first).
        Read from the sites when not given (simulation only).
    site_effects
        A site effect per gene in the control fit (default: with more than one site, for
        ``nb_glm``).
    size_factors
        ``"library"`` (library size over its global geometric mean) or ``"poscounts"``.
    dispersion, dispersion_cells, shrink, fit_type
        ``"cox-reid"`` or ``"moments"``; from the ``"control"`` or ``"all"`` cells; MAP
        shrinkage to the ``"parametric"`` (or ``"mean"``) trend.
    min_mu
        Floor of fitted means (default 1e-8: a numerical guard, see ``docs/screen.md``).
    min_cell_size
        Disclosure control: smaller perturbation groups are left out at their site; a site
        refuses a design cell with fewer control cells (0 = every disclosure rule off).
    min_pooled_group, min_nonzero
        Study-level disclosure rules: a (perturbation, design cell) group holding fewer
        than ``min_pooled_group`` cells (over all sites; with site effects, one site's) is
        left out of every sum, a perturbation with no group left is left out (NaN
        results), and a (perturbation, gene) pair whose groups hold 1 ..
        ``min_nonzero - 1`` expressing cells is
        withheld (NaN, untested): a sum with one non-zero contributor is that cell's count.
        A gene whose control cells of one design cell (with site effects, one site's) hold
        1 .. ``min_nonzero - 1`` expressing cells is withheld whole
        (``facts["genes_withheld"]``), and a design cell with fewer than
        ``min_pooled_group`` control cells stops the run.
    min_pct_ctrl, min_pct_pert, min_mean_ctrl, min_mean_pert, min_cells_ctrl, min_cells_pert
        Expression filters: untested pairs are NaN and excluded from BH.
    chunk_size, backed
        Cells read at once; read ``.h5ad`` paths from disk in chunks instead of loading them.
    rounds
        ``genewise_rounds``, ``map_rounds``, ``fit_rounds`` (unrolled iteration counts).
    measure_memory
        Trace the peak memory of every site task (tracemalloc; slows the run a little).
    record_messages, progress
        Keep every message (privacy tests); ``progress=True``: a progress bar on stderr
        (tasks done of the plan's total, time left), or a callback ``(step, org, round)``.
    backend, workdir
        ``"simulation"`` (strict in-process, default), ``"subprocess"`` (substra's
        subprocess backend: one organisation per site, real functions and tasks; working
        files under ``workdir``) or ``"remote"`` (a Substra network; ``sites`` is not given:
        the cells stay at the sites).
    credentials, keys, timeout
        Remote backend: credentials YAML, keys YAML written by ``fed-de register-site --kind
        screen`` (its site names are the study's sites), seconds to wait. The study must be
        declared: ``perturbations``, ``genes`` and, with covariates, ``levels``.
    secure_aggregation
        Mask every message so the aggregator sees only cross-site totals (on by default from
        two sites); ``False`` for audits that need each site's own messages.
    layer
        The AnnData layer holding the raw UMI counts (e.g. ``"counts"`` beside a normalised
        ``X``); read in memory.
    n_jobs, spill_dir
        Simulation: worker processes for the site tasks of a round (``-1``: every CPU; the
        answer is identical; ``measure_memory`` traces only in-process runs, ``n_jobs=1``),
        and a directory where shared states are kept as files instead of in memory.
    """
    from fed_de.backends.plan import record_plan
    from fed_de.progress import progress_callback
    from fed_de.provenance import run_provenance
    from fed_de.screening.strategy import ScreenStrategy

    provenance = run_provenance()
    started = time.perf_counter()
    if site_effects is None:
        site_effects = method == "nb_glm"
    if backend == "remote":
        if sites:
            raise ValueError("backend='remote': the cells stay at the sites; give keys=, "
                             "not sites")
        loaded = []
        study = _declared_remote_study(keys, perturbation_column, control, covariates,
                                       perturbations, genes, levels, bool(site_effects))
    else:
        loaded = load_screen_sites(sites, chunk_size, backed, layer)
        study = declare_screen(loaded, perturbation_column, control, covariates=covariates,
                               perturbations=perturbations, genes=genes, levels=levels,
                               site_effects=bool(site_effects))
    params = dict(method=method, size_factors=size_factors, dispersion=dispersion,
                  dispersion_cells=dispersion_cells, shrink=shrink, fit_type=fit_type,
                  min_mu=min_mu, min_cell_size=min_cell_size,
                  min_pooled_group=min_pooled_group, min_nonzero=min_nonzero,
                  min_pct_ctrl=min_pct_ctrl,
                  min_pct_pert=min_pct_pert, min_mean_ctrl=min_mean_ctrl,
                  min_mean_pert=min_mean_pert, min_cells_ctrl=min_cells_ctrl,
                  min_cells_pert=min_cells_pert, **dict(rounds or {}))
    from fed_de.backends import declared_site_names, n_declared_sites, secure_option

    n_sites = n_declared_sites(loaded, keys)
    strategy = ScreenStrategy(study.to_dict(), **params, n_sites=n_sites,
                              secure_aggregation=secure_option(secure_aggregation, n_sites))
    simulation = backend == "simulation"
    in_process = simulation and (n_jobs or 1) == 1
    tracing = in_process and measure_memory and not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()
    total = 0
    if progress is True:
        names = list(declared_site_names(loaded, keys))
        total = len(record_plan(strategy, names).tasks)
    try:
        with progress_callback(progress, total, "fed_de screen") as callback:
            done = run(strategy, loaded, backend, workdir=workdir, credentials=credentials,
                       keys=keys, timeout=timeout, progress=callback,
                       record_messages=record_messages and simulation,
                       opener_source=SCREEN_OPENER_SOURCE,
                       write_site=write_screen_site_folder, prefix="fed_de_screen_",
                       n_jobs=n_jobs, spill_dir=spill_dir)
    finally:
        if tracing:
            tracemalloc.stop()
    state, facts = done.state, done.facts
    facts["wall_seconds"] = round(time.perf_counter() - started, 4)
    G = len(study.genes)
    facts["bytes_per_gene_by_site"] = {k: round(v / G, 1)
                                       for k, v in facts["bytes_sent_by_site"].items()}
    facts["secure_aggregation"] = strategy.masks(n_sites)
    if measure_memory and in_process:
        facts["peak_memory_by_site"] = {
            s.name: {"task_peak_bytes": done.local_states[s.name].peak_bytes,
                     "resident_counts_bytes": s.resident_bytes,
                     "total_bytes": done.local_states[s.name].peak_bytes + s.resident_bytes}
            for s in loaded}
    facts["site_effects"] = bool(study.site_factor)
    scale = state.scale
    if scale is not None and scale.withheld is not None:
        dropped = [p for p, d in zip(study.perturbations, scale.dropped, strict=True) if d]
        facts.update(perturbations_left_out=dropped,
                     groups_left_out=int(scale.n_groups_out),
                     pairs_withheld=int(scale.withheld[~scale.dropped].sum()),
                     min_pooled_group=min_pooled_group, min_nonzero=min_nonzero)
        _report_genes_withheld(facts, scale, study.genes, min_nonzero)
        if dropped:
            warnings.warn(f"{len(dropped)} perturbation(s) left out for disclosure control: "
                          f"each of their (perturbation, design cell) groups holds fewer "
                          f"than min_pooled_group={min_pooled_group} cells (results NaN): "
                          f"{dropped[:5]}", FitWarning, stacklevel=2)
        if scale.n_groups_out:
            warnings.warn(f"{scale.n_groups_out} (perturbation, design cell) group(s) of "
                          f"fewer than min_pooled_group={min_pooled_group} cells left out "
                          "for disclosure control: those perturbations are estimated from "
                          "their other design cells (facts['groups_left_out'])",
                          FitWarning, stacklevel=2)
    facts.update(provenance, layer=layer)
    gene_table = pd.DataFrame({"control_mean": state.summary.ctrl_mean}, index=study.genes)
    disp = state.dispersions
    if disp is not None:
        for col, values in (("dispersion_genewise", disp.gene), ("dispersion_trend", disp.fit),
                            ("dispersion_map", disp.map), ("dispersion", disp.final)):
            gene_table[col] = values
    gene_table.index.name = "gene"
    results = state.results
    return ScreenResult(
        study=study, method=method, arrays=results.arrays, tested=results.tested,
        n_cells=pd.Series(state.summary.n_pert, index=study.perturbations, name="n_cells"),
        n_control=int(state.summary.n_ctrl), gene_table=gene_table, facts=facts,
        converged=results.converged, params=params)
