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
    whose points are at least NODE_SEPARATION apart (kept greedily in sorted order: the nodes
    besides the nearest). Both are genes x (width + 2) arrays with a NaN column on either
    side and NaN past each gene's count (``n_all``, ``n_thin``): an index from -1 to the
    width reads NaN wherever it is out of range, with no mask per lookup (the replayed path
    looks nodes up ~50 times per step). Compiled
    (:func:`fed_de.core.kernels.index_tables`)."""
    from fed_de.core.kernels import index_tables  # numba: loaded when used

    arrs = [np.ascontiguousarray(mem[k], dtype=np.float64) for k in ("x", "f", "g", "h")]
    tab, thin, n_all, n_thin = index_tables(*arrs, NODE_SEPARATION)
    return {"all": dict(zip("xfgh", tab, strict=True)),
            "thin": dict(zip("xfgh", thin, strict=True)), "n_all": n_all, "n_thin": n_thin}


def surrogate(ix: dict, x: np.ndarray, prior: dict | None = None,
              rows: np.ndarray | None = None) -> dict:
    """Objective ``f, g, h`` at ``x`` (one point per gene, or per gene of ``rows``: indices
    into the index's genes) from the evaluated points (:func:`index`), plus the prior, with
    error estimates ``ef, eg``, ``dist`` (to the nearest evaluated point) and ``outside``
    (how far ``x`` lies outside them all).

    The interpolant is the confluent Hermite one (values and two derivatives at each node,
    Newton form) through up to :data:`HERMITE_NODES` nodes: the nearest evaluated point first
    (so an evaluated value is returned as is, with estimates 0), then thinned points
    (:data:`NODE_SEPARATION` apart) on either side in turn, since nodes all on one side
    would extrapolate. The error estimates are the larger of the last two changes when a
    node is added (the last node alone may add little when it is far). A gene with fewer
    nodes than :data:`HERMITE_NODES` gets NaN values (no surrogate there). Computed by the
    compiled :func:`fed_de.core.kernels.surrogate_values`, gene by gene.
    """
    from fed_de.core.kernels import surrogate_values  # numba: loaded when used

    a, t = ix["all"], ix["thin"]
    x = np.ascontiguousarray(x, dtype=np.float64)
    rows = np.arange(x.size) if rows is None else np.asarray(rows, dtype=np.int64)
    f, g, h, ef, eg, dist, outside = surrogate_values(
        a["x"], a["f"], a["g"], a["h"], ix["n_all"], t["x"], t["f"], t["g"], t["h"], rows, x,
        HERMITE_NODES, NODE_SEPARATION)
    f, g, h = add_prior(f, g, h, x, prior)
    return {"f": f, "g": g, "h": h, "ef": ef, "eg": eg, "dist": dist, "outside": outside}


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
