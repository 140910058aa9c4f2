"""The CPU clock the micro-benchmarks share (``disp_cost.py``, ``mask_cost.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_cpu(fn: Callable[[], object], repeats: int = 3) -> float:
    """Least CPU seconds (this process) of ``repeats`` calls of ``fn``: the least is the run
    the rest of the machine disturbed least."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best
