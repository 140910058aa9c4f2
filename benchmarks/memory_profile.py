"""Where the simulation's memory peaks: tracemalloc after every aggregator step.

``python benchmarks/memory_profile.py [GENES]``: a default run of the demo study (150
samples, 3 hospitals); prints the largest traced memory seen after a step, the step, and the
allocations alive then, largest first.
"""

from __future__ import annotations

import sys
import tracemalloc
import warnings

import fed_de
from fed_de.demo_data import make_demo_study
from fed_de.federation import calls


def profile(n_genes: int = 3000, top: int = 6) -> None:
    """Run once with every step call wrapped; print the peak's allocations."""
    study = make_demo_study(n_samples=150, n_genes=n_genes, seed=0)
    best = {"current": 0, "snapshot": None, "step": None}
    invoke = calls.invoke

    def traced(fn, state, provided, params):
        out = invoke(fn, state, provided, params)
        current, _ = tracemalloc.get_traced_memory()
        if current > best["current"]:
            best.update(current=current, snapshot=tracemalloc.take_snapshot(),
                        step=fn.__name__)
        return out

    calls.invoke = traced
    tracemalloc.start(8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fed_de.deseq2(study.sites, study.design, levels=study.levels)
    finally:
        calls.invoke = invoke
        tracemalloc.stop()
    print(f"largest traced memory {best['current'] / 1e6:.1f} MB, after {best['step']}")
    for stat in best["snapshot"].statistics("traceback")[:top]:
        print(f"{stat.size / 1e6:8.1f} MB  {stat.count} blocks")
        for line in stat.traceback.format()[-4:]:
            print("    ", line)


if __name__ == "__main__":
    profile(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
