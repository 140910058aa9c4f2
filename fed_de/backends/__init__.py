"""Where a strategy runs: one :func:`run` for every backend.

- ``simulation`` (:mod:`.simulation`): the strict in-process executor (default, CI);
- ``subprocess`` (:mod:`.substra`): substra's subprocess backend, real registered functions,
  datasets and tasks on this machine;
- ``remote`` (:mod:`.substra`): a Substra network of hospitals.
:mod:`.plan` records a plan without running it (``--plan-only``, the substra backends' facts);
:mod:`.opener` is the substratools opener the sites register.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("simulation", "subprocess", "remote")


@dataclass
class Run:
    """A finished run: the final shared state, the run facts, and (simulation) what each
    site keeps at the end."""

    state: Any
    facts: dict
    local_states: dict = field(default_factory=dict)


def check_backend(backend: str) -> None:
    """Refuse an unknown backend, naming the ones there are."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available; choose one of {BACKENDS}")


def run(strategy, sites: list, backend: str = "simulation", *, workdir=None, credentials=None,
        keys=None, timeout: float | None = None, progress=None, record_messages: bool = False,
        opener_source: str | None = None, write_site=None, prefix: str = "fed_de_",
        n_jobs: int | None = 1, spill_dir=None, attach: str | None = None,
        checkpoint=None, resume=None) -> Run:
    """Run ``strategy`` over ``sites`` (simulation, subprocess) or a remote network's
    registered datasets (``keys``); ``opener_source`` and ``write_site`` let other kinds of
    site (screens) travel the substra backends. ``n_jobs`` (worker processes for a round's
    site tasks) and ``spill_dir`` (shared states kept as files there) are the simulation's;
    ``attach`` (remote) waits for an already submitted compute plan of the same study and
    options instead of submitting a new one; ``checkpoint`` (simulation) a folder from which
    a failed or interrupted run resumes (:mod:`.checkpoint`); ``resume`` (any backend) a
    failed plan's downloaded seed, or the folder holding it: a new plan runs the rounds after
    it (:mod:`.resume`)."""
    check_backend(backend)
    if resume is not None:
        done = _resumed(strategy, resume)
        result = run(strategy, sites, backend, workdir=workdir, credentials=credentials,
                     keys=keys, timeout=timeout, progress=progress,
                     record_messages=record_messages, opener_source=opener_source,
                     write_site=write_site, prefix=prefix, n_jobs=n_jobs, spill_dir=spill_dir,
                     attach=attach, checkpoint=checkpoint)
        result.facts["resumed"] = done
        return result
    check_workers(backend, n_jobs, spill_dir)
    if attach is not None and backend != "remote":
        raise ValueError("attach= (a submitted compute plan's key) applies to the remote "
                         "backend")
    if checkpoint is not None and backend != "simulation":
        raise ValueError(f"checkpoint= applies to the simulation backend; on {backend!r} "
                         "the network keeps the plan: reattach with attach= (fed-de download)")
    if backend == "simulation":
        from fed_de.backends.simulation import run_strict

        sim = run_strict(strategy, sites, record_messages=record_messages, progress=progress,
                         n_jobs=n_jobs, spill_dir=spill_dir, checkpoint=checkpoint)
        facts = sim.ledger.facts()
        if record_messages:
            facts["messages"] = sim.ledger.messages
        # what each site keeps (the federation base saves it with the site's keyring)
        kept = {k: v[0] if isinstance(v, tuple) else v for k, v in sim.local_states.items()}
        return Run(sim.shared_state, facts, kept)
    from fed_de.backends import substra

    workdir = Path(workdir or tempfile.mkdtemp(prefix=prefix + "substra_"))
    if backend == "subprocess":
        extra = {"opener_source": opener_source} if opener_source else {}
        if write_site is not None:
            extra["write_site"] = write_site
        sub = substra.run_subprocess(strategy, sites, workdir=workdir, progress=progress,
                                     **extra)
    else:
        sub = substra.run_remote(strategy, credentials, keys, workdir=workdir,
                                 timeout=timeout, progress=progress, attach=attach)
    facts = dict(sub.facts)
    facts.update(workdir=str(workdir), backend=backend)
    return Run(sub.shared_state, facts)


def _resumed(strategy, resume) -> dict:
    """Give ``strategy`` the seed (or the folder holding it) it resumes from; its facts."""
    from fed_de.backends import resume as resume_mod
    from fed_de.federation.resume import Seed

    seed = resume if isinstance(resume, Seed) else resume_mod.load_seed(resume)
    strategy.resume_from = seed
    return resume_mod.facts(seed)


def check_workers(backend: str, n_jobs: int | None, spill_dir) -> None:
    """Worker processes and spilling are options of the simulation: refuse them elsewhere."""
    if n_jobs is not None and not isinstance(n_jobs, int | np.integer):
        raise ValueError(f"n_jobs must be an integer (-1: every CPU), not {n_jobs!r}")
    if backend != "simulation" and ((n_jobs or 1) != 1 or spill_dir is not None):
        raise ValueError(f"n_jobs / spill_dir apply to the simulation backend; on {backend!r} "
                         "the platform runs each site's tasks on that site's own node")


def declared_site_names(loaded: list, keys=None) -> tuple[str, ...]:
    """The study's site names: those of the sites given, or those the keys file lists (a
    remote study, whose data stays at the sites)."""
    if loaded:
        return tuple(s.name for s in loaded)
    if keys is None:
        return ()
    from fed_de.backends.substra import _load_yaml

    return tuple((_load_yaml(keys) or {}).get("sites") or {})


def n_declared_sites(loaded: list, keys=None) -> int:
    """The study's number of sites: those given, or those the keys file lists (remote)."""
    return len(declared_site_names(loaded, keys))


def secure_option(asked: bool, n_sites: int) -> bool:
    """Secure aggregation as asked; with two sites, say what it cannot hide."""
    if asked and n_sites == 2:
        warnings.warn("secure aggregation with two sites: each site can infer the other's "
                      "sums (the total minus its own); the aggregator still sees totals only",
                      stacklevel=3)
    return bool(asked)
