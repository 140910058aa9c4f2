"""Step functions and how the plan names them.

A federated step is written as plain functions in its module, side by side:

- a **site step** (:func:`site_step`) runs at every site: ``fn(site, <state parts>, <params>)
  -> Message``; ``site`` is the site's view (its data, what it keeps, the study);
- an **aggregator step** (:func:`aggregator_step`) runs at the aggregator:
  ``fn(<state parts>, sums=..., <params>) -> dict`` of the state parts it writes.

Parameters named after a field of the run state receive that part of the shared state, so a
step's signature says what it reads; an aggregator step's ``writes`` say what it changes (the
dispatcher refuses any other key). Other names the dispatcher fills: ``sums`` (the round's
summed message), ``side`` (a side chain's final state), ``study``, ``options`` (the strategy's).
Everything else comes from the plan as a small scalar parameter.

The plan refers to steps as :class:`Call` objects, encoded as one short string (the method
parameter substrafl registers: each distinct string is one registered function).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

_PARAM_TYPES = (bool, int, float, str, type(None))


def site_step(fn: Callable) -> Callable:
    """Mark ``fn`` as a step a site may run (its module is in fed_de)."""
    fn.fed_role = "site"
    return fn


def reads_except(rule: Callable[[dict], Iterable[str]]) -> Callable:
    """Mark state parts a step's signature names but does not read for some parameters:
    ``rule(params)`` names them, so the plan stops sending them once no other step reads
    them (:mod:`fed_de.federation.liveness`); the step then receives None for them."""

    def decorator(fn: Callable) -> Callable:
        fn.fed_unread = rule
        return fn

    return decorator


def step_reads(fn: Callable, params: dict) -> set[str]:
    """The names step ``fn`` reads with ``params``: its signature's, less what
    :func:`reads_except` excludes."""
    names = set(inspect.signature(fn).parameters)
    rule = getattr(fn, "fed_unread", None)
    return names - set(rule(params)) if rule is not None else names


def aggregator_step(*, writes: Sequence[str]) -> Callable:
    """Mark ``fn`` as an aggregator step that writes the run-state parts ``writes``."""

    def decorator(fn: Callable) -> Callable:
        fn.fed_role = "aggregator"
        fn.fed_writes = tuple(writes)
        return fn

    return decorator


@dataclass(frozen=True)
class Call:
    """A step function and its scalar parameters, as the plan names it."""

    fn: Callable
    params: tuple = ()

    def encode(self) -> str:
        """``module:function`` plus ``?name=value&...`` (values as Python literals)."""
        name = f"{self.fn.__module__}:{self.fn.__name__}"
        if not self.params:
            return name
        return name + "?" + "&".join(f"{k}={v!r}" for k, v in self.params)


def call(fn: Callable, **params) -> Call:
    """A :class:`Call` of ``fn`` with plain scalar parameters."""
    for key, value in params.items():
        if not isinstance(value, _PARAM_TYPES):
            raise TypeError(f"parameter {key!r} of {fn.__name__} is a {type(value).__name__}; "
                            "plan parameters must be plain scalars (bool/int/float/str/None)")
    return Call(fn, tuple(sorted(params.items())))


def as_call(step: Call | Callable) -> Call:
    """A bare function is a call without parameters."""
    return step if isinstance(step, Call) else Call(step)


def encode_chain(steps: Sequence[Call | Callable]) -> str:
    """Several calls run one after the other in one task."""
    return "|".join(as_call(s).encode() for s in steps)


def decode(spec: str, role: str) -> list[tuple[Callable, dict]]:
    """The functions and parameters named by :func:`encode_chain`; only fed_de step
    functions of the expected ``role`` are accepted."""
    out = []
    for item in spec.split("|"):
        target, _, query = item.partition("?")
        module, _, name = target.partition(":")
        if not module.startswith("fed_de."):
            raise ValueError(f"step {item!r} is not a fed_de step")
        fn = getattr(importlib.import_module(module), name, None)
        if getattr(fn, "fed_role", None) != role:
            raise ValueError(f"{target} is not a fed_de {role} step")
        params = {}
        for pair in filter(None, query.split("&")):
            key, _, value = pair.partition("=")
            params[key] = ast.literal_eval(value)
        out.append((fn, params))
    return out


def state_fields(state: Any) -> set[str]:
    """Names of the parts of a run state (a dataclass)."""
    return {f.name for f in fields(state)}


def invoke(fn: Callable, state: Any, provided: dict, params: dict) -> Any:
    """Call a step function, giving each parameter the state part or value it names."""
    names = state_fields(state)
    kwargs = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in provided:
            kwargs[name] = provided[name]
        elif name in params:
            kwargs[name] = params[name]
        elif name in names:
            kwargs[name] = getattr(state, name)
        elif p.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__module__}.{fn.__name__}: nothing provides {name!r}")
    unknown = set(params) - set(inspect.signature(fn).parameters)
    if unknown:
        raise TypeError(f"{fn.__module__}.{fn.__name__}: unknown parameters {sorted(unknown)}")
    return fn(**kwargs)


def apply_aggregation(fn: Callable, state: Any, provided: dict, params: dict) -> Any:
    """Run an aggregator step and return the state with the parts it wrote replaced."""
    updates = invoke(fn, state, provided, params) or {}
    extra = set(updates) - set(fn.fed_writes)
    if extra and "*" not in fn.fed_writes:  # "*": a resumed plan's seed installs every part
        raise TypeError(f"{fn.__module__}.{fn.__name__} wrote {sorted(extra)}, declared "
                        f"{list(fn.fed_writes)}")
    return replace(state, **updates)


def describe(method_name: str, params: dict) -> str:
    """A task's readable name: the step functions it runs (for progress and logs)."""
    spec = params.get("site_step") or params.get("steps")
    if not spec:
        return method_name
    names = []
    for item in spec.split("|"):
        target, _, query = item.partition("?")
        name = target.rpartition(":")[2]
        if len(query) > 80:  # a resumed plan's seed: its size, not its bytes
            query = f"<{len(query)} characters>"
        names.append(f"{name}({query.replace('&', ', ')})" if query else name)
    return "+".join(names)


def site_message_type(params: dict):
    """The message class the site step named in ``params`` returns (None if none)."""
    from fed_de.federation.messages import type_hints

    spec = params.get("site_step")
    if not spec:
        return None
    ((fn, _),) = decode(spec, "site")
    return type_hints(fn).get("return")
