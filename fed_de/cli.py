"""The ``fed-de`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, help="Federated differential expression (DESeq2-grade).")
console = Console()


@app.callback()
def main() -> None:
    """fed_de: the pooled DESeq2 answer from per-site sums, run as a substrafl compute plan."""


@app.command()
def demo(
    samples: int = typer.Option(150, help="Samples in the generated study."),
    genes: int = typer.Option(5000, help="Genes in the generated study."),
    seed: int = typer.Option(0, help="Random seed of the generated study."),
    out: Path | None = typer.Option(None, help="Folder for the site data and results."),
) -> None:
    """Simulate a three-hospital study, run fed_de on it, compare with the pooled analysis."""
    from fed_de.demo_run import run_demo

    report = run_demo(n_samples=samples, n_genes=genes, seed=seed, out=out, console=console)
    if out is not None:
        (out / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))


def print_facts(facts: dict, title: str = "Run facts") -> None:
    """A small table of a run's steps, tasks and bytes."""
    table = Table(title=title)
    table.add_column("fact")
    table.add_column("value", justify="right")
    table.add_row("sequential steps", str(facts["sequential_steps"]))
    table.add_row("tasks", str(facts["tasks"]))
    table.add_row("distinct functions", str(facts.get("distinct_functions", "")))
    for site, b in facts["bytes_sent_by_site"].items():
        table.add_row(f"bytes sent by {site}", f"{b:,}")
    table.add_row("bytes sent by aggregator", f"{facts['bytes_sent_by_aggregator']:,}")
    table.add_row("wall seconds", f"{facts['wall_seconds']:.3f}")
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    app()
