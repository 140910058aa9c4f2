"""Secure aggregation in the plan: a key round, masked messages, unmasked totals.

With secure aggregation on (two sites or more), the plan opens with a key round: each site
makes a fresh X25519 key pair (the private key stays in its local state) and offers its public
key (:func:`offer_key`); the aggregator relays every key with a fresh run id
(:func:`relay_keys`). From then on every message a site sends is encoded in fixed point and
masked with pairwise masks that cancel in the sum over all sites (:mod:`fed_de.secagg`): the
aggregator learns only the cross-site total of each message, never a site's own sums, sample
count or cell sizes. A site is known to its peers only by its public key.

With two sites each one can infer the other's sums (total minus its own); with one site there
is nothing to hide from itself, and nothing is masked.
"""

from __future__ import annotations

import importlib
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np

from fed_de import secagg
from fed_de.errors import DisclosureError
from fed_de.federation.calls import aggregator_step, site_step
from fed_de.federation.messages import Message, arrays, flagged_keys, folded_keys, sums, type_hints

KEY_ROUND_STEPS = 2  # the key round adds one site task and one aggregation to the chain


class KeyOffer(Message):
    """A site's public key (32 bytes as values 0..255): relayed, never summed."""

    public_key: np.ndarray = sums(32)


@dataclass
class KeyRelay:
    """Every site's public key and the run id, as the aggregator relays them."""

    public_keys: tuple[bytes, ...]
    run_id: bytes


@dataclass
class MaskedMessage:
    """What a site sends when secure aggregation is on: its message encoded and masked.

    ``kind`` names the message type (``module:Class``) so the aggregator can rebuild the sum;
    ``folded``: arrays sent without the columns the study makes equal or zero, each with the
    map back (per original column, its index among those sent, -1: zero).
    """

    kind: str
    payload: dict
    folded: dict = field(default_factory=dict)


@dataclass
class Keyring:
    """What a site keeps for secure aggregation: its key pair, then its session (the private
    key is dropped once the pair seeds are derived)."""

    private: bytes = b""
    public: bytes = b""
    session: secagg.SecAggSession | None = None


def _site_id(public: bytes) -> str:
    return public.hex()


@site_step
def offer_key(keyring: Keyring) -> KeyOffer:
    """Make this run's key pair (kept at the site) and offer the public key."""
    pair = secagg.new_keypair()
    keyring.private, keyring.public, keyring.session = pair.private, pair.public, None
    return KeyOffer(public_key=np.frombuffer(pair.public, dtype=np.uint8).astype(np.float64))


@aggregator_step(writes=("secure",))
def relay_keys(offers: list) -> dict:
    """Relay every site's public key, and a fresh run id."""
    keys = tuple(sorted(bytes(np.asarray(o.public_key, dtype=np.uint8)) for o in offers))
    return {"secure": KeyRelay(public_keys=keys, run_id=os.urandom(16))}


def mask_message(message: Message, keys: Keyring, relay: KeyRelay, n_sites: int,
                 stream: int, compact: bool = True,
                 count_bounds: tuple[int | None, int | None] = (None, None),
                 folds: Mapping[str, tuple] | None = None) -> MaskedMessage:
    """Encode and mask a checked message (the session opens at the first message); its
    :func:`~fed_de.federation.messages.counts` fields travel packed and its ``narrow`` sums
    in two words, unless ``compact`` is False (e.g. noised: neither integers nor in range).

    ``count_bounds``: ``(pooled sample count N, this site's sample count)`` once the run
    state carries ``N``: counts then travel in ``N.bit_length()``-bit fields
    (:func:`fed_de.secagg.pack_counts`); ``(None, None)``: 32-bit fields.

    ``folds``: ``{symbol: (columns sent, map back)}`` (:func:`fed_de.federation.messages.
    fold_columns`): arrays whose last dimension is such a symbol travel without the columns
    the declared design makes equal to another or zero (packed X'WX of a factor design:
    ``x_j x_j = x_j`` for a 0/1 column, two levels of one factor never both 1); the aggregator
    copies them back (:class:`MaskedTotal`). Public, from the study: the totals it learns are
    the same."""
    if keys.session is None:
        if n_sites and len(relay.public_keys) != n_sites:
            raise DisclosureError(
                f"the aggregator relayed {len(relay.public_keys)} keys for a study of "
                f"{n_sites} sites; nothing sent")
        peers = {_site_id(k): k for k in relay.public_keys}
        if _site_id(keys.public) not in peers:
            raise DisclosureError("the aggregator's relay lacks this site's own key; nothing "
                                  "sent")
        keys.session = secagg.open_session(keys.private, peers, _site_id(keys.public),
                                           relay.run_id)
        keys.private = b""  # the session holds the pair seeds only
    kind = f"{type(message).__module__}:{type(message).__qualname__}"
    counts = flagged_keys(message, "counts") if compact else ()
    narrow = flagged_keys(message, "narrow") if compact else ()
    flat, folded = arrays(message), {}
    if compact and folds:
        for key, symbol in folded_keys(type(message), folds).items():
            if key in flat:
                keep, expand = folds[symbol]
                flat[key] = np.ascontiguousarray(flat[key][..., keep])
                folded[key] = [int(e) for e in expand]
    return MaskedMessage(kind=kind, folded=folded,
                         payload=secagg.mask(flat, keys.session, stream=stream, counts=counts,
                                             narrow=narrow, count_total=count_bounds[0],
                                             count_own=count_bounds[1]))


class MaskedTotal:
    """The sum of one round's masked messages, added as they arrive (one site's message is
    held at a time, not all of them): :meth:`add` each, then :meth:`message`."""

    def __init__(self, consume: bool = False) -> None:
        """``consume``: the caller drops each message once added (the first one's arrays
        then hold the running totals: :class:`fed_de.secagg.MaskedSum`)."""
        self.kind: str | None = None
        self.folded: dict = {}
        self.sum = secagg.MaskedSum(consume=consume)

    def __bool__(self) -> bool:
        return self.kind is not None

    def add(self, masked: MaskedMessage) -> None:
        """Add one site's masked message (all must be of one message type)."""
        if self.kind is not None and masked.kind != self.kind:
            raise ValueError(f"sites sent different messages in one round: "
                             f"{sorted({self.kind, masked.kind})}")
        folded = masked.folded
        if self.kind is not None and folded != self.folded:
            raise ValueError("sites folded different columns in one round")
        self.kind, self.folded = masked.kind, folded
        self.sum.add(masked.payload)

    def message(self) -> Message:
        """The cross-site total, rebuilt as its message type."""
        module, _, name = (self.kind or "").partition(":")
        if not module.startswith("fed_de."):
            raise ValueError(f"{self.kind} is not a fed_de message")
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, Message)):
            raise ValueError(f"{self.kind} is not a fed_de message")
        return from_arrays(cls, unfold(self.sum.total(), self.folded))


def unfold(totals: dict, folded: Mapping[str, list]) -> dict:
    """Totals with the folded arrays' columns copied back (zeros where the map says -1)."""
    out = dict(totals)
    for key, expand in folded.items():
        e = np.asarray(expand, dtype=int)
        v = np.asarray(totals[key])
        out[key] = np.where(e >= 0, v[..., np.maximum(e, 0)], 0.0)
    return out


def unmask_total(masked: list[MaskedMessage]) -> Message:
    """The sum of the sites' messages, rebuilt as its message type."""
    total = MaskedTotal()
    for m in masked:
        total.add(m)
    return total.message()


def from_arrays(cls: type, flat: dict, prefix: str = "") -> Message:
    """Inverse of :func:`fed_de.federation.messages.arrays`."""
    hints = type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        key = prefix + f.name
        if "shape" in f.metadata:
            value = np.asarray(flat[key], dtype=np.float64)
            kwargs[f.name] = value[()] if value.ndim == 0 else value
            continue
        if not any(k.startswith(key + ".") for k in flat):
            kwargs[f.name] = None
            continue
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],)
                    if isinstance(t, type) and issubclass(t, Message))
        kwargs[f.name] = from_arrays(kind, flat, key + ".")
    return cls(**kwargs)
