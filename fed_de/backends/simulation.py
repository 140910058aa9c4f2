"""Strict in-process execution of a substrafl compute plan, optionally on parallel processes.

The node classes below satisfy substrafl's ``TrainDataNodeProtocol`` and
``AggregationNodeProtocol``, so an unchanged ``ComputePlanBuilder.build_compute_plan`` runs
through them. A site task is deferred when the plan declares it and run when something needs
its outputs (the aggregation that reads them, or the end of the plan): with ``n_jobs`` the
site tasks of one round run together in worker processes; serially, each runs when the
aggregation reads its message. Every task has the semantics of real substra execution:

- a fresh instance per task, rebuilt from the pickled ``RemoteStruct`` (constructor arguments
  only: an attribute set anywhere else is gone, as on a real node);
- local state written by ``save_local_state`` and read back by ``load_local_state`` at every
  task, through a file;
- shared states pickled on output and unpickled separately by every consumer (no aliasing);
  a site's message, which its aggregation alone reads, is kept as the object the task
  returned and handed over (sized by pickling it into a byte counter; a second reader would
  get a copy);
- a train task given no shared state after a non-initial task receives its *own previous
  shared output*, as substrafl's ``TrainDataNode`` wires it;
- aggregations get a fresh instance and no local state;
- opener data is read-only (in workers: a read-only memory map of the site's dump);
- method parameters must be small plain scalars (each distinct value is a registered function).

An output is freed once no reference to it is left in the plan and no pending task reads it;
an aggregation that reads its inputs from ``stream()`` (fed_de's do) frees each site's message
as soon as it has read it, so a serial run holds one site's message at a time. With
``spill_dir`` (and always with workers) outputs are files, so the parent holds only what the
running aggregation reads. Every run records the sequential step count (longest dependency
chain), the task count, the distinct functions, the bytes each site and the aggregator
send: the pickled outputs (masked, when secure aggregation is on) and the plaintext float64
payload of the sites' messages, and each task's CPU, with the CPU along the costliest chain of
dependent tasks (what the run takes with every site on its own machine).
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
import shutil
import tempfile
import time
import traceback
import uuid
import weakref
from collections.abc import Sequence
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
from fed_de.federation.secure import MaskedMessage, secagg
from fed_de.site import SiteData

_PARAM_TYPES = (bool, int, float, str, type(None))


@dataclass
class RunLedger:
    """What a run did: tasks, dependency depth, bytes, and (optionally) every message."""

    record_messages: bool = False
    tasks: int = 0
    depth: dict[str, int] = field(default_factory=dict)
    parents: dict[str, tuple[str, ...]] = field(default_factory=dict)  # in declaration order
    task_cpu: dict[str, float] = field(default_factory=dict)  # CPU of each task that ran
    bytes_by_site: dict[str, int] = field(default_factory=dict)
    payload_by_site: dict[str, int] = field(default_factory=dict)
    received_by_site: dict[str, int] = field(default_factory=dict)
    aggregator_bytes: int = 0
    step_bytes: dict[str, list[int]] = field(default_factory=dict)  # [payload, sent, largest]
    site_step_bytes: dict[tuple, list[int]] = field(default_factory=dict)
    aggregator_step_bytes: dict[str, list[int]] = field(default_factory=dict)  # [total, max]
    site_cpu: dict[str, float] = field(default_factory=dict)  # site tasks' CPU, by part
    functions: set = field(default_factory=set)
    messages: list[dict] = field(default_factory=list)
    steps_log: list[tuple[int, str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    n_jobs: int = 1
    checkpoint: Any = None  # fed_de.backends.checkpoint.Checkpoint of a resumable run

    @property
    def sequential_steps(self) -> int:
        """Length of the longest chain of dependent tasks."""
        return max(self.depth.values(), default=0)

    def declared(self, key: str, parents: Sequence[str]) -> None:
        """Book task ``key``'s place in the plan: its depth and what it waits for."""
        self.parents[key] = tuple(parents)
        self.depth[key] = 1 + max((self.depth.get(k, 0) for k in parents), default=0)

    @property
    def critical_path_cpu(self) -> float:
        """CPU seconds along the costliest chain of dependent tasks: what the run's compute
        takes when every site works on its own machine, at once (transfers and queues
        aside). A task that did not run (reused from a checkpoint) weighs nothing."""
        done: dict[str, float] = {}
        for key, parents in self.parents.items():  # parents are declared first
            done[key] = self.task_cpu.get(key, 0.0) + max(
                (done.get(k, 0.0) for k in parents), default=0.0)
        return max(done.values(), default=0.0)

    def facts(self) -> dict:
        """Run facts, JSON-serialisable.

        ``bytes_sent_by_site``: the pickled messages each site sent (masked when secure
        aggregation is on); ``payload_bytes_by_site``: their plaintext float64 values;
        ``bytes_sent_by_aggregator``: one copy of each aggregation's output;
        ``bytes_received_by_site``: the aggregator's outputs each site read;
        ``bytes_by_step``: per site step, the most any one site sent over its rounds (payload
        and sent) and its largest single message (sent);
        ``aggregator_bytes_by_step``: per aggregation chain, its outputs' total and largest;
        ``site_task_cpu_seconds``: CPU of the site tasks (wherever they ran), split into
        reading their inputs, the step itself, and writing their outputs;
        ``aggregator_cpu_seconds``: CPU of the aggregations (with the simulation's own
        booking between tasks); ``critical_path_cpu_seconds``: CPU along the costliest
        chain of dependent tasks (:attr:`critical_path_cpu`).
        """
        return {
            "sequential_steps": self.sequential_steps,
            "tasks": self.tasks,
            "distinct_functions": len(self.functions),
            "bytes_sent_by_site": dict(self.bytes_by_site),
            "payload_bytes_by_site": dict(self.payload_by_site),
            "bytes_sent_by_aggregator": self.aggregator_bytes,
            "bytes_received_by_site": dict(self.received_by_site),
            "bytes_by_step": {k: {"payload": v[0], "sent": v[1], "largest": v[2]}
                              for k, v in self.step_bytes.items()},
            "aggregator_bytes_by_step": {k: {"total": v[0], "largest": v[1]}
                                         for k, v in self.aggregator_step_bytes.items()},
            "bytes_measured": True,
            "bytes_note": "measured: pickled outputs (masked under secure aggregation); "
                          "payload = the messages' plaintext float64 values",
            "n_jobs": self.n_jobs,
            "site_task_cpu_seconds": {k: round(v, 3) for k, v in self.site_cpu.items()},
            "aggregator_cpu_seconds": round(sum(self.task_cpu.values())
                                            - sum(self.site_cpu.values()), 3),
            "critical_path_cpu_seconds": round(self.critical_path_cpu, 3),
            "wall_seconds": round(time.perf_counter() - self.started, 4),
            **({"checkpoint": self.checkpoint.facts()} if self.checkpoint is not None
               else {}),
        }


def payload_nbytes(obj: Any) -> int:
    """Plaintext bytes of a site's message: its float64 values (a masked message's values are
    ``limbs`` words each, its narrow sums two, its packed counts several to a word; the header is
    not counted)."""
    if isinstance(obj, MaskedMessage):
        head = obj.payload[secagg.HEADER]
        packed = head.get("counts") or {}
        return sum(8 * (math.prod(packed[k]) if k in packed
                        else int(v.size) // secagg.key_format(head, k)[0])
                   for k, v in obj.payload.items() if k != secagg.HEADER)
    if isinstance(obj, Message):
        return sum(int(v.size) * 8 for v in arrays(obj).values())
    return 0


def _dumps(value: Any, key: str, into=None) -> bytes | None:
    """The pickle of task ``key``'s output ``value``, or (``into`` a file) written there."""
    try:
        if into is None:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.dump(value, into, protocol=pickle.HIGHEST_PROTOCOL)
        return None
    except Exception as err:  # noqa: BLE001 - any pickling failure is a plan bug
        raise TypeError(f"shared state of task {key} is not picklable: {err}") from err


class _Counter:
    """A file that only counts what is written to it."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.n += n
        return n


# -- a site task, as a worker process runs it ---------------------------------------------------
@dataclass
class _SiteJob:
    """Everything one train task needs; picklable (it travels to a worker process)."""

    op_id: str
    org: str
    remote_struct: bytes  # cloudpickled RemoteStruct: the instance is rebuilt from it
    site: Any  # the SiteData in-process, or the path of its dump for a worker
    local_in: str | None  # local state file to load
    shared_in: bytes | str | None  # the pickled shared state, or its file
    shared_out: str | None  # file to write the message to (None: return it)
    local_out: str


@dataclass
class _SiteDone:
    """What a site task reports back."""

    op_id: str
    n_bytes: int = 0
    payload: int = 0
    blob: _Held | None = None  # the message, in-process (files: None)
    error: BaseException | None = None
    error_text: str = ""
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of its parts


_OPENED: dict[str, Any] = {}  # in a worker: dump path -> site (the workers end with the run)


def _open_site(site: Any) -> Any:
    """The site in-process, or (in a worker) its dump mapped read-only, once per worker."""
    if not isinstance(site, str):
        return site
    if site not in _OPENED:
        import joblib

        _OPENED[site] = joblib.load(site, mmap_mode="r")
    return _OPENED[site]


@dataclass(frozen=True)
class _Held:
    """A site's message kept in-process as the object its task returned, with the size of
    its pickle (counted, not built: a large message is not held twice).

    Only the finished task held a reference to it, so handing it to its one reader is what
    unpickling a fresh copy gives; any other reader gets a copy (:func:`_read_blob`).
    """

    value: Any
    n_bytes: int

    @classmethod
    def of(cls, value: Any, key: str) -> _Held:
        count = _Counter()  # the bytes pickle.dumps gives (and a file would hold)
        _dumps(value, key, into=count)
        return cls(value, count.n)

    def blob(self) -> bytes:
        """The pickle itself (a checkpoint's file, a copy for a second reader)."""
        return pickle.dumps(self.value, protocol=pickle.HIGHEST_PROTOCOL)


def _read_blob(source: bytes | str | _Held) -> Any:
    if isinstance(source, _Held):
        source = source.blob()
    if isinstance(source, bytes):
        return pickle.loads(source)
    with open(source, "rb") as fh:
        return pickle.load(fh)


def _run_site_job(job: _SiteJob, in_worker: bool = False) -> _SiteDone:
    """Run one train task (in this process or a worker); errors are returned, not raised
    (from a worker: as a copy that survives pickling, with the worker's traceback text)."""
    cpu: dict[str, float] = {}
    clock = [time.process_time()]

    def lap(name: str) -> None:
        now = time.process_time()
        cpu[name] = cpu.get(name, 0.0) + now - clock[0]
        clock[0] = now

    try:
        rs = cloudpickle.loads(job.remote_struct)
        instance = rs.get_instance()
        if job.local_in is not None:
            instance = instance.load_local_state(Path(job.local_in))
        kwargs: dict[str, Any] = {}
        if job.shared_in is not None:
            kwargs["shared_state"] = _read_blob(job.shared_in)
        site = _open_site(job.site)
        lap("inputs")
        out = getattr(instance, rs._method_name)(data_from_opener=site, _skip=True, **kwargs,
                                                 **rs._method_parameters)
        lap("step")
        kwargs = None  # the request is read: not held beside the message
        payload = payload_nbytes(out)
        if job.shared_out is not None:
            blob = _dumps(out, job.op_id)
            out = None  # the pickle is what travels: the message is not held beside it
            Path(job.shared_out).write_bytes(blob)
            held, n_bytes = None, len(blob)
        else:
            held = _Held.of(out, job.op_id)
            out, n_bytes = None, held.n_bytes
        blob = None
        instance.save_local_state(Path(job.local_out))
        lap("outputs")
        return _SiteDone(job.op_id, n_bytes, payload, held, cpu=cpu)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        if not in_worker:
            return _SiteDone(job.op_id, error=err)
        return _SiteDone(job.op_id, error=_portable(err), error_text=traceback.format_exc())


def _portable(err: BaseException) -> BaseException | None:
    """``err`` if it survives pickling (it may cross a process boundary), else None."""
    try:
        back = pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001 - an exception class with a custom constructor
        return None
    return back if type(back) is type(err) else None


# -- where outputs live between tasks ---------------------------------------------------------
@dataclass
class _Pending:
    job: _SiteJob
    seq: int
    needs: tuple[str, ...]  # outputs it reads: they must exist, and are held until it ran
    step: str
    round_idx: int | None
    reads_aggregate: str | None  # the aggregator output it reads (counted as received)
    own_shared: str | None  # or its own previous output (substrafl's wiring)
    weight: int = 0  # the site's samples: larger sites are dispatched first


class _Platform:
    """Where task outputs live between tasks (what substra's storage does), and the queue of
    site tasks declared but not yet run.

    An output is freed as soon as no reference to it is left in the plan being built and no
    pending task reads it: memory stays bounded by what the next tasks can read, not by
    everything a run sent. With ``files``, shared states are files in ``workdir`` (workers
    read and write them there); otherwise the parent keeps them as pickled bytes.
    """

    def __init__(self, ledger: RunLedger, workdir: Path, progress=None, *, n_jobs: int = 1,
                 files: bool = False):
        self.ledger = ledger
        self.workdir = workdir
        self.files = files or n_jobs != 1
        self.n_jobs = n_jobs
        self.shared: dict[str, bytes | _Held] = {}  # memory mode
        self.sizes: dict[str, int] = {}  # every live output: its pickled size
        self.local_paths: dict[str, Path] = {}
        self.progress = progress
        self.last_aggregate: str | None = None
        self.last_local: dict[str, str] = {}
        self.pending: dict[str, _Pending] = {}
        self._holders: dict[str, int] = {}
        self._seq = itertools.count()
        self._site_dumps: dict[int, str] = {}
        self._parallel = None
        self.ckpt = ledger.checkpoint
        self.index: dict[str, int] = {}  # output key -> its task's number in the checkpoint
        self.consumed: set[str] = set()  # site outputs freed once their aggregation read them

    # -- references and freeing ---------------------------------------------------------------
    def hold(self, key: str, ref):
        """Return ``ref``, freeing the output ``key`` once every such reference is gone."""
        self._pin(key)
        weakref.finalize(ref, self._release, key)
        return ref

    def _pin(self, key: str) -> None:
        self._holders[key] = self._holders.get(key, 0) + 1

    def _release(self, key: str) -> None:
        left = self._holders.get(key, 1) - 1
        if left:
            self._holders[key] = left
            return
        self._holders.pop(key, None)
        self._free_if_unused(key)

    def _free_if_unused(self, key: str) -> None:
        if self._holders.get(key) or key in self.pending:
            return
        if key == self.last_aggregate or key in self.last_local.values():
            return  # what the run returns
        self.shared.pop(key, None)
        if self.sizes.pop(key, None) is not None and self.files:
            self.shared_path(key).unlink(missing_ok=True)
        path = self.local_paths.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)
        if self.ckpt is not None and key in self.index:
            self.ckpt.freed(self.index[key])

    # -- checkpoints ----------------------------------------------------------------------------
    def declare(self, key: str, kind: str, org: str, step: str) -> str:
        """Number task ``key`` in the checkpoint; ``"run"`` it, or its outputs were kept
        (``"reuse"``: read back now) or are needed by nothing left (``"skip"``)."""
        if self.ckpt is None:
            return "run"
        n, action = self.ckpt.declare(kind, org, step)
        self.index[key] = n
        if action == "reuse":
            blob = self.ckpt.path(n, "shared").read_bytes()
            if self.files:
                self.shared_path(key).write_bytes(blob)
            else:
                self.shared[key] = blob
            self.sizes[key] = len(blob)
            local = self.ckpt.path(n, "local")
            if local.exists():
                self.local_paths[key] = self.workdir / f"local-{key}"
                shutil.copyfile(local, self.local_paths[key])
        return action

    def keep(self, key: str, local: str | Path | None = None) -> None:
        """Checkpoint the finished task ``key``'s outputs."""
        if self.ckpt is not None:
            source = self.shared_source(key)
            if isinstance(source, _Held):
                source = source.blob()
            self.ckpt.finish(self.index[key], source, local)

    def set_last_local(self, org: str, key: str) -> None:
        old = self.last_local.get(org)
        self.last_local[org] = key
        if old is not None:
            self._free_if_unused(old)

    def set_last_aggregate(self, key: str) -> None:
        old, self.last_aggregate = self.last_aggregate, key
        if old is not None:
            self._free_if_unused(old)

    # -- shared states --------------------------------------------------------------------------
    def shared_path(self, key: str) -> Path:
        return self.workdir / f"shared-{key}"

    def put_shared(self, key: str, value: Any) -> int:
        blob = _dumps(value, key)
        if self.files:
            self.shared_path(key).write_bytes(blob)
        else:
            self.shared[key] = blob
        self.sizes[key] = len(blob)
        return len(blob)

    def consume(self, key: str) -> None:
        """Free the in-memory copy of site output ``key`` now that its aggregation read it,
        unless a pending task reads it too (files are freed as before)."""
        if self._consumable(key):
            del self.shared[key]
            self.consumed.add(key)

    def _consumable(self, key: str) -> bool:
        """Whether site output ``key`` is held in memory and read by its aggregation only."""
        if self.files or key not in self.local_paths or key not in self.shared:
            return False
        return not any(key in p.needs for p in self.pending.values())

    def take_shared(self, key: str) -> Any:
        """Output ``key`` for its aggregation: a site's message read by nobody else is
        handed over and freed (no copy is made); anything else is read as a fresh copy.
        The task that makes it has run (:meth:`_Inputs._read`)."""
        held = self.shared.get(key)
        value = (held.value if self._consumable(key) and isinstance(held, _Held)
                 else self.get_shared(key))
        held = None
        self.consume(key)
        return value

    def shared_source(self, key: str) -> bytes | str | _Held:
        """The pickled output ``key``, or the file holding it."""
        if key in self.consumed:
            raise FedDEError(
                f"the simulation freed the message of task {key} once its aggregation read "
                "it, and another task reads it now (a train task given no shared state reads "
                "its own previous message): run with spill_dir= to keep messages as files")
        return str(self.shared_path(key)) if self.files else self.shared[key]

    def get_shared(self, key: str) -> Any:
        self.run_pending([key])
        return _read_blob(self.shared_source(key))

    # -- site data for workers --------------------------------------------------------------------
    def site_for_job(self, site: Any) -> Any:
        """The site itself in-process; for workers, the path of a read-only dump (written once
        per run; every worker maps it read-only)."""
        if self.n_jobs == 1:
            return site
        if id(site) not in self._site_dumps:
            import joblib

            path = self.workdir / f"site-{len(self._site_dumps)}.joblib"
            try:
                joblib.dump(site, path)
            except Exception as err:  # noqa: BLE001 - any reason the site cannot travel
                raise FedDEError(
                    f"site {getattr(site, 'name', site)!r} cannot be handed to worker "
                    f"processes ({type(err).__name__}: {err}); run with n_jobs=1") from err
            self._site_dumps[id(site)] = str(path)
        return self._site_dumps[id(site)]

    # -- deferred site tasks --------------------------------------------------------------------
    def defer(self, job: _SiteJob, *, needs: list[str], step: str, round_idx,
              reads_aggregate: str | None, own_shared: str | None, weight: int = 0) -> None:
        """Queue a site task; what it reads is held until it has run."""
        for key in needs:
            self._pin(key)
        self.pending[job.op_id] = _Pending(job, next(self._seq), tuple(needs), step,
                                           round_idx, reads_aggregate, own_shared, weight)

    def run_pending(self, keys=None) -> None:
        """Run the pending site tasks the outputs ``keys`` depend on (all with ``None``), the
        ready ones together, wave after wave."""
        wanted = set(self.pending) if keys is None else self._closure(keys)
        while wanted:
            wave = sorted((self.pending[k] for k in wanted
                           if not any(n in self.pending for n in self.pending[k].needs)),
                          key=lambda p: p.seq)
            self._run_wave(wave)
            wanted -= {p.job.op_id for p in wave}

    def _closure(self, keys) -> set[str]:
        out: set[str] = set()
        todo = [k for k in keys if k in self.pending]
        while todo:
            key = todo.pop()
            if key not in out:
                out.add(key)
                todo.extend(n for n in self.pending[key].needs if n in self.pending)
        return out

    def _run_wave(self, wave: list[_Pending]) -> None:
        for p in wave:  # the inputs exist now
            source = p.reads_aggregate or p.own_shared
            if source is not None:
                p.job.shared_in = self.shared_source(source)
            if self.progress is not None:
                self.progress(p.step, p.job.org, p.round_idx)
        if self.n_jobs == 1 or len(wave) == 1:
            done = [_run_site_job(p.job) for p in wave]
        else:
            from joblib import delayed

            # largest sites first: the round ends when its slowest worker does
            order = sorted(range(len(wave)), key=lambda i: -wave[i].weight)
            out = self._pool()(delayed(_run_site_job)(wave[i].job, True) for i in order)
            done = [None] * len(wave)
            for i, d in zip(order, out, strict=True):
                done[i] = d
        failed = None
        for p, d in zip(wave, done, strict=True):
            del self.pending[p.job.op_id]
            if d.error is None and not d.error_text:
                self._record(p, d)
            elif failed is None:
                failed = (p, d)
        for p in wave:  # after every record: a failed task's inputs stay in the checkpoint
            for key in p.needs:
                self._release(key)
            p.job.shared_in = None
        if failed is not None:
            self._raise(*failed)

    def _record(self, p: _Pending, d: _SiteDone) -> None:
        """Book a finished site task: its outputs, bytes, and (when asked) its message."""
        ledger, org, key = self.ledger, p.job.org, p.job.op_id
        if d.blob is not None:
            self.shared[key] = d.blob
        self.sizes[key] = d.n_bytes
        self.local_paths[key] = Path(p.job.local_out)
        ledger.tasks += 1
        for part, seconds in d.cpu.items():
            ledger.site_cpu[part] = ledger.site_cpu.get(part, 0.0) + seconds
        ledger.task_cpu[key] = sum(d.cpu.values())
        ledger.bytes_by_site[org] = ledger.bytes_by_site.get(org, 0) + d.n_bytes
        ledger.payload_by_site[org] = ledger.payload_by_site.get(org, 0) + d.payload
        per_site = ledger.site_step_bytes.setdefault((org, p.step), [0, 0, 0])
        per_site[:] = [per_site[0] + d.payload, per_site[1] + d.n_bytes,
                       max(per_site[2], d.n_bytes)]
        top = ledger.step_bytes.setdefault(p.step, [0, 0, 0])
        top[:] = [max(a, b) for a, b in zip(top, per_site, strict=True)]
        if p.reads_aggregate is not None:
            ledger.received_by_site[org] = (ledger.received_by_site.get(org, 0)
                                            + self.sizes.get(p.reads_aggregate, 0))
        self.keep(key, p.job.local_out)
        if ledger.record_messages:
            msg = _read_blob(self.shared_source(key))
            ledger.messages.append(
                {"site": org, "step": p.step,
                 "message": arrays(msg) if isinstance(msg, Message) else msg,
                 "bytes": d.n_bytes})
        self._free_if_unused(key)  # every reference may be gone already

    def _raise(self, p: _Pending, d: _SiteDone):
        """Raise a site task's error as the in-process executor does (site, step, facts)."""
        what = f"task {p.step!r} failed at site {p.job.org!r}"
        err = d.error
        if err is not None and d.error_text:  # from a worker: keep where it failed there
            err.__cause__ = RuntimeError(f"in the worker process:\n{d.error_text}")
        if isinstance(err, FedDEError):
            err.site, err.step, err.facts = p.job.org, p.step, self.ledger.facts()
            raise err
        cause = err if err is not None else RuntimeError(d.error_text)
        name = type(err).__name__ if err is not None else "error"
        text = str(err) if err is not None else d.error_text.strip().splitlines()[-1]
        raise SiteTaskError(f"{what}: {name}: {text}", site=p.job.org, step=p.step,
                            facts=self.ledger.facts()) from cause

    def _pool(self):
        if self._parallel is None:
            from joblib import Parallel

            self._parallel = Parallel(n_jobs=self.n_jobs, backend="loky", batch_size=1)
            self._parallel.__enter__()  # keep the workers (and their open sites) for the run
        return self._parallel

    def close(self) -> None:
        """End the run's worker processes (with them, their maps of the sites' dumps)."""
        if self._parallel is None:
            return
        backend = getattr(self._parallel, "_backend", None)
        try:
            backend.abort_everything(ensure_ready=False)
        except Exception:  # noqa: BLE001 - a joblib without it: idle workers time out
            pass
        self._parallel.__exit__(None, None, None)
        self._parallel = None


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
    except _SiteFailedError as failed:
        raise failed.error from None
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
    """A data node whose tasks run with real-substra semantics, deferred until needed."""

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
        """Declare one train task (run when its outputs are needed); return references to
        its outputs."""
        if not isinstance(operation, RemoteDataOperation):
            raise TypeError("operation must be a RemoteDataOperation (decorate with @remote_data)")
        pf, ledger = self._platform, self._platform.ledger
        rs = operation.remote_struct
        step = describe(rs._method_name, rs._method_parameters)
        _check_method_params(rs._method_parameters, f"site {self.organization_id!r}, {step}")
        ledger.functions.add(rs)
        op_id = str(uuid.uuid4())
        has_local = local_state is not None and not local_state.init
        parents = [local_state.key] if has_local else []
        reads_aggregate = own = None
        if operation.shared_state is not None:
            reads_aggregate = operation.shared_state.key
            parents.append(reads_aggregate)
        elif has_local:
            own = local_state.key  # substrafl wires the parent task's own shared output
        if pf.declare(op_id, "site", self.organization_id, step) == "run":
            job = _SiteJob(
                op_id=op_id, org=self.organization_id, remote_struct=cloudpickle.dumps(rs),
                site=pf.site_for_job(self._site),
                local_in=str(pf.workdir / f"local-{local_state.key}") if has_local else None,
                shared_in=None,
                shared_out=str(pf.shared_path(op_id)) if pf.files else None,
                local_out=str(pf.workdir / f"local-{op_id}"))
            pf.defer(job, needs=parents, step=step, round_idx=round_idx,
                     reads_aggregate=reads_aggregate, own_shared=own,
                     weight=int(getattr(self._site, "n_samples", 0)))
        ledger.declared(op_id, parents)
        ledger.steps_log.append((ledger.depth[op_id], self.organization_id, step))
        pf.set_last_local(self.organization_id, op_id)
        return (pf.hold(op_id, LocalStateRef(op_id)), pf.hold(op_id, SharedStateRef(op_id)))

    def register_operations(self, *args, **kwargs) -> None:
        """Nothing to register in-process."""
        return None

    def summary(self) -> dict:
        """Description for experiment summaries."""
        return {"organization_id": self.organization_id, "n_samples": self._site.n_samples}


class _SiteFailedError(Exception):
    """A site task run while an aggregation read its message failed: :func:`_call` re-raises
    the site's own error (naming the site), not an error of the aggregation."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class _Inputs(Sequence):
    """An aggregation's inputs, unpickled when read and not kept: a task that reads them
    once, in order, holds one site's message at a time (the pickled outputs stay with the
    platform until the task is done). Every read is a fresh copy, as every consumer gets."""

    def __init__(self, platform: _Platform, keys: list[str]):
        self._platform, self._keys = platform, keys

    def __len__(self) -> int:
        return len(self._keys)

    def _read(self, key: str, take: bool = False):
        try:
            self._platform.run_pending([key])  # a deferred site task runs when read
        except BaseException as err:  # noqa: BLE001 - re-raised as the site's own error
            raise _SiteFailedError(err) from None
        if take:
            return self._platform.take_shared(key)
        return self._platform.get_shared(key)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._read(k) for k in self._keys[i]]
        return self._read(self._keys[i])

    def __iter__(self):
        for key in self._keys:
            yield self._read(key)

    def stream(self):
        """Each input once, in order, its pickled copy freed once read when nothing else
        reads it (a site's message, read by its aggregation only). With the site tasks run
        as their messages are read, at most one site's message is held, pickled or not,
        beside what the task keeps of it."""
        for key in self._keys:
            value = self._read(key, take=True)  # freed once read, unless read again
            yield value
            value = None  # not held while the next site's task runs

    def __reduce__(self):  # a task that returns its inputs returns a list of them
        return list, (list(self),)


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
        """Run one aggregation task now (after the site tasks it reads) and return a
        reference to its output."""
        if not isinstance(operation, RemoteOperation):
            raise TypeError("operation must be a RemoteOperation (decorate with @remote)")
        pf, ledger = self._platform, self._platform.ledger
        rs = operation.remote_struct
        step = describe(rs._method_name, rs._method_parameters)
        _check_method_params(rs._method_parameters, f"aggregator, {step}")
        ledger.functions.add(rs)
        refs = operation.shared_states or []
        op_id = str(uuid.uuid4())
        if pf.declare(op_id, "aggregation", self.organization_id, step) == "run":
            if pf.n_jobs != 1:  # a round's site tasks run together, on the workers
                pf.run_pending([r.key for r in refs])
            states = _Inputs(pf, [r.key for r in refs])  # else each one as it is read
            instance = _rebuild(rs).get_instance()
            if pf.progress is not None:
                pf.progress(step, self.organization_id, round_idx)
            # its own CPU: serially, the site tasks it reads run inside it (booked apart)
            cpu0, sites0 = time.process_time(), sum(ledger.site_cpu.values())
            out = _call(getattr(instance, rs._method_name), self.organization_id, step,
                        ledger, f"aggregation {step!r} failed", shared_states=states,
                        _skip=True, **rs._method_parameters)
            del states
            n_bytes = pf.put_shared(op_id, out)
            del out
            ledger.task_cpu[op_id] = max(0.0, time.process_time() - cpu0
                                         - (sum(ledger.site_cpu.values()) - sites0))
            pf.keep(op_id)
            ledger.tasks += 1
            ledger.aggregator_bytes += n_bytes
            seen = ledger.aggregator_step_bytes.setdefault(step, [0, 0])
            seen[:] = [seen[0] + n_bytes, max(seen[1], n_bytes)]
        ledger.declared(op_id, [r.key for r in refs])
        ledger.steps_log.append((ledger.depth[op_id], self.organization_id, step))
        pf.set_last_aggregate(op_id)
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


def resolve_jobs(n_jobs: int | None) -> int:
    """Worker processes for ``n_jobs`` (joblib's convention: -1 = every CPU)."""
    if n_jobs is None or n_jobs == 0:
        return 1
    n = int(n_jobs)
    if n < 0:
        n = max(1, (os.cpu_count() or 1) + 1 + n)
    return n


def run_strict(
    strategy,
    sites: list[SiteData],
    *,
    record_messages: bool = False,
    progress=None,
    keep_local_states: bool = True,
    n_jobs: int | None = 1,
    spill_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> SimulationResult:
    """Build and execute ``strategy``'s compute plan over ``sites``.

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
    n_jobs
        Worker processes for the site tasks of a round (joblib/loky; ``-1``: every CPU).
        ``1`` runs them in this process. The answer is the same either way.
    spill_dir
        Keep shared states as files in a fresh folder under this directory (removed at the
        end) instead of in memory. Workers always exchange them through files (in a
        temporary folder when no ``spill_dir`` is given).
    checkpoint
        A folder keeping the run's frontier (:mod:`fed_de.backends.checkpoint`): a run that
        fails or is interrupted resumes from it when called again with the same strategy
        and sites (finished tasks are not run again); removed when the run ends well.
    """
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    n_jobs = resolve_jobs(n_jobs)
    ledger = RunLedger(record_messages=record_messages, n_jobs=n_jobs)
    if checkpoint is not None:
        from fed_de.backends.checkpoint import Checkpoint, fingerprint

        ledger.checkpoint = Checkpoint(checkpoint, fingerprint(strategy, names))
    if spill_dir is not None:  # absolute: worker processes may run in another directory
        spill_dir = Path(spill_dir).resolve()
        spill_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="fed_de_sim_", dir=spill_dir)
    platform = _Platform(ledger, Path(tmp), progress, n_jobs=n_jobs,
                         files=spill_dir is not None)
    try:
        train_nodes = [StrictTrainDataNode(s, platform) for s in sites]
        agg = StrictAggregationNode(platform)
        strategy.build_compute_plan(
            train_data_nodes=train_nodes,
            aggregation_node=agg,
            evaluation_strategy=None,
            num_rounds=None,
            clean_models=True,
        )
        platform.run_pending()  # tasks no aggregation read
        final = platform.get_shared(platform.last_aggregate) if platform.last_aggregate else None
        local_states = {}
        if keep_local_states:
            for name, op_id in platform.last_local.items():
                with open(platform.local_paths[op_id], "rb") as fh:
                    local_states[name] = pickle.load(fh)
        if ledger.checkpoint is not None:  # the run ended well: nothing to resume
            ledger.checkpoint.clear()
    finally:
        if ledger.checkpoint is not None and ledger.checkpoint.folder.exists():
            ledger.checkpoint.save_plan()
        platform.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return SimulationResult(shared_state=final, ledger=ledger, local_states=local_states)
