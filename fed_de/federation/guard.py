"""A site's own defences, run before any step touches its data or sends anything.

- **Its data did not change during the run.** At its first task a site keeps a digest
  (SHA-256) of what it analyses; every later task recomputes it and refuses on a mismatch:
  sums taken over two versions of the data are no sum of anything, and a data set replaced
  mid-run could be a differencing attack.
- **The request is what the protocol sends.** The shared state is of the strategy's type,
  the numbers the site will compute with are finite, gene selections are genes of the study,
  and (per pipeline) no request narrows a sum to fewer samples than the disclosure rule
  allows. A refusal is a :class:`~fed_de.errors.DisclosureError` (schema or narrowing) or
  a :class:`~fed_de.errors.SiteDataError` (changed data) naming the site and the step;
  nothing is sent.

Pure functions; the strategy base (:mod:`fed_de.federation.strategy`) calls them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np

from fed_de.errors import DisclosureError, SiteDataError


def _raw_bytes(arr: np.ndarray):
    """The bytes ``tobytes()`` gives, without a copy where the array is contiguous already
    (a site's counts are hashed at every task)."""
    arr = np.ascontiguousarray(arr)
    return arr.tobytes() if arr.dtype.hasobject else arr.reshape(-1).view(np.uint8)


def digest_arrays(parts: Iterable[Any]) -> str:
    """SHA-256 of a sequence of arrays, sparse matrices, strings and tables, in order.

    Parameters
    ----------
    parts
        numpy arrays (dtype, shape and bytes hashed), scipy sparse matrices (format,
        shape, data, indices, indptr), pandas tables and series (index, then each column:
        name, dtype and values), tuples or lists of strings, other values (their repr).

    Returns
    -------
    str
        The hex digest.
    """
    import pandas as pd
    import scipy.sparse as sp

    h = hashlib.sha256()
    for part in parts:
        if sp.issparse(part):
            csr = part.tocsr()
            h.update(f"sparse{csr.shape}{csr.dtype}".encode())
            for arr in (csr.data, csr.indices, csr.indptr):
                h.update(_raw_bytes(arr))
        elif isinstance(part, np.ndarray):
            h.update(f"dense{part.shape}{part.dtype}".encode())
            h.update(_raw_bytes(part))
        elif isinstance(part, pd.DataFrame | pd.Series):
            _hash_table(h, part)
        elif isinstance(part, tuple | list) and _hash_strings(h, part):
            pass
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _hash_strings(h, strings) -> bool:
    """Hash strings, counted and separated (a site hashes its gene names at every task: no
    per-string repr); False, hashing nothing, when not all are strings."""
    try:
        text = "\x00".join(strings)
    except TypeError:
        return False
    h.update(f"strings{len(strings)}".encode())
    h.update(text.encode("utf-8", "surrogatepass"))
    return True


def _hash_table(h, table) -> None:
    """A table's (or series') index, then each column's name, dtype and values: numeric
    columns by their bytes, others by their values' text (cheaper than writing CSV)."""
    import pandas as pd

    h.update(f"table{table.shape}".encode())
    _hash_strings(h, [str(x) for x in table.index])
    columns = table.items() if isinstance(table, pd.DataFrame) else [(table.name, table)]
    for name, col in columns:
        h.update(f"{name!s}\x00{col.dtype}".encode())
        dtype = col.dtype
        if (pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
                and not isinstance(dtype, pd.CategoricalDtype)):
            h.update(_raw_bytes(col.to_numpy(dtype=np.float64, na_value=np.nan)))
        else:
            _hash_strings(h, [str(x) for x in col.tolist()])


def check_digest(kept: str | None, now: str, *, site: str, step: str) -> str:
    """The digest to keep: ``now`` at the first task; later, refuse a different one.

    Raises
    ------
    SiteDataError
        The site's data changed since its first task of this run.
    """
    if kept is not None and kept != now:
        raise SiteDataError(
            f"site {site!r}, step {step}: the site's data changed since its first task of this "
            "run (counts or the design's sample columns differ); nothing sent. Restore the data "
            "as it was when the run started, or start a new run on the new data")
    return now


def check_finite(obj: Any, names: Iterable[str], *, site: str, step: str,
                 where: str = "") -> None:
    """Refuse a request whose fields ``names`` of ``obj`` hold NaN or infinite numbers.

    ``names`` are dotted paths (``"totals.xtx"``); a missing or ``None`` part is skipped.

    Raises
    ------
    DisclosureError
        A named field holds a non-finite value (or is not numeric).
    """
    for name in names:
        value = obj
        for attr in name.split("."):
            value = getattr(value, attr, None) if value is not None else None
        if value is None:
            continue
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise DisclosureError(
                f"site {site!r}, step {step}: the request's {where}{name} is not numeric "
                f"({type(value).__name__}); refused, nothing sent (the aggregator runs another "
                "fed_de version, or is faulty)") from None
        if not np.all(np.isfinite(arr)):
            raise DisclosureError(
                f"site {site!r}, step {step}: the request's {where}{name} holds NaN or "
                "infinite values where the protocol sends finite numbers; refused, nothing "
                "sent (the aggregator is faulty or tampered with)")


def check_parts(state: Any, expected: type, *, site: str, step: str) -> None:
    """Refuse a shared state that is not ``expected`` (a dataclass), or whose parts are not
    of their declared dataclass types (``None`` allowed).

    Raises
    ------
    DisclosureError
        The state or one of its parts has another type.
    """
    import typing

    from fed_de.federation.messages import type_hints

    if not isinstance(state, expected):
        raise DisclosureError(
            f"site {site!r}, step {step}: the request is a {type(state).__name__}, not a "
            f"{expected.__name__}; refused, nothing sent (is the aggregator running the same "
            "fed_de version?)")
    hints = type_hints(expected)
    for f in fields(expected):
        value = getattr(state, f.name)
        if value is None:
            continue
        kinds = [k for k in typing.get_args(hints[f.name]) or (hints[f.name],)
                 if isinstance(k, type) and k is not type(None)]
        typed = [k for k in kinds if is_dataclass(k)]
        if typed and not isinstance(value, tuple(typed)):
            raise DisclosureError(
                f"site {site!r}, step {step}: the request's part {f.name!r} is a "
                f"{type(value).__name__}, declared {' | '.join(k.__name__ for k in typed)}; "
                "refused, nothing sent")


def check_rows(rows: Any, n_genes: int, *, site: str, step: str) -> None:
    """Refuse a gene selection that is not distinct, sorted genes of the study.

    Raises
    ------
    DisclosureError
        ``rows`` is not a 1-D integer array of increasing indices in ``[0, n_genes)``.
    """
    if rows is None:
        return
    arr = np.asarray(rows)
    ok = (arr.ndim == 1 and arr.dtype.kind in "iu" and (arr.size == 0 or (
        arr.min() >= 0 and arr.max() < n_genes and np.all(np.diff(arr) > 0))))
    if not ok:
        raise DisclosureError(
            f"site {site!r}, step {step}: the request's gene selection (rows) is not a set of "
            f"distinct genes of the study's {n_genes}; refused, nothing sent")
