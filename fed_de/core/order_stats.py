"""Exact order statistics and trimmed means from per-site sums (a multi-way search).

To find the ``k``-th smallest of values spread over sites, the aggregator proposes ``K``
thresholds inside a bracket known to hold it; each site returns, per sub-interval between
consecutive thresholds, the number of its values there and their sum and sum of squares.
The aggregator keeps the sub-interval holding rank ``k``. A sub-interval whose values have
zero variance holds a single distinct value, which is then known exactly (sum / count): the
search ends exactly, ties included. Each round shrinks the bracket ``K + 1``-fold (in log
scale while it spans more than a factor 4, linearly after), so values ``~1e-3 .. 1e7`` apart
by ``1e-9`` relative are separated within about ``log(1e19) / log(K + 1)`` rounds (≈ 8 for
``K = 15``); genes whose target is already isolated are masked.

What the aggregator learns: counts and sums of values per sub-interval, and — as any exact
trimmed mean requires — the values of the order statistics that bound the trimmed set.

R's ``mean(x, trim)``: ``lo = floor(n * trim) + 1``, ``hi = n + 1 - lo``, the mean of the
sorted values ``lo..hi``.
"""

from __future__ import annotations

import numpy as np

TIE = 1e-12  # relative: values this close to a bounding value are that value
LOG_LO, LOG_HI = -3.0, 7.0  # first bracket (log10) above the explicit zero threshold


def trim_ranks(n: int, trim: float) -> tuple[int, int]:
    """1-based ranks bounding R's ``mean(x, trim)``."""
    lo = int(np.floor(n * trim)) + 1
    return lo, n + 1 - lo


def first_thresholds(n_genes: int, n_targets: int, k: int) -> np.ndarray:
    """Initial thresholds (genes x targets x K): 0 (zeros apart), then a log grid."""
    grid = np.concatenate([[0.0], np.logspace(LOG_LO, LOG_HI, k - 1)])
    return np.broadcast_to(grid, (n_genes, n_targets, k)).copy()


def scaled_thresholds(center: np.ndarray, n_targets: int, k: int, lo_dec: float,
                      hi_dec: float) -> np.ndarray:
    """Initial thresholds around a per-gene scale: 0, then a log grid from
    ``center * 10**lo_dec`` to ``center * 10**hi_dec`` (values beyond are still found: the
    outer sub-intervals are refined like the others)."""
    grid = np.concatenate([[0.0], np.logspace(lo_dec, hi_dec, k - 1)])
    center = np.where(np.isfinite(center) & (center > 0), center, 1.0)
    out = center[:, None, None] * grid[None, None, :]
    return np.broadcast_to(out, (center.size, n_targets, k)).copy()


def interval_sums(x: np.ndarray, thresholds: np.ndarray) -> dict:
    """Site side: per gene and target, counts, sums and sums of squares of the values in each
    of the ``K + 1`` sub-intervals ``(-inf, t1], (t1, t2], ..., (tK, inf)``.

    Parameters
    ----------
    x
        Samples x genes values (normalised counts).
    thresholds
        Genes x targets x K, sorted along the last axis.
    """
    G, T, K = thresholds.shape
    out = {k: np.zeros((G, T, K + 1)) for k in ("count", "sum", "sumsq")}
    for t in range(T):
        # bin of every value: number of thresholds strictly below it
        bins = (x[:, :, None] > thresholds[None, :, t, :]).sum(axis=2)  # samples x genes
        onehot = bins[:, :, None] == np.arange(K + 1)[None, None, :]
        out["count"][:, t] = onehot.sum(axis=0)
        out["sum"][:, t] = (onehot * x[:, :, None]).sum(axis=0)
        out["sumsq"][:, t] = (onehot * (x * x)[:, :, None]).sum(axis=0)
    return out


def refine(thresholds: np.ndarray, tot: dict, ranks: np.ndarray, state: dict | None) -> dict:
    """Aggregator side: keep the sub-interval holding each target rank; propose thresholds.

    ``ranks`` (genes x targets) are 1-based. The returned state holds, per target, whether
    its value is known (``done``) and the value, and the next thresholds.
    """
    G, T, K = thresholds.shape
    counts = tot["count"]
    cum = np.cumsum(counts, axis=2)  # number of values <= upper edge of each sub-interval
    j = (cum < ranks[..., None]).sum(axis=2)  # sub-interval holding the target
    j = np.minimum(j, K)
    take = lambda a: np.take_along_axis(a, j[..., None], axis=2)[..., 0]  # noqa: E731
    n_in, s_in, q_in = take(counts), take(tot["sum"]), take(tot["sumsq"])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s_in / n_in
        var = q_in / n_in - mean * mean
    single = (n_in > 0) & (np.abs(var) <= 1e-12 * np.maximum(mean * mean, 1e-300))
    prev_done = state["done"] if state else np.zeros((G, T), dtype=bool)
    value = state["value"].copy() if state else np.full((G, T), np.nan)
    done = prev_done | single
    value = np.where(~prev_done & single, mean, value)
    # the kept sub-interval is bounded by thresholds, or by the previous bracket at the ends
    # (first round: values >= 0 below, their sum above)
    lo_prev = state["lo"] if state else np.zeros((G, T))
    hi_prev = state["hi"] if state else np.full((G, T), np.inf)
    edges = np.concatenate([lo_prev[..., None], thresholds, hi_prev[..., None]], axis=2)
    lo_b = np.take_along_axis(edges, j[..., None], axis=2)[..., 0]
    hi_b = np.take_along_axis(edges, (j + 1)[..., None], axis=2)[..., 0]
    hi_b = np.where(np.isfinite(hi_b), hi_b, s_in * (1.0 + 1e-12) + 1e-300)
    nxt = _subdivide(lo_b, hi_b, K)
    nxt = np.where(done[..., None], thresholds, nxt)
    return {"done": done, "value": value, "thresholds": nxt, "lo": lo_b, "hi": hi_b}


def _subdivide(lo: np.ndarray, hi: np.ndarray, k: int) -> np.ndarray:
    """K thresholds strictly inside (lo, hi): log-spaced when hi/lo > 4, else linear."""
    frac = np.arange(1, k + 1) / (k + 1)
    lin = lo[..., None] + (hi - lo)[..., None] * frac
    with np.errstate(divide="ignore", invalid="ignore"):
        wide = (lo > 0) & (hi / lo > 4.0)
        log = np.exp(np.log(np.where(lo > 0, lo, 1.0))[..., None]
                     + np.log(np.where(lo > 0, hi / lo, 1.0))[..., None] * frac)
    return np.where(wide[..., None], log, lin)


def trimmed_sum_parts(x: np.ndarray, v_lo: np.ndarray, v_hi: np.ndarray) -> dict:
    """Site side, once both bounding values are known: sums that give the trimmed mean.

    A bounding value is a mean of equal values summed over sites, exact to rounding; values
    within 1e-12 (relative) of it count as equal to it, so every site decides alike.
    """
    lo, hi = v_lo * (1 + TIE) + 1e-300, v_hi * (1 - TIE) - 1e-300
    inside = (x > lo[None]) & (x < hi[None])
    return {"sum_inside": (x * inside).sum(axis=0), "n_le_lo": (x <= lo[None]).sum(axis=0)
            .astype(float), "n_lt_hi": (x < hi[None]).sum(axis=0).astype(float)}


def trimmed_mean(parts: dict, v_lo: np.ndarray, v_hi: np.ndarray, lo: int, hi: int
                 ) -> np.ndarray:
    """Aggregator side: R's ``mean(x, trim)`` from summed :func:`trimmed_sum_parts`."""
    same = v_lo == v_hi
    total = (parts["sum_inside"] + v_lo * (parts["n_le_lo"] - (lo - 1))
             + v_hi * (hi - parts["n_lt_hi"]))
    total = np.where(same, v_lo * (hi - lo + 1), total)
    return total / (hi - lo + 1)
