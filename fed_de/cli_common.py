"""What fed-de's commands share: site arguments and the run-facts table."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def parse_sites(items: list[str], h5ad_only: bool = False) -> dict[str, Path]:
    """``NAME=PATH`` options -> {name: path}, with clear errors for bad or missing paths."""
    sites: dict[str, Path] = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--site expects NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        if name in sites:
            raise typer.BadParameter(f"site name {name!r} given twice")
        p = Path(path)
        if not p.exists():
            raise typer.BadParameter(f"site {name!r}: {path} does not exist")
        if h5ad_only and p.is_file() and p.suffix != ".h5ad":
            raise typer.BadParameter(f"site {name!r}: {path} is not an .h5ad file")
        sites[name] = p
    if not sites:
        raise typer.BadParameter("give at least one --site NAME=PATH")
    return sites


def print_facts(facts: dict, title: str = "Run facts", console: Console | None = None) -> None:
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
    (console or Console()).print(table)
