"""What a run keeps per round, and what a resume costs (issue 14).

``python benchmarks/resume_cost.py [GENES] [OUT.json]``: the demo study (150 samples, three
hospitals, ``~ batch + condition``, Cook's on, secure aggregation), in the simulation:

- the aggregator's run state after every aggregation (pickled bytes) and every site's local
  state after every task (the files the simulation writes);
- a new-plan resume (``deseq2(resume_from=seed)``) from the middle of the plan (the Cook's
  side chain in flight): the seed's bytes (main and side plan parameters, ``resume.pkl``),
  its wall time and tasks against the full run's, and the largest difference of results;
- a checkpoint resume (``deseq2(checkpoint=DIR)``) after an interruption at half the tasks:
  the folder's bytes, wall time and reused tasks.

The seed is built as a failed substra plan's would be (``backends.resume.download_seed``),
from the states the simulation's aggregations produced, by round.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np

import fed_de
from fed_de import api
from fed_de.backends import simulation
from fed_de.backends.resume import download_seed
from fed_de.demo_data import make_demo_study
from fed_de.federation.strategy import FedStrategy


def _record(study):
    """The full run, its strategy, its states by round and its local-state file sizes."""
    states, local_bytes, seen = {}, [], {}
    update, run, save = (simulation.StrictAggregationNode.update_states, api.run,
                         FedStrategy.save_local_state)

    def capture(self, operation, *, round_idx=None, **more):
        ref = update(self, operation, round_idx=round_idx, **more)
        states.setdefault(round_idx, []).append(self._platform.get_shared(ref.key))
        return ref

    def keep(strategy, *args, **more):
        seen["strategy"] = strategy
        return run(strategy, *args, **more)

    def sized(self, path):
        save(self, path)
        local_bytes.append(Path(path).stat().st_size)

    simulation.StrictAggregationNode.update_states, api.run = capture, keep
    FedStrategy.save_local_state = sized
    try:
        start = time.perf_counter()
        full = fed_de.deseq2(study.sites, study.design, levels=study.levels, genes=study.genes)
        wall = time.perf_counter() - start
    finally:
        simulation.StrictAggregationNode.update_states, api.run = update, run
        FedStrategy.save_local_state = save
    return full, wall, seen["strategy"], states, local_bytes


def measure(n_genes: int = 2000) -> dict:
    """The numbers of the module docstring."""
    warnings.simplefilter("ignore")
    study = make_demo_study(n_genes=n_genes, seed=1)
    full, t_full, strategy, states, local_bytes = _record(study)
    agg = {r: len(pickle.dumps(s[0], protocol=5)) for r, s in sorted(states.items())}
    main = sorted(r for r, s in states.items() if s[0].robust is None)
    fail = main[len(main) // 2]
    tasks = [types.SimpleNamespace(worker="agg", status="STATUS_DONE", key=f"t{r}",
                                   metadata={"round_idx": str(r)}) for r in states if r < fail]
    client = types.SimpleNamespace(list_task=lambda filters=None: tasks)
    seed = download_seed(client, "cp", strategy, "agg",
                         download=lambda client, compute_plan_key, round_idx:
                         states[round_idx][0])
    start = time.perf_counter()
    res = fed_de.deseq2(study.sites, study.design, levels=study.levels, genes=study.genes,
                        resume_from=seed)
    t_res = time.perf_counter() - start
    diff = np.nanmax(np.abs(res.results().to_numpy(float) - full.results().to_numpy(float)))
    out = {"n_genes": n_genes, "tasks": full.facts["tasks"], "wall_s": round(t_full, 1),
           "aggregator_state_bytes_by_round": agg,
           "local_state_bytes": {"tasks": len(local_bytes), "min": min(local_bytes),
                                 "median": int(np.median(local_bytes)),
                                 "max": max(local_bytes)},
           "new_plan_resume": {
               "failed_at_round": fail, "seed_round": seed.round_idx,
               "side_round": seed.side_round, "tasks": res.facts["tasks"],
               "wall_s": round(t_res, 1), "max_abs_diff": float(diff),
               "main_param_chars": len(seed.encode()),
               "side_param_chars": len(seed.encode(side=True)) if seed.side is not None else 0,
               "untrimmed_state_bytes": agg[seed.round_idx]}}
    folder = Path(tempfile.mkdtemp())
    count = {"n": 0}

    def interrupt(step, org, round_idx):
        count["n"] += 1
        if count["n"] == full.facts["tasks"] // 2:
            raise KeyboardInterrupt

    try:
        fed_de.deseq2(study.sites, study.design, levels=study.levels, genes=study.genes,
                      checkpoint=folder / "ck", progress=interrupt)
    except KeyboardInterrupt:
        pass
    kept = sum(p.stat().st_size for p in (folder / "ck").rglob("*") if p.is_file())
    start = time.perf_counter()
    again = fed_de.deseq2(study.sites, study.design, levels=study.levels, genes=study.genes,
                          checkpoint=folder / "ck")
    out["checkpoint_resume"] = {"folder_bytes": kept,
                                "wall_s": round(time.perf_counter() - start, 1),
                                "tasks_reused": again.facts["checkpoint"]["tasks_reused"]}
    shutil.rmtree(folder)
    return out


if __name__ == "__main__":
    result = measure(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
    text = json.dumps(result, indent=1)
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(text)
    print(text)
