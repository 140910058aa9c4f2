"""``fed-de screen``: a federated perturbation screen from the command line.

Registered in :mod:`fed_de.cli` as ``app.command("screen")(screen_command)``::

    fed-de screen --site a=a.h5ad --site b=b.h5ad --perturbation-column perturbation \\
        --control non-targeting --method nb_glm --alpha 0.05 --out results/

writes ``results.csv`` (long: perturbation, gene, baseMean, log2FoldChange, lfcSE, stat,
pvalue, padj), ``screen.h5ad`` (perturbations x genes, one layer per column, scanpy's
``rank_genes_groups`` in ``uns``) and ``run.json`` (sequential steps, tasks, bytes and peak
memory per site, wall time).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fed_de.cli_common import parse_sites

METHODS = ("nb_glm", "wilcoxon", "t_test")


def _parse_sites(site: list[str]) -> dict[str, Path]:
    return parse_sites(site, h5ad_only=True)


def screen_command(
    site: Annotated[list[str], typer.Option("--site", help="NAME=PATH of an .h5ad (repeat).")],
    perturbation_column: Annotated[str, typer.Option(
        "--perturbation-column", help="obs column holding the perturbation labels.")],
    control: Annotated[str, typer.Option("--control", help="Label of the control cells.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    method: Annotated[str, typer.Option("--method", help="nb_glm, wilcoxon or t_test.")
                      ] = "nb_glm",
    alpha: Annotated[float, typer.Option(
        "--alpha", help="Significance level reported per perturbation (padj < alpha).")] = 0.05,
    covariate: Annotated[list[str] | None, typer.Option(
        "--covariate", help="Categorical obs column added to the control fit (repeat).")
    ] = None,
    size_factors: Annotated[str, typer.Option(
        "--size-factors", help="library or poscounts.")] = "library",
    dispersion: Annotated[str, typer.Option(
        "--dispersion", help="cox-reid or moments.")] = "cox-reid",
    site_effects: Annotated[bool | None, typer.Option(
        "--site-effects/--no-site-effects",
        help="A per-gene site effect in the control fit (default: on with several sites).")
    ] = None,
    chunk_size: Annotated[int, typer.Option(
        "--chunk-size", help="Cells a site reads at once.")] = 2048,
    backed: Annotated[bool, typer.Option(
        "--backed/--in-memory", help="Read the .h5ad files chunk by chunk from disk.")
    ] = False,
    min_cell_size: Annotated[int, typer.Option(
        "--min-cell-size", help="Smallest group of cells a site sends sums of (0 = off).")
    ] = 3,
    measure_memory: Annotated[bool, typer.Option(
        "--measure-memory/--no-measure-memory",
        help="Trace each site's peak memory (tracemalloc; a little slower).")] = True,
    backend: Annotated[str, typer.Option(
        "--backend", help="simulation or subprocess (substra's real tasks).")] = "simulation",
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
    from fed_de.errors import FedDEError
    from fed_de.screening.api import screen

    if method not in METHODS:
        raise typer.BadParameter(f"--method must be one of {METHODS}, not {method!r}")
    if not 0 < alpha < 1:
        raise typer.BadParameter("--alpha must be in (0, 1)")
    sites = _parse_sites(site)
    started = time.perf_counter()
    try:
        res = screen(sites, perturbation_column=perturbation_column, control=control,
                     covariates=list(covariate or []) or None, method=method,
                     size_factors=size_factors, dispersion=dispersion,
                     site_effects=site_effects, chunk_size=chunk_size, backed=backed,
                     min_cell_size=min_cell_size, measure_memory=measure_memory,
                     backend=backend, workdir=workdir, n_jobs=workers, spill_dir=spill_dir)
    except (FedDEError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    wall = time.perf_counter() - started
    res.params["alpha"] = alpha
    paths = res.write(out, wall_seconds=wall)
    n_sig = res.significant(alpha)
    facts = res.facts
    typer.echo(f"{len(res)} perturbations x {len(res.genes)} genes, method {method}: "
               f"{int(n_sig.sum())} (perturbation, gene) pairs with padj < {alpha}; "
               f"{facts['sequential_steps']} sequential steps, {facts['tasks']} tasks, "
               f"{wall:.2f} s")
    typer.echo(f"wrote {paths['results']}, {paths['h5ad']}, {paths['run']}")
