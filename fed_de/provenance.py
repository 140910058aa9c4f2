"""What a run records to be reproduced: versions, the fed_de commit, the command line, the start.

Every node of a study must run the same numpy / scipy / pandas / anndata (shared states are
pickles), so the versions are part of a run's record, as is the fed_de source it ran.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

#: Packages whose versions a run records (those whose objects travel, and the platform).
PACKAGES = ("fed-de", "numpy", "scipy", "pandas", "anndata", "formulaic", "substrafl",
            "substra", "substratools")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed version of each package (``"not installed"`` when absent)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def fed_de_commit() -> str:
    """The git commit fed_de runs from (``+dirty`` when its files differ from it), or
    ``"unknown"`` for an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return "unknown"
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "fed_de"], check=True, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def run_provenance(started: datetime | None = None, argv: list[str] | None = None) -> dict:
    """Start time (UTC, ISO 8601), Python, platform, fed_de version and commit, package
    versions and, when given, the command line."""
    import fed_de

    out = {
        "started": (started or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "fed_de_version": fed_de.__version__,
        "fed_de_commit": fed_de_commit(),
        "package_versions": package_versions(),
    }
    if argv is not None:
        out["command_line"] = list(argv)
    return out


def json_default(value):
    """JSON for what run facts hold besides plain values: numpy scalars and arrays as
    numbers and lists, anything else as its text."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
