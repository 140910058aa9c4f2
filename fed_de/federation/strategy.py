"""The substrafl strategy base every fed_de pipeline derives from, and the plan cursor.

A strategy has exactly two remote methods: :meth:`FedStrategy.local` runs the site step the
plan names at a site, and :meth:`FedStrategy.aggregate` sums the sites' messages and runs the
chain of aggregator steps the plan names (a chain composes "finish this step, start the next"
in one task). The pipeline's order of rounds is written once, in the strategy's
``build_compute_plan``, through :class:`PlanCursor`.

What a site keeps between its tasks is a typed local state (:attr:`FedStrategy.kept`), written
by ``save_local_state`` and read back by ``load_local_state``; what travels is a typed run state
(aggregator output) and typed messages (site output).
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from substrafl.compute_plan_builder import ComputePlanBuilder
from substrafl.remote import remote, remote_data

from fed_de.federation import guard, liveness, secure
from fed_de.federation.calls import (
    Call,
    apply_aggregation,
    as_call,
    decode,
    encode_chain,
    invoke,
)
from fed_de.federation.messages import Message, check_message, take_rows, total


class FedStrategy(ComputePlanBuilder):
    """Base of fed_de strategies.

    Subclasses set :meth:`initial_state`, :meth:`new_kept`, :meth:`site_view`, :meth:`dims`
    and :meth:`context`, and write ``build_compute_plan`` with a :class:`PlanCursor`.
    Every constructor argument goes to ``super().__init__``: the remote side rebuilds the
    object from them.
    """

    def __init__(self, secure_aggregation: bool = True, n_sites: int = 0, **kwargs):
        super().__init__(secure_aggregation=secure_aggregation, n_sites=n_sites, **kwargs)
        self.secure_aggregation = bool(secure_aggregation)
        self.n_sites = int(n_sites)
        self.kept = self.new_kept()
        self.keyring = secure.Keyring()
        self.digest: str | None = None  # of the site's data, kept from its first task

    def masks(self, n_nodes: int) -> bool:
        """Secure aggregation in this plan: asked for, and more than one site."""
        return self.secure_aggregation and n_nodes > 1

    # -- what subclasses define ----------------------------------------------------------------
    def initial_state(self) -> Any:
        """The run state before the first aggregation."""
        raise NotImplementedError

    def new_kept(self) -> Any:
        """An empty local state."""
        raise NotImplementedError

    def site_view(self, data) -> Any:
        """What a site step receives as ``site``: the site's data and what it keeps."""
        raise NotImplementedError

    def dims(self) -> dict[str, int]:
        """Study-level sizes message shapes may use."""
        raise NotImplementedError

    def request_dims(self, state) -> dict[str, int]:
        """Sizes the aggregator announces in its request (points per gene, ...)."""
        return {}

    def withhold(self, message: Message, state) -> Message:
        """The message with what a disclosure rule of the run state withholds set to zero
        (same shape); the base withholds nothing."""
        return message

    def context(self) -> dict:
        """Values every step may ask for by name besides the state parts (study, options)."""
        return {}

    def kept_parts(self) -> tuple[str, ...] | None:
        """Run-state parts an aggregation always sends, and a resumed plan's seed always
        keeps, besides those a later step reads (:mod:`fed_de.federation.liveness`);
        ``None`` (the base): every part is sent and kept."""
        return None

    def data_digest(self, data) -> str | None:
        """A digest of what the site analyses (:func:`guard.digest_arrays`), compared at
        every task with the one kept from its first; ``None``: not checked."""
        return None

    def check_request(self, state, site: str, step: str) -> None:
        """Refuse (raise) a shared state the protocol would not send, before any step runs
        (:mod:`fed_de.federation.guard`). The base accepts everything."""

    def site_message(self, fn: Callable, state, provided: dict, params: dict) -> Message:
        """Run a site step; the message it sends (the base: the step's own; a subclass may
        release it differently, e.g. with calibrated noise)."""
        return invoke(fn, state, provided, params)

    def compact_fields(self) -> bool:
        """Whether messages' count fields hold exact counts and their ``narrow`` sums stay in
        range (then they travel in compact encodings under secure aggregation); the base:
        yes. A subclass that noises messages says no."""
        return True

    def column_folds(self, message: Message | type) -> dict:
        """``{symbol: (columns sent, map back)}`` for ``message``'s (or its type's) arrays
        whose last dimension's columns the study makes equal or zero
        (:func:`secure.mask_message`); the base: none."""
        return {}

    def count_bounds(self, state, data) -> tuple[int | None, int | None]:
        """``(pooled sample count, this site's sample count)`` when the request ``state``
        carries the pooled count (count fields then travel in narrower packed fields,
        :func:`fed_de.secagg.pack_counts`); the base: ``(None, None)``, 32-bit fields."""
        return None, None

    def postprocess(self, sums: Message) -> Message:
        """The round's summed message as the aggregator steps read it (the base: as summed)."""
        return sums

    def restore(self, data, state) -> None:
        """Re-derive what the site keeps from its own data and ``state``, at the first task
        of a resumed plan (:mod:`fed_de.federation.resume`) that reads a seeded state (the
        base: nothing; see :meth:`resume_refusal`)."""

    def resume_refusal(self, state) -> str | None:
        """Why a resumed plan cannot start from ``state`` (None: it can): e.g. a side chain
        in flight, or site state that cannot be re-derived cheaply. The base refuses: a
        pipeline says how its sites re-derive what they keep (:meth:`restore`)."""
        return f"{type(self).__name__} does not re-derive its sites' local state"

    def resume_side(self, state, round_idx: int, fetch, rounds: list[int]
                    ) -> tuple[object, int] | None:
        """The side chain's seed when ``state`` (a main-chain state, after round
        ``round_idx``) was taken while a side chain was in flight: ``(side state, its
        round)`` from ``fetch(r)`` over the failed plan's finished aggregations ``rounds``;
        None when no side chain is in flight (the base: a plan without side chains)."""
        return None

    def resume_seed(self, state, fetch, rounds=()) -> object:
        """The seed a resumed plan installs: ``state``, plus what the sites need to
        re-derive their local state that the run state no longer carries (``fetch(r)``: the
        failed plan's state after its aggregation of round ``r``, one of ``rounds``)."""
        return state

    # -- the two remote methods ------------------------------------------------------------
    @remote_data
    def local(self, data_from_opener, shared_state=None, site_step: str = "",
              stream: int = 0):
        """Run the site step ``site_step`` names; check its message against the declared
        schema; mask it when secure aggregation is on (``stream``: the chain of tasks, so
        forked chains never reuse a mask)."""
        ((fn, params),) = decode(site_step, "site")
        state = shared_state if shared_state is not None else self.initial_state()
        name = getattr(data_from_opener, "name", "?")
        digest = self.data_digest(data_from_opener)
        if digest is not None:
            self.digest = guard.check_digest(self.digest, digest, site=name, step=fn.__name__)
        self.check_request(state, name, fn.__name__)
        if shared_state is not None:
            self.restore(data_from_opener, state)
        site = self.site_view(data_from_opener)
        message = self.site_message(fn, state, {"site": site, "keyring": self.keyring,
                                                **self.context()}, params)
        dims = {**self.dims(), **self.request_dims(state)}
        rows = getattr(state, "rows", None)
        if rows is not None:  # the aggregator asked for these genes only (a refit)
            message = take_rows(message, rows)
            dims["G"] = len(rows)
        message = self.withhold(message, state)
        check_message(message, dims, site=data_from_opener.name, step=fn.__name__)
        relay = getattr(state, "secure", None)
        if relay is None or isinstance(message, secure.KeyOffer):
            return message
        return secure.mask_message(message, self.keyring, relay, self.n_sites, stream,
                                   compact=self.compact_fields(),
                                   count_bounds=self.count_bounds(state, data_from_opener),
                                   folds=self.column_folds(message))

    @remote
    def aggregate(self, shared_states: list, steps: str = "") -> Any:
        """Sum the sites' messages, then run the chain of aggregator steps ``steps`` names.

        Inputs are the sites' messages, then (optionally) a side chain's final state, then the
        previous run state (aggregations keep no state: it travels this way).
        """
        offers, plain, states = [], [], []
        masked = secure.MaskedTotal(consume=True)  # each message is dropped once read
        # one pass: masked messages are summed as they come (the simulation's inputs also
        # free each message once read: ``stream``)
        for item in getattr(shared_states, "stream", lambda: shared_states)():
            if isinstance(item, secure.KeyOffer):
                offers.append(item)
            elif isinstance(item, secure.MaskedMessage):
                masked.add(item)
            elif isinstance(item, Message):
                plain.append(item)
            else:
                states.append(item)
            item = None  # not held while the next message is made and read
        state = states[-1] if states else self.initial_state()
        side = states[0] if len(states) > 1 else None
        if masked and plain:
            raise ValueError("some sites sent masked messages and others did not")
        sums = None
        if masked or plain:
            rows = getattr(state, "rows", None)
            n_genes = self.dims()["G"] if rows is not None else None
            sums = self.postprocess(
                total([masked.message()] if masked else plain, rows, n_genes))
        masked = plain = None  # the running totals are decoded: not held while steps run
        provided = {"sums": sums, "side": side, "offers": offers, **self.context()}
        for fn, params in decode(steps, "aggregator"):
            state = apply_aggregation(fn, state, provided, params)
        return liveness.trim(state, self, steps)

    # -- local state -----------------------------------------------------------------------
    def save_local_state(self, path: Path) -> None:
        """Write what the site keeps between tasks (its keyring and data digest included)."""
        with Path(path).open("wb") as fh:
            pickle.dump((self.kept, self.keyring, self.digest), fh,
                        protocol=pickle.HIGHEST_PROTOCOL)

    def load_local_state(self, path: Path):
        """Read what the site kept from its previous task."""
        with Path(path).open("rb") as fh:
            self.kept, self.keyring, self.digest = pickle.load(fh)
        return self


class PlanCursor:
    """Builds the compute plan: nodes, the sites' current local states, the last shared
    state, and the round index."""

    def __init__(self, strategy: FedStrategy, train_data_nodes, aggregation_node,
                 clean_models: bool = True, stream: int = 0):
        self.strategy = strategy
        self.train_nodes = list(train_data_nodes)
        self.agg = aggregation_node
        self.clean_models = clean_models
        self.local_states = [None] * len(self.train_nodes)
        self.shared = None
        self.round_idx = 0
        self.stream = stream
        self.forks = 0
        self.seed = None  # a resumed plan: (round index it closes, its reference)
        self.side_seed = None  # and its side chain's, when one was in flight

    def skipping(self) -> bool:
        """A resumed plan: this round was finished by the failed plan (no task)."""
        return self.seed is not None and self.round_idx <= self.seed[0]

    def _advance(self) -> None:
        self.round_idx += 1
        if self.seed is not None and self.round_idx == self.seed[0] + 1:
            self.shared = self.seed[1]  # the rounds left start from the seed

    def local(self, step: Call | Callable) -> list:
        """One task per site running ``step``; returns the sites' message refs."""
        if self.skipping():
            self._advance()
            return []
        spec = as_call(step).encode()
        extra = {"stream": self.stream} if self.stream else {}
        refs = []
        for i, node in enumerate(self.train_nodes):
            op = self.strategy.local(data_samples=node.data_sample_keys,
                                     shared_state=self.shared, site_step=spec, **extra)
            self.local_states[i], ref = node.update_states(
                op, local_state=self.local_states[i], round_idx=self.round_idx,
                authorized_ids={node.organization_id},
                aggregation_id=self.agg.organization_id, clean_models=self.clean_models)
            refs.append(ref)
        self.round_idx += 1
        return refs

    def aggregate(self, steps: Sequence[Call | Callable], refs: list,
                  extra: list | None = None):
        """The aggregation task over ``refs`` (then ``extra``, then the previous state)."""
        if self.skipping():
            self._advance()
            return self.shared
        refs = [*refs, *(extra or [])]
        if self.shared is not None:
            refs = [*refs, self.shared]
        op = self.strategy.aggregate(shared_states=refs, steps=encode_chain(steps))
        self.shared = self.agg.update_states(
            op, round_idx=self.round_idx,
            authorized_ids={n.organization_id for n in self.train_nodes}
            | {self.agg.organization_id},
            clean_models=self.clean_models)
        self.round_idx += 1
        return self.shared

    def round(self, local: Call | Callable, steps: Sequence[Call | Callable],
              extra: list | None = None):
        """A site step at every site, then the aggregation chain ``steps``."""
        return self.aggregate(steps, self.local(local), extra=extra)

    def fork(self) -> PlanCursor:
        """A side chain from the current states (parallel branch: adds no sequential step
        while it is shorter than the main chain)."""
        self.forks += 1
        side = PlanCursor(self.strategy, self.train_nodes, self.agg, self.clean_models,
                          stream=self.stream * 16 + self.forks)
        side.local_states, side.shared, side.round_idx = (list(self.local_states), self.shared,
                                                          self.round_idx)
        if self.skipping():  # forked within the failed plan's rounds: from its side seed,
            # or (none: the failed plan had joined the side chain) no round of it at all
            side.seed = self.side_seed or (math.inf, None)
            if side.round_idx > side.seed[0]:  # seeded with the state it forks from
                side.shared = side.seed[1]
        return side


# -- the plan as named phases -------------------------------------------------------------------
@dataclass
class Round:
    """A site step at every site, then a chain of aggregator steps.

    ``join``: the aggregation also reads the final state of the side chain.
    """

    local: Call | Callable
    steps: list
    join: bool = False


@dataclass
class Phase:
    """A named part of the plan.

    ``opening`` aggregator steps start the phase without a round of their own: they run in
    the previous phase's last aggregation ("finish A + start B" composed here, not inside the
    steps); ``closing`` steps end it in its own last aggregation. A phase with ``fork_after``
    is a side chain: it starts from the state after that phase and runs in parallel (it adds
    no sequential step while it is shorter); the round marked ``join`` reads its result.
    """

    name: str
    rounds: list[Round] = field(default_factory=list)
    opening: list = field(default_factory=list)
    closing: list = field(default_factory=list)
    fork_after: str | None = None
    join: bool = False


def schedule(phases: Sequence[Phase]) -> list[tuple[str, Round]]:
    """The main chain's rounds in order, each phase's opening and closing steps fused into
    the aggregations that run them."""
    out: list[tuple[str, Round]] = []
    for phase in phases:
        if phase.fork_after is not None:
            continue
        if phase.opening:
            if not out:
                raise ValueError(f"phase {phase.name!r} opens before any round")
            name, last = out[-1]
            out[-1] = (name, Round(last.local, [*last.steps, *phase.opening],
                                   last.join or phase.join))
        rounds = [Round(r.local, list(r.steps), r.join) for r in phase.rounds]
        if phase.closing:
            if rounds:
                rounds[-1].steps.extend(phase.closing)
            else:
                name, last = out[-1]
                out[-1] = (name, Round(last.local, [*last.steps, *phase.closing], last.join))
        out.extend((phase.name, r) for r in rounds)
    return out


def run_phases(plan: PlanCursor, phases: Sequence[Phase]):
    """Submit the plan's phases (after the key round of secure aggregation); returns the last
    aggregation's reference."""
    sides = {p.fork_after: p for p in phases if p.fork_after is not None}
    rounds = schedule(phases)
    seed = getattr(plan.strategy, "resume_from", None)
    masks = plan.strategy.masks(len(plan.train_nodes))
    if seed is not None:
        _seed_round(plan, seed, masks)
    elif masks:
        plan.round(secure.offer_key, [secure.relay_keys])
    side_ref, ref = None, None
    for i, (name, rnd) in enumerate(rounds):
        ref = plan.round(rnd.local, rnd.steps, extra=[side_ref] if rnd.join else None)
        phase_ends = i + 1 == len(rounds) or rounds[i + 1][0] != name
        if phase_ends and name in sides:
            side_ref = _run_side(plan.fork(), sides[name])
    return ref


def _seed_round(plan: PlanCursor, seed, masks: bool) -> None:
    """A resumed plan's first round: fresh keys (secure aggregation) or nothing from the
    sites, and the seed installed by the aggregator (and its side chain's state, in an
    aggregation of its own); the failed plan's rounds up to the seed's are then skipped
    (:meth:`PlanCursor.skipping`), the side chain's up to its state's."""
    from fed_de.federation import resume

    plan.round_idx = seed.round_idx - 1  # the install is numbered as the state it installs
    if masks:
        plan.round(secure.offer_key, [resume.install_call(seed), secure.relay_keys])
    else:
        plan.round(resume.ready, [resume.install_call(seed)])
    main = plan.shared
    if getattr(seed, "side", None) is not None:  # numbered as the failed plan's side state;
        plan.round_idx = seed.side_round  # it keeps the new keys (``secure``) of ``main``
        plan.side_seed = (seed.side_round,
                          plan.aggregate([resume.install_call(seed, side=True)], []))
    plan.seed = (seed.round_idx, main)
    plan.round_idx = 2 if masks else 0  # the failed plan's numbering from here on
    plan.shared = None


def _run_side(side: PlanCursor, phase: Phase):
    if phase.opening:
        side.aggregate(phase.opening, [])
    for rnd in phase.rounds:
        side.round(rnd.local, rnd.steps)
    return side.shared
