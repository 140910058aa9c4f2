"""Per-gene maximisation in one variable (log dispersion) from evaluations done at the sites:
the perturbation screen's search (the bulk pipeline follows DESeq2's own line search instead,
:mod:`fed_de.core.disp_path`).

Every round the sites evaluate the objective's summands at a few points per gene; the
aggregator combines them into exact values and first/second derivatives. Every evaluation is
kept (:func:`bracket_start`, :func:`bracket_add`), the maximum is bracketed between points
whose derivatives change sign (:func:`bracket_best`), and each round proposes the Newton
point, the root of the cubic (Hermite) interpolating the derivative at both bracket ends, and
the midpoint, so the bracket at least halves every round (:func:`bracket_propose`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def add_log_normal_prior(f, g, h, points: np.ndarray, mean: np.ndarray | None, var: float):
    """Add a normal prior on log(alpha) (mean per gene, common variance) to f, g, h."""
    if mean is None:
        return f, g, h
    dev = points - mean[:, None]
    return f - 0.5 * dev**2 / var, g - dev / var, h - 1.0 / var


# -- bracketed search (the screen's dispersions) ---------------------------------------------
#: A Newton step below this (log alpha) is taken and ends a bracketed search: Newton's
#: quadratic convergence leaves an error of order NEWTON_DONE^2.
X_TOL = 1e-7  # a bracket this narrow (log scale) has found the maximum
NEWTON_DONE = 1e-4
#: Relative rounding noise of the bracketed search's summed objectives (ties below it).
BRACKET_NOISE = 1e-11
#: Points per gene a bracketed search proposes each round (Newton, Hermite root, midpoint).
BRACKET_POINTS = 3


@dataclass
class Evaluations:
    """Every point a bracketed search evaluated, per gene: ``(G, n)`` each."""

    x: np.ndarray
    f: np.ndarray
    g: np.ndarray
    h: np.ndarray


@dataclass
class Bracket:
    """Best point per gene (``x, f, g, h``), the bracket ``[a, b]`` around the maximum with the
    derivatives at its ends, whether both ends are evaluated points (``both``), the Newton
    step from the best point, whether the search is ``done``, and the ``estimate``."""

    x: np.ndarray
    f: np.ndarray
    g: np.ndarray
    h: np.ndarray
    a: np.ndarray
    b: np.ndarray
    ga: np.ndarray
    ha: np.ndarray
    gb: np.ndarray
    hb: np.ndarray
    both: np.ndarray
    newton: np.ndarray
    done: np.ndarray
    estimate: np.ndarray


def bracket_start(points: np.ndarray, f: np.ndarray, g: np.ndarray,
                  h: np.ndarray) -> Evaluations:
    """A bracketed search's first evaluations (``(G, K)`` each)."""
    return Evaluations(x=points.copy(), f=f.copy(), g=g.copy(), h=h.copy())


def bracket_add(ev: Evaluations, points, f, g, h) -> Evaluations:
    """The evaluations with one more round appended."""
    return Evaluations(*(np.concatenate([old, v], axis=1)
                         for old, v in ((ev.x, points), (ev.f, f), (ev.g, g), (ev.h, h))))


def bracket_best(ev: Evaluations, lo: float, hi: float) -> Bracket:
    """Best point per gene, the bracket around the maximum, and whether the search is done.

    The bracket ``[a, b]`` runs from the largest evaluated point left of the best whose
    derivative is ``>= 0`` to the smallest one right of it whose derivative is ``<= 0`` (the
    range bounds where there is none). Done: bracket below :data:`X_TOL`, Newton step below
    :data:`NEWTON_DONE` (``estimate`` then takes it), or the maximum at a bound.
    """
    x, f, g, h = ev.x, ev.f, ev.g, ev.h
    score = np.where(np.isfinite(f), f, -np.inf)
    top = score.max(axis=1, keepdims=True)
    # the earliest point within rounding noise of the best wins: sites summing in another
    # order follow the same path
    near = score >= top - BRACKET_NOISE * (np.abs(np.nan_to_num(top, neginf=0.0)) + 1.0)
    k = np.argmax(near, axis=1)
    rows = np.arange(x.shape[0])
    xb, fb, gx, hx = x[rows, k], score[rows, k], g[rows, k], h[rows, k]
    ok = np.isfinite(score)
    left = (g >= 0) & (x <= xb[:, None]) & ok
    right = (g <= 0) & (x >= xb[:, None]) & ok
    ka = np.argmax(np.where(left, x, -np.inf), axis=1)
    kb = np.argmin(np.where(right, x, np.inf), axis=1)
    has_a, has_b = left.any(axis=1), right.any(axis=1)
    a, b = np.where(has_a, x[rows, ka], lo), np.where(has_b, x[rows, kb], hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        newton = np.where(hx < 0, -gx / hx, np.nan)
    close = np.abs(newton) < NEWTON_DONE
    done = ((b - a) < X_TOL) | close | ~np.isfinite(fb)
    done |= ((xb <= lo) & (gx <= 0)) | ((xb >= hi) & (gx >= 0))
    # the estimate: the best point, plus its last (tiny) Newton step where that ended it
    estimate = np.where(close, np.clip(xb + np.nan_to_num(newton), lo, hi), xb)
    return Bracket(x=xb, f=fb, g=gx, h=hx, a=a, b=b, ga=g[rows, ka], ha=h[rows, ka],
                   gb=g[rows, kb], hb=h[rows, kb], both=has_a & has_b, newton=newton,
                   done=done, estimate=estimate)


def _hermite_root(a, b, ga, ha, gb, hb, iters: int = 60) -> np.ndarray:
    """Root in ``[a, b]`` of the cubic matching ``g`` and its derivative at both ends
    (``ga >= 0 >= gb``), by bisection on the cubic."""
    L = b - a

    def cubic(t):
        t2, t3 = t * t, t * t * t
        return ((2 * t3 - 3 * t2 + 1) * ga + (t3 - 2 * t2 + t) * L * ha
                + (-2 * t3 + 3 * t2) * gb + (t3 - t2) * L * hb)

    lo_t, hi_t = np.zeros_like(a), np.ones_like(a)
    for _ in range(iters):
        mid = 0.5 * (lo_t + hi_t)
        pos = cubic(mid) >= 0
        lo_t = np.where(pos, mid, lo_t)
        hi_t = np.where(pos, hi_t, mid)
    return a + 0.5 * (lo_t + hi_t) * L


def bracket_propose(best: Bracket, lo: float, hi: float,
                    k: int = BRACKET_POINTS) -> np.ndarray:
    """Next points per gene inside the bracket (one end of which is the best point).

    When the Newton point from the best falls inside: the Newton point, the root of the cubic
    interpolating the derivative at both bracket ends (or a doubled Newton step while one end
    is a range bound), and the bracket's midpoint (which at least halves it). Otherwise the
    bracket's quartiles. The first ``k`` of them; done genes repeat their best point."""
    a, b, xb = best.a, best.b, best.x
    step = np.nan_to_num(best.newton)
    span = b - a
    inner = lambda v: np.clip(v, a + 1e-3 * span, b - 1e-3 * span)  # noqa: E731
    newton = inner(np.where(np.isfinite(best.newton), xb + step, 0.5 * (a + b)))
    with np.errstate(all="ignore"):
        herm = _hermite_root(a, b, np.nan_to_num(best.ga), np.nan_to_num(best.ha),
                             np.nan_to_num(best.gb), np.nan_to_num(best.hb))
    second = inner(np.where(best.both, herm, xb + 2.0 * step))
    valid = np.isfinite(best.newton) & (xb + step > a) & (xb + step < b)
    guided = np.stack([newton, second, 0.5 * (a + b)], axis=1)
    quarters = a[:, None] + span[:, None] * np.array([0.25, 0.5, 0.75])[None, :]
    pts = np.where(valid[:, None], guided, quarters)[:, :k]
    pts = np.where(best.done[:, None], xb[:, None], pts)
    return np.clip(pts, lo, hi)
