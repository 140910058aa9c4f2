"""``fed-de screen``: a federated perturbation screen from the command line.

Registered in :mod:`fed_de.cli` as ``app.command("screen")(screen_command)``::

    fed-de screen --site a=a.h5ad --site b=b.h5ad --perturbation-column perturbation \\
        --control non-targeting --method nb_glm --alpha 0.05 --out results/

writes ``results.csv`` (long: perturbation, gene, baseMean, log2FoldChange, lfcSE, stat,
pvalue, padj), ``screen.h5ad`` (perturbations x genes, one layer per column, scanpy's
``rank_genes_groups`` in ``uns``) and ``run.json`` (sequential steps, tasks, bytes and peak
memory per site, wall time, parameters, warnings, the command line, the start time, the
Python, package and fed_de versions and commit).
"""

from __future__ import annotations

import time
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fed_de.cli_common import (
    STATE,
    cli_errors,
    command_line,
    parse_sites,
    record_failure,
    report_warnings,
    value,
)


class Method(str, Enum):
    """The screen's test."""

    nb_glm = "nb_glm"
    wilcoxon = "wilcoxon"
    t_test = "t_test"


class ScreenSizeFactors(str, Enum):
    """Size factors of screen cells."""

    library = "library"
    poscounts = "poscounts"


class Dispersion(str, Enum):
    """Dispersion estimator of the NB GLM."""

    cox_reid = "cox-reid"
    moments = "moments"


class ScreenBackend(str, Enum):
    """Where a screen's plan runs from the command line."""

    simulation = "simulation"
    subprocess = "subprocess"


METHODS = tuple(m.value for m in Method)


def _parse_sites(site: list[str]) -> dict[str, Path]:
    return parse_sites(site, h5ad_only=True)


@cli_errors("screen")
def screen_command(
    ctx: typer.Context,
    site: Annotated[list[str], typer.Option("--site", help="NAME=PATH of an .h5ad (repeat).")],
    perturbation_column: Annotated[str, typer.Option(
        "--perturbation-column", help="obs column holding the perturbation labels.")],
    control: Annotated[str, typer.Option("--control", help="Label of the control cells.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    method: Annotated[Method, typer.Option("--method", help="The test.")] = Method.nb_glm,
    alpha: Annotated[float, typer.Option(
        "--alpha", help="Significance level reported per perturbation (padj < alpha).")] = 0.05,
    covariate: Annotated[list[str] | None, typer.Option(
        "--covariate", help="Categorical obs column added to the control fit (repeat).")
    ] = None,
    size_factors: Annotated[ScreenSizeFactors, typer.Option(
        "--size-factors", help="Size factors of the cells.")] = ScreenSizeFactors.library,
    dispersion: Annotated[Dispersion, typer.Option(
        "--dispersion", help="Dispersion estimator.")] = Dispersion.cox_reid,
    site_effects: Annotated[bool | None, typer.Option(
        "--site-effects/--no-site-effects",
        help="A per-gene site effect in the control fit (default: on with several sites).")
    ] = None,
    chunk_size: Annotated[int, typer.Option(
        "--chunk-size", help="Cells a site reads at once.")] = 2048,
    backed: Annotated[bool, typer.Option(
        "--backed/--in-memory", help="Read the .h5ad files chunk by chunk from disk.")
    ] = False,
    layer: Annotated[str | None, typer.Option(
        "--layer", help="AnnData layer holding the raw UMI counts (e.g. counts, when X is "
                        "normalised); read in memory.")] = None,
    min_cell_size: Annotated[int, typer.Option(
        "--min-cell-size", help="Smallest group of cells a site sends sums of (0 = every "
        "disclosure rule off).")
    ] = 3,
    min_pooled_group: Annotated[int, typer.Option(
        "--min-pooled-group", help="(perturbation, design cell) groups of fewer cells (all "
        "sites; with site effects, one site's) are left out of every sum; perturbations "
        "with no group left are left out (NaN).")] = 15,
    measure_memory: Annotated[bool, typer.Option(
        "--measure-memory/--no-measure-memory",
        help="Trace each site's peak memory (tracemalloc; a little slower).")] = True,
    backend: Annotated[ScreenBackend, typer.Option(
        "--backend", help="simulation, or subprocess (substra's real tasks).")
    ] = ScreenBackend.simulation,
    workdir: Annotated[Path | None, typer.Option(
        "--workdir", help="Run directory of the subprocess backend.")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="Simulation: worker processes running a round's site tasks at once "
        "(-1: every CPU; memory is traced only with 1).")] = 1,
    spill_dir: Annotated[Path | None, typer.Option(
        "--spill-dir", help="Simulation: keep shared states as files under this folder.")
    ] = None,
) -> None:
    """Test every perturbation against the shared control across sites (no cell moves)."""
    from fed_de.screening.api import screen

    if not 0 < alpha < 1:
        raise typer.BadParameter("--alpha must be in (0, 1)")
    sites = _parse_sites(site)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, \
            record_failure(out, command_line(ctx, "screen"), method=value(method),
                           backend=value(backend)):
        warnings.simplefilter("always")
        res = screen(sites, perturbation_column=perturbation_column, control=control,
                     covariates=list(covariate or []) or None, method=value(method),
                     size_factors=value(size_factors), dispersion=value(dispersion),
                     site_effects=site_effects, chunk_size=chunk_size, backed=backed,
                     min_cell_size=min_cell_size, min_pooled_group=min_pooled_group,
                     measure_memory=measure_memory,
                     backend=value(backend), workdir=workdir, layer=layer,
                     n_jobs=workers, spill_dir=spill_dir,
                     progress=not STATE["quiet"])
    res.facts["warnings"] = report_warnings(caught)
    res.facts["command_line"] = command_line(ctx, "screen")
    wall = time.perf_counter() - started
    res.params["alpha"] = alpha
    paths = res.write(out, wall_seconds=wall)
    n_sig = res.significant(alpha)
    facts = res.facts
    if STATE["quiet"]:
        return
    typer.echo(f"{len(res)} perturbations x {len(res.genes)} genes, method "
               f"{value(method)}: {int(n_sig.sum())} (perturbation, gene) pairs with padj < "
               f"{alpha}; {facts['sequential_steps']} sequential steps, {facts['tasks']} "
               f"tasks, {wall:.2f} s")
    typer.echo(f"wrote {paths['results']}, {paths['h5ad']}, {paths['run']}")
