"""Exact trimmed means (R's ``mean(x, trim)``) from counts and one sum per group, across sites.

R's ``mean(x, trim)`` averages the sorted values of ranks ``lo..hi`` (``lo = floor(n trim) + 1``,
``hi = n + 1 - lo``). It needs no order statistic: given a threshold ``t_a`` with exactly
``lo - 1`` values below it and ``t_b`` with exactly ``hi`` values below it, the trimmed set is
the values in ``[t_a, t_b)``, and the mean is their sum over ``hi - lo + 1``.

Separating thresholds are found by a multi-way search on **counts only**. A target asks for a
threshold with ``k`` values below it; its bracket ``[lo, hi)`` has fewer than ``k`` values below
``lo`` and more than ``k`` below ``hi``. Each round the sites return, for every open target, the
number of their values below each of ``K`` thresholds inside its bracket
(:func:`count_below`); the aggregator, holding the totals, either finds a threshold with exactly
``k`` values below it or keeps the sub-bracket that holds rank ``k`` (:func:`refine`). The first
round's thresholds sit around a per-gene scale, and the bracket shrinks ``K + 1``-fold a round
(log-spaced while it spans more than a factor 4). A search ends once a threshold falls between
the two values on either side of rank ``k`` -- anywhere in that gap, so no value is pinned down.

Equal values on both sides of rank ``k`` (ties: zeros, mostly) cannot be separated: the bracket
closes on them (relative width below ``TIE_WIDTH``, or ``[0, tiny)`` for zeros) and the sites
return, for that bracket only, the count and the sum of its values -- at least two equal values.

What the aggregator learns, per gene and group: totals of counts below the thresholds it chose
near the two trimming ranks, the trimmed sum, and a tied boundary value (shared by at least two
samples). Never a sum over a bracket holding a single value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TINY = float(np.finfo(float).tiny)  # first threshold: zeros below it, every positive value above
TIE_WIDTH = 1e-9  # a bracket this narrow (relative) holds one repeated value
GROW = 10.0  # factor between thresholds above a bracket open to +inf
REFINE_BLOCK = 16384  # open targets per block of the next thresholds (bounds temporaries)


def trim_ranks(n: int, trim: float) -> tuple[int, int]:
    """1-based ranks bounding R's ``mean(x, trim)``."""
    lo = int(np.floor(n * trim)) + 1
    return lo, n + 1 - lo


@dataclass
class Search:
    """Searches for separating thresholds, one per (gene, target).

    ``k`` values wanted below the threshold; ``lo``/``hi`` the bracket with ``n_lo < k <
    n_hi`` values below its ends; ``tau`` the threshold once found (``done``); ``tie`` the
    bracket closed on equal values; ``thresholds`` (genes x targets x K) the next round's.
    """

    k: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n_lo: np.ndarray
    n_hi: np.ndarray
    tau: np.ndarray
    done: np.ndarray
    tie: np.ndarray
    thresholds: np.ndarray


def start(center: np.ndarray, k: np.ndarray, n: np.ndarray, n_thresholds: int,
          decades: tuple[float, float], known: np.ndarray | None = None) -> Search:
    """Searches before the first round.

    Parameters
    ----------
    center
        Per gene, a scale of the values (e.g. their mean): the first thresholds are ``TINY``,
        then a log grid from ``center * 10**decades[0]`` to ``center * 10**decades[1]``.
    k
        Genes x targets: how many values each threshold must have below it.
    n
        Per target, how many values there are (``k == 0`` and ``k == n`` need no search).
    known
        Genes x targets, optional: a value many samples may share that the aggregator already
        knows (the squared error of a zero count, ``q**2``): two thresholds just around it
        close a tie there in the first round.
    """
    G, T = k.shape
    K = n_thresholds
    center = np.where(np.isfinite(center) & (center > 0), center, 1.0)
    n_grid = K - 1 if known is None else K - 3
    grid = np.concatenate([[0.0], np.logspace(*decades, n_grid)])
    thr = center[:, None, None] * grid[None, None, :] * np.ones((1, T, 1))
    thr[..., 0] = TINY
    if known is not None:
        v = np.where(np.isfinite(known) & (known > TINY), known, 2.0 * TINY)
        around = np.stack([v * (1 - TIE_WIDTH / 4), v * (1 + TIE_WIDTH / 4)], axis=-1)
        thr = np.sort(np.concatenate([thr, around], axis=-1), axis=-1)
    n = np.broadcast_to(np.asarray(n, dtype=float)[None, :], (G, T))
    done = (k <= 0) | (k >= n)
    tau = np.where(k <= 0, 0.0, np.where(k >= n, np.inf, np.nan))
    return Search(k=k.astype(float), lo=np.zeros((G, T)), hi=np.full((G, T), np.inf),
                  n_lo=np.zeros((G, T)), n_hi=n.copy(), tau=tau, done=done,
                  tie=np.zeros((G, T), dtype=bool), thresholds=thr)


def count_below(x: np.ndarray, thresholds: np.ndarray,
                genes: np.ndarray | None = None) -> np.ndarray:
    """Site side: per gene, the number of values strictly below each threshold.

    ``x`` samples x genes; ``thresholds`` genes x K, sorted (one row per column of ``x``, or
    per entry of ``genes``: columns of ``x``, read in place). Returns genes x K (float).
    Compiled (:func:`fed_de.core.kernels.count_below`): no genes x samples x K table.
    """
    from fed_de.core.kernels import count_below as counted  # numba: loaded when used

    cols = np.arange(x.shape[1]) if genes is None else np.asarray(genes, dtype=np.int64)
    return counted(np.ascontiguousarray(x, dtype=np.float64), cols,
                   np.ascontiguousarray(thresholds, dtype=np.float64))


def refine(search: Search, counts: np.ndarray) -> Search:
    """Aggregator side: from the summed counts below each threshold, close or narrow every
    open target's bracket and propose the next thresholds.

    The brackets are compiled (:func:`fed_de.core.kernels.refine_brackets`); the open
    targets' next thresholds are taken :data:`REFINE_BLOCK` targets at a time, so their
    targets x thresholds temporaries stay the size of a block (each target's thresholds are
    its own: the numbers are those of one call).
    """
    from fed_de.core.kernels import refine_brackets  # numba: loaded when used

    lo, hi, n_lo, n_hi, tau = (np.array(a, dtype=np.float64) for a in (
        search.lo, search.hi, search.n_lo, search.n_hi, search.tau))
    done, tie = np.array(search.done, dtype=bool), np.array(search.tie, dtype=bool)
    thr = np.ascontiguousarray(search.thresholds, dtype=np.float64)
    refine_brackets(thr, np.ascontiguousarray(search.k, dtype=np.float64),
                    np.ascontiguousarray(counts, dtype=np.float64), done, tie, lo, hi, n_lo,
                    n_hi, tau, TIE_WIDTH, TINY)
    K = thr.shape[-1]
    nxt = thr.copy()  # the open targets' next thresholds (most targets close early)
    flat = nxt.reshape(-1, K)
    open_ = np.flatnonzero(~done.ravel())
    for start in range(0, open_.size, REFINE_BLOCK):
        rows = open_[start:start + REFINE_BLOCK]
        flat[rows] = _inside(lo.ravel()[rows], hi.ravel()[rows], K)
    return Search(k=search.k, lo=lo, hi=hi, n_lo=n_lo, n_hi=n_hi, tau=tau, done=done,
                  tie=tie, thresholds=nxt)


def _inside(lo: np.ndarray, hi: np.ndarray, K: int) -> np.ndarray:
    """K thresholds inside ``(lo, hi)``: log-spaced when ``hi / lo > 4`` (from at most six
    decades below ``hi``: a target further down is followed in the next round), else linear;
    above ``lo`` by factors of ``GROW`` when the bracket is open to +inf."""
    frac = np.arange(1, K + 1) / (K + 1)
    finite = np.isfinite(hi)
    top = np.where(finite, hi, 1.0)
    base = np.maximum(lo, top * 1e-6)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lin = lo[..., None] + (top - lo)[..., None] * frac
        log = np.exp(np.log(base)[..., None]
                     + (np.log(top) - np.log(base))[..., None] * frac)
        grow = np.maximum(lo, TINY)[..., None] * GROW ** np.arange(1, K + 1)
    out = np.where((top > 4.0 * lo)[..., None], log, lin)
    return np.where(finite[..., None], out, grow)


def _bounds(lower: Search, upper: Search, t_lo: int, t_up: int) -> tuple[np.ndarray, ...]:
    """Per gene, the interval summed between two targets (a tied boundary's bracket left out)."""
    a = np.where(lower.tie[:, t_lo], lower.hi[:, t_lo], lower.tau[:, t_lo])
    b = np.where(upper.tie[:, t_up], upper.lo[:, t_up], upper.tau[:, t_up])
    return a, b


def trimmed_parts(x: np.ndarray, lower: Search, upper: Search, t_lo: int, t_up: int) -> dict:
    """Site side, once both searches of a group ended: the sum of the values between the
    thresholds, and count and sum of the values in each *tied* boundary bracket (zeros for a
    boundary that was separated).

    ``x`` samples x genes (the group's values); ``t_lo``/``t_up`` the two targets.
    """
    a, b = _bounds(lower, upper, t_lo, t_up)
    inside = (x >= a[None]) & (x < b[None])
    out = {"sum_inside": (x * inside).sum(axis=0)}
    for name, s, t in (("lo", lower, t_lo), ("hi", upper, t_up)):
        tied = s.tie[:, t]
        in_tie = (x >= s.lo[:, t][None]) & (x < s.hi[:, t][None]) & tied[None]
        out[f"tie_count_{name}"] = in_tie.sum(axis=0).astype(float)
        out[f"tie_sum_{name}"] = (x * in_tie).sum(axis=0)
    return out


def trimmed_mean(parts: dict, lower: Search, upper: Search, t_lo: int, t_up: int, lo: int,
                 hi: int) -> np.ndarray:
    """Aggregator side: R's ``mean(x, trim)`` from summed :func:`trimmed_parts`."""
    tie_l, tie_u = lower.tie[:, t_lo], upper.tie[:, t_up]
    with np.errstate(invalid="ignore", divide="ignore"):
        v_l = parts["tie_sum_lo"] / parts["tie_count_lo"]
        v_u = parts["tie_sum_hi"] / parts["tie_count_hi"]
    total = (parts["sum_inside"]
             + np.where(tie_l, (lower.n_hi[:, t_lo] - (lo - 1)) * np.nan_to_num(v_l), 0.0)
             + np.where(tie_u, (hi - upper.n_lo[:, t_up]) * np.nan_to_num(v_u), 0.0))
    same = tie_l & tie_u & (lower.lo[:, t_lo] == upper.lo[:, t_up])
    total = np.where(same, (hi - lo + 1) * np.nan_to_num(v_l), total)
    ended = lower.done[:, t_lo] & upper.done[:, t_up]
    return np.where(ended, total / (hi - lo + 1), np.nan)
