"""A resumed plan: a new compute plan that starts from a run state downloaded from a failed
one and runs only the rounds that plan had not finished.

The seed (the last finished aggregation's run state) enters the new plan once, as the
parameter of :func:`install`, the first step of the new plan's first aggregation (with
secure aggregation: the key round's, which every new plan needs anyway, since the sites'
secret keys of the failed plan are not kept for the coordinator). Sites keep nothing for the
coordinator either: each re-derives its local state from its own data plus the seed at its
first task that reads it (:meth:`fed_de.federation.strategy.FedStrategy.restore`).
"""

from __future__ import annotations

import base64
import lzma
import pickle
import zlib
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from fed_de.federation.calls import aggregator_step, call, site_step
from fed_de.federation.messages import Message


@dataclass
class Seed:
    """Where a resumed plan starts: the run state after the aggregation of round
    ``round_idx`` of the failed plan ``source`` (its rounds up to there are not run again).

    ``side``: when the failed plan's side chain was in flight at ``round_idx``, the side
    chain's state after its aggregation of round ``side_round`` (its last finished one, or
    the state it forked from): the resumed side chain runs its rounds after that one.
    """

    state: Any
    round_idx: int
    source: str = ""
    tasks_done: int = 0  # tasks of the failed plan finished before the seed (reused)
    side: Any = None
    side_round: int | None = None

    def encode(self, side: bool = False) -> str:
        """The seed state (``side``: the side chain's) as one plan parameter
        (xz-compressed pickle, base64: xz keeps float arrays 10-40% smaller than zlib)."""
        state = self.side if side else self.state
        blob = lzma.compress(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), preset=6)
        return base64.b64encode(blob).decode("ascii")


def decode_state(text: str) -> Any:
    """The run state :meth:`Seed.encode` wrote (or an earlier zlib-compressed one)."""
    blob = base64.b64decode(text)
    raw = lzma.decompress(blob) if blob.startswith(b"\xfd7zXZ") else zlib.decompress(blob)
    return pickle.loads(raw)


class Ready(Message):
    """A site's answer to a resumed plan's first round without secure aggregation: nothing."""


@site_step
def ready() -> Ready:
    """First task of a resumed plan at a site (no key round): send nothing."""
    return Ready()


@aggregator_step(writes=("*",))
def install(seed: str, keep: str = "") -> dict:
    """Every part of the seed run state (the aggregator starts from it), but the parts
    ``keep`` names (comma-separated: a side chain's seed keeps the new plan's keys)."""
    state = decode_state(seed)
    for value in (getattr(state, f.name) for f in fields(state)):
        if isinstance(value, np.ndarray) and value.dtype == object:
            raise ValueError("a seed run state holds no object arrays")
    kept = set(keep.split(",")) - {""}
    return {f.name: getattr(state, f.name) for f in fields(state) if f.name not in kept}


def install_call(seed: Seed, side: bool = False):
    """The plan's call of :func:`install` for ``seed`` (``side``: its side chain's state,
    which keeps the new plan's ``secure`` part)."""
    if side:
        return call(install, seed=seed.encode(side=True), keep="secure")
    return call(install, seed=seed.encode())
