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


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int | float) else "n/a"


def print_facts(facts: dict, title: str = "Run facts", console: Console | None = None) -> None:
    """A small table of a run's steps, tasks and bytes; a fact a backend does not report
    (the substra backends measure no received bytes, a remote run no bytes at all) prints as
    ``n/a``, and declared upper bounds are labelled so."""
    table = Table(title=title)
    table.add_column("fact")
    table.add_column("value", justify="right")
    table.add_row("sequential steps", _count(facts.get("sequential_steps")))
    table.add_row("tasks", _count(facts.get("tasks")))
    table.add_row("distinct functions", _count(facts.get("distinct_functions")))
    measured = facts.get("bytes_measured", True)
    kind = "bytes sent" if measured else "bytes sent (declared upper bound)"
    payload = facts.get("payload_bytes_by_site") or {}
    for site, b in (facts.get("bytes_sent_by_site") or {}).items():
        extra = f" (payload {_count(payload[site])})" if site in payload else ""
        table.add_row(f"{kind} by {site}", _count(b) + extra)
    table.add_row("bytes sent by aggregator", _count(facts.get("bytes_sent_by_aggregator")))
    if facts.get("n_jobs", 1) != 1:
        table.add_row("worker processes", _count(facts["n_jobs"]))
    wall = facts.get("wall_seconds")
    table.add_row("wall seconds", f"{wall:.3f}" if isinstance(wall, int | float) else "n/a")
    (console or Console()).print(table)
    if facts.get("bytes_note"):
        (console or Console()).print(f"bytes: {facts['bytes_note']}")
