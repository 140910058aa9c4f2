"""Secure aggregation by pairwise masking: the aggregator learns only cross-site totals.

The idea is that of Bonawitz et al. (2017), "Practical Secure Aggregation for Privacy-Preserving
Machine Learning" (ACM CCS), without its dropout recovery: a site that fails fails the plan.

Protocol (``S`` sites, ids compared as Python strings)
------------------------------------------------------
1. Each site makes a fresh X25519 key pair (:func:`new_keypair`) and sends its public key; the
   private key never leaves the site (it stays in the site's local state).
2. The aggregator relays every public key. Each site derives, for every peer, a 32-byte pair
   seed: HKDF-SHA256 over the X25519 shared secret, bound to the run id and both site ids
   (:func:`pair_seeds`). Both members of a pair derive the same seed; nobody else can.
3. For each message, a site encodes every array in fixed point in the ring ``Z_{2^K}``
   (:class:`FixedPoint`) and adds, for each of its mask neighbours ``j``
   (:func:`mask_neighbours`: every other site in studies of up to 9 sites, 8 of them beyond),
   a mask expanded from the pair seed by AES-128 in counter mode under a key derived from the
   address ``(stream, round tag, message key)`` (:func:`_mask_key`, :func:`_add_masks`):
   ``+mask`` if ``me < j``, ``-mask`` otherwise (:func:`mask`). The two
   members of a pair add opposite masks, so every mask cancels in the sum over all sites, and
   the aggregator decodes the exact total of the encoded values (:func:`unmask_sum`). The
   neighbour graph is connected, so any strict subset of the messages is covered by at least
   one uncancelled mask and is computationally indistinguishable from uniform; a coalition of
   fewer sites than the graph's connectivity (8) cannot uncover a subset either.

A mask must never cover two different messages: the difference of two messages masked alike is
the difference of their data. Masks are addressed by ``(stream, tag, key)`` and a site refuses
a tag that is not strictly larger than the last one it used in that stream
(:class:`ReplayError`); the session that remembers it is part of the site's local state.

Messages
--------
A message is a flat dict ``{key: value}``. Values may be float or integer arrays of any shape,
or scalars (Python or numpy numbers, 0-d arrays); integers must be exact in float64
(``|x| <= 2**53``). Bool arrays are refused: a per-site flag is not a sum; a count across
sites is sent as a float 0/1 array explicitly. NaN and infinities are refused. The masked
message holds, under each key, a uint64 array of shape ``(limbs,) + value.shape`` (limb 0 the
least significant word), and a header under the reserved key ``"_secagg"``. :func:`unmask_sum`
returns float64 arrays of the original shapes (``np.float64`` for scalars).

Keys named as ``counts`` (sample counts: non-negative integers) travel packed instead, several
fields to a word of ``Z_{2^64}`` (:func:`pack_counts`), not ``8 * limbs`` bytes each. Before
the pooled sample count is known, two 32-bit fields to a word: each site's count must be below
``2**(32 - ceil(log2 S))``, so no field's total over ``S`` sites reaches ``2**32``. Once every
site knows the pooled count ``N`` (``count_total``), fields are ``w = N.bit_length()`` bits,
``64 // w`` to a word (8 fields of 8 bits for ``N <= 255``): a site refuses a count above its
own sample count ``n_i`` (and an ``n_i`` above ``N``), so every field's total is at most
``sum_i n_i = N < 2**w``. Either way no field carries into its neighbour: the sum of the
packed words is the packed totals, exactly, and the aggregator learns those totals and nothing
more (the header's ``count_bits`` says the width).

Keys named as ``narrow`` (sums whose magnitude is bounded well below ``2**53``: fit sums, not
sums of squared counts) travel in two words (:data:`NARROW`: ``Z_{2^128}``, resolution
``2**-64``), 16 bytes a value; the same range rule and error bound apply with those limbs.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HEADER = "_secagg"
_VERSION = b"fed_de/secagg/v2"  # v2: AES-128-CTR masks (v1: ChaCha20); the run digest differs
_MAX_TAG = 2**63
_ZEROS = bytes(1 << 20)  # encrypted into the mask keystream (one chunk at a time)
_MASK_CHUNK = 8192  # values per chunk of the masking (stays in cache)
MASK_DEGREE = 8  # peers each site masks with (all of them in studies of up to 9 sites)


class SecAggError(ValueError):
    """A secure-aggregation input or message is malformed; nothing is sent or summed."""


class EncodingRangeError(SecAggError):
    """A value is not finite or too large for the fixed-point ring; the message is not sent."""


class ReplayError(SecAggError):
    """A round tag was already used: masking again would let the aggregator difference data."""


# --------------------------------------------------------------------------- fixed point


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding of float64 values in the ring ``Z_{2^K}``, ``K = 64 * limbs``.

    A value ``x`` is encoded as the integer ``v = round(x * 2**frac_bits)`` (ties to even),
    stored in two's complement as ``limbs`` little-endian uint64 words.

    Default ``limbs=3, frac_bits=96`` (``K = 192``): resolution ``2**-96`` (1.3e-29), and with
    ``S <= 1024`` sites every site value up to ``2**85`` (3.9e25) in magnitude is accepted.
    Every float64 ``|x| >= 2**-44`` (5.7e-14) is encoded exactly. Two limbs are not enough
    for every field of fed_de's messages: a 150-sample demo run already sends sums of squared
    normalised counts of 8.4e19 (above ``2**63``) beside Cox-Reid derivative sums of 1e-9; the
    fields whose range is bounded far below ``2**53`` are declared narrow (:data:`NARROW`).

    Range (no overflow). Let ``c = ceil(log2 S)``. A site refuses a value unless
    ``|v| < 2**(K-1-c)`` (:meth:`max_abs`). Then ``|sum_i v_i| <= sum_i |v_i| < S * 2**(K-1-c)
    <= 2**(K-1)`` since ``2**c >= S``: the exact integer total lies in ``(-2**(K-1),
    2**(K-1))``, where reduction modulo ``2**K`` is one-to-one. The masks sum to ``0 mod
    2**K`` (each pair's mask is added by one member and subtracted by the other), so the sum
    of the masked messages modulo ``2**K``, read in two's complement, is exactly
    ``sum_i v_i``: no sum of up to ``S`` sites overflows, whatever the order of summation.

    Error. Rounding gives ``|v_i * 2**-f - x_i| <= 2**-(f+1)`` (0 if ``|x_i| >= 2**(52-f)``).
    Decoding converts the exact integer total to float64 with a compensated sum of its 32-bit
    chunks, within ``2**-52`` relative. Hence the decoded total ``D`` satisfies::

        |D - sum_i x_i| <= S * 2**-(f+1) * (1 + 2**-52) + 2**-52 * |sum_i x_i|

    (absolute ``S * 6.3e-30`` plus relative ``2.2e-16`` for the default), for any order of
    the sites. For comparison, summing float64 values directly has error up to
    ``(S-1) * 2**-53 * sum_i |x_i|``.
    """

    limbs: int = 3
    frac_bits: int = 96

    def __post_init__(self) -> None:
        if self.limbs < 1 or not 0 <= self.frac_bits <= 64 * self.limbs - 2:
            raise SecAggError(f"bad fixed point: {self.limbs} limbs, {self.frac_bits} bits")

    @property
    def ring_bits(self) -> int:
        """``K``: the ring is ``Z_{2^K}``."""
        return 64 * self.limbs

    def int_bound_log2(self, n_parties: int) -> int:
        """``K - 1 - ceil(log2 S)``: every encoded ``|v|`` must be below ``2**`` this."""
        if n_parties < 1:
            raise SecAggError("at least one party")
        return self.ring_bits - 1 - math.ceil(math.log2(n_parties))

    def max_abs(self, n_parties: int) -> float:
        """Largest magnitude (exclusive, up to rounding) a site may send with ``S`` sites."""
        return math.ldexp(1.0, self.int_bound_log2(n_parties) - self.frac_bits)

    def encode(self, x: np.ndarray, n_parties: int, name: str = "value") -> np.ndarray:
        """Encode float64 values; shape ``(limbs,) + x.shape``, dtype uint64, limb 0 lowest.

        Raises
        ------
        EncodingRangeError
            A value is NaN, infinite, or at or above :meth:`max_abs` (names ``name``).
        """
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise EncodingRangeError(f"{name!r}: non-finite value; not sent")
        # scaling by a power of two and rint are exact in float64
        a = np.abs(np.rint(np.ldexp(x, self.frac_bits))).reshape(-1)
        limit = math.ldexp(1.0, self.int_bound_log2(n_parties))
        if a.size and a.max() >= limit:
            raise EncodingRangeError(
                f"{name!r}: |value| {np.abs(x).max():.6g} is not below the secure-aggregation "
                f"bound {self.max_abs(n_parties):.6g} for {n_parties} sites; not sent")
        out = _limbs(a, (x < 0).reshape(-1), self.limbs)
        return out.reshape((self.limbs,) + x.shape)

    def decode(self, v: np.ndarray) -> np.ndarray:
        """Float64 values of ring elements read in two's complement (centered lift)."""
        from fed_de.core.kernels import from_limbs  # numba: loaded when used

        v = np.asarray(v, dtype=np.uint64)
        shape = v.shape[1:]
        out = np.empty(math.prod(shape))
        from_limbs(np.ascontiguousarray(v.reshape(self.limbs, -1)), self.frac_bits, out)
        return out.reshape(shape)


def _limbs(a: np.ndarray, neg: np.ndarray, limbs: int) -> np.ndarray:
    """Integral float64 magnitudes ``a`` with signs ``neg`` as ``(limbs, n)`` uint64 words of
    the ring (two's complement), limb 0 lowest (:func:`fed_de.core.kernels.to_limbs`: the
    53-bit mantissa shifted by its exponent, integer shifts, exact)."""
    from fed_de.core.kernels import to_limbs  # numba: loaded when used

    out = np.empty((limbs, a.size), dtype=np.uint64)
    to_limbs(np.ascontiguousarray(a, dtype=np.float64).view(np.uint64),
             np.ascontiguousarray(neg, dtype=np.bool_), out)
    return out


# Ring arithmetic on (limbs, n) uint64 arrays, in place, limb 0 least significant, with the
# carries run through the limbs (fed_de.core.kernels: ring_add, ring_sub, ring_add_masks).


def _iadd(acc: np.ndarray, b: np.ndarray) -> None:
    """``acc += b mod 2**K``."""
    from fed_de.core.kernels import ring_add  # numba: loaded when used

    ring_add(acc, b)


def _isub(acc: np.ndarray, b: np.ndarray) -> None:
    """``acc -= b mod 2**K``."""
    from fed_de.core.kernels import ring_sub  # numba: loaded when used

    ring_sub(acc, b)


#: the two-word encoding of ``narrow`` keys: a site value below ``2**(63 - ceil(log2 S))``
#: (9.2e18 / S rounded up to a power of two: 9e15 for 1,024 sites), resolution 5.4e-20
NARROW = FixedPoint(limbs=2, frac_bits=64)


# --------------------------------------------------------------------------- packed counts

COUNT_BITS = 32  # width of one count field when the pooled sample count is not known


def count_width(count_total: int | None) -> int:
    """Bits of one packed count field: ``N.bit_length()`` when the pooled sample count ``N``
    is known (every site's count and every total fit in ``[0, N]``), else :data:`COUNT_BITS`
    (also when ``N`` needs 32 bits or more)."""
    if count_total is None:
        return COUNT_BITS
    if count_total < 0 or count_total != int(count_total):
        raise SecAggError(f"the pooled sample count must be a non-negative integer, got "
                          f"{count_total!r}")
    return min(COUNT_BITS, max(1, int(count_total).bit_length()))


def count_limit(n_parties: int, count_total: int | None = None,
                count_own: int | None = None) -> int:
    """A site's counts must be below this (exclusive).

    Without ``count_total``: ``2**(32 - ceil(log2 S))``, so that ``S`` of them sum below
    ``2**32``. With the pooled sample count ``N``: ``N + 1`` (a count of the site's samples
    is at most its own ``n``, and ``n <= N``), or ``count_own + 1`` when the site's own
    sample count is given: then the totals are at most ``sum_i n_i = N < 2**width``.
    """
    width = count_width(count_total)
    if width == COUNT_BITS:
        return 2 ** (COUNT_BITS - math.ceil(math.log2(max(1, n_parties))))
    return int(count_total if count_own is None else count_own) + 1


def packed_words(n_counts: int, bits: int = COUNT_BITS) -> int:
    """uint64 words holding ``n_counts`` packed counts of ``bits`` bits (:func:`pack_counts`:
    ``64 // bits`` to a word)."""
    return -(-n_counts // (64 // bits))


def pack_counts(x: np.ndarray, n_parties: int, name: str = "value",
                count_total: int | None = None, count_own: int | None = None) -> np.ndarray:
    """Non-negative integer counts packed ``64 // width`` to a uint64 word
    (:func:`count_width`; two 32-bit fields when ``count_total`` is None): shape
    ``(1, words)``, field ``j`` of a word in bits ``[j * width, (j + 1) * width)``.

    Raises
    ------
    EncodingRangeError
        A value is not an integer, is negative, or is not below :func:`count_limit` (names
        ``name``); the site's own count is above the pooled one; nothing is returned.
    """
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    if count_own is not None and count_total is not None and count_own > count_total:
        raise EncodingRangeError(
            f"{name!r}: the site's {count_own} samples exceed the pooled sample count "
            f"{count_total} the aggregator announced; not sent")
    from fed_de.core.kernels import pack_fields  # numba: loaded when used

    limit = count_limit(n_parties, count_total, count_own)
    bits = count_width(count_total)
    out = np.empty(packed_words(flat.size, bits), dtype=np.uint64)
    if pack_fields(np.ascontiguousarray(flat), float(limit), bits, out) >= 0:
        raise EncodingRangeError(
            f"{name!r}: a count must be an integer in [0, {limit - 1}] for {n_parties} sites "
            f"(largest sent: {flat.max():.6g}); not sent")
    return out[None, :]


def unpack_counts(words: np.ndarray, shape: tuple, bits: int = COUNT_BITS) -> np.ndarray:
    """Inverse of :func:`pack_counts` on (summed) words of ``bits``-bit fields: float64
    counts of ``shape``."""
    w = np.asarray(words, dtype=np.uint64).reshape(-1)
    per = 64 // bits
    field_mask = np.uint64((1 << bits) - 1)
    out = np.empty((w.size, per), dtype=np.float64)
    for j in range(per):
        out[:, j] = (w >> np.uint64(j * bits)) & field_mask
    return out.reshape(-1)[:math.prod(shape)].reshape(shape)


def key_format(head: Mapping, key: str) -> tuple[int, int]:
    """``(limbs, frac_bits)`` of ``key`` in a masked message with header ``head`` (a packed
    count: one word, ``(1, 0)``; a narrow sum: :data:`NARROW`'s; else the session's)."""
    if key in (head.get("counts") or {}):
        return 1, 0
    narrow = head.get("narrow") or {}
    if key in narrow.get("keys", ()):
        return narrow["limbs"], narrow["frac_bits"]
    return head["limbs"], head.get("frac_bits")


# --------------------------------------------------------------------------- keys and seeds


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings. ``private`` never leaves the site."""

    private: bytes = field(repr=False)
    public: bytes


def new_keypair() -> KeyPair:
    """A fresh X25519 key pair from the OS's randomness (one per site and run)."""
    return keypair_from_private(X25519PrivateKey.generate().private_bytes_raw())


def keypair_from_private(private: bytes) -> KeyPair:
    """The key pair of a raw 32-byte X25519 private key (e.g. reloaded from local state)."""
    key = X25519PrivateKey.from_private_bytes(bytes(private))
    return KeyPair(private=bytes(private), public=key.public_key().public_bytes_raw())


def _lp(b: bytes) -> bytes:
    """Length-prefixed bytes: concatenations of these cannot be ambiguous."""
    return struct.pack("<I", len(b)) + b


def _check_parties(public_by_site: Mapping[str, bytes], me: str) -> None:
    if me not in public_by_site:
        raise SecAggError(f"site {me!r} is missing from the relayed public keys")
    if len(public_by_site) < 2:
        raise SecAggError("secure aggregation needs at least 2 sites")
    keys = [bytes(k) for k in public_by_site.values()]
    if any(len(k) != 32 for k in keys):
        raise SecAggError("an X25519 public key must be 32 raw bytes")
    if len(set(keys)) != len(keys):
        raise SecAggError("two sites relayed the same public key")


def pair_seeds(private: bytes, public_by_site: Mapping[str, bytes], me: str,
               run_id: bytes) -> dict[str, bytes]:
    """Per-peer 32-byte seeds shared by the two members of each pair.

    ``seed = HKDF-SHA256(X25519(private, peer_public), salt=version,
    info=run_id | min(me, peer) | max(me, peer))`` (each field length-prefixed), so a seed
    is bound to this run and this pair and is never reused across runs or pairs.

    Parameters
    ----------
    private
        This site's raw X25519 private key.
    public_by_site
        Every site's raw public key as relayed by the aggregator, this site included.
    me
        This site's id.
    run_id
        Bytes identifying the run (e.g. the compute plan key).

    Returns
    -------
    dict
        ``{peer_id: seed}`` for every other site.

    Raises
    ------
    SecAggError
        ``me`` is missing or its relayed key is not this site's own, fewer than 2 sites, a
        malformed or duplicated key.
    """
    _check_parties(public_by_site, me)
    pair = keypair_from_private(private)
    if bytes(public_by_site[me]) != pair.public:
        raise SecAggError(f"the public key relayed for {me!r} is not this site's own")
    key = X25519PrivateKey.from_private_bytes(pair.private)
    seeds = {}
    for peer, public in public_by_site.items():
        if peer == me:
            continue
        shared = key.exchange(X25519PublicKey.from_public_bytes(bytes(public)))
        lo, hi = sorted((me, peer))
        info = _lp(bytes(run_id)) + _lp(lo.encode()) + _lp(hi.encode())
        seeds[peer] = HKDF(algorithm=hashes.SHA256(), length=32, salt=_VERSION,
                           info=info).derive(shared)
    return seeds


def key_fingerprint(public_by_site: Mapping[str, bytes], run_id: bytes) -> str:
    """A short hex digest of the run id and every (site, public key): sites that print the
    same fingerprint were relayed the same keys (checks a relay out of band)."""
    h = hashlib.sha256(_VERSION + _lp(bytes(run_id)))
    for site in sorted(public_by_site):
        h.update(_lp(site.encode()) + _lp(bytes(public_by_site[site])))
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------- site session


@dataclass
class SecAggSession:
    """A site's secure-aggregation state for one run; keep it in the site's local state.

    ``last_tag`` maps a stream to the last round tag masked in it. Persist the session after
    every :func:`mask` (the guard against replayed tags lives here).
    """

    me: str
    run_id: bytes
    seeds: dict[str, bytes] = field(repr=False)  # the mask neighbours' pair seeds
    encoding: FixedPoint = field(default_factory=FixedPoint)
    last_tag: dict[int, int] = field(default_factory=dict)
    all_sites: tuple[str, ...] = ()  # every site (default: me and the seeds' peers)

    @property
    def parties(self) -> tuple[str, ...]:
        """Every site of the run, sorted."""
        return tuple(sorted(self.all_sites or [self.me, *self.seeds]))

    @property
    def run_digest(self) -> bytes:
        """Public 16-byte id of (run, parties, encoding): all messages summed must share it."""
        h = hashlib.sha256(_VERSION + _lp(self.run_id))
        for site in self.parties:
            h.update(_lp(site.encode()))
        h.update(struct.pack("<II", self.encoding.limbs, self.encoding.frac_bits))
        return h.digest()[:16]


def mask_neighbours(sites: Collection[str], me: str, degree: int = MASK_DEGREE
                    ) -> tuple[str, ...]:
    """The sites ``me`` shares masks with: within ``degree // 2`` places of it on the ring of
    the sorted site ids (a circulant graph); every other site when there are at most
    ``degree + 1`` sites.

    The graph is symmetric (both members of a pair agree) and its vertex connectivity is
    ``2 * (degree // 2)``: fewer colluding sites than that cannot split the others, so the
    aggregator and a coalition that small learn from the masked messages only what they learn
    with masks between every pair (the total over the other sites). Each site masks with
    ``degree`` peers, not ``S - 1``: the masking cost of a study grows as ``S``, not ``S**2``
    (the idea of Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
    Overhead", ACM CCS; here without dropouts, so a fixed graph suffices).
    """
    ring = sorted(sites)
    if me not in ring:
        raise SecAggError(f"site {me!r} is not among the sites {ring}")
    n, half = len(ring), max(1, degree // 2)
    if n - 1 <= 2 * half:
        return tuple(s for s in ring if s != me)
    i = ring.index(me)
    return tuple(ring[(i + d) % n] for d in range(-half, half + 1) if d != 0)


def open_session(private: bytes, public_by_site: Mapping[str, bytes], me: str, run_id: bytes,
                 *, encoding: FixedPoint | None = None,
                 expected_sites: Collection[str] | None = None,
                 degree: int = MASK_DEGREE) -> SecAggSession:
    """A site's session from its private key and the relayed public keys.

    ``expected_sites`` (the study's declared sites) guards against a relay that adds or drops
    a site. The site masks with its :func:`mask_neighbours` (``degree`` of them; all the
    others in studies of up to ``degree + 1`` sites). The private key is not kept: the
    session holds the pair seeds only.
    """
    if expected_sites is not None and set(public_by_site) != set(expected_sites):
        raise SecAggError(
            f"relayed sites {sorted(public_by_site)} differ from the study's "
            f"{sorted(expected_sites)}")
    seeds = pair_seeds(private, public_by_site, me, run_id)
    near = set(mask_neighbours(public_by_site, me, degree))
    return SecAggSession(me=me, run_id=bytes(run_id),
                         seeds={k: v for k, v in seeds.items() if k in near},
                         encoding=encoding or FixedPoint(),
                         all_sites=tuple(sorted(public_by_site)))


def _mask_key(seed: bytes, stream: int, tag: int, key: str) -> bytes:
    """The 16-byte AES key of one address ``(stream, tag, key)`` under a pair seed:
    HMAC-SHA256 (a PRF) truncated, so distinct addresses get independent keys."""
    return hmac.digest(seed, _VERSION + b"/mask" + struct.pack("<QQ", stream, tag)
                       + key.encode(), "sha256")[:16]


def _add_masks(acc: np.ndarray, plus: Sequence[bytes], minus: Sequence[bytes]) -> None:
    """``acc += sum(masks of plus) - sum(masks of minus) mod 2**K``, in place.

    ``acc`` is ``(limbs, n)`` uint64 (limb 0 lowest); each mask key (:func:`_mask_key`) gives
    an AES-128-CTR keystream (counter from 0) read as little-endian uint64 words that fill,
    chunk by chunk of :data:`_MASK_CHUNK` values, the chunk's limbs in order: limb 0 of its
    values, then limb 1, ... Both members of a pair read the same words, so their masks
    cancel whatever else is added. Each chunk's masks are added with their carries in one
    pass (:func:`fed_de.core.kernels.ring_add_masks`) while they are in cache.
    """
    from fed_de.core.kernels import ring_add_masks  # numba: loaded when used

    limbs, n = acc.shape
    d, p = len(plus) + len(minus), len(plus)
    if n == 0 or d == 0:
        return
    encs = [Cipher(algorithms.AES(k), modes.CTR(bytes(16))).encryptor() for k in (*plus, *minus)]
    size = min(_MASK_CHUNK, n)
    buf = np.empty((d, limbs, size), dtype=np.uint64)
    zeros = memoryview(_ZEROS if 8 * limbs * size <= len(_ZEROS) else bytes(8 * limbs * size))
    for start in range(0, n, size):
        nc = min(size, n - start)
        nbytes = 8 * limbs * nc
        for i, enc in enumerate(encs):
            enc.update_into(zeros[:nbytes], memoryview(buf[i]).cast("B")[:nbytes])
        # a last, shorter chunk: its words fill its own limbs in order
        b = buf if nc == size else np.ascontiguousarray(
            buf.reshape(d, -1)[:, :limbs * nc].reshape(d, limbs, nc))
        ring_add_masks(acc, start, b, p)


def _as_float_array(key: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
        raise SecAggError(f"{key!r}: bool array; send a float 0/1 count if a sum is meant")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and np.abs(arr.astype(np.float64)).max() > 2.0**53:
            raise EncodingRangeError(f"{key!r}: integer not exact in float64; not sent")
        return arr.astype(np.float64)
    if not np.issubdtype(arr.dtype, np.floating):
        raise SecAggError(f"{key!r}: dtype {arr.dtype} cannot be summed securely")
    return arr.astype(np.float64, copy=False)


def mask(message: Mapping[str, object], session: SecAggSession, round_tag: int | None = None,
         *, stream: int = 0, counts: Collection[str] = (),
         narrow: Collection[str] = (), count_total: int | None = None,
         count_own: int | None = None) -> dict:
    """Encode and mask a site's message for one round.

    Parameters
    ----------
    message
        ``{key: float/int array or scalar}`` (see the module docstring).
    session
        This site's session; ``session.last_tag[stream]`` is advanced to ``round_tag``.
    round_tag
        The round's tag, the same at every site, strictly larger than any tag this session
        used in ``stream``. Take it from the static plan (the site's own code), not from the
        aggregator. ``None``: one more than the last tag of ``stream`` (0 first); in a static
        plan every site masks the same sequence of messages per stream, so the sites agree.
    stream
        An independent tag sequence, e.g. one per chain of local tasks whose local states are
        forked (each fork can only check its own tags; give each a fixed stream id in code).
    counts
        Keys whose values are sample counts, sent packed (:func:`pack_counts`). Every site
        must name the same keys (they are declared by the message type, not by the data).
    narrow
        Keys sent in the two-word encoding :data:`NARROW` (likewise declared by the type).
    count_total
        The pooled sample count ``N`` once every site knows it (the same at every site):
        counts then travel in fields of ``N.bit_length()`` bits (:func:`count_width`), and a
        count above ``N`` is refused. ``None``: 32-bit fields.
    count_own
        This site's own sample count: with ``count_total``, a count above it is refused (so
        the totals stay at most ``N`` and no field carries into the next).

    Returns
    -------
    dict
        ``{key: uint64 array of shape (limbs,) + value.shape}`` (counts: ``(1, words)``)
        plus the header under ``"_secagg"`` (site, parties, run digest, stream, tag,
        encoding, the counts' shapes and field width ``count_bits``).

    Raises
    ------
    ReplayError
        ``round_tag`` is not above the last tag of ``stream``.
    EncodingRangeError, SecAggError
        A value cannot be encoded (names the key); nothing is returned.
    """
    last = session.last_tag.get(stream)
    if round_tag is None:
        round_tag = 0 if last is None else last + 1
    if not (0 <= stream < 2**32 and 0 <= round_tag < _MAX_TAG):
        raise SecAggError(f"stream {stream} / round tag {round_tag} out of range")
    if last is not None and round_tag <= last:
        raise ReplayError(
            f"site {session.me!r}: round tag {round_tag} in stream {stream} is not above the "
            f"last one used ({last}); refusing to reuse masks")
    if HEADER in message:
        raise SecAggError(f"{HEADER!r} is a reserved key")
    if not all(isinstance(key, str) for key in message):
        raise SecAggError("message keys must be strings")
    fmt = session.encoding
    n_parties = len(session.parties)
    unknown = (set(counts) | set(narrow)) - set(message)
    if unknown:
        raise SecAggError(f"counts or narrow keys {sorted(unknown)} are not keys of the "
                          "message")
    if set(counts) & set(narrow):
        raise SecAggError(f"keys {sorted(set(counts) & set(narrow))} are both counts and "
                          "narrow")
    out: dict = {}
    shapes: dict[str, tuple] = {}
    for key, value in message.items():
        arr = _as_float_array(key, value)
        if key in counts:
            v = pack_counts(arr, n_parties, name=key, count_total=count_total,
                            count_own=count_own)
            shapes[key] = arr.shape
        else:
            v = (NARROW if key in narrow else fmt).encode(arr, n_parties, name=key)
        plus, minus = [], []  # + the masks of larger peers, - the others'
        for peer, seed in session.seeds.items():
            (plus if session.me < peer else minus).append(
                _mask_key(seed, stream, round_tag, key))
        _add_masks(v.reshape(v.shape[0], -1), plus, minus)  # a fresh array, in place
        out[key] = v
    session.last_tag[stream] = round_tag
    out[HEADER] = {"site": session.me, "parties": session.parties,
                   "run": session.run_digest, "stream": stream, "tag": round_tag,
                   "limbs": fmt.limbs, "frac_bits": fmt.frac_bits,
                   "counts": {k: shapes[k] for k in sorted(shapes)},
                   "count_bits": count_width(count_total),
                   "narrow": {"keys": sorted(narrow), "limbs": NARROW.limbs,
                              "frac_bits": NARROW.frac_bits}}
    return out


# --------------------------------------------------------------------------- aggregator


class MaskedSum:
    """Cross-site totals of one masked round, accumulated one site's message at a time.

    :meth:`add` checks each message against the first (same round, run and encoding, same
    keys and shapes) and adds it into the ring totals; the message can be dropped at once, so
    an aggregator holds one message and the running totals, not every site's message.
    :meth:`total` checks that every party sent exactly once and decodes. Ring addition is
    exact, so the totals do not depend on the order of the sites.
    """

    _COMMON = ("parties", "run", "stream", "tag", "limbs", "frac_bits", "counts", "count_bits",
               "narrow")

    def __init__(self, consume: bool = False) -> None:
        """``consume``: the first message's (writable) arrays become the running totals, not
        copies of them: for a caller that drops each message once added (it saves a copy of
        the largest message; the caller's message is changed)."""
        self.head: dict | None = None
        self.sites: list[str] = []
        self.acc: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple] = {}
        self.consume = consume

    def __bool__(self) -> bool:
        return self.head is not None

    def add(self, masked: Mapping) -> None:
        """Add one site's masked message.

        Raises
        ------
        SecAggError
            The message is not masked, is of another round, run or encoding, or its keys or
            shapes differ from the first message's.
        """
        if HEADER not in masked:
            raise SecAggError("a message is not masked (no secure-aggregation header)")
        head = masked[HEADER]
        if self.head is None:
            self.head = head
        diff = [k for k in self._COMMON if head.get(k) != self.head.get(k)]
        if diff:
            raise SecAggError(f"messages differ in {diff}: not from the same masked round")
        keys = set(masked) - {HEADER}
        if self.sites and keys != set(self.acc):
            raise SecAggError("messages carry different keys")
        for key in keys:
            limbs = key_format(self.head, key)[0]
            a = np.asarray(masked[key])
            if a.dtype != np.uint64 or a.shape[:1] != (limbs,) or (
                    self.sites and a.shape != self.shapes[key]):
                raise SecAggError(
                    f"{key!r}: masked arrays differ in shape or are not uint64 limbs")
            if not self.sites:
                self.shapes[key] = a.shape
                acc = a.reshape(limbs, -1)
                own = self.consume and acc.flags.writeable and np.shares_memory(acc, a)
                self.acc[key] = acc if own else acc.copy()
            else:
                _iadd(self.acc[key], a.reshape(limbs, -1))
        self.sites.append(head["site"])

    def total(self) -> dict:
        """The decoded totals ``{key: float64 array}`` (``np.float64`` for scalars).

        Raises
        ------
        SecAggError
            No message was added, or not every party sent exactly once (the masks cancel
            only over every site).
        """
        if self.head is None:
            raise SecAggError("no message to sum")
        if sorted(self.sites) != sorted(self.head["parties"]):
            raise SecAggError(
                f"masks cancel only over every site: got {sorted(self.sites)}, need "
                f"{sorted(self.head['parties'])}")
        packed = self.head.get("counts") or {}
        totals: dict = {}
        for key, acc in self.acc.items():
            value = (unpack_counts(acc, tuple(packed[key]),
                                   self.head.get("count_bits", COUNT_BITS)) if key in packed
                     else FixedPoint(*key_format(self.head, key)).decode(
                         acc.reshape(self.shapes[key])))
            totals[key] = np.float64(value) if value.ndim == 0 else value
        return totals


def unmask_sum(masked: Sequence[Mapping]) -> dict:
    """Cross-site totals from every site's masked message of one round (all at once; see
    :class:`MaskedSum` to add them as they arrive).

    Returns
    -------
    dict
        ``{key: float64 array}`` of the original shapes (``np.float64`` for scalars); within
        the bound of :class:`FixedPoint` of the exact sum of the sites' values.

    Raises
    ------
    SecAggError
        A site is missing or repeated, or the messages are not of the same round, run and
        encoding, or their keys or shapes differ.
    """
    total = MaskedSum()
    for m in masked:
        total.add(m)
    return total.total()
