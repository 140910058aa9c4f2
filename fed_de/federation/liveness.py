"""Which parts of the run state a plan still reads: an aggregation sends only those.

A plan is static and every step's signature names the run-state parts it reads
(:mod:`fed_de.federation.calls`). So, for each aggregation of the plan (its chain of steps,
encoded), the parts that any task declared after its first occurrence reads are known before
the run; the others are dead and the aggregation drops them from what it sends (to the sites
and to the next aggregation alike: a substrafl aggregation has one output). Parts read by
other means (the results, the masking relay, a gene selection) are kept by the strategy's
:meth:`~fed_de.federation.strategy.FedStrategy.kept_parts`.

A chain that occurs several times keeps the union over its occurrences, which is what is read
after its first: what a plan reads later only shrinks as it advances.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import fields, is_dataclass, replace
from typing import Any

from fed_de.federation.calls import decode

_CACHE: dict[str, dict[str, frozenset[str]]] = {}


def _plan_key(strategy) -> str:
    return json.dumps({"class": f"{type(strategy).__module__}.{type(strategy).__qualname__}",
                       "args": repr(getattr(strategy, "args", ())),
                       "kwargs": repr(sorted(getattr(strategy, "kwargs", {}).items()))})


def _reads(spec: str, role: str) -> set[str]:
    out: set[str] = set()
    for fn, _ in decode(spec, role):
        out |= set(inspect.signature(fn).parameters)
    return out


def live_after(strategy) -> dict[str, frozenset[str]]:
    """Per aggregation chain (its ``steps`` encoding): the names its later tasks read.

    The plan is recorded once per process (a dry run of a fresh copy of the strategy, about
    20 ms) and cached by the strategy's class and constructor arguments.
    """
    key = _plan_key(strategy)
    if key not in _CACHE:
        from fed_de.backends.plan import record_plan

        fresh = type(strategy)(*strategy.args, **strategy.kwargs)
        n = max(int(getattr(strategy, "n_sites", 0) or 0), 1)
        tasks = record_plan(fresh, [f"site{i}" for i in range(n)]).tasks
        reads = [_reads(t.spec, "site" if t.message is not None else "aggregator")
                 if t.spec else set() for t in tasks]
        later: set[str] = set()
        after: list[frozenset[str]] = [frozenset()] * len(tasks)
        for i in range(len(tasks) - 1, -1, -1):  # what tasks after i read, from the end
            after[i] = frozenset(later)
            later |= reads[i]
        live: dict[str, frozenset[str]] = {}
        for i, t in enumerate(tasks):
            if t.message is None and t.spec and t.spec not in live:
                live[t.spec] = after[i]  # the first occurrence reads the most later
        _CACHE[key] = live
    return _CACHE[key]


def trim(state: Any, strategy, steps: str) -> Any:
    """``state`` without the parts nothing after the chain ``steps`` reads (set to None),
    keeping :meth:`kept_parts`; unchanged for a strategy that keeps everything (``None``),
    a chain the plan does not hold, or a state that is not a dataclass."""
    keep = strategy.kept_parts()
    if keep is None or not steps or not is_dataclass(state):
        return state
    live = live_after(strategy).get(steps)
    if live is None:
        return state
    dead = {f.name: None for f in fields(state)
            if f.name not in live and f.name not in keep and getattr(state, f.name) is not None}
    return replace(state, **dead) if dead else state
