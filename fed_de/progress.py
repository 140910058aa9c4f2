"""A progress bar over a compute plan's tasks: done / total, percentage, time left.

The plan is static, so its task count is known before the first task
(``fed_de.backends.plan.record_plan(strategy, names).tasks``). A bar is a progress callback
``(step, organisation, round_idx)`` as the backends call it: the simulation calls it before
every task; the substra backends call it once when submitting, once with
``"submitted compute plan <key>"`` (printed above the bar), then at each poll with
``"compute plan <status> (<done>/<total> tasks)"``, which sets the bar to ``done``.
"""

from __future__ import annotations

import re
from contextlib import nullcontext

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_POLL = re.compile(r"\((\w+)/(\d+) tasks\)")


class TaskBar:
    """A rich progress bar (on stderr) counting a plan's tasks; call it as a progress
    callback."""

    def __init__(self, total: int, description: str = "fed_de",
                 console: Console | None = None, transient: bool = False):
        self.total = int(total)
        self.description = description
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("tasks"), TaskProgressColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
            console=console or Console(stderr=True), transient=transient)
        self._task = None
        self.last_step = ""  # what the last call said (shown by nothing; for logs and tests)

    def __enter__(self) -> TaskBar:
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # the error, not a half-drawn bar, is what the user reads
            self._progress.live.transient = True
        self._progress.stop()

    @property
    def completed(self) -> int:
        """Tasks counted so far."""
        return int(self._progress.tasks[0].completed) if self._progress.tasks else 0

    def __call__(self, step: str, organisation: str, round_idx) -> None:
        poll = _POLL.search(step)
        self.last_step = f"round {round_idx}: {step} at {organisation}"
        if step.startswith("submitted compute plan"):  # its key: to reattach later
            self._progress.console.print(step, highlight=False)
        elif poll:  # a substra backend polling its compute plan
            done = int(poll[1]) if poll[1].isdigit() else 0
            self._progress.update(self._task, completed=done)
        elif not step.startswith("submitting"):
            self._progress.update(self._task, advance=1)


def progress_callback(progress, total: int, description: str = "fed_de"):
    """A context manager yielding the callback the backends call: ``TaskBar`` for
    ``progress=True``, the callable itself, or ``None``."""
    if progress is True:
        return TaskBar(total, description)
    if callable(progress):
        return nullcontext(progress)
    if progress in (None, False):
        return nullcontext(None)
    raise TypeError(f"progress must be True, False, None or a callable (step, organisation, "
                    f"round_idx), not {type(progress).__name__}")

