"""Result files written whole or not at all, and the record of a run that failed.

Every results file (CSV, ``.h5ad``, ``run.json``) is written to a temporary file in the same
folder and renamed over its final name (``os.replace``, atomic on one file system), so a
crash, a full disk or an interrupt never leaves half a file where a reader looks for one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    Parameters
    ----------
    path
        The final file. Its folder is created if missing.

    Yields
    ------
    Path
        Where to write (same folder and suffix, hidden name). Removed if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{path.suffix}",
                                dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # as an ordinary file, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Write ``path`` atomically with ``writer(temporary_path)``; return ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj: Any, default: Callable | None = None) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (``default`` as ``json.dumps``)."""
    return write_text(path, json.dumps(obj, indent=2, default=default))


def write_csv(frame, path: str | Path, **kwargs) -> Path:
    """Write a DataFrame with ``frame.to_csv(..., **kwargs)`` atomically."""
    return write_with(path, lambda tmp: frame.to_csv(tmp, **kwargs))


def write_h5ad(adata, path: str | Path) -> Path:
    """Write an AnnData as ``.h5ad`` atomically."""
    return write_with(path, adata.write_h5ad)


def failure_record(err: BaseException, command_line: list[str] | None = None,
                   **known: Any) -> dict:
    """What ``run.json`` says about a run that failed.

    Parameters
    ----------
    err
        The error. fed_de's task errors carry ``site`` (the organisation), ``step`` and the
        run ``facts`` measured until then; other errors give ``None`` there.
    command_line
        The command as typed.
    **known
        Anything else known (options, the design).

    Returns
    -------
    dict
        ``status: "failed"``, ``error`` (the message), ``error_type``, ``step``, ``site``,
        ``facts`` (so far), ``command_line`` and ``known``.
    """
    return {"status": "failed", "error": str(err).strip(), "error_type": type(err).__name__,
            "step": getattr(err, "step", None), "site": getattr(err, "site", None),
            "facts": dict(getattr(err, "facts", None) or {}),
            "command_line": command_line, **known}
