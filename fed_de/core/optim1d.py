"""Per-gene maximisation in one variable (log dispersion) from evaluations done at the sites.

Every round the sites evaluate the objective's summands at ``K`` points per gene; the
aggregator combines them into exact values and first/second derivatives, keeps the best point
per gene, and proposes the next points: a safeguarded Newton step tried at a few lengths at
once (a parallel backtracking line search), so one round does what a sequential line search
does in several. Round 0 adds a coarse grid over the whole range to find the right basin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STEP_FRACTIONS = (1.0, 0.5, 0.125)
NOISE = 1e-12  # relative rounding noise of summed log likelihoods
X_TOL = 1e-7  # converged when the Newton step is below this (log scale)


@dataclass
class Search:
    """One search per gene: best point ``x`` with its objective ``f``, gradient ``g`` and
    curvature ``h``, the trust ``radius``, and whether the gene is ``done``."""

    x: np.ndarray
    f: np.ndarray
    g: np.ndarray
    h: np.ndarray
    radius: np.ndarray
    done: np.ndarray


def best_of(points, f, g, h) -> tuple[np.ndarray, ...]:
    """Best evaluated point per gene (NaN objective never wins): x, f, g, h."""
    score = np.where(np.isfinite(f), f, -np.inf)
    k = np.argmax(score, axis=1)
    rows = np.arange(points.shape[0])
    return points[rows, k], score[rows, k], g[rows, k], h[rows, k]


def newton_step(state: Search, lo: float, hi: float) -> np.ndarray:
    """Safeguarded Newton step from the best point, limited by the trust radius and bounds."""
    g, h, radius = state.g, state.h, state.radius
    with np.errstate(divide="ignore", invalid="ignore"):
        step = np.where(h < 0, -g / h, np.sign(g) * radius)
    step = np.clip(np.nan_to_num(step), -radius, radius)
    return np.clip(state.x + step, lo, hi) - state.x


def propose(state: Search, lo: float, hi: float) -> np.ndarray:
    """Candidate points of the next round: genes x len(STEP_FRACTIONS)."""
    step = newton_step(state, lo, hi)
    step = np.where(state.done, 0.0, step)
    return state.x[:, None] + step[:, None] * np.asarray(STEP_FRACTIONS)[None, :]


def start(points, f, g, h, radius: float, lo: float, hi: float) -> Search:
    """Search state after the first evaluation round."""
    x, fx, gx, hx = best_of(points, f, g, h)
    return with_done(x, fx, gx, hx, np.full(points.shape[0], radius), None, lo, hi)


def with_done(x, f, g, h, radius, done, lo: float, hi: float) -> Search:
    """A search state whose ``done`` flags add the convergence test at ``x``."""
    conv = converged(x, g, h, f, lo, hi)
    return Search(x=x, f=f, g=g, h=h, radius=radius, done=conv if done is None else done | conv)


def update(state: Search, points, f, g, h, lo: float, hi: float) -> Search:
    """Accept the best candidate when it improves the objective; shrink the radius if not.

    Differences below rounding noise do not decide anything (the first, longest step wins
    ties), so sites summing in another order follow the same path.
    """
    score = np.where(np.isfinite(f), f, -np.inf)
    noise = NOISE * (np.abs(np.nan_to_num(score[:, 0], neginf=0.0)) + 1.0)
    k = np.where(score.max(axis=1) > score[:, 0] + noise, np.argmax(score, axis=1), 0)
    rows = np.arange(points.shape[0])
    cand = {"x": points[rows, k], "f": score[rows, k], "g": g[rows, k], "h": h[rows, k]}
    slack = NOISE * (np.abs(np.nan_to_num(state.f, neginf=0.0)) + 1.0)
    better = (cand["f"] > state.f - slack) & ~state.done
    new = {k: np.where(better, cand[k], getattr(state, k)) for k in ("x", "f", "g", "h")}
    moved = np.abs(cand["x"] - state.x)
    # success: the radius may grow (a long convex stretch is crossed in few rounds)
    radius = np.where(better, np.maximum(2.0 * moved, state.radius), state.radius / 8.0)
    radius = np.minimum(radius, hi - lo)
    done = (state.done | converged(new["x"], new["g"], new["h"], new["f"], lo, hi)
            | (radius < X_TOL))
    return Search(**new, radius=radius, done=done)


def converged(x, g, h, f, lo: float, hi: float) -> np.ndarray:
    """At a stationary point (Newton step below X_TOL), at a bound it pushes against, or
    not finite."""
    with np.errstate(divide="ignore", invalid="ignore"):
        small = (h < 0) & (np.abs(g / h) < X_TOL)
    at_lo = (x <= lo) & (g <= 0)
    at_hi = (x >= hi) & (g >= 0)
    return small | at_lo | at_hi | ~np.isfinite(f)


def add_log_normal_prior(f, g, h, points: np.ndarray, mean: np.ndarray | None, var: float):
    """Add a normal prior on log(alpha) (mean per gene, common variance) to f, g, h."""
    if mean is None:
        return f, g, h
    dev = points - mean[:, None]
    return f - 0.5 * dev**2 / var, g - dev / var, h - 1.0 / var
