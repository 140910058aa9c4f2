"""Strict in-process execution of a substrafl compute plan.

The node classes below satisfy substrafl's ``TrainDataNodeProtocol`` and
``AggregationNodeProtocol``, so an unchanged ``ComputePlanBuilder.build_compute_plan`` runs
through them. Each task is executed as soon as the plan declares it (the plan is built in
dependency order) with the semantics of real substra execution:

- a fresh instance per task, rebuilt from the pickled ``RemoteStruct`` (constructor arguments
  only: an attribute set anywhere else is gone, as on a real node);
- local state written by ``save_local_state`` and read back by ``load_local_state`` at every
  task, through a file;
- shared states pickled on output and unpickled separately by every consumer (no aliasing);
- a train task given no shared state after a non-initial task receives its *own previous
  shared output*, as substrafl's ``TrainDataNode`` wires it;
- aggregations get a fresh instance and no local state;
- opener data is read-only;
- method parameters must be small plain scalars (each distinct value is a registered function).

Every run records the sequential step count (longest dependency chain), the task count, the
distinct functions, and the bytes each site and the aggregator send.
"""

from __future__ import annotations

import pickle
import tempfile
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
from substrafl.nodes.references.local_state import LocalStateRef
from substrafl.nodes.references.shared_state import SharedStateRef
from substrafl.remote.operations import RemoteDataOperation, RemoteOperation

from fed_de.errors import FedDEError, SiteTaskError
from fed_de.federation.calls import describe
from fed_de.federation.messages import Message, arrays
from fed_de.site import SiteData

_PARAM_TYPES = (bool, int, float, str, type(None))


@dataclass
class RunLedger:
    """What a run did: tasks, dependency depth, bytes, and (optionally) every message."""

    record_messages: bool = False
    tasks: int = 0
    depth: dict[str, int] = field(default_factory=dict)
    bytes_by_site: dict[str, int] = field(default_factory=dict)
    aggregator_bytes: int = 0
    functions: set = field(default_factory=set)
    messages: list[dict] = field(default_factory=list)
    steps_log: list[tuple[int, str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @property
    def sequential_steps(self) -> int:
        """Length of the longest chain of dependent tasks."""
        return max(self.depth.values(), default=0)

    def facts(self) -> dict:
        """Run facts, JSON-serialisable."""
        return {
            "sequential_steps": self.sequential_steps,
            "tasks": self.tasks,
            "distinct_functions": len(self.functions),
            "bytes_sent_by_site": dict(self.bytes_by_site),
            "bytes_sent_by_aggregator": self.aggregator_bytes,
            "wall_seconds": round(time.perf_counter() - self.started, 4),
        }


class _Platform:
    """Where task outputs live between tasks (what substra's storage does).

    An output is freed as soon as no reference to it is left in the plan being built (every
    task that reads it has been declared, hence run): memory stays bounded by what the next
    tasks can read, not by everything a run sent.
    """

    def __init__(self, ledger: RunLedger, workdir: Path, progress=None):
        self.ledger = ledger
        self.workdir = workdir
        self.shared: dict[str, bytes] = {}
        self.local_paths: dict[str, Path] = {}
        self.progress = progress
        self.last_aggregate: str | None = None
        self.last_local: dict[str, str] = {}
        self._holders: dict[str, int] = {}

    def hold(self, key: str, ref):
        """Return ``ref``, freeing the output ``key`` once every such reference is gone."""
        self._holders[key] = self._holders.get(key, 0) + 1
        weakref.finalize(ref, self._release, key)
        return ref

    def _release(self, key: str) -> None:
        left = self._holders.get(key, 1) - 1
        if left:
            self._holders[key] = left
            return
        self._holders.pop(key, None)
        if key == self.last_aggregate or key in self.last_local.values():
            return  # what the run returns
        self.shared.pop(key, None)
        path = self.local_paths.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def put_shared(self, key: str, value: Any) -> int:
        try:
            blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:  # noqa: BLE001 - any pickling failure is a plan bug
            raise TypeError(f"shared state of task {key} is not picklable: {err}") from err
        self.shared[key] = blob
        return len(blob)

    def get_shared(self, key: str) -> Any:
        return pickle.loads(self.shared[key])


def _check_method_params(params: dict, where: str) -> None:
    for name, value in params.items():
        if isinstance(value, np.ndarray) or not isinstance(value, _PARAM_TYPES):
            raise TypeError(
                f"{where}: method parameter {name!r} is a {type(value).__name__}; substrafl "
                "registers one function per distinct parameter value, so method parameters "
                "must be small plain scalars (bool/int/float/str/None). Send arrays in the "
                "shared state instead."
            )


def _call(method, org: str, step: str, ledger: RunLedger, what: str, **kwargs):
    """Run a task's method; errors name the organisation and step and keep partial facts."""
    try:
        return method(**kwargs)
    except FedDEError as err:
        err.site, err.step, err.facts = org, step, ledger.facts()
        raise
    except Exception as err:
        raise SiteTaskError(f"{what}: {type(err).__name__}: {err}", site=org, step=step,
                            facts=ledger.facts()) from err


def _rebuild(remote_struct):
    """The RemoteStruct as a remote node unpickles it (constructor args only)."""
    return cloudpickle.loads(cloudpickle.dumps(remote_struct))


class StrictTrainDataNode:
    """A data node that runs its tasks in-process with real-substra semantics."""

    def __init__(self, site: SiteData, platform: _Platform):
        self.organization_id = site.name
        self.data_manager_key = f"opener-{site.name}"
        self.data_sample_keys = [f"samples-{site.name}"]
        self._site = site
        self._platform = platform

    def init_states(self, *args, **kwargs) -> LocalStateRef:
        """Initial (empty) local state."""
        return LocalStateRef(key=str(uuid.uuid4()), init=True)

    def update_states(
        self,
        operation: RemoteDataOperation,
        *,
        authorized_ids: set | None = None,
        round_idx: int | None = None,
        aggregation_id: str | None = None,
        clean_models: bool = False,
        local_state: LocalStateRef | None = None,
    ) -> tuple[LocalStateRef, SharedStateRef]:
        """Run one train task now and return references to its outputs."""
        if not isinstance(operation, RemoteDataOperation):
            raise TypeError("operation must be a RemoteDataOperation (decorate with @remote_data)")
        pf, ledger = self._platform, self._platform.ledger
        rs = operation.remote_struct
        step = describe(rs._method_name, rs._method_parameters)
        _check_method_params(rs._method_parameters, f"site {self.organization_id!r}, {step}")
        ledger.functions.add(rs)
        op_id = str(uuid.uuid4())
        parents = []
        instance = _rebuild(rs).get_instance()
        has_local = local_state is not None and not local_state.init
        if has_local:
            instance = instance.load_local_state(pf.local_paths[local_state.key])
            parents.append(local_state.key)
        kwargs: dict[str, Any] = {}
        if operation.shared_state is not None:
            kwargs["shared_state"] = pf.get_shared(operation.shared_state.key)
            parents.append(operation.shared_state.key)
        elif has_local:
            # substrafl wires the parent task's own shared output in this case
            kwargs["shared_state"] = pf.get_shared(local_state.key)
        if pf.progress is not None:
            pf.progress(step, self.organization_id, round_idx)
        out = _call(getattr(instance, rs._method_name), self.organization_id, step, ledger,
                    f"task {step!r} failed at site {self.organization_id!r}",
                    data_from_opener=self._site, _skip=True, **kwargs,
                    **rs._method_parameters)
        n_bytes = pf.put_shared(op_id, out)
        path = pf.workdir / f"local-{op_id}"
        instance.save_local_state(path)
        pf.local_paths[op_id] = path
        pf.last_local[self.organization_id] = op_id
        ledger.tasks += 1
        ledger.depth[op_id] = 1 + max((ledger.depth.get(k, 0) for k in parents), default=0)
        ledger.bytes_by_site[self.organization_id] = (
            ledger.bytes_by_site.get(self.organization_id, 0) + n_bytes
        )
        ledger.steps_log.append((ledger.depth[op_id], self.organization_id, step))
        if ledger.record_messages:
            msg = pf.get_shared(op_id)
            ledger.messages.append(
                {"site": self.organization_id, "step": step,
                 "message": arrays(msg) if isinstance(msg, Message) else msg, "bytes": n_bytes}
            )
        return (pf.hold(op_id, LocalStateRef(op_id)), pf.hold(op_id, SharedStateRef(op_id)))

    def register_operations(self, *args, **kwargs) -> None:
        """Nothing to register in-process."""
        return None

    def summary(self) -> dict:
        """Description for experiment summaries."""
        return {"organization_id": self.organization_id, "n_samples": self._site.n_samples}


class StrictAggregationNode:
    """The aggregator: stateless tasks over unpickled copies of the sites' messages."""

    def __init__(self, platform: _Platform, organization_id: str = "aggregator"):
        self.organization_id = organization_id
        self._platform = platform

    def update_states(
        self,
        operation: RemoteOperation,
        *,
        authorized_ids: set | None = None,
        round_idx: int | None = None,
        clean_models: bool = False,
    ) -> SharedStateRef:
        """Run one aggregation task now and return a reference to its output."""
        if not isinstance(operation, RemoteOperation):
            raise TypeError("operation must be a RemoteOperation (decorate with @remote)")
        pf, ledger = self._platform, self._platform.ledger
        rs = operation.remote_struct
        step = describe(rs._method_name, rs._method_parameters)
        _check_method_params(rs._method_parameters, f"aggregator, {step}")
        ledger.functions.add(rs)
        refs = operation.shared_states or []
        states = [pf.get_shared(r.key) for r in refs]
        instance = _rebuild(rs).get_instance()
        if pf.progress is not None:
            pf.progress(step, self.organization_id, round_idx)
        out = _call(getattr(instance, rs._method_name), self.organization_id, step, ledger,
                    f"aggregation {step!r} failed", shared_states=states, _skip=True,
                    **rs._method_parameters)
        op_id = str(uuid.uuid4())
        n_bytes = pf.put_shared(op_id, out)
        ledger.tasks += 1
        ledger.aggregator_bytes += n_bytes
        ledger.depth[op_id] = 1 + max((ledger.depth.get(r.key, 0) for r in refs), default=0)
        ledger.steps_log.append((ledger.depth[op_id], self.organization_id, step))
        pf.last_aggregate = op_id
        return pf.hold(op_id, SharedStateRef(op_id))

    def register_operations(self, *args, **kwargs) -> None:
        """Nothing to register in-process."""
        return None

    def summary(self) -> dict:
        """Description for experiment summaries."""
        return {"organization_id": self.organization_id}


@dataclass
class SimulationResult:
    """Output of :func:`run_strict`: the final shared state, the ledger, local states."""

    shared_state: Any
    ledger: RunLedger
    local_states: dict[str, Any]


def run_strict(
    strategy,
    sites: list[SiteData],
    *,
    record_messages: bool = False,
    progress=None,
    keep_local_states: bool = True,
) -> SimulationResult:
    """Build and execute ``strategy``'s compute plan over ``sites`` in-process.

    Parameters
    ----------
    strategy
        A substrafl ``ComputePlanBuilder``.
    sites
        One :class:`SiteData` per data node.
    record_messages
        Keep a copy of every message a site sends (for privacy tests).
    progress
        Optional callable ``(step_name, organization, round_idx)`` called before each task.
    keep_local_states
        Return each site's final local state (what the site itself holds at the end).
    """
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    ledger = RunLedger(record_messages=record_messages)
    with tempfile.TemporaryDirectory(prefix="fed_de_sim_") as tmp:
        platform = _Platform(ledger, Path(tmp), progress)
        train_nodes = [StrictTrainDataNode(s, platform) for s in sites]
        agg = StrictAggregationNode(platform)
        strategy.build_compute_plan(
            train_data_nodes=train_nodes,
            aggregation_node=agg,
            evaluation_strategy=None,
            num_rounds=None,
            clean_models=True,
        )
        final = platform.get_shared(platform.last_aggregate) if platform.last_aggregate else None
        local_states = {}
        if keep_local_states:
            for name, op_id in platform.last_local.items():
                with open(platform.local_paths[op_id], "rb") as fh:
                    local_states[name] = pickle.load(fh)
    return SimulationResult(shared_state=final, ledger=ledger, local_states=local_states)
