"""What a site sends: typed messages whose shapes are written in study sizes only.

A message is a dataclass (subclass of :class:`Message`) whose fields are float64 arrays
declared with :func:`sums` (or :func:`counts`, for sample counts), or nested messages
(``None`` where a variant is off: the LRT's reduced model, Cook's counts). Each array's shape
is a tuple of dimension symbols: genes ``G``, coefficients ``p``, packed p x p matrices
``T``, design cells ``C``, ... and sizes the aggregator announces in its request (points per
gene ``K``, candidates ``KB``, open search targets ``A``). Never the site's sample count. The
schema is read from the type, so what is declared is what is checked, summed and sent.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import Field, dataclass, field, fields
from typing import Any

import numpy as np

from fed_de.errors import MessageSchemaError


@functools.cache
def type_hints(obj) -> dict[str, Any]:
    """``typing.get_type_hints`` of a class or function, evaluated once per process (its
    string annotations are compiled at every call; steps ask at every task). Read only."""
    return typing.get_type_hints(obj)


def sums(*shape: str | int, narrow: bool = False) -> Any:
    """Declare a message field: a float64 array of the given symbolic shape (``()``: scalar).

    ``narrow``: its values stay well below ``2**53`` in magnitude (fit sums; not sums of
    squared counts), so under secure aggregation they travel in two words, not three
    (:data:`fed_de.secagg.NARROW`; a larger value is refused, naming the field).
    """
    return field(metadata={"shape": tuple(shape), **({"narrow": True} if narrow else {})})


def counts(*shape: str | int) -> Any:
    """Declare a field of sample counts: non-negative integers held in a float64 array.

    Summed like :func:`sums`; under secure aggregation they travel packed, 4 bytes a count
    instead of a fixed-point value's 24, ``N.bit_length()`` bits once the request carries the
    pooled sample count ``N`` (:func:`fed_de.secagg.pack_counts`). A count is a number of the
    site's samples: at most its own sample count (a larger one is refused), so its total over
    sites is at most the study's.
    """
    return field(metadata={"shape": tuple(shape), "counts": True})


def part() -> Any:
    """Declare a nested message (``None`` when the variant that sends it is off)."""
    return field(default=None, metadata={"part": True})


@dataclass
class Message:
    """Base of every message a site sends to the aggregator (subclasses are dataclasses)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        dataclass(cls)

    @classmethod
    def schema(cls) -> dict[str, tuple]:
        """Declared shapes of the array fields (nested messages are not listed)."""
        return {f.name: f.metadata["shape"] for f in fields(cls) if "shape" in f.metadata}


def _is_array(f: Field) -> bool:
    return "shape" in f.metadata


def resolve(symbols: tuple, dims: dict[str, int]) -> tuple[int, ...]:
    """Concrete shape of a symbolic one."""
    return tuple(dims[s] if isinstance(s, str) else int(s) for s in symbols)


def check_message(message: Message, dims: dict[str, int], *, site: str, step: str) -> None:
    """Raise :class:`MessageSchemaError` unless ``message`` matches its declared schema."""
    if not isinstance(message, Message):
        raise MessageSchemaError(f"site {site!r}, {step}: a message must be a Message, not "
                                 f"{type(message).__name__}; not sent")
    for f in fields(message):
        value = getattr(message, f.name)
        if not _is_array(f):
            if value is not None:
                check_message(value, dims, site=site, step=f"{step}.{f.name}")
            continue
        shape = resolve(f.metadata["shape"], dims)
        arr = np.asarray(value)
        if arr.shape != shape or arr.dtype != np.float64:
            raise MessageSchemaError(
                f"site {site!r}, {step}: {f.name!r} has shape {arr.shape} dtype {arr.dtype}, "
                f"declared {shape} float64; not sent"
            )


def arrays(message: Message, prefix: str = "") -> dict[str, np.ndarray]:
    """The message's arrays by dotted name (nested parts flattened): for audits and tests."""
    out = {}
    for f in fields(message):
        value = getattr(message, f.name)
        if _is_array(f):
            out[prefix + f.name] = np.asarray(value)
        elif value is not None:
            out.update(arrays(value, f"{prefix}{f.name}."))
    return out


def flagged_keys(message: Message, flag: str, prefix: str = "") -> set[str]:
    """Dotted names of the message's fields declared with ``flag`` (``"counts"``: by
    :func:`counts`; ``"narrow"``: by ``sums(..., narrow=True)``), nested parts included."""
    out = set()
    for f in fields(message):
        value = getattr(message, f.name)
        if _is_array(f):
            if f.metadata.get(flag):
                out.add(prefix + f.name)
        elif value is not None:
            out |= flagged_keys(value, flag, f"{prefix}{f.name}.")
    return out


def take_rows(message: Message, rows: np.ndarray) -> Message:
    """The message restricted to genes ``rows`` (fields whose first dimension is ``G``)."""
    kwargs = {}
    for f in fields(message):
        value = getattr(message, f.name)
        if _is_array(f):
            kwargs[f.name] = (np.asarray(value)[rows] if f.metadata["shape"][:1] == ("G",)
                              else value)
        else:
            kwargs[f.name] = None if value is None else take_rows(value, rows)
    return type(message)(**kwargs)


def zero_rows(message: Message, rows: np.ndarray) -> Message:
    """The message with genes ``rows`` (a mask) set to zero in every field whose first
    dimension is ``G``: genes out of the analysis send nothing of theirs."""
    kwargs = {}
    for f in fields(message):
        value = getattr(message, f.name)
        if _is_array(f) and f.metadata["shape"][:1] == ("G",):
            value = np.asarray(value)
            kwargs[f.name] = np.where(rows.reshape((-1,) + (1,) * (value.ndim - 1)), 0.0, value)
        elif _is_array(f) or value is None:
            kwargs[f.name] = value
        else:
            kwargs[f.name] = zero_rows(value, rows)
    return type(message)(**kwargs)


def total(messages: list[Message], rows: np.ndarray | None = None,
          n_genes: int | None = None) -> Message:
    """Sum the sites' messages field by field, in site order (reproducible sums).

    Messages restricted to genes ``rows`` are scattered back to all ``n_genes`` genes (zeros
    elsewhere). A single message's float arrays are taken as they are, not copied (a masked
    round's decoded total is one fresh message).
    """
    first = messages[0]
    kwargs = {}
    for f in fields(first):
        values = [getattr(m, f.name) for m in messages]
        if not _is_array(f):
            kwargs[f.name] = None if values[0] is None else total(values, rows, n_genes)
            continue
        if len(values) == 1:  # taken as it is (a scalar field stays a numpy scalar)
            tot = np.asarray(values[0], dtype=np.float64)
            tot = tot[()] if tot.ndim == 0 else tot
        else:
            tot = np.sum([np.asarray(v, dtype=np.float64) for v in values], axis=0)
        if rows is not None and f.metadata["shape"][:1] == ("G",):
            full = np.zeros((n_genes,) + tot.shape[1:])
            full[rows] = tot
            tot = full
        kwargs[f.name] = tot
    return type(first)(**kwargs)


def folded_keys(cls: type, folds: dict) -> dict[str, str]:
    """Dotted names of the arrays of message type ``cls`` (every optional part) whose last
    dimension is a symbol of ``folds`` (e.g. ``T``, packed ``X'WX``), with that symbol: the
    columns a study makes equal or zero need not travel (folded by
    :func:`fed_de.federation.secure.mask_message`, copied back by its ``unfold``)."""
    return {key: f.metadata["shape"][-1] for key, f in _declared(cls)
            if f.metadata["shape"] and f.metadata["shape"][-1] in folds}


def fold_columns(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a study-level matrix whose columns are what every sample multiplies into a packed
    sum (e.g. ``x_i x_j`` over the design's cell rows): the columns to send (first of each
    set of equal, non-zero columns) and, per column, its index among them (-1: always zero).
    Public: it depends on the declared design only."""
    columns = np.asarray(columns, dtype=float)
    keep: list[int] = []
    expand = np.full(columns.shape[1], -1)
    for j in range(columns.shape[1]):
        if not columns[:, j].any():
            continue
        same = [i for i, k in enumerate(keep) if np.array_equal(columns[:, k], columns[:, j])]
        if same:
            expand[j] = same[0]
        else:
            expand[j] = len(keep)
            keep.append(j)
    return np.array(keep, dtype=int), expand


def declared_shapes(cls: type, dims: dict[str, int],
                    only: str | None = None) -> dict[str, tuple]:
    """Every array a message of type ``cls`` may carry, by dotted name, with its shape (every
    optional part included: an upper bound for variants that leave a part out);
    ``only``: the fields declared with that flag (see :func:`flagged_keys`)."""
    return {key: resolve(f.metadata["shape"], dims) for key, f in _declared(cls)
            if only is None or f.metadata.get(only)}


def _declared(cls: type, prefix: str = ""):
    """``(dotted name, field)`` of every array field message type ``cls`` declares, every
    optional part's included."""
    hints = type_hints(cls)
    for f in fields(cls):
        if _is_array(f):
            yield prefix + f.name, f
            continue
        for kind in typing.get_args(hints[f.name]) or (hints[f.name],):
            if isinstance(kind, type) and issubclass(kind, Message):
                yield from _declared(kind, f"{prefix}{f.name}.")
