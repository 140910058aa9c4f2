"""Dry run of a compute plan: tasks, dependencies and declared messages, nothing executed.

Used for ``--plan-only`` and for the run facts of the substra backends (where the platform,
not fed_de, executes the tasks): sequential steps, tasks, distinct functions, and the bytes
each site may send, computed from the declared message schemas. Those byte figures are
**upper bounds**: every optional part of a message is counted (a run sends less: the
simulation and the subprocess backend measure what is sent). Two are given: the plaintext
float64 payload, and the masked size when secure aggregation is on (each value encoded in
``limbs`` 64-bit words, sample counts packed two to a word, narrow sums in two words; pickle
framing and the masking header not counted). A run packs counts tighter once the pooled
sample count is known (``N.bit_length()``-bit fields): the plan does not know ``N``, so it
counts 32-bit fields, an upper bound.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
from substrafl.nodes.references.local_state import LocalStateRef
from substrafl.nodes.references.shared_state import SharedStateRef

from fed_de import secagg
from fed_de.federation.calls import describe, site_message_type
from fed_de.federation.messages import declared_shapes, folded_keys


@dataclass
class PlannedTask:
    """One task of the plan."""

    key: str
    worker: str
    method: str
    round_idx: int
    depth: int
    message: dict | None = None  # key -> shape, for local tasks
    spec: str = ""  # the steps it runs (``federation.calls`` encoding)
    counts: frozenset = frozenset()  # keys of its count fields (packed when masked)
    narrow: frozenset = frozenset()  # keys of its narrow sums (two words when masked)
    folded: dict = field(default_factory=dict)  # key -> (columns sent, columns) when masked


@dataclass
class PlanRecord:
    """Every task of a plan, in submission order; ``masked_words``: 64-bit words per value of
    a masked message (1: messages are not masked)."""

    tasks: list[PlannedTask] = field(default_factory=list)
    functions: set = field(default_factory=set)
    depth: dict[str, int] = field(default_factory=dict)  # task key -> dependency depth
    masked_words: int = 1
    folds: object = None  # the strategy's column_folds (message type -> folds), when masked
    compact: bool = True  # masked counts take 4 bytes and narrow sums 16 (not under DP)

    @property
    def sequential_steps(self) -> int:
        """Longest chain of dependent tasks."""
        return max((t.depth for t in self.tasks), default=0)

    def bytes_by_site(self, masked: bool = False) -> dict[str, int]:
        """Upper bound of the payload bytes (float64) each site sends, from the declared
        schemas; ``masked``: of the masked values (``masked_words`` words per value, counts
        two to a word, narrow sums two words, without the columns a factor design makes
        equal or zero: ``column_folds``)."""
        out: dict[str, int] = {}
        for t in self.tasks:
            if t.message is None:
                continue
            n = 0
            for key, shape in t.message.items():
                size = int(np.prod(shape))
                if not masked or _unmasked(t.method) or self.masked_words == 1:
                    n += 8 * size
                    continue
                if key in t.folded and self.compact:  # columns the study makes equal or 0
                    sent, total = t.folded[key]
                    size = size // total * sent
                if key in t.counts and self.compact:
                    n += 8 * secagg.packed_words(size)
                elif key in t.narrow and self.compact:
                    n += 8 * size * secagg.NARROW.limbs
                else:
                    n += 8 * size * self.masked_words
            out[t.worker] = out.get(t.worker, 0) + n
        return out

    @property
    def final_round(self) -> int:
        """Round index of the last aggregation (what to download)."""
        return max(t.round_idx for t in self.tasks if t.message is None)

    def facts(self) -> dict:
        """Facts of the plan; its bytes are declared upper bounds, labelled so."""
        return {"sequential_steps": self.sequential_steps, "tasks": len(self.tasks),
                "distinct_functions": len(self.functions),
                "payload_bytes_upper_bound_by_site": self.bytes_by_site(),
                "bytes_upper_bound_by_site": self.bytes_by_site(masked=True),
                "masked": self.masked_words > 1,
                "bytes_note": BYTES_NOTE}


BYTES_NOTE = ("declared upper bounds from the message schemas (every optional part counted); "
              "payload = float64 values; bytes = masked values under secure aggregation "
              "(limbs x 8 bytes each; sample counts 4 bytes, narrow sums 16), without pickle "
              "framing")


def _unmasked(method: str) -> bool:
    """The key round's offer is relayed, not masked."""
    return method == "offer_key"


class _DryNode:
    def __init__(self, organization_id: str, record: PlanRecord, dims: dict,
                 data_manager_key: str = "", data_sample_keys: list | None = None):
        self.organization_id = organization_id
        self.data_manager_key = data_manager_key or f"opener-{organization_id}"
        self.data_sample_keys = data_sample_keys or [f"samples-{organization_id}"]
        self._record = record
        self._dims = dims

    def _add(self, method, parents, round_idx, message=None, spec: str = "",
             counts: frozenset = frozenset(), narrow: frozenset = frozenset(),
             folded: dict | None = None) -> str:
        key = str(uuid.uuid4())
        depth = 1 + max((self._record.depth.get(p, 0) for p in parents), default=0)
        self._record.depth[key] = depth
        self._record.tasks.append(PlannedTask(key, self.organization_id, method,
                                              round_idx or 0, depth, message, spec,
                                              counts, narrow, folded or {}))
        return key

    def register_operations(self, *args, **kwargs):
        return None

    def summary(self) -> dict:
        return {"organization_id": self.organization_id}


class DryTrainDataNode(_DryNode):
    """Records local tasks and the shapes of the messages they declare."""

    def init_states(self, *args, **kwargs) -> LocalStateRef:
        return LocalStateRef(key=str(uuid.uuid4()), init=True)

    def update_states(self, operation, *, authorized_ids=None, round_idx=None,
                      aggregation_id=None, clean_models=False, local_state=None):
        rs = operation.remote_struct
        self._record.functions.add(rs)
        parents = []
        if local_state is not None and not local_state.init:
            parents.append(local_state.key)
        if operation.shared_state is not None:
            parents.append(operation.shared_state.key)
        cls = site_message_type(rs._method_parameters)
        counts = narrow = frozenset()
        folded = {}
        if cls is not None:
            folds = self._record.folds(cls) if self._record.folds is not None else {}
            folded = {k: (len(folds[s][0]), len(folds[s][1]))
                      for k, s in folded_keys(cls, folds).items()}
            message = declared_shapes(cls, self._dims)
            counts = frozenset(declared_shapes(cls, self._dims, only="counts"))
            narrow = frozenset(declared_shapes(cls, self._dims, only="narrow"))
        else:  # a step declared with the older ``sends`` schema (screens)
            method = getattr(rs._cls, rs._method_name)
            schema = getattr(method, "message_schema", None) or getattr(
                getattr(method, "__wrapped__", None), "message_schema", {})
            message = {k: _shape(v, self._dims) for k, v in schema.items()}
        key = self._add(describe(rs._method_name, rs._method_parameters), parents, round_idx,
                        message, rs._method_parameters.get("site_step", ""), counts, narrow,
                        folded)
        return LocalStateRef(key), SharedStateRef(key)


class DryAggregationNode(_DryNode):
    """Records aggregation tasks."""

    def update_states(self, operation, *, authorized_ids=None, round_idx=None,
                      clean_models=False):
        rs = operation.remote_struct
        self._record.functions.add(rs)
        parents = [r.key for r in (operation.shared_states or [])]
        return SharedStateRef(self._add(describe(rs._method_name, rs._method_parameters),
                                        parents, round_idx,
                                        spec=rs._method_parameters.get("steps", "")))


def _shape(symbols: tuple, dims: dict) -> tuple:
    symbols = symbols[:-1] if symbols and symbols[-1] == "bool" else symbols
    return tuple(dims[s] if isinstance(s, str) else int(s) for s in symbols)


def record_plan(strategy, site_names: list[str], aggregator: str = "aggregator") -> PlanRecord:
    """Build ``strategy``'s plan over named sites without executing anything."""
    record = PlanRecord()
    masks = getattr(strategy, "masks", None)
    if masks is not None and masks(len(site_names)):
        from fed_de.federation.secure import secagg

        record.masked_words = secagg.FixedPoint().limbs
        record.compact = getattr(strategy, "compact_fields", lambda: True)()
        record.folds = getattr(strategy, "column_folds", None)
    dims = strategy.dims()
    nodes = [DryTrainDataNode(name, record, dims) for name in site_names]
    strategy.build_compute_plan(train_data_nodes=nodes,
                                aggregation_node=DryAggregationNode(aggregator, record, dims),
                                evaluation_strategy=None, num_rounds=None, clean_models=True)
    return record
