"""Unit tests of :mod:`fed_de.core.optim1d` (the per-gene 1-D maximisation over rounds).

Reference: functions whose maximiser is known in closed form (``-cosh(x - c)``,
``a x - exp(x)``, a tilted double well), with bounds that are active for some genes; the
search must end within its tolerance (Newton step below 1e-7) of the known answer.
"""

from __future__ import annotations

import numpy as np

from fed_de.core import optim1d

LO, HI = -20.0, 5.0


def cosh_family(c):
    """f = -cosh(x - c): maximiser c (clipped to the bounds)."""
    def fgh(x):
        d = x - c[:, None]
        return -np.cosh(d), -np.sinh(d), -np.cosh(d)
    return fgh


def exp_family(a):
    """f = a x - exp(x): maximiser log(a)."""
    def fgh(x):
        e = np.exp(x)
        return a[:, None] * x - e, a[:, None] - e, -e
    return fgh


def run(fgh, start_points, rounds: int = 40):
    f, g, h = fgh(start_points)
    state = optim1d.start(start_points, f, g, h, radius=3.0, lo=LO, hi=HI)
    for r in range(rounds):
        if state.done.all():
            return state, r
        pts = optim1d.propose(state, LO, HI)
        state = optim1d.update(state, pts, *fgh(pts), LO, HI)
    return state, rounds


def grid(G: int) -> np.ndarray:
    return np.broadcast_to(np.linspace(LO, HI, 6), (G, 6)).copy()


def test_reaches_known_maximisers_and_active_bounds():
    c = np.array([-19.5, -7.3, -1.0, 0.0, 0.25, 4.9, 8.0, -25.0])
    state, rounds = run(cosh_family(c), grid(c.size))
    assert state.done.all() and rounds <= 8  # measured 5
    np.testing.assert_allclose(state.x, np.clip(c, LO, HI), rtol=0, atol=1e-7)
    assert state.x[6] == HI and state.x[7] == LO  # maximiser outside: ends on the bound


def test_non_quadratic_maximiser_from_a_far_start():
    a = np.array([1e-6, 1e-3, 0.5, 1.0, 7.0, 100.0])
    start = np.full((a.size, 1), -15.0)  # one start point, far from most maximisers
    state, rounds = run(exp_family(a), start)
    assert state.done.all() and rounds <= 10  # measured 8
    np.testing.assert_allclose(state.x, np.log(a), rtol=0, atol=1e-7)


def test_the_start_grid_picks_the_global_basin():
    # f = -(x^2 - 1)^2 + 0.3 x: local maxima near -0.96 and 1.04; the global one near 1.04
    def fgh(x):
        return -(x * x - 1) ** 2 + 0.3 * x, -4 * x * (x * x - 1) + 0.3, -12 * x * x + 4

    start = np.broadcast_to(np.array([-1.2, 0.9, 3.0]), (2, 3)).copy()
    state, _ = run(fgh, start)
    roots = np.roots([-4, 0, 4, 0.3])
    best = roots[np.argmax([fgh(np.array([[r.real]]))[0][0, 0] for r in roots])].real
    np.testing.assert_allclose(state.x, best, atol=1e-7)


def test_nan_never_wins_and_done_genes_never_move():
    pts = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    f = np.array([[-1.0, np.nan, -3.0], [-2.0, -1.0, np.inf * -1]])
    g = np.zeros_like(f)
    h = -np.ones_like(f)
    x, fx, _, _ = optim1d.best_of(pts, f, g, h)
    np.testing.assert_array_equal(x, [0.0, 1.0])
    state = optim1d.Search(x=np.array([0.0, 0.0]), f=np.array([-1.0, -1.0]),
                           g=np.array([1.0, 1.0]), h=np.array([-1.0, -1.0]),
                           radius=np.array([1.0, 1.0]), done=np.array([True, False]))
    cand = optim1d.propose(state, LO, HI)
    np.testing.assert_array_equal(cand[0], 0.0)  # a done gene proposes its own point
    better = np.array([[0.0, 10.0, 10.0], [10.0, 10.0, 10.0]])
    new = optim1d.update(state, cand, better, np.zeros_like(better), -np.ones_like(better),
                         LO, HI)
    assert new.x[0] == 0.0 and new.f[0] == -1.0 and new.done[0]
    nan_only = np.full_like(better, np.nan)
    new = optim1d.update(state, cand, nan_only, nan_only, nan_only, LO, HI)
    assert new.x[1] == 0.0 and new.f[1] == -1.0 and new.radius[1] < state.radius[1]


def test_ties_below_rounding_noise_go_to_the_longest_step():
    state = optim1d.Search(x=np.zeros(1), f=np.array([-100.0]), g=np.ones(1), h=-np.ones(1),
                           radius=np.ones(1), done=np.zeros(1, dtype=bool))
    cand = optim1d.propose(state, LO, HI)
    f = np.array([[-50.0, -50.0 + 1e-12, -50.0 - 1e-9]])  # within 1e-12 * |f|
    new = optim1d.update(state, cand, f, np.zeros_like(f), -np.ones_like(f), LO, HI)
    assert new.x[0] == cand[0, 0]
