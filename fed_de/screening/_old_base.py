"""What every federated step shares: local state, message schemas, and plan-building helpers.

A step module defines a mixin whose ``@remote_data`` local methods and ``@remote`` aggregation
methods sit side by side, plus a ``run_*`` method that adds them to the compute plan through
:func:`local_step` and :func:`aggregation_step`.

Messages: a local method declares the schema of what it sends with :func:`sends`: every key,
and a shape written in genes (``G``), coefficients (``p``) and other study-level sizes only,
never in the site's sample count. A message that does not match is not sent.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import numpy as np
from substrafl.compute_plan_builder import ComputePlanBuilder

from fed_de.design import Study, reduced_study
from fed_de.errors import MessageSchemaError


def sends(**schema: tuple) -> Callable:
    """Declare and enforce the schema of a local method's message.

    Each keyword names a message key; its value is the shape as a tuple of dimension symbols
    resolved by the strategy's :meth:`FedBase.dims` (``()`` for a scalar). Values must be
    float64 (or bool arrays for masks, declared with a trailing ``"bool"`` symbol).
    """

    def decorator(fn: Callable) -> Callable:
        @wraps(fn)
        def wrapper(self, data_from_opener, shared_state=None, **kwargs):
            depth = getattr(self, "_sends_depth", 0)  # a message method may extend another
            self._sends_depth = depth + 1
            try:
                out = fn(self, data_from_opener, shared_state, **kwargs)
            finally:
                self._sends_depth = depth
            dims = self.dims()
            rows = (shared_state.get("compact_rows") if isinstance(shared_state, dict)
                    else None)
            # only the genes the aggregator asked for (a refit), by the outermost method
            if rows is not None and depth == 0:
                out = {k: np.asarray(v)[rows] if schema[k][:1] == ("G",) else v
                       for k, v in out.items()}
                dims = {**dims, "G": len(rows)}
            check_message(out, schema, dims, site=data_from_opener.name, step=fn.__name__)
            return out

        wrapper.message_schema = schema
        return wrapper

    return decorator


def check_message(message: dict, schema: dict, dims: dict, *, site: str, step: str) -> None:
    """Raise :class:`MessageSchemaError` unless ``message`` matches ``schema`` exactly."""
    if not isinstance(message, dict):
        raise MessageSchemaError(f"site {site!r}, {step}: message must be a dict, not sent")
    if set(message) != set(schema):
        raise MessageSchemaError(
            f"site {site!r}, {step}: message keys {sorted(message)} differ from the declared "
            f"schema {sorted(schema)}; not sent"
        )
    for key, symbols in schema.items():
        value = message[key]
        want_bool = bool(symbols) and symbols[-1] == "bool"
        symbols = symbols[:-1] if want_bool else symbols
        shape = tuple(dims[s] if isinstance(s, str) else int(s) for s in symbols)
        arr = np.asarray(value)
        dtype_ok = arr.dtype == np.bool_ if want_bool else arr.dtype == np.float64
        if arr.shape != shape or not dtype_ok:
            raise MessageSchemaError(
                f"site {site!r}, {step}: {key!r} has shape {arr.shape} dtype {arr.dtype}, "
                f"declared {shape} {'bool' if want_bool else 'float64'}; not sent"
            )


def sum_messages(messages: list[dict], keys: list[str] | None = None,
                 prev: dict | None = None) -> dict:
    """Sum the sites' messages key by key (fixed site order: reproducible sums).

    When the previous shared state restricted the messages to ``compact_rows`` (genes),
    the sums are scattered back to all genes (zeros elsewhere).
    """
    keys = keys if keys is not None else list(messages[0])
    tot = {k: np.sum([np.asarray(m[k], dtype=np.float64) for m in messages], axis=0)
           for k in keys}
    rows = prev.get("compact_rows") if prev is not None else None
    if rows is None:
        return tot
    G = len(prev["all_zero"])
    out = {}
    for k, v in tot.items():
        full = np.zeros((G,) + v.shape[1:])
        full[rows] = v
        out[k] = full
    return out


class FedBase(ComputePlanBuilder):
    """Base of fed_de strategies: study, options, and a dict local state.

    Parameters
    ----------
    study
        ``Study.to_dict()``: the design, declared levels and genes.
    options
        Plain scalars/strings/lists controlling the pipeline (shipped to every node).
    """

    def __init__(self, study: dict, **options):
        super().__init__(study=study, **options)
        self.study = Study.from_dict(study)
        self.options = options
        self.local: dict = {}
        reduced = options.get("reduced")
        self.reduced = reduced_study(self.study, reduced) if reduced else None

    def dims(self) -> dict[str, int]:
        """Sizes that message shapes may use: genes and coefficients (plus step sizes)."""
        p = self.study.n_coefs
        levels = self.study.levels.values()
        n_cells = int(np.prod([len(v) for v in levels])) if self.study.levels else 1
        pr = self.reduced.n_coefs if self.reduced is not None else 1
        # "A": open targets of an order-statistic search, announced by the aggregator (the
        # same for every site, whatever its sample count)
        return {"G": len(self.study.genes), "p": p, "T": p * (p + 1) // 2, "C": n_cells,
                "pr": pr, "Tr": pr * (pr + 1) // 2, **getattr(self, "dyn_dims", {})}

    def save_local_state(self, path: Path) -> None:
        """Write the site's local state (kept at the site between tasks)."""
        with Path(path).open("wb") as fh:
            pickle.dump(self.local, fh, protocol=pickle.HIGHEST_PROTOCOL)

    def load_local_state(self, path: Path):
        """Read the site's local state written by the previous task."""
        with Path(path).open("rb") as fh:
            self.local = pickle.load(fh)
        return self


class PlanCursor:
    """Carries the plan being built: nodes, current local states, last shared ref, round."""

    def __init__(self, train_data_nodes, aggregation_node, clean_models: bool = True):
        self.train_nodes = list(train_data_nodes)
        self.agg = aggregation_node
        self.clean_models = clean_models
        self.local_states = [None] * len(self.train_nodes)
        self.shared = None
        self.round_idx = 0

    def local(self, method: Callable, **method_params) -> list:
        """Add one local task per site; returns the sites' shared-state refs."""
        refs = []
        for i, node in enumerate(self.train_nodes):
            op = method(data_samples=node.data_sample_keys, shared_state=self.shared,
                        **method_params)
            self.local_states[i], ref = node.update_states(
                op,
                local_state=self.local_states[i],
                round_idx=self.round_idx,
                authorized_ids={node.organization_id},
                aggregation_id=self.agg.organization_id,
                clean_models=self.clean_models,
            )
            refs.append(ref)
        self.round_idx += 1
        return refs

    def fork(self) -> PlanCursor:
        """A side chain starting from the current local and shared states (a parallel
        branch of the plan: it adds no sequential step while it is shorter)."""
        side = PlanCursor(self.train_nodes, self.agg, self.clean_models)
        side.local_states, side.shared, side.round_idx = (list(self.local_states), self.shared,
                                                          self.round_idx)
        return side

    def aggregate(self, method: Callable, refs: list, carry: bool = False,
                  extra: list | None = None, **method_params):
        """Add the aggregation task over ``refs``; its output becomes the next shared state.

        With ``carry`` (and a previous aggregation), the aggregator also reads its own previous
        output, appended last: aggregations keep no state, so what they need travels this way.
        ``extra`` refs (a side chain's result) come between the sites' and that one.
        """
        refs = [*refs, *(extra or [])]
        if carry and self.shared is not None:
            refs = [*refs, self.shared]
        op = method(shared_states=refs, **method_params)
        self.shared = self.agg.update_states(
            op,
            round_idx=self.round_idx,
            authorized_ids={n.organization_id for n in self.train_nodes}
            | {self.agg.organization_id},
            clean_models=self.clean_models,
        )
        self.round_idx += 1
        return self.shared

    def round(self, local_method: Callable, agg_method: Callable, carry: bool = False,
              local_params: dict | None = None, agg_params: dict | None = None,
              extra: list | None = None):
        """A local step at every site followed by its aggregation."""
        refs = self.local(local_method, **(local_params or {}))
        return self.aggregate(agg_method, refs, carry=carry, extra=extra, **(agg_params or {}))
