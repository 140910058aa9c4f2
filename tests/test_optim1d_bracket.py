"""The bracketed 1-D search (the screen's dispersions) finds known maxima.

``f(x) = (x - m) - exp(x - m)`` is concave with its maximum at ``x = m`` and, like an NB log
likelihood in log(alpha), asymmetric (exponential on one side, linear on the other). Genes
have maxima across the range, one above and one below it; start points are the screen's
(a rough start with two neighbours, anchors across the range).
"""

from __future__ import annotations

import numpy as np

from fed_de.core import optim1d

LO, HI = float(np.log(1e-9)), float(np.log(10.0))


def _evaluate(points: np.ndarray, m: np.ndarray):
    d = points - m[:, None]
    return d - np.exp(d), 1.0 - np.exp(d), -np.exp(d)


def _search(m: np.ndarray, start: np.ndarray, rounds: int):
    G = m.size
    anchors = [LO, np.log(1e-3), np.log(0.1), np.log(10.0), HI]
    points = np.clip(np.column_stack([start, start - 1, start + 1,
                                      *[np.full(G, a) for a in anchors]]), LO, HI)
    ev = optim1d.bracket_start(points, *_evaluate(points, m))
    best = optim1d.bracket_best(ev, LO, HI)
    spans = [best.b - best.a]
    for _ in range(rounds):
        points = optim1d.bracket_propose(best, LO, HI)
        assert points.shape == (G, optim1d.BRACKET_POINTS)
        ev = optim1d.bracket_add(ev, points, *_evaluate(points, m))
        best = optim1d.bracket_best(ev, LO, HI)
        spans.append(best.b - best.a)
    return best, ev, spans


def test_bracketed_search_finds_maxima_and_bounds():
    rng = np.random.default_rng(0)
    m = np.concatenate([rng.uniform(-15.0, 2.0, 198), [5.0, -25.0]])
    best, ev, spans = _search(m, m + rng.normal(0.0, 2.0, m.size), rounds=6)
    assert best.done.all()
    np.testing.assert_allclose(best.estimate[:-2], m[:-2], atol=1e-6, rtol=0)
    # maxima beyond the range end at the bound they push against
    assert best.estimate[-2] == HI and best.estimate[-1] == LO
    # every evaluation is kept: 8 start points, then 3 per round
    assert ev.x.shape == (m.size, 8 + 6 * optim1d.BRACKET_POINTS)
    # brackets never widen
    for before, after in zip(spans[:-1], spans[1:], strict=True):
        assert (after <= before + 1e-12).all()


def test_done_genes_repeat_their_best_point():
    m = np.array([-3.0, 1.0])
    best, _, _ = _search(m, m, rounds=3)
    assert best.done.all()
    points = optim1d.bracket_propose(best, LO, HI)
    np.testing.assert_array_equal(points, np.repeat(best.x[:, None], 3, axis=1))
