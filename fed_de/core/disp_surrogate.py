"""A surrogate of the dispersion objective between evaluated points, with error bounds.

The Cox-Reid adjusted log likelihood of a gene, as a function of ``x = log(alpha)``, is
analytic in the strip ``|Im x| < pi/2`` (every weight ``mu / (1 + alpha mu)`` and every
``lgamma`` argument keeps a positive real part there). The sites return its value and first
two derivatives at the points asked for; between such points a confluent Hermite
interpolant through a handful of nodes around ``x`` is accurate to ~1e-12 when the nodes are
a few tenths apart. The error of each value is estimated by dropping the farthest node.

Arrays are genes first; each gene has its own evaluated points (``memory``, NaN-padded).
"""

from __future__ import annotations

import numpy as np

HERMITE_NODES = 5  # nodes behind each value: degree 14
NODE_SEPARATION = 0.05  # closer nodes make the divided differences ill-conditioned
SAFETY = 10.0  # multiplies the interpolant's own error estimate
EPS_MACH = float(np.finfo(float).eps)


# -- evaluated points -------------------------------------------------------------------------
def memory_empty(G: int) -> dict:
    """No evaluated point yet: ``x`` and the prior-free ``f, g, h`` there (G x 0)."""
    return {k: np.empty((G, 0)) for k in ("x", "f", "g", "h")}


def memory_add(mem: dict, points: np.ndarray, f: np.ndarray, g: np.ndarray,
               h: np.ndarray) -> dict:
    """Append a round's evaluations (genes x K); NaN points, and points where the objective
    is not finite, are not stored. Each gene's points are kept left-aligned, so the width
    is the largest count of any gene."""
    keep = np.isfinite(points) & np.isfinite(f) & np.isfinite(g) & np.isfinite(h)
    new = {"x": points, "f": f, "g": g, "h": h}
    both = {k: np.concatenate([mem[k], np.where(keep, v, np.nan)], axis=1)
            for k, v in new.items()}
    order = np.argsort(np.isnan(both["x"]), axis=1, kind="stable")
    width = int(np.isfinite(both["x"]).sum(axis=1).max(initial=0))
    return {k: np.take_along_axis(v, order, axis=1)[:, :width] for k, v in both.items()}


def memory_pack(mem: dict) -> dict:
    """The evaluated points as flat arrays (``count`` per gene, then values gene by gene):
    what an aggregator keeps in its state between tasks, ~32 bytes a point."""
    ok = np.isfinite(mem["x"])
    out = {k: v[ok] for k, v in mem.items()}
    out["count"] = ok.sum(axis=1)
    return out


def memory_unpack(packed: dict) -> dict:
    """Inverse of :func:`memory_pack`."""
    count = packed["count"]
    G, width = count.size, int(count.max(initial=0))
    slot = np.arange(width)[None, :] < count[:, None]
    out = {}
    for k in ("x", "f", "g", "h"):
        out[k] = np.full((G, width), np.nan)
        out[k][slot] = packed[k]
    return out


def memory_rows(mem: dict, rows: np.ndarray) -> dict:
    """The memory of some genes, without columns they all leave empty."""
    sub = {k: v[rows] for k, v in mem.items()}
    used = np.isfinite(sub["x"]).any(axis=0)
    return {k: v[:, used] for k, v in sub.items()}


# -- interpolation ----------------------------------------------------------------------------
def index(mem: dict) -> dict:
    """The memory prepared for many queries: each gene's points sorted, and a thinned copy
    whose points are at least NODE_SEPARATION apart (the nodes besides the nearest); both
    padded (:func:`_padded`), so a lookup is one flat take."""
    order = np.argsort(np.where(np.isnan(mem["x"]), np.inf, mem["x"]), axis=1, kind="stable")
    srt = {k: np.take_along_axis(v, order, axis=1) for k, v in mem.items()}
    G, M = srt["x"].shape
    keep = np.isfinite(srt["x"])
    last = np.full(G, -np.inf)
    for j in range(M):  # greedy in sorted order: keep a point far enough from the last kept
        ok = keep[:, j] & (srt["x"][:, j] - last >= NODE_SEPARATION)
        keep[:, j] = ok
        last = np.where(ok, srt["x"][:, j], last)
    left = np.argsort(~keep, axis=1, kind="stable")
    width = int(keep.sum(axis=1).max(initial=0))
    thin = {k: np.take_along_axis(np.where(keep, v, np.nan), left, axis=1)[:, :width]
            for k, v in srt.items()}
    n_all, n_thin = np.isfinite(srt["x"]).sum(axis=1), keep.sum(axis=1)
    return {"all": _padded(srt, n_all), "thin": _padded(thin, n_thin), "n_all": n_all,
            "n_thin": n_thin}


def _padded(arrs: dict, n: np.ndarray) -> dict:
    """Each array (genes x width) with a NaN column on either side and NaN past each gene's
    ``n`` values: an index from -1 to the width reads NaN wherever it is out of range, with no
    mask per lookup (the replayed path looks nodes up ~50 times per step)."""
    out = {}
    for k, v in arrs.items():
        G, W = v.shape
        p = np.full((G, W + 2), np.nan)
        p[:, 1:W + 1] = np.where(np.arange(W)[None, :] < n[:, None], v, np.nan)
        out[k] = p
    return out


def index_rows(ix: dict, rows: np.ndarray) -> dict:
    """The index of some genes."""
    return {"all": {k: v[rows] for k, v in ix["all"].items()},
            "thin": {k: v[rows] for k, v in ix["thin"].items()},
            "n_all": ix["n_all"][rows], "n_thin": ix["n_thin"][rows]}


class _Reader:
    """Lookups ``arr[gene, i]`` in padded arrays of one width (:func:`_padded`): NaN out of
    range (``-1 <= i <= width``), one flat take per lookup."""

    def __init__(self, padded: dict):
        G, W2 = padded["x"].shape
        self.flat = {k: v.reshape(-1) for k, v in padded.items()}
        self.base = np.arange(G) * W2 + 1  # column 0 is the left pad
        self.width = W2 - 2

    def __call__(self, key: str, i: np.ndarray) -> np.ndarray:
        return self.flat[key].take(np.clip(i, -1, self.width) + self.base)


def nearest_nodes(ix: dict, x: np.ndarray, m: int) -> dict:
    """Up to ``m`` nodes around ``x`` per gene (``x, f, g, h``: genes x m, nearest first),
    ``count``, the distance to the nearest evaluated point and how far ``x`` lies outside
    them all.

    The nearest evaluated point comes first (so an evaluated value is returned as is); then
    thinned points on either side in turn (nodes all on one side would extrapolate), none
    closer than NODE_SEPARATION to the first.
    """
    at_all, at_thin = _Reader(ix["all"]), _Reader(ix["thin"])
    na = ix["n_all"]
    G = x.shape[0]
    rows = np.arange(G)
    with np.errstate(invalid="ignore"):  # the NaN pads compare False
        pos = np.sum(ix["all"]["x"] < x[:, None], axis=1)
    dl, dr = np.abs(at_all("x", pos - 1) - x), np.abs(at_all("x", pos) - x)
    first = np.where(np.fmin(dl, dr) == dl, pos - 1, pos)
    dist = np.fmin(dl, dr)
    dist = np.where(np.isnan(dist), np.inf, dist)
    has0 = na > 0
    nodes = {k: np.full((G, m), np.nan) for k in ("x", "f", "g", "h")}
    for k in nodes:
        nodes[k][:, 0] = at_all(k, first)
    count = has0.astype(int)
    x0 = nodes["x"][:, 0]
    with np.errstate(invalid="ignore"):
        left = np.sum(ix["thin"]["x"] < x[:, None], axis=1) - 1
    right = left + 1
    last_left = np.zeros(G, dtype=bool)
    for _ in range(1, m):
        for _skip in range(3):  # thinned points are apart: few can clash with the first
            with np.errstate(invalid="ignore"):
                left = left - (np.abs(at_thin("x", left) - x0) < NODE_SEPARATION)
                right = right + (np.abs(at_thin("x", right) - x0) < NODE_SEPARATION)
        has_l, has_r = np.isfinite(at_thin("x", left)), np.isfinite(at_thin("x", right))
        use_left = has_l & (~has_r | ~last_left)
        has = (has_l | has_r) & has0
        idx = np.where(use_left, left, right)
        slot = np.minimum(count, m - 1)
        for k in nodes:
            val = at_thin(k, idx)
            nodes[k][rows[has], slot[has]] = val[has]
        count += has
        last_left = np.where(has, use_left, last_left)
        left = left - (has & use_left)
        right = right + (has & ~use_left)
    d = np.where(np.arange(m)[None, :] < count[:, None], np.abs(nodes["x"] - x[:, None]),
                 np.inf)
    srt = np.argsort(d, axis=1, kind="stable")
    nodes = {k: np.take_along_axis(v, srt, axis=1) for k, v in nodes.items()}
    lo = at_all("x", np.zeros(G, dtype=int))
    hi = at_all("x", na - 1)
    outside = np.where(has0, np.fmax(np.fmax(lo - x, x - hi), 0.0), np.inf)
    return {**nodes, "count": count, "dist": dist, "outside": outside}


def hermite(z: np.ndarray, fz: np.ndarray, gz: np.ndarray, hz: np.ndarray, count: np.ndarray,
            x: np.ndarray) -> tuple[tuple, np.ndarray, np.ndarray]:
    """Confluent Hermite interpolant through nodes ``z`` (values and two derivatives each) in
    Newton form, at ``x``: (value, derivative, second derivative), and error estimates of
    the value and derivative: the larger of the last two changes when a node is added (the
    last node alone may add little when it is far). A gene uses its first ``count`` nodes."""
    G, m = z.shape
    n = 3 * m
    # node by node (n x G): every operation below runs on contiguous rows of genes
    s = np.repeat(np.ascontiguousarray(z.T), 3, axis=0)
    col = np.repeat(np.ascontiguousarray(fz.T), 3, axis=0)
    coef = np.zeros((n, G))
    coef[0] = col[0]
    node, rep = np.divmod(np.arange(n), 3)  # row i: node i // 3, its (i % 3)-th copy
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for j in range(1, n):  # the divided-difference table, a column of it at a time
            prev, col = col, np.full((n, G), np.nan)
            col[j:] = (prev[j:] - prev[j - 1:n - 1]) / (s[j:] - s[:n - j])
            if j <= 2:  # repeated nodes: the derivatives themselves (h / 2 for the second)
                at = np.flatnonzero((np.arange(n) >= j) & (rep >= j))
                col[at] = (gz if j == 1 else 0.5 * hz).T[node[at]]
            coef[j] = col[j]
        vals = []
        for drop in (0, 1, 2):
            c = np.where(np.arange(n)[:, None] < 3 * (count[None, :] - drop), coef, 0.0)
            p, dp, d2p = c[n - 1].copy(), np.zeros(G), np.zeros(G)
            for i in range(n - 2, -1, -1):
                t = x - s[i]
                d2p = d2p * t + 2.0 * dp
                dp = dp * t + p
                p = p * t + c[i]
            vals.append((p, dp, d2p))
        (f, g, h), (f1, g1, _), (f2, g2, _) = vals
        ef = np.where(count > 2, np.fmax(np.abs(f - f1), np.abs(f1 - f2)),
                      np.where(count == 2, np.abs(f - f1), np.inf))
        eg = np.where(count > 2, np.fmax(np.abs(g - g1), np.abs(g1 - g2)),
                      np.where(count == 2, np.abs(g - g1), np.inf))
    return (f, g, h), ef, eg


def surrogate(ix: dict, x: np.ndarray, prior: dict | None = None) -> dict:
    """Objective ``f, g, h`` at ``x`` (one point per gene) from the evaluated points
    (:func:`index`), plus the prior, with error estimates ``ef, eg`` (see :func:`hermite`),
    ``dist`` (to the nearest evaluated point) and ``outside``.

    At an evaluated point the value is that evaluation (the nearest node comes first in the
    Newton form) and the estimates are 0.
    """
    nd = nearest_nodes(ix, x, HERMITE_NODES)
    count = nd["count"]
    base = np.where(count > 0, nd["f"][:, 0], 0.0)  # a shifted log likelihood loses less
    (f, g, h), ef, eg = hermite(nd["x"], nd["f"] - base[:, None], nd["g"], nd["h"], count, x)
    f = f + base
    exact = nd["dist"] == 0
    ef, eg = np.where(exact, 0.0, ef), np.where(exact, 0.0, eg)
    f, g, h = add_prior(f, g, h, x, prior)
    return {"f": f, "g": g, "h": h, "ef": ef, "eg": eg, "dist": nd["dist"],
            "outside": nd["outside"]}


def add_prior(f, g, h, x: np.ndarray, prior: dict | None):
    """Add DESeq2's normal prior on log(alpha) (``log_posterior``'s ``prior_part``)."""
    if prior is None:
        return f, g, h
    mean = prior["mean"] if np.ndim(x) == 1 else prior["mean"][:, None]
    dev = x - mean
    return f - 0.5 * dev**2 / prior["var"], g - dev / prior["var"], h - 1.0 / prior["var"]


# -- error bounds -----------------------------------------------------------------------------
def rounding_floor(x: np.ndarray, f: np.ndarray, n_samples: int) -> np.ndarray:
    """Rounding error of an objective evaluated at ``x = log(alpha)``: lgamma(y + 1/alpha)
    and lgamma(1/alpha) are ~ r log r (r = 1/alpha) and cancel, so small alpha is noisy.
    R's values carry the same noise: a decision closer than this is R's coin toss too."""
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.exp(-x)
        return 4.0 * EPS_MACH * (np.abs(f) + n_samples * r * (np.abs(x) + 1.0))


def error_bounds(s: dict, x: np.ndarray, n_samples: int, ux) -> dict:
    """Bounds on the errors of surrogate values ``s`` (:func:`surrogate`) at ``x``, itself
    known to ``ux``: SAFETY times the estimates, the rounding noise of the evaluated values
    amplified by the interpolation (none at an evaluated point) and the position error; and
    the rounding noise itself."""
    amplify = 25.0 * np.fmin(1.0, s["dist"] / 0.1)
    noise = rounding_floor(x, s["f"], n_samples)
    ef = SAFETY * s["ef"] + amplify * noise + np.abs(s["g"]) * ux
    eg = SAFETY * s["eg"] + amplify * rounding_floor(x, s["g"], n_samples) + np.abs(s["h"]) * ux
    return {"f": ef, "g": eg, "noise": noise}
