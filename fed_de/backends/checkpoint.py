"""Checkpoints of a simulated run, so that a failed or interrupted run resumes where it
stopped (``fed_de.deseq2(..., checkpoint=DIR)``, ``fed-de resume``).

The plan is static: the same strategy over the same sites declares the same tasks in the
same order. Every task is numbered in that order; the folder keeps

- ``plan.json``: the plan's fingerprint (the strategy's constructor arguments and the sites)
  and one line per declared task (kind, organisation, step): a resume of another plan is
  refused;
- ``done``: the numbers of the tasks that finished, one per line (appended as they finish);
- ``<n>.shared`` (the task's output: a site's message or the aggregator's run state) and
  ``<n>.local`` (a site's local state after the task), written whole (temporary file +
  rename) when the task finishes, and deleted once nothing later in the plan reads them (the
  executor frees outputs no reference or pending task holds) -- so the folder holds the
  plan's frontier: the last run state and, per site, its last local state and any message
  not yet aggregated.

On resume a finished task with its files is not run again: its outputs are read back; a
finished task whose files were deleted is not needed by anything left to run. Everything
else runs as usual. The answer is the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from fed_de.errors import FedDEError
from fed_de.files import write_text, write_with


def fingerprint(strategy, site_names: list[str]) -> str:
    """SHA-256 of the strategy's class, constructor arguments and the sites' names."""
    text = json.dumps({"class": f"{type(strategy).__module__}.{type(strategy).__name__}",
                       "args": repr(getattr(strategy, "args", ())),
                       "kwargs": repr(sorted(getattr(strategy, "kwargs", {}).items())),
                       "sites": list(site_names)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class Checkpoint:
    """A run's checkpoint folder (see the module docstring).

    Parameters
    ----------
    folder
        Where the checkpoint lives (created).
    plan_id
        :func:`fingerprint` of the run; a folder holding another plan's checkpoint is
        refused.
    """

    def __init__(self, folder: str | Path, plan_id: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.plan_id = plan_id
        meta = self.folder / "plan.json"
        saved = json.loads(meta.read_text()) if meta.exists() else None
        if saved is not None and saved.get("plan") != plan_id:
            raise FedDEError(
                f"{self.folder} holds the checkpoint of another run (other options, sites or "
                "fed_de version); resume with the options of that run, or remove the folder "
                "to start afresh")
        self.saved_tasks: list[list[str]] = saved["tasks"] if saved else []
        done = self.folder / "done"
        self.finished = ({int(x) for x in done.read_text().split()} if done.exists()
                         else set())
        self.tasks: list[list[str]] = []
        self.reused = {"site": 0, "aggregation": 0}
        self._to_delete: list[int] = []
        self._kept: dict[int, tuple[str, int]] = {}  # task -> (organisation, bytes on disk)
        self.peak_by_org: dict[str, int] = {}

    # -- the plan --------------------------------------------------------------------------
    def declare(self, kind: str, org: str, step: str) -> tuple[int, str]:
        """Number the next task; return it and what to do: ``"run"``, ``"reuse"`` (read its
        outputs back) or ``"skip"`` (finished; nothing left reads its outputs)."""
        n = len(self.tasks)
        entry = [kind, org, step]
        if n < len(self.saved_tasks) and self.saved_tasks[n] != entry:
            raise FedDEError(
                f"{self.folder}: task {n} of the checkpoint is {self.saved_tasks[n]}, this "
                f"run's is {entry}; the plan changed. Resume with the same options, or "
                "remove the folder")
        self.tasks.append(entry)
        if n not in self.finished:
            return n, "run"
        self.reused[kind] += 1  # finished before: not run again
        if self.path(n, "shared").exists():
            self._kept[n] = (org, sum(self.path(n, w).stat().st_size
                                      for w in ("shared", "local") if self.path(n, w).exists()))
            return n, "reuse"
        return n, "skip"

    def path(self, n: int, what: str) -> Path:
        """The file of task ``n``'s ``what`` (``shared`` or ``local``)."""
        return self.folder / f"{n}.{what}"

    def save_plan(self) -> None:
        """Write the plan's fingerprint and the tasks declared so far."""
        tasks = self.tasks if len(self.tasks) >= len(self.saved_tasks) else self.saved_tasks
        write_text(self.folder / "plan.json", json.dumps({"plan": self.plan_id,
                                                          "tasks": tasks}))

    # -- outputs ---------------------------------------------------------------------------
    def finish(self, n: int, shared: bytes | str, local: str | Path | None = None) -> None:
        """Keep task ``n``'s outputs (bytes, or the file holding them) and mark it done; then
        delete the files of outputs freed before it."""
        for what, source in (("shared", shared), ("local", local)):
            if source is None:
                continue
            if isinstance(source, bytes):
                write_with(self.path(n, what), lambda tmp, b=source: tmp.write_bytes(b))
            else:
                write_with(self.path(n, what), lambda tmp, s=source: shutil.copyfile(s, tmp))
        with (self.folder / "done").open("a") as fh:
            fh.write(f"{n}\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.finished.add(n)
        org = self.tasks[n][1]
        self._kept[n] = (org, sum(self.path(n, w).stat().st_size
                                  for w in ("shared", "local") if self.path(n, w).exists()))
        now = sum(b for o, b in self._kept.values() if o == org)
        self.peak_by_org[org] = max(self.peak_by_org.get(org, 0), now)
        self._flush_deletes()

    def freed(self, n: int) -> None:
        """Nothing later reads task ``n``'s outputs: delete its files after the next task
        finishes (never while an error unwinds the run: the frontier stays)."""
        self._to_delete.append(n)

    def _flush_deletes(self) -> None:
        for n in self._to_delete:
            for what in ("shared", "local"):
                self.path(n, what).unlink(missing_ok=True)
            self._kept.pop(n, None)
        self._to_delete.clear()

    def facts(self) -> dict:
        """What the checkpoint did: tasks and aggregation rounds not run again (finished
        before the run was resumed), and the most bytes
        it held at once per organisation (a site's: its local state and unaggregated
        messages; the aggregator's: its last run states)."""
        return {"folder": str(self.folder), "tasks_reused": sum(self.reused.values()),
                "rounds_reused": self.reused["aggregation"],
                "site_tasks_reused": self.reused["site"],
                "peak_bytes_by_org": dict(self.peak_by_org)}

    def clear(self) -> None:
        """Remove the checkpoint (the run finished)."""
        shutil.rmtree(self.folder, ignore_errors=True)
