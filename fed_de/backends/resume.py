"""Resume a failed compute plan as a new one, from a state downloaded from it.

On Substra a failed plan cannot be continued: a new plan is submitted. What it needs from
the failed one is the run state after the last aggregation a new plan can start from
(:meth:`~fed_de.federation.strategy.FedStrategy.resume_refusal` says which can) and that
aggregation's round index; :func:`download_seed` fetches them with the aggregator's client
(substra keeps every output of a plan submitted with ``clean_models=False``, as fed_de
submits). The seed is written to a run folder (:func:`save_seed`, ``resume.pkl`` and a
readable ``resume.json``) and given to :func:`fed_de.backends.run` (``resume=``) on any
backend; the new plan runs only the rounds after the seed's
(:mod:`fed_de.federation.resume`).

Why not let the new plan's tasks read the failed plan's outputs directly? The subprocess
backend keeps its tasks in memory, so they are gone with the process that ran them; and the
sites' local states need not travel at all, since each site re-derives its own from its data
and the seed.
"""

from __future__ import annotations

import json
import pickle
import zlib
from dataclasses import is_dataclass
from pathlib import Path

from fed_de.errors import FedDEError
from fed_de.federation.liveness import keep_only, plan_reads
from fed_de.federation.resume import Seed

SEED_FILE = "resume.pkl"


def _done(task) -> bool:
    return "done" in str(getattr(task, "status", "")).lower()


def _round(task) -> int | None:
    value = (getattr(task, "metadata", None) or {}).get("round_idx")
    return int(value) if value not in (None, "", "None") else None


def download_seed(client, compute_plan_key: str, strategy, aggregator_org: str,
                  download=None) -> Seed:
    """The seed of a new plan resuming the failed plan ``compute_plan_key``: the state of
    its latest finished aggregation the strategy can resume from.

    Raises
    ------
    FedDEError
        No finished aggregation of the plan can seed a new one (names why for the latest).
    """
    from substrafl.model_loading import download_aggregate_shared_state

    download = download or download_aggregate_shared_state
    tasks = list(client.list_task(filters={"compute_plan_key": [compute_plan_key]}))
    rounds = sorted({r for t in tasks if t.worker == aggregator_org and _done(t)
                     and (r := _round(t)) is not None}, reverse=True)
    cache: dict[int, object] = {}

    def fetch(r: int):
        if r not in cache:
            cache[r] = download(client=client, compute_plan_key=compute_plan_key, round_idx=r)
        return cache[r]

    reasons = []
    for r in rounds:
        try:
            state = fetch(r)
        except Exception as err:  # noqa: BLE001 - two aggregations of one round: side chain
            reasons.append(f"round {r}: {type(err).__name__}: {err}")
            continue
        why = strategy.resume_refusal(state)
        if why is None:
            side = strategy.resume_side(state, r, fetch, rounds)
            last = r if side is None else max(r, side[1])  # what the new plan does not run
            reused = sum(1 for t in tasks if _done(t) and (_round(t) or 0) <= last)
            n_sites = getattr(strategy, "n_sites", 0) or len(
                {t.worker for t in tasks if t.worker != aggregator_org})
            keep = parts_read_after(strategy, r if side is None else min(r, side[1]),
                                    n_sites)
            if side is not None and "side" not in keep:  # a join reads every part of it
                side = (trim(side[0], keep, strategy), side[1])
            return Seed(trim(strategy.resume_seed(state, fetch, rounds), keep, strategy), r,
                        compute_plan_key, reused, *(side or (None, None)))
        reasons.append(f"round {r}: {why}")
    detail = "; ".join(reasons[:2]) or "no aggregation of it finished"
    raise FedDEError(f"compute plan {compute_plan_key} has no finished round a new plan can "
                     f"start from ({detail}); run the study again from the start")


def parts_read_after(strategy, round_idx: int, n_sites: int) -> set[str]:
    """Names of the run state's parts that a step of ``strategy``'s plan (over ``n_sites``
    sites) after round ``round_idx`` reads (:func:`fed_de.federation.liveness.plan_reads`)."""
    reads: set[str] = set()
    for task, names in plan_reads(strategy, n_sites):
        if task.round_idx > round_idx:
            reads |= names
    return reads


def trim(state, keep: set[str], strategy):
    """``state`` with only the parts in ``keep`` or in ``strategy.kept_parts()`` (what the
    results read from the final state); the others are None (a smaller seed: only what the
    remaining rounds read). A strategy whose ``kept_parts()`` is None keeps all."""
    always = strategy.kept_parts()
    if always is None or not is_dataclass(state):
        return state
    return keep_only(state, keep | set(always))


def save_seed(seed: Seed, folder: str | Path) -> Path:
    """Write ``seed`` to ``folder/resume.pkl`` (a zlib-compressed pickle) and a readable
    ``resume.json``."""
    from fed_de.files import write_text, write_with

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blob = zlib.compress(pickle.dumps(seed, protocol=pickle.HIGHEST_PROTOCOL), 9)
    write_with(folder / SEED_FILE, lambda tmp: tmp.write_bytes(blob))
    write_text(folder / "resume.json", json.dumps(
        {"compute_plan_key": seed.source, "round_idx": seed.round_idx,
         "tasks_done": seed.tasks_done, "seed_bytes": len(blob)}, indent=1))
    return folder / SEED_FILE


def load_seed(folder: str | Path) -> Seed:
    """The seed :func:`save_seed` wrote to ``folder``."""
    path = Path(folder) / SEED_FILE
    if not path.exists():
        raise FedDEError(f"{path} does not exist: download the failed plan's state first "
                         "(fed-de download PLAN_KEY --out RUN_DIR)")
    try:
        seed = pickle.loads(zlib.decompress(path.read_bytes()))
    except (zlib.error, pickle.UnpicklingError, EOFError) as err:
        raise FedDEError(f"{path} is no fed_de resume seed ({err}): download it again "
                         "(fed-de download PLAN_KEY --out RUN_DIR)") from None
    if not isinstance(seed, Seed):
        raise FedDEError(f"{path} holds no fed_de resume seed")
    return seed


def facts(seed: Seed) -> dict:
    """What a resumed run reports about the plan it continued."""
    return {"from_compute_plan": seed.source, "from_round": seed.round_idx,
            "tasks_reused": seed.tasks_done}
