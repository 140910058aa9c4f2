"""Command-line argument parsing shared by fed-de's commands."""

from __future__ import annotations

from pathlib import Path

import typer


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
