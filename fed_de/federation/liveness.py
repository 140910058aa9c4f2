"""Which parts of the run state a plan still reads: an aggregation sends only those.

A plan is static and every step's signature names the run-state parts it reads
(:mod:`fed_de.federation.calls`; less those :func:`~fed_de.federation.calls.reads_except`
excludes for its parameters, e.g. the IRLS fit of the other stage). So, for each
aggregation of the plan (its chain of steps, encoded), the parts that any task declared after
its first occurrence reads are known before the run; the others are dead and the aggregation
drops them from what it sends (to the sites and to the next aggregation alike: a substrafl
aggregation has one output). Parts read by other means (the results, the masking relay, a
gene selection) are kept by the strategy's
:meth:`~fed_de.federation.strategy.FedStrategy.kept_parts`.

A chain that occurs several times keeps the union over its occurrences, which is what is read
after its first: what a plan reads later only shrinks as it advances.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import Any

from fed_de.federation.calls import decode, step_reads

_CACHE: dict[str, dict[str, frozenset[str]]] = {}


def _reads(spec: str, role: str) -> set[str]:
    out: set[str] = set()
    for fn, params in decode(spec, role):
        out |= step_reads(fn, params)
    return out


def plan_reads(strategy, n_sites: int) -> list[tuple[Any, set[str]]]:
    """Every task of ``strategy``'s plan over ``n_sites`` sites (a dry run,
    :func:`fed_de.backends.plan.record_plan`), in submission order, with the names its steps
    read (their signatures)."""
    from fed_de.backends.plan import record_plan

    tasks = record_plan(strategy, [f"site{i}" for i in range(max(int(n_sites), 1))]).tasks
    return [(t, _reads(t.spec, "site" if t.message is not None else "aggregator")
             if t.spec else set()) for t in tasks]


def live_after(strategy) -> dict[str, frozenset[str]]:
    """Per aggregation chain (its ``steps`` encoding): the names its later tasks read.

    The plan is recorded once per process (a dry run of a fresh copy of the strategy, about
    20 ms) and cached by the strategy's class and constructor arguments.
    """
    from fed_de.backends.checkpoint import fingerprint

    key = fingerprint(strategy, [])  # class and constructor arguments: the plan's shape
    if key not in _CACHE:
        fresh = type(strategy)(*strategy.args, **strategy.kwargs)
        tasks = plan_reads(fresh, getattr(strategy, "n_sites", 0) or 0)
        later: set[str] = set()
        after: list[frozenset[str]] = [frozenset()] * len(tasks)
        for i in range(len(tasks) - 1, -1, -1):  # what tasks after i read, from the end
            after[i] = frozenset(later)
            later |= tasks[i][1]
        live: dict[str, frozenset[str]] = {}
        for i, (t, _) in enumerate(tasks):
            if t.message is None and t.spec and t.spec not in live:
                live[t.spec] = after[i]  # the first occurrence reads the most later
        _CACHE[key] = live
    return _CACHE[key]


def keep_only(state: Any, keep) -> Any:
    """``state`` (a dataclass) with every part not named in ``keep`` set to None."""
    dead = {f.name: None for f in fields(state)
            if f.name not in keep and getattr(state, f.name) is not None}
    return replace(state, **dead) if dead else state


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
    return keep_only(state, live | set(keep))
