"""DESeq2's dispersion searches, gene-wise and MAP, step for step, in few federated rounds.

R's result is where its procedure stops, not the optimum: the line search ``fitDisp`` from
its start (rough/moments estimate, or the MAP start), its Armijo backtracking, kappa rules,
``dispTol`` and ``maxit``; ``noIncrease``; the grid refit ``fitDispGrid`` of the searches
that did not converge; the bounds. This module reproduces that path.

- The port (:func:`path_start`, :func:`path_proposal`, :func:`path_step`,
  :func:`genewise_decisions`, :func:`map_decisions`, :func:`map_start`, :func:`coarse_grid`,
  :func:`fine_grid`, :func:`grid_result`) is R's procedure, one evaluation per iteration,
  kept for exact agreement with R DESeq2 1.38: src/DESeq2.cpp ``fitDisp``, ``fitDispGrid``;
  R/core.R ``estimateDispersionsGeneEst``, ``estimateDispersionsMAP``; R/wrappers.R
  ``fitDispGridWrapper``.
- The round scheme (:func:`start`, :func:`propose`, :func:`update`, :func:`result`) follows
  that path from evaluations batched in rounds. Each round the sites evaluate, at the points
  asked, the summands of the Cox-Reid adjusted log likelihood; the aggregator keeps every
  value ``f`` and derivatives ``g, h`` in log(alpha), interpolates between them
  (:mod:`fed_de.core.disp_surrogate`), runs R's loop on that surrogate with error bounds,
  and settles a gene when every decision of R's on its path (Armijo, dispTol, the
  min_log_alpha break, noIncrease, the refit rule, the grid's argmax) holds whatever the
  errors and the final log(alpha) is known to VALUE_TOL. Otherwise it asks for the points
  that decide: the first uncertain decision, the path points with the largest errors, and
  support points along and ahead of the predicted path.

Everything is vectorised over genes; the objective is never computed here.
"""

from __future__ import annotations

import numpy as np

from fed_de.core import disp_surrogate as sur

KAPPA_0 = 1.0  # initial step length (``kappa_0``)
EPSILON = 1e-4  # Armijo constant of fitDisp
DISP_TOL = 1e-6  # ``dispTol``: stop when an accepted step gains less
MAXIT = 100  # ``maxit``
LOG_LO, LOG_HI = -30.0, 10.0  # fitDisp never proposes beyond these
MIN_DISP = 1e-8
GRID_N = 20  # points of each of fitDispGrid's two grids


# -- R's line search, one iteration at a time ----------------------------------------------------
def path_start(a0: np.ndarray, f0: np.ndarray, g0: np.ndarray,
               min_log_alpha: float = float(np.log(MIN_DISP / 10))) -> dict:
    """State of ``fitDisp`` before its first iteration, from the objective at the start."""
    G = a0.shape[0]
    return {"a": a0.astype(float), "lp": f0.astype(float), "dlp": g0.astype(float),
            "kappa": np.full(G, KAPPA_0), "iter": np.zeros(G, dtype=int),
            "iter_accept": np.zeros(G, dtype=int), "initial_lp": f0.astype(float),
            "done": np.zeros(G, dtype=bool), "min_log_alpha": float(min_log_alpha)}


def path_proposal(path: dict) -> tuple[np.ndarray, np.ndarray]:
    """Next proposal ``a + kappa * dlp`` and the (possibly shortened) ``kappa`` behind it.

    fitDisp shortens kappa itself so the proposal stays in [-30, 10]; the shortened kappa is
    kept for the following iterations, as in R.
    """
    a, dlp, kappa = path["a"], path["dlp"], path["kappa"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        prop = a + kappa * dlp
        kappa = np.where(prop < LOG_LO, (LOG_LO - a) / dlp, kappa)
        kappa = np.where(prop > LOG_HI, (LOG_HI - a) / dlp, kappa)
        prop = a + kappa * dlp
    return prop, kappa


def path_step(path: dict, f: np.ndarray, g: np.ndarray, active: np.ndarray | None = None,
              noise: float = 0.0) -> dict:
    """One iteration of fitDisp's loop for the ``active`` genes, given ``f``, ``g`` at their
    proposals (:func:`path_proposal`).

    ``noise`` (relative) widens the Armijo test by rounding noise so that sums added in a
    different order take the same decision; 0 reproduces R's comparison exactly.
    """
    act = ~path["done"] if active is None else active & ~path["done"]
    prop, kappa = path_proposal(path)
    lp, dlp = path["lp"], path["dlp"]
    with np.errstate(invalid="ignore", over="ignore"):
        slack = noise * (np.abs(lp) + 1.0)
        accept = act & (-f <= -lp - kappa * EPSILON * dlp**2 + slack)
        change = f - lp
    it = path["iter"] + act
    acc = path["iter_accept"] + accept
    small = accept & (change < DISP_TOL)
    below = accept & ~small & (prop < path["min_log_alpha"])
    go_on = accept & ~small & ~below
    new = dict(path)
    new["iter"], new["iter_accept"] = it, acc
    new["a"] = np.where(accept, prop, path["a"])
    # R breaks before updating lp when log(alpha) ran below min_log_alpha
    new["lp"] = np.where(small | go_on, f, lp)
    new["dlp"] = np.where(go_on, g, dlp)
    grown = np.fmin(kappa * 1.1, KAPPA_0)
    grown = np.where(acc % 5 == 0, grown / 2.0, grown)
    new["kappa"] = np.where(go_on, grown, np.where(act & ~accept, kappa / 2.0, path["kappa"]))
    new["done"] = path["done"] | small | below | (act & (it >= MAXIT))
    return new


# -- R's decisions after the search ----------------------------------------------------------
def genewise_decisions(path: dict, alpha_init: np.ndarray, max_disp: float,
                       min_disp: float = MIN_DISP) -> dict:
    """estimateDispersionsGeneEst after fitDisp: ``noIncrease`` keeps the start, and genes not
    converged (``iter == maxit`` or ``iter == 1``) above ``10 * minDisp`` go to the grid.

    Returns ``disp`` (before any grid refit, unclipped below) and the boolean ``refit``.
    """
    est = np.fmin(np.exp(path["a"]), max_disp)
    initial = path["initial_lp"]
    no_increase = path["lp"] < initial + np.abs(initial) / 1e6
    est = np.where(no_increase, alpha_init, est)
    conv = (path["iter"] < MAXIT) & (path["iter"] != 1)
    return {"disp": est, "refit": ~conv & (est > min_disp * 10), "iter": path["iter"]}


def map_decisions(path: dict) -> dict:
    """estimateDispersionsMAP after fitDisp: genes at ``maxit`` go to the grid."""
    return {"disp": np.exp(path["a"]), "refit": path["iter"] >= MAXIT, "iter": path["iter"]}


def map_start(disp_gene: np.ndarray, disp_fit: np.ndarray) -> np.ndarray:
    """MAP start of estimateDispersionsMAP: the gene-wise value unless it is an order of
    magnitude below the trend (or missing); then the trend."""
    with np.errstate(invalid="ignore"):
        init = np.where(disp_gene > 0.1 * disp_fit, disp_gene, disp_fit)
    return np.where(np.isnan(init), disp_fit, init)


# -- fitDispGrid -----------------------------------------------------------------------------
def coarse_grid(n_samples: int) -> np.ndarray:
    """fitDispGridWrapper's grid: 20 points from log(1e-8) to log(max(10, n))."""
    return np.linspace(np.log(1e-8), np.log(max(10.0, float(n_samples))), GRID_N)


def fine_grid(coarse: np.ndarray, f: np.ndarray, noise: float = 0.0) -> np.ndarray:
    """Second grid of fitDispGrid: 20 points over +- one coarse step around the best coarse
    point (genes x 20). Ties within ``noise`` go to the first point, as arma's ``max``."""
    best = coarse[argmax_first(f, noise)]
    delta = coarse[1] - coarse[0]
    return np.linspace(best - delta, best + delta, GRID_N, axis=-1)


def grid_result(points: np.ndarray, f: np.ndarray, noise: float = 0.0) -> np.ndarray:
    """log(alpha) of the best fine-grid point per gene."""
    return points[np.arange(points.shape[0]), argmax_first(f, noise)]


def argmax_first(f: np.ndarray, noise: float = 0.0) -> np.ndarray:
    """First index whose value is within ``noise`` (relative) of the row maximum; NaN never
    wins (arma's ``max`` skips NaN)."""
    score = np.where(np.isnan(f), -np.inf, f)
    top = score.max(axis=-1, keepdims=True)
    tol = noise * (np.abs(np.where(np.isfinite(top), top, 0.0)) + 1.0)
    return np.argmax(score >= top - tol, axis=-1)


# -- following R's path on the surrogate ------------------------------------------------------
FAR = 0.35  # an accepted step this far outside the evaluated points is evaluated
FAR_INSIDE = 1.0  # ... and one this far from any evaluated point inside them
VALUE_TOL = 1e-8  # bound on the error of a final log(alpha) that the result uses
FILL_MARGIN = 0.5  # support points reach this far beyond the predicted path
FILL_AHEAD = 0.5  # ... and, ahead of its end, this fraction of its length
FILL_GAP = 0.15  # ... and go only where evaluated points are farther apart
MIN_GAP = 5e-3  # points asked for in one round are at least this far apart
LADDER = 8  # backtracking proposals sent at once for a coin-toss Armijo test
# A step that lands on the optimum gains ~kappa dlp^2 -> 0+: sums added in another order
# (another site split) move that by ~1e-16 |lp|, to either side of R's threshold 0. The
# threshold moves to -1e-14 |lp|, away from that cluster, so every split decides alike.
ARMIJO_SLACK = 1e-14
REPLAY_BLOCK = 2048  # genes replayed at once (:func:`replay`): bounds its memory


def replay(a0: np.ndarray, mem: dict, prior: dict | None, n_samples: int, k: int,
           todo: np.ndarray, genewise: dict | None = None) -> dict:
    """Run fitDisp from ``a0`` on the surrogate of ``mem`` for the genes in ``todo``.

    Error bounds (:func:`disp_surrogate.error_bounds`) are carried along the path to first
    order (a position error ``d`` becomes ``(1 + kappa h) d`` after a step) and decide
    whether each of R's decisions is certain: the Armijo test, ``change < dispTol``, the
    ``min_log_alpha`` break and, for the gene-wise search (``genewise``: ``alpha_init``,
    ``max_disp``, ``min_disp``), ``noIncrease`` and the grid-refit threshold.

    Returns
    -------
    dict
        ``path`` (:func:`path_start` keys; genes outside ``todo`` have ``iter`` 0), ``ua``
        (bound on the final log alpha), ``certain`` (all decisions certain, and the final
        log alpha within VALUE_TOL where the result uses it) and ``need``: up to ``k``
        points per uncertain gene to evaluate next (NaN-padded).
    """
    G = a0.shape[0]
    out = {"path": path_start(a0, np.full(G, np.nan), np.full(G, np.nan)),
           "ua": np.zeros(G), "certain": np.zeros(G, dtype=bool),
           "need": np.full((G, k), np.nan)}
    out["path"]["done"][:] = True
    todo_rows = np.flatnonzero(todo)
    # genes are independent: blocks bound the path's per-iteration arrays (every step of
    # every gene is kept until the points are picked: ~0.5 GB at 30,000 genes at once)
    for lo in range(0, todo_rows.size, REPLAY_BLOCK):
        rows = todo_rows[lo:lo + REPLAY_BLOCK]
        pri = None if prior is None else {"mean": prior["mean"][rows], "var": prior["var"]}
        gw = None if genewise is None else dict(genewise,
                                                 alpha_init=genewise["alpha_init"][rows])
        part = _replay(a0[rows], sur.memory_rows(mem, rows), pri, n_samples, k, gw)
        for key, val in part["path"].items():
            if isinstance(val, np.ndarray):
                out["path"][key][rows] = val
        for key in ("ua", "certain", "need"):
            out[key][rows] = part[key]
    return out


def _replay(a0: np.ndarray, mem: dict, prior: dict | None, n_samples: int, k: int,
            genewise: dict | None) -> dict:
    """:func:`replay` on the genes it is given."""
    G = a0.shape[0]
    ix = sur.index(mem)
    s0 = _surrogate_at(ix, a0, prior, np.ones(G, dtype=bool))
    e0 = sur.error_bounds(s0, a0, n_samples, 0.0)
    path = path_start(a0, s0["f"], s0["g"])
    ua, ulp, eps_g, h_a = np.zeros(G), e0["f"], e0["g"], s0["h"]
    sure = np.ones(G, dtype=bool)
    # every point of the path is a candidate for evaluation, the start included
    steps = [(a0, np.ones(G, dtype=bool), sur.SAFETY * (s0["ef"] + s0["eg"]))]
    # a coin toss on the first gene-wise proposal decides iter == 1, hence a grid refit,
    # unless the start is at the floor (where noIncrease keeps it below 10 * minDisp)
    first_toss = np.zeros(G, dtype=bool) if genewise is None else (
        a0 > np.log(10 * genewise["min_disp"]))
    while not path["done"].all():
        act = ~path["done"]
        prop, kappa = path_proposal(path)
        s = _surrogate_at(ix, prop, prior, act)
        with np.errstate(invalid="ignore", over="ignore"):
            up = np.abs(1.0 + kappa * h_a) * ua + np.abs(kappa) * eps_g
            e = sur.error_bounds(s, prop, n_samples, up)
            own = sur.error_bounds(s, prop, n_samples, 0.0)  # the surrogate's own part
        ok, noisy = _certain_step(path, prop, kappa, s, e, ulp, eps_g, up,
                                  first_toss & (path["iter"] == 0))
        bad = act & ~ok
        score = sur.SAFETY * (s["ef"] + np.abs(kappa) * s["eg"])
        steps.append((prop, act, np.where(bad & sure, np.inf, score)))
        ladder = act & noisy & sure
        if ladder.any():  # R's backtracking proposals after this one, all exact
            for j in range(1, LADDER):
                steps.append((path["a"] + kappa * 0.5**j * path["dlp"], ladder,
                              np.full(G, np.inf)))
        sure &= ~bad
        new = path_step(path, s["f"], s["g"], noise=ARMIJO_SLACK)
        moved = act & (new["iter_accept"] > path["iter_accept"])
        ua = np.where(moved, up, ua)
        ulp = np.where(moved & (new["lp"] != path["lp"]), e["f"], ulp)
        eps_g = np.where(moved, own["g"], eps_g)  # position errors go through ua
        h_a = np.where(moved, s["h"], h_a)
        path = new
    uses_a = np.ones(G, dtype=bool) if genewise is None else np.zeros(G, dtype=bool)
    refit = path["iter"] >= MAXIT
    if genewise is not None:
        ok, no_inc, refit = _certain_genewise(path, ulp + e0["f"], ua, e0["noise"], genewise)
        sure &= ok
        uses_a = ~no_inc & ~refit
        steps.append((path["a"], ~ok, np.full(G, np.inf)))  # settles both lp's
    precise = ~uses_a | refit | (ua <= VALUE_TOL)
    certain = sure & precise
    return {"path": path, "ua": ua, "certain": certain,
            "need": _pick_needed(steps, k, ~certain, mem)}


def _surrogate_at(ix: dict, x: np.ndarray, prior: dict | None, rows: np.ndarray) -> dict:
    """:func:`disp_surrogate.surrogate` for the genes in ``rows`` (NaN for the others)."""
    idx = np.flatnonzero(rows)
    pri = None if prior is None else {"mean": prior["mean"][idx], "var": prior["var"]}
    part = sur.surrogate(ix, x[idx], pri, rows=idx)
    out = {key: np.full(x.shape, np.nan) for key in part}
    for key, val in part.items():
        out[key][idx] = val
    return out


def _certain_step(path, prop, kappa, s, e, ulp, eps_g, up, relevant) -> tuple:
    """Whether R's decisions at this proposal hold whatever the errors: the Armijo test,
    then (on acceptance) ``change < dispTol`` and the ``min_log_alpha`` break.

    An Armijo test closer than rounding noise is a coin toss in R too; where the gene's
    result depends on it (``relevant``: a first gene-wise step accepted with no gain makes
    ``iter == 1``, a grid refit), it is decided by an evaluated value, as the port does,
    else by the surrogate (the path's end moves by rounding noise at most). Returns
    ``(ok, noisy)``; ``noisy``: a relevant coin toss on a point not evaluated yet.
    """
    lp, dlp = path["lp"], path["dlp"]
    with np.errstate(invalid="ignore", over="ignore"):
        margin = s["f"] - (lp + kappa * EPSILON * dlp**2) + ARMIJO_SLACK * (np.abs(lp) + 1.0)
        umargin = e["f"] + ulp + 2.0 * np.abs(kappa) * EPSILON * np.abs(dlp) * eps_g
        accept = margin >= 0
        toss = np.abs(margin) <= e["noise"]
        noisy = toss & relevant & (s["dist"] > 0)
        armijo = np.where(toss, ~noisy, np.abs(margin) > umargin)
        uchange = e["f"] + ulp
        tol = (np.abs(s["f"] - lp - DISP_TOL) > uchange) | (uchange < e["noise"])
        below = np.abs(prop - path["min_log_alpha"]) > up
    far = (s["dist"] > FAR_INSIDE) | (s["outside"] > FAR)
    ok = armijo & (~accept | (tol & below & ~far)) & np.isfinite(s["f"])
    # a proposal on the current point (kappa cut to 0 at a bound) is a certain accept
    return ok | (prop == path["a"]), noisy


def _certain_genewise(path, ulp_total, ua, noise, gw) -> tuple:
    """noIncrease and the grid-refit threshold of estimateDispersionsGeneEst, with whether
    they hold whatever the errors (``ulp_total``: bound on last_lp - initial_lp)."""
    initial = path["initial_lp"]
    margin = path["lp"] - (initial + np.abs(initial) / 1e6)
    no_inc = margin < 0
    ok = (np.abs(margin) > ulp_total) | (ulp_total < noise)
    dec = genewise_decisions(path, gw["alpha_init"], gw["max_disp"], gw["min_disp"])
    unconv = (path["iter"] >= MAXIT) | (path["iter"] == 1)
    threshold = np.log(gw["min_disp"] * 10)
    ok &= no_inc | ~unconv | (np.abs(path["a"] - threshold) > ua)
    return ok, no_inc, dec["refit"]


def _nearest_gap(a: np.ndarray, b: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Per gene, each ``a`` point's distance to the nearest ``b`` point (genes x m and
    genes x w, NaN-padded; NaN ignored, ``inf`` when no point) for the genes in ``rows``
    (all by default; ``inf`` elsewhere). Compiled (:func:`fed_de.core.kernels.nearest_gap`):
    no genes x m x w table."""
    from fed_de.core.kernels import nearest_gap  # numba: loaded when used

    out = np.full(a.shape, np.inf)
    todo = np.arange(a.shape[0]) if rows is None else np.flatnonzero(rows)
    nearest_gap(np.ascontiguousarray(a, dtype=np.float64),
                np.ascontiguousarray(b, dtype=np.float64), todo, out)
    return out


def _pick_needed(steps: list, k: int, open_: np.ndarray, mem: dict) -> np.ndarray:
    """Up to ``k`` points per open gene to evaluate next: the first uncertain decision, then
    the path points with the largest surrogate errors (MIN_GAP apart, not yet evaluated),
    then support points over the predicted path's range where evaluated points are sparse."""
    pts = np.array([p for p, _, _ in steps]).T  # genes x steps
    act = np.array([a for _, a, _ in steps]).T & np.isfinite(pts) & open_[:, None]
    score = np.where(act, np.array([sc for _, _, sc in steps]).T, -np.inf)
    score = np.where(_nearest_gap(pts, mem["x"], open_) < 1e-12, -np.inf, score)
    G = pts.shape[0]
    rows = np.arange(G)
    need = np.full((G, k), np.nan)
    for j in range(k):  # best remaining candidate, then drop those too close to it
        best = np.argmax(score, axis=1)
        top = score[rows, best]
        take = (top > -np.inf) & ((top > 0) | (j == 0))
        pick = np.where(take, pts[rows, best], np.nan)
        need[:, j] = pick
        gap = np.where(np.isinf(top), 1e-12, MIN_GAP)  # must-haves need only differ
        with np.errstate(invalid="ignore"):
            close = np.abs(pts - pick[:, None]) < gap[:, None]
        score = np.where(close | ~take[:, None], -np.inf, score)
    # support points ahead of (and around) the predicted path
    first = pts[:, 0]
    ends = np.where(act, pts, np.nan)
    lo, hi = np.nanmin(np.where(act, pts, np.inf), axis=1), np.nanmax(
        np.where(act, pts, -np.inf), axis=1)
    last = ends[rows, np.maximum(act.shape[1] - 1 - np.argmax(act[:, ::-1], axis=1), 0)]
    ahead = np.fmax(FILL_MARGIN, FILL_AHEAD * np.abs(last - first))
    lo = lo - np.where(last < first, ahead, FILL_MARGIN)
    hi = hi + np.where(last > first, ahead, FILL_MARGIN)
    room = k - np.isfinite(need).sum(axis=1)
    fill = _support(np.concatenate([mem["x"], need], axis=1), lo, hi, room)
    return _pad(_merge(need, fill), k)


def _support(have: np.ndarray, lo: np.ndarray, hi: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Up to ``room`` points per gene in [lo, hi], each in the widest remaining gap between
    ``have`` and the points already chosen: with nodes all along the predicted path, one
    round usually settles it. Genes with no finite range or room get none."""
    G = lo.shape[0]
    n = int(np.max(room, initial=0))
    out = np.full((G, max(n, 0)), np.nan)
    ok = np.isfinite(lo) & np.isfinite(hi) & (room > 0)
    if n <= 0 or not ok.any():
        return out
    lo_, hi_ = np.clip(np.where(ok, lo, 0.0), LOG_LO, LOG_HI), np.clip(np.where(ok, hi, 0.0),
                                                                      LOG_LO, LOG_HI)
    cand = lo_[:, None] + (hi_ - lo_)[:, None] * np.linspace(0.0, 1.0, 4 * n + 9)[None, :]
    gap = _nearest_gap(cand, have)
    rows = np.arange(G)
    for j in range(n):
        best = np.argmax(gap, axis=1)
        take = ok & (j < room) & (gap[rows, best] >= FILL_GAP)
        out[:, j] = np.where(take, cand[rows, best], np.nan)
        gap = np.fmin(gap, np.where(take[:, None], np.abs(cand - out[:, j:j + 1]), np.inf))
    return out


# -- fitDispGrid on the surrogate -------------------------------------------------------------
def grid_argmax(mem: dict, points: np.ndarray, prior: dict | None, n_samples: int,
                todo: np.ndarray) -> dict:
    """Best of ``points`` (genes x Q: one of fitDispGrid's grids) by the surrogate, whether
    that choice is certain, and the points to evaluate before it is.

    Certain when no other point's upper bound reaches the best one's lower bound, or when
    the best and every contender are evaluated points (their tie is decided as arma's
    ``max``, first index: R's own rounding noise decides such a tie too).
    """
    G, Q = points.shape
    F, E = np.full((G, Q), -np.inf), np.zeros((G, Q))
    rows = np.flatnonzero(todo)
    if rows.size:
        ix = sur.index(sur.memory_rows(mem, rows))
        pri = None if prior is None else {"mean": prior["mean"][rows], "var": prior["var"]}
        for q in range(Q):
            x = points[rows, q]
            s = sur.surrogate(ix, x, pri)
            e = sur.error_bounds(s, x, n_samples, 0.0)
            F[rows, q] = np.where(np.isfinite(s["f"]), s["f"], -np.inf)
            E[rows, q] = np.where(np.isfinite(e["f"]), e["f"], np.inf)
    best = argmax_first(F)
    at = np.arange(G)
    contender = F + E >= (F[at, best] - E[at, best])[:, None]
    contender[at, best] = False
    unsure = (contender & (E > 0)).any(axis=1) | (contender.any(axis=1) & (E[at, best] > 0))
    certain = todo & ~unsure
    contender[at, best] = True
    return {"best": best, "certain": certain,
            "need": contender & (E > 0) & (todo & ~certain)[:, None]}


# -- the search, driven by evaluation rounds --------------------------------------------------
FIRST_OFFSETS = (0.0, -0.3, 0.3, -0.8, 0.8, -1.6, 1.6, -3.0, 3.0, -5.0)
FLOOR_ANCHORS = (-7.0, 2.0)  # range of the first points of a gene that starts at 1e-8
POINTS_PER_ROUND = 12
LATE_ROUND, LATE_POINTS = 2, 32  # from the third round the few genes still open take more
GRID_WIDTH = 80  # points per round of a gene on fitDispGrid's grids (a few per cent)
SPEC_ITER = 30  # an open path predicted this long starts on the grid speculatively
FINE_SUPPORT = 8  # support points over the expected fine grid, sent with the coarse one
MAX_ROUNDS = 5
PREFETCH_POINTS = 4  # MAP points per gene sent in a gene-wise round's free slots
STAGE_PATH, STAGE_COARSE, STAGE_FINE, STAGE_DONE = 0, 1, 2, 3


def start(a0: np.ndarray, *, n_samples: int, max_disp: float, prior: dict | None = None,
          alpha_init: np.ndarray | None = None, memory: dict | None = None,
          active: np.ndarray | None = None, max_rounds: int = MAX_ROUNDS,
          k: int = POINTS_PER_ROUND, k_late: int = LATE_POINTS,
          min_disp: float = MIN_DISP) -> dict:
    """Start DESeq2's gene-wise (``prior=None``) or MAP dispersion search.

    Parameters
    ----------
    a0
        Start per gene, log scale: log(alpha_hat) (rough/moments estimate clipped to
        [minDisp, maxDisp]) for the gene-wise search, log(:func:`map_start`) for MAP.
    n_samples, max_disp
        Number of samples (fitDispGrid's range) and DESeq2's ``maxDisp = max(10, n)``.
    prior
        MAP only: ``{"mean": log(dispFit) per gene, "var": dispPriorVar}``.
    alpha_init
        Gene-wise only: what ``noIncrease`` restores (default ``exp(a0)``).
    memory
        Evaluations already made (``state["memory"]`` of an earlier search: the objective
        without prior is the same for the gene-wise and MAP searches).
    active
        Genes to search (not the all-zero ones); the others come back NaN.
    max_rounds
        Rounds of the compute plan: after the last, a gene still uncertain takes the
        surrogate's prediction and is flagged ``uncertain`` in :func:`result`.
    k, k_late
        Points per gene per round (from the third round on: ``k_late``).

    Returns
    -------
    dict
        Search state; :func:`propose` gives the first round's points (none when the memory
        already settles every gene).
    """
    G = a0.shape[0]
    active = np.ones(G, dtype=bool) if active is None else np.asarray(active, dtype=bool)
    a0 = np.where(active, a0, 0.0)
    state = {
        "a0": a0, "prior": prior, "n_samples": int(n_samples), "max_disp": float(max_disp),
        "min_disp": float(min_disp), "k": int(k), "k_late": int(k_late),
        "max_rounds": int(max_rounds), "round": 0, "active": active,
        "alpha_init": np.exp(a0) if alpha_init is None else np.asarray(alpha_init, float),
        "memory": sur.memory_empty(G) if memory is None else memory,
        "stage": np.where(active, STAGE_PATH, STAGE_DONE),
        "a": np.full(G, np.nan), "iter": np.zeros(G, dtype=int),
        "refit": np.zeros(G, dtype=bool), "last_lp": np.full(G, np.nan),
        "initial_lp": np.full(G, np.nan), "grid_a": np.full(G, np.nan),
        "fine": np.full((G, GRID_N), np.nan), "uncertain": np.zeros(G, dtype=bool),
        "evaluated": np.zeros(G, dtype=int),
    }
    if memory is None:
        state["points"] = np.where(active[:, None], _first_points(a0, min_disp), np.nan)
    else:
        _advance(state)
    return state


def propose(state: dict) -> np.ndarray:
    """Points (genes x width, log alpha) the sites evaluate this round; NaN: none."""
    return state["points"]


def update(state: dict, points: np.ndarray, f: np.ndarray, g: np.ndarray,
           h: np.ndarray) -> dict:
    """Take a round's sums and advance.

    ``f, g, h`` (same shape as ``points``) are the Cox-Reid adjusted log likelihood, without
    prior, and its first two derivatives in log alpha; values at NaN points are ignored.
    ``points`` may hold more than :func:`propose` asked (see :func:`merge_points`).
    """
    new = {key: (val.copy() if isinstance(val, np.ndarray) else val)
           for key, val in state.items()}
    new["memory"] = sur.memory_add(state["memory"], points, f, g, h)
    new["evaluated"] = state["evaluated"] + np.isfinite(points).sum(axis=1)
    new["round"] = state["round"] + 1
    _advance(new)
    return new


def done(state: dict) -> bool:
    """Whether the search is over (no point left to evaluate)."""
    return not np.isfinite(state["points"]).any()


def result(state: dict) -> dict:
    """DESeq2's estimates from the search.

    Returns
    -------
    dict
        ``disp``: dispGeneEst or dispMAP (after noIncrease, grid refit and clipping to
        [minDisp, maxDisp]; NaN for inactive genes); ``iter``: dispGeneIter / dispIter;
        ``refit``: grid-refitted; ``uncertain``: closed by the round cap on a prediction;
        ``final``: settled (before the search is done, the others carry the surrogate's
        prediction: a provisional result); ``evaluated``: points evaluated per gene;
        ``rounds``.
    """
    lo, hi = state["min_disp"], state["max_disp"]
    est = np.exp(state["a"])
    if state["prior"] is None:
        est = np.fmin(est, hi)
        initial = state["initial_lp"]
        no_increase = state["last_lp"] < initial + np.abs(initial) / 1e6
        est = np.where(no_increase, state["alpha_init"], est)
    est = np.where(state["refit"] & np.isfinite(state["grid_a"]), np.exp(state["grid_a"]), est)
    return {"disp": np.where(state["active"], np.clip(est, lo, hi), np.nan),
            "iter": state["iter"], "refit": state["refit"], "uncertain": state["uncertain"],
            "final": state["stage"] == STAGE_DONE, "evaluated": state["evaluated"],
            "rounds": state["round"]}


def merge_points(points: np.ndarray, extra: np.ndarray, width: int) -> np.ndarray:
    """Fill each gene's free slots of ``points`` with ``extra`` (e.g. a MAP search's points,
    prefetched during the gene-wise rounds): ``width`` columns, NaN-padded."""
    return _pad(_merge(points, extra), width)


def prefetch_map(state: dict, disp_fit: np.ndarray, prior_var: float,
                 k: int = PREFETCH_POINTS) -> np.ndarray:
    """Points the MAP search would ask first if it started now, from the gene-wise search's
    provisional result and a provisional trend (``disp_fit``, ``prior_var``).

    Sent in the free slots of a gene-wise round (:func:`merge_points`), they put evaluated
    points along the MAP paths, so the MAP search that starts from the final trend mostly
    settles without a round of its own.
    """
    res = result(state)
    a0 = np.log(np.where(state["active"], map_start(res["disp"], disp_fit), 1.0))
    prior = {"mean": np.log(np.where(state["active"], disp_fit, 1.0)), "var": prior_var}
    spec = start(a0, n_samples=state["n_samples"], max_disp=state["max_disp"], prior=prior,
                 memory=state["memory"], active=state["active"], max_rounds=1, k=k,
                 k_late=k, min_disp=state["min_disp"])
    return propose(spec)[:, :k]


def _first_points(a0: np.ndarray, min_disp: float) -> np.ndarray:
    """First round: the start and points around it. A start at the floor ends there (its
    gradient is ~alpha): its other points go where that gene's MAP search will run."""
    first = np.clip(a0[:, None] + np.asarray(FIRST_OFFSETS)[None, :], LOG_LO, LOG_HI)
    anchors = np.linspace(FLOOR_ANCHORS[0], FLOOR_ANCHORS[1], len(FIRST_OFFSETS) - 1)
    floor = a0 <= np.log(min_disp) + 1e-9
    first[floor, 1:] = anchors
    return first


def _advance(state: dict) -> None:
    """Settle what the memory allows, stage by stage, and set the next round's points."""
    G = state["a0"].shape[0]
    k = state["k"] if state["round"] < LATE_ROUND else state["k_late"]
    last = state["round"] >= state["max_rounds"]
    need = np.full((G, 0), np.nan)
    spec = np.zeros(G, dtype=bool)  # open paths predicted to end in a grid refit
    on_path = state["stage"] == STAGE_PATH
    if on_path.any():
        gw = None if state["prior"] is not None else {
            "alpha_init": state["alpha_init"], "max_disp": state["max_disp"],
            "min_disp": state["min_disp"]}
        rep = replay(state["a0"], state["memory"], state["prior"], state["n_samples"], k,
                     on_path, gw)
        settle = on_path & (rep["certain"] | last)
        state["uncertain"] |= settle & ~rep["certain"]
        path = rep["path"]
        # open genes keep the predicted path: the provisional result
        for key, val in (("a", path["a"]), ("iter", path["iter"]), ("last_lp", path["lp"]),
                         ("initial_lp", path["initial_lp"])):
            state[key] = np.where(on_path, val, state[key])
        grid = _needs_grid(state, path)
        state["refit"] = np.where(on_path, grid, state["refit"])
        state["stage"] = np.where(settle, np.where(grid, STAGE_COARSE, STAGE_DONE),
                                  state["stage"])
        # long open paths often end at maxit: their grid starts early too
        spec = on_path & ~settle & (grid | (path["iter"] >= SPEC_ITER))
        need = np.where((on_path & ~settle)[:, None], rep["need"], np.nan)
    need = _merge(need, _grid_round(state, spec, last))
    grids = spec.any() or (state["stage"] == STAGE_COARSE).any() or (
        state["stage"] == STAGE_FINE).any()
    state["points"] = _pad(need, max(k, GRID_WIDTH) if grids else k)


def _grid_round(state: dict, spec: np.ndarray, last: bool) -> np.ndarray:
    """Settle the coarse and fine grids the memory allows; return the points still needed.

    The coarse grid's undecided points go with support points over the fine grid expected
    around the predicted best (the whole fine grid when that is log(1e-8), where the
    objective is flat to rounding noise), so the fine grid rarely needs a round of its own;
    genes whose open path is predicted to end in a refit (``spec``) start on it early.
    """
    G = state["a0"].shape[0]
    mem, prior, n = state["memory"], state["prior"], state["n_samples"]
    coarse = coarse_grid(n)
    delta = coarse[1] - coarse[0]
    at = np.arange(G)
    need = np.full((G, 0), np.nan)
    on_coarse = (state["stage"] == STAGE_COARSE) | spec
    if on_coarse.any():
        pts = np.broadcast_to(coarse, (G, GRID_N))
        pick = grid_argmax(mem, pts, prior, n, on_coarse)
        best = pts[at, pick["best"]]
        state["grid_a"] = np.where(on_coarse, best, state["grid_a"])  # provisional
        settle = (state["stage"] == STAGE_COARSE) & (pick["certain"] | last)
        state["uncertain"] |= settle & ~pick["certain"]
        fine = np.linspace(best - delta, best + delta, GRID_N, axis=-1)
        state["fine"] = np.where(settle[:, None], fine, state["fine"])
        state["stage"] = np.where(settle, STAGE_FINE, state["stage"])
        wait = on_coarse & ~settle
        need = np.where(pick["need"] & wait[:, None], pts, np.nan)
        need = _merge(need, _fine_support(mem, need, pick, fine, wait, coarse))
    on_fine = state["stage"] == STAGE_FINE
    if on_fine.any():
        pick = grid_argmax(mem, state["fine"], prior, n, on_fine)
        state["grid_a"] = np.where(on_fine, state["fine"][at, pick["best"]], state["grid_a"])
        settle = on_fine & (pick["certain"] | last)
        state["uncertain"] |= settle & ~pick["certain"]
        state["stage"] = np.where(settle, STAGE_DONE, state["stage"])
        wait = on_fine & ~settle
        need = _merge(need, np.where(pick["need"] & wait[:, None], state["fine"], np.nan))
    return need


def _fine_support(mem, need, pick, fine, wait, coarse) -> np.ndarray:
    """Points sent with a coarse grid for the fine grid that will follow it."""
    delta = coarse[1] - coarse[0]
    floor_fine = np.linspace(coarse[0] - delta, coarse[0] + delta, GRID_N)
    out = np.full((need.shape[0], GRID_N + FINE_SUPPORT), np.nan)
    at_floor = wait & ((pick["best"] == 0) | pick["need"][:, 0])
    out[at_floor, :GRID_N] = floor_fine  # flat to rounding noise: only evaluations decide
    inner = wait & (pick["best"] != 0)
    out[:, GRID_N:] = _pad(_support(np.concatenate([mem["x"], need], axis=1),
                                    np.where(inner, fine[:, 0], np.nan), fine[:, -1],
                                    np.where(inner, FINE_SUPPORT, 0)), FINE_SUPPORT)
    return out


def _needs_grid(state: dict, path: dict) -> np.ndarray:
    """R's grid-refit rule after fitDisp (gene-wise: not converged and above 10 * minDisp
    after noIncrease; MAP: at maxit)."""
    if state["prior"] is not None:
        return map_decisions(path)["refit"]
    dec = genewise_decisions(path, state["alpha_init"], state["max_disp"], state["min_disp"])
    return dec["refit"]


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Finite entries of ``a`` then of ``b``, per row (NaN-padded)."""
    both = np.concatenate([a, b], axis=1)
    order = np.argsort(~np.isfinite(both), axis=1, kind="stable")
    return np.take_along_axis(both, order, axis=1)


def _pad(points: np.ndarray, width: int) -> np.ndarray:
    """Exactly ``width`` columns, finite points first (any beyond wait for a later round)."""
    points = _merge(points, np.full((points.shape[0], 0), np.nan))
    if points.shape[1] >= width:
        return points[:, :width]
    fill = np.full((points.shape[0], width - points.shape[1]), np.nan)
    return np.concatenate([points, fill], axis=1)
