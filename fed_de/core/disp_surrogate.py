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
SAFETY = 3.0  # multiplies the interpolant's own error estimate
EPS_MACH = float(np.finfo(float).eps)


# -- evaluated points -------------------------------------------------------------------------
def memory_empty(G: int) -> dict:
    """No evaluated point yet: ``x`` and the prior-free ``f, g, h`` there (G x 0)."""
    return {k: np.empty((G, 0)) for k in ("x", "f", "g", "h")}


def memory_add(mem: dict, points: np.ndarray, f: np.ndarray, g: np.ndarray,
               h: np.ndarray) -> dict:
    """Append a round's evaluations (genes x K); NaN points are not stored."""
    keep = np.isfinite(points)
    new = {"x": points, "f": f, "g": g, "h": h}
    new = {k: np.where(keep, v, np.nan) for k, v in new.items()}
    return {k: np.concatenate([mem[k], new[k]], axis=1) for k in mem}


def memory_rows(mem: dict, rows: np.ndarray) -> dict:
    """The memory of some genes, without columns they all leave empty."""
    sub = {k: v[rows] for k, v in mem.items()}
    used = np.isfinite(sub["x"]).any(axis=0)
    return {k: v[:, used] for k, v in sub.items()}


# -- interpolation ----------------------------------------------------------------------------
def nearest_nodes(xm: np.ndarray, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (genes x m) of up to ``m`` evaluated points around ``x``, nearest first, and
    how many were found.

    The nearest point comes first; then the nearest remaining point on either side in turn
    (nodes all on one side would extrapolate), skipping points closer than NODE_SEPARATION to
    a node already taken.
    """
    G, M = xm.shape
    rows = np.arange(G)
    order = np.argsort(np.where(np.isnan(xm), np.inf, xm), axis=1, kind="stable")
    xs = np.take_along_axis(xm, order, axis=1)
    n_valid = np.isfinite(xs).sum(axis=1)
    with np.errstate(invalid="ignore"):
        left = np.sum(xs < x[:, None], axis=1) - 1
    right = left + 1
    taken = np.full((G, m), np.nan)
    chosen = np.zeros((G, m), dtype=int)
    count = np.zeros(G, dtype=int)

    def at(i):
        ok = (i >= 0) & (i < n_valid)
        return np.where(ok, xs[rows, np.clip(i, 0, max(M - 1, 0))], np.nan)

    def skip(ptr, step):
        for _ in range(M):
            with np.errstate(invalid="ignore"):
                clash = (np.abs(taken - at(ptr)[:, None]) < NODE_SEPARATION).any(axis=1)
            if not clash.any():
                break
            ptr = ptr + step * clash
        return ptr

    last_left = np.zeros(G, dtype=bool)
    for pick in range(m):
        left, right = skip(left, -1), skip(right, 1)
        dl, dr = np.abs(at(left) - x), np.abs(at(right) - x)
        has_l, has_r = np.isfinite(dl), np.isfinite(dr)
        if pick == 0:
            use_left = has_l & (~has_r | (dl <= dr))
        else:  # alternate sides while both have points
            use_left = has_l & (~has_r | ~last_left)
        has = has_l | has_r
        idx = np.where(use_left, left, right)
        chosen[rows[has], count[has]] = idx[has]
        taken[rows[has], count[has]] = at(idx)[has]
        count += has
        last_left = np.where(has, use_left, last_left)
        left = left - (has & use_left)
        right = right + (has & ~use_left)
    chosen = np.take_along_axis(order, chosen, axis=1)
    dist = np.where(np.arange(m)[None, :] < count[:, None], np.abs(taken - x[:, None]), np.inf)
    srt = np.argsort(dist, axis=1, kind="stable")
    return np.take_along_axis(chosen, srt, axis=1), count


def hermite(z: np.ndarray, fz: np.ndarray, gz: np.ndarray, hz: np.ndarray, count: np.ndarray,
            x: np.ndarray) -> tuple[tuple, tuple]:
    """Confluent Hermite interpolant through nodes ``z`` (values and two derivatives each) in
    Newton form, at ``x``: (value, derivative, second derivative), and the first two of the
    interpolant without the last node. A gene uses its first ``count`` nodes."""
    G, m = z.shape
    n = 3 * m
    s = np.repeat(z, 3, axis=1)
    col = np.repeat(fz, 3, axis=1)
    coef = np.zeros((G, n))
    coef[:, 0] = col[:, 0]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for j in range(1, n):
            prev, col = col, np.full((G, n), np.nan)
            for i in range(j, n):
                k, r = divmod(i, 3)
                if j == 1 and r >= 1:
                    col[:, i] = gz[:, k]
                elif j == 2 and r == 2:
                    col[:, i] = 0.5 * hz[:, k]
                else:
                    col[:, i] = (prev[:, i] - prev[:, i - 1]) / (s[:, i] - s[:, i - j])
            coef[:, j] = col[:, j]
        terms = np.arange(n)[None, :]
        out = []
        for c in (np.where(terms < 3 * count[:, None], coef, 0.0),
                  np.where(terms < 3 * (count[:, None] - 1), coef, 0.0)):
            p, dp, d2p = c[:, n - 1].copy(), np.zeros(G), np.zeros(G)
            for i in range(n - 2, -1, -1):
                t = x - s[:, i]
                d2p = d2p * t + 2.0 * dp
                dp = dp * t + p
                p = p * t + c[:, i]
            out.append((p, dp, d2p))
    return out[0], out[1][:2]


def surrogate(mem: dict, x: np.ndarray, prior: dict | None = None) -> dict:
    """Objective ``f, g, h`` at ``x`` (one point per gene) from the evaluated points, plus the
    prior, with error estimates ``ef, eg`` (the change when the farthest node is dropped).

    At an evaluated point the value is that evaluation (the nearest node comes first in the
    Newton form) and the estimates are 0.
    """
    idx, count = nearest_nodes(mem["x"], x, HERMITE_NODES)
    rows = np.arange(x.shape[0])[:, None]
    z, fz, gz, hz = (mem[k][rows, idx] for k in ("x", "f", "g", "h"))
    base = fz[:, 0]  # divided differences of a shifted log likelihood lose less
    (f, g, h), (f2, g2) = hermite(z, fz - base[:, None], gz, hz, count, x)
    f, f2 = f + base, f2 + base
    at_node = count > 0
    at_node &= np.abs(np.where(at_node, z[:, 0], np.nan) - x) == 0
    ef = np.where(at_node, 0.0, np.where(count > 1, np.abs(f - f2), np.inf))
    eg = np.where(at_node, 0.0, np.where(count > 1, np.abs(g - g2), np.inf))
    f, g, h = add_prior(f, g, h, x, prior)
    return {"f": f, "g": g, "h": h, "ef": ef, "eg": eg}


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


def error_bounds(s: dict, x: np.ndarray, mem: dict, n_samples: int, ux) -> dict:
    """Bounds on the errors of surrogate values ``s`` at ``x``, itself known to ``ux``:
    SAFETY times the estimates, the rounding noise of the evaluated values amplified by the
    interpolation (none at an evaluated point) and the position error. Also the distance to
    the nearest evaluated point, how far ``x`` lies outside them, and the rounding noise."""
    with np.errstate(invalid="ignore"):
        dist = np.nanmin(np.abs(mem["x"] - x[:, None]), axis=1, initial=np.inf)
        lo = np.nanmin(mem["x"], axis=1, initial=np.inf)
        hi = np.nanmax(mem["x"], axis=1, initial=-np.inf)
    amplify = 25.0 * np.fmin(1.0, dist / 0.1)
    noise = rounding_floor(x, s["f"], n_samples)
    ef = SAFETY * s["ef"] + amplify * noise + np.abs(s["g"]) * ux
    eg = SAFETY * s["eg"] + amplify * rounding_floor(x, s["g"], n_samples) + np.abs(s["h"]) * ux
    return {"f": ef, "g": eg, "dist": dist, "outside": np.fmax(np.fmax(lo - x, x - hi), 0.0),
            "noise": noise}
