"""DESeq2's gene-wise and MAP dispersion *path* (fitDisp / fitDispGrid), against R.

References: tests/data/r_extra/disp_path (make_refs.R: R 4.2.2, DESeq2 1.38.3), with R's
own inputs to the searches (the dispersion-fit means, alpha_hat, dispFit, dispPriorVar) and
its outputs, on pasilla (~ type + condition), marioni (~ run + tissue) and a simulated 3 vs 3
study (~ condition). The objective is evaluated as fed_de's sites do (nb.disp_summands summed
over samples, nb.cox_reid at the aggregator).

Where R and fed_de part, it is on decisions inside rounding noise (R's coin toss):
- log(alpha) near log(1e-8), where lgamma(y + 1/alpha) - lgamma(1/alpha) cancels ~1e9-sized
  terms: the objective is flat to ~1e-6 and fitDispGrid's choice between grid points is
  noise (both values are below 10 * minDisp; their objectives agree within that noise);
- the last step of a search of a gene with |log posterior| ~ 1e4, where the Armijo gain is
  ~1e-11 (pasilla: 12 MAP searches of 1,500 take a different number of steps, <= 1e-6 apart).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fed_de.core import disp_path as dp
from fed_de.core import disp_surrogate as sur
from fed_de.core import nb

DATA = Path(__file__).parent / "data" / "r_extra" / "disp_path"
STUDIES = ("real_pasilla", "real_marioni", "synth_small")


# -- references and the objective ------------------------------------------------------------
def load(name: str) -> dict:
    d = DATA / name
    genes = pd.read_csv(d / "genes.csv.gz")
    counts = pd.read_csv(d / "counts.csv.gz", index_col=0)
    mu = pd.read_csv(d / "mu.csv.gz", index_col=0)
    X = pd.read_csv(d / "design.csv", index_col=0)
    assert list(counts.columns) == list(X.index) == list(mu.columns)
    sc = pd.read_csv(d / "scalars.csv.gz").iloc[0]
    return {"genes": genes, "y": counts.to_numpy(float).T, "mu": mu.to_numpy(float).T,
            "X": X.to_numpy(float), "prior_var": float(sc.dispPriorVar),
            "max_disp": float(sc.maxDisp)}


_CACHE: dict = {}


def study(name: str) -> dict:
    if name not in _CACHE:
        _CACHE[name] = load(name)
    return _CACHE[name]


class Objective:
    """f, g, h of the Cox-Reid adjusted log likelihood (no prior) at points per gene, as the
    aggregator forms them from summed site messages. ``sites``: sample index arrays whose
    sums are added in the order given (a federated run); None: one site."""

    def __init__(self, y, mu, X, sites=None):
        self.y, self.mu, self.X = y, mu, X
        self.sites = [np.arange(y.shape[0])] if sites is None else sites

    def __call__(self, points: np.ndarray, rows: np.ndarray | None = None):
        rows = np.arange(points.shape[0]) if rows is None else rows
        tot = None
        for s in self.sites:
            part = nb.disp_summands(self.y[np.ix_(s, rows)], self.mu[np.ix_(s, rows)],
                                    self.X[s], points)
            tot = part if tot is None else {k: tot[k] + part[k] for k in tot}
        cr, cr1, cr2 = nb.cox_reid(tot["A"], tot["A1"], tot["A2"], self.X.shape[1])
        return tot["ll"] + cr, tot["d1"] + cr1, tot["d2"] + cr2

    def at(self, points: np.ndarray):
        """Evaluate where ``points`` is finite (NaN elsewhere)."""
        ok = np.isfinite(points)
        rows = np.flatnonzero(ok.any(axis=1))
        out = [np.full(points.shape, np.nan) for _ in range(3)]
        if rows.size:
            fill = np.where(ok[rows], points[rows],
                            np.nanmax(points[rows], axis=1, keepdims=True))
            for o, v in zip(out, self(fill, rows), strict=True):
                o[rows] = np.where(ok[rows], v, np.nan)
        return out


def with_prior(obj, prior):
    def call(points, rows):
        f, g, h = obj(points, rows)
        return sur.add_prior(f, g, h, points, {"mean": prior["mean"][rows],
                                               "var": prior["var"]})
    return call


# -- the exact port: R's loop, one evaluation per gene per iteration ---------------------------
def port_fit_disp(call, a0: np.ndarray) -> dict:
    f0, g0, _ = call(a0[:, None], np.arange(a0.size))
    path = dp.path_start(a0, f0[:, 0], g0[:, 0])
    while not path["done"].all():
        act = np.flatnonzero(~path["done"])
        prop, _ = dp.path_proposal(path)
        f, g = np.full(a0.size, np.nan), np.full(a0.size, np.nan)
        ff, gg, _ = call(prop[act][:, None], act)
        f[act], g[act] = ff[:, 0], gg[:, 0]
        path = dp.path_step(path, f, g)
    return path


def port_grid(call, rows: np.ndarray, n: int) -> np.ndarray:
    coarse = dp.coarse_grid(n)
    f, _, _ = call(np.tile(coarse, (rows.size, 1)), rows)
    fine = dp.fine_grid(coarse, f)
    f2, _, _ = call(fine, rows)
    return np.exp(dp.grid_result(fine, f2))


def port(name: str) -> dict:
    s = study(name)
    g, n = s["genes"], s["X"].shape[0]
    obj = Objective(s["y"], s["mu"], s["X"])
    alpha_hat = g.alpha_hat.to_numpy()
    path = port_fit_disp(obj, np.log(alpha_hat))
    dec = dp.genewise_decisions(path, alpha_hat, s["max_disp"])
    gene_est = dec["disp"].copy()
    refit = np.flatnonzero(dec["refit"])
    gene_est[refit] = port_grid(obj, refit, n)
    prior = {"mean": np.log(g.dispFit.to_numpy()), "var": s["prior_var"]}
    call = with_prior(obj, prior)
    init = dp.map_start(g.dispGeneEst.to_numpy(), g.dispFit.to_numpy())
    mpath = port_fit_disp(call, np.log(init))
    mdec = dp.map_decisions(mpath)
    map_est = mdec["disp"].copy()
    mrefit = np.flatnonzero(mdec["refit"])
    if mrefit.size:
        map_est[mrefit] = port_grid(call, mrefit, n)
    clip = (dp.MIN_DISP, s["max_disp"])
    return {"path": path, "refit": dec["refit"], "gene": np.clip(gene_est, *clip),
            "map_path": mpath, "map": np.clip(map_est, *clip)}


# -- the round scheme -------------------------------------------------------------------------
def scheme(name: str, sites=None, prefetch: bool = True) -> dict:
    """Gene-wise search (with MAP points prefetched from a provisional trend: R's, 1 % off)
    then the MAP search from R's trend, driven by evaluation rounds."""
    s = study(name)
    g, n = s["genes"], s["X"].shape[0]
    obj = Objective(s["y"], s["mu"], s["X"], sites)
    fit = g.dispFit.to_numpy()
    st = dp.start(np.log(g.alpha_hat.to_numpy()), n_samples=n, max_disp=s["max_disp"])
    gw_points = []
    while not dp.done(st):
        pts = dp.propose(st)
        gw_points.append(np.isfinite(pts).sum(axis=1))
        st = dp.update(st, pts, *obj.at(pts))
        if prefetch and not dp.done(st):
            extra = dp.prefetch_map(st, fit * 1.01, s["prior_var"] * 1.02)
            st["points"] = dp.merge_points(st["points"], extra, st["points"].shape[1])
    gene = dp.result(st)
    prior = {"mean": np.log(fit), "var": s["prior_var"]}
    ms = dp.start(np.log(dp.map_start(gene["disp"], fit)), n_samples=n,
                  max_disp=s["max_disp"], prior=prior, memory=st["memory"], max_rounds=2)
    map_points = []
    while not dp.done(ms):
        pts = dp.propose(ms)
        map_points.append(np.isfinite(pts).sum(axis=1))
        ms = dp.update(ms, pts, *obj.at(pts))
    return {"gene": gene, "map": dp.result(ms), "gw_points": gw_points,
            "map_points": map_points}


_SCHEME: dict = {}


def scheme_cached(name: str) -> dict:
    if name not in _SCHEME:
        _SCHEME[name] = scheme(name)
    return _SCHEME[name]


def rel(a, b):
    return np.abs(a - b) / np.abs(b)


def floor_tie(name: str, ours: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Genes whose value and R's are both below 10 * minDisp, where the objective is flat to
    rounding noise, and whose objectives agree within that noise."""
    s = study(name)
    both = (ours < 1e-7) & (r < 1e-7) & (rel(ours, r) > 1e-8)
    rows = np.flatnonzero(both)
    out = np.zeros(ours.size, dtype=bool)
    if rows.size:
        pts = np.log(np.column_stack([ours[rows], r[rows]]))
        f, _, _ = Objective(s["y"], s["mu"], s["X"])(pts, rows)
        noise = sur.rounding_floor(pts, f, s["X"].shape[0])
        out[rows] = np.abs(f[:, 0] - f[:, 1]) <= noise.max(axis=1)
    return out


# -- (a) the exact port against R ---------------------------------------------------------------
@pytest.mark.parametrize("name", STUDIES)
def test_port_reproduces_r(name):
    g = study(name)["genes"]
    out = port(name)
    same_iter = out["path"]["iter"] == g.gw_iter.to_numpy()
    floor_start = g.alpha_hat.to_numpy() <= 1e-8 * (1 + 1e-9)
    # fitDisp itself: where R took as many steps, the same log(alpha) to 1e-8
    raw = np.abs(out["path"]["a"] - g.gw_log_alpha.to_numpy())
    assert raw[same_iter & ~floor_start].max() < 1e-8
    assert (~same_iter & ~floor_start).sum() <= 0.005 * len(g)
    np.testing.assert_array_equal(out["refit"], g.gw_refit.to_numpy())
    r = g.dispGeneEst.to_numpy()
    e = rel(out["gene"], r)
    tie = floor_tie(name, out["gene"], r)
    assert e[~tie & (same_iter | floor_start)].max() < 1e-8
    assert e[~tie].max() < 1e-5 and tie.sum() <= 5
    # MAP from R's trend and prior
    m = g.dispMAP.to_numpy()
    e = rel(out["map"], m)
    same = out["map_path"]["iter"] == g.map_iter.to_numpy()
    assert e[same].max() < 1e-10
    assert (~same).sum() <= 0.01 * len(g) and e.max() < 1e-5


# -- (b) the round scheme against R ------------------------------------------------------------
@pytest.mark.parametrize("name", STUDIES)
def test_scheme_reproduces_r(name):
    g = study(name)["genes"]
    out = scheme_cached(name)
    gene, mp = out["gene"], out["map"]
    assert not gene["uncertain"].any() and not mp["uncertain"].any()
    assert gene["rounds"] <= dp.MAX_ROUNDS and mp["rounds"] <= 1
    np.testing.assert_array_equal(gene["refit"], g.gw_refit.to_numpy())
    r = g.dispGeneEst.to_numpy()
    e = rel(gene["disp"], r)
    tie = floor_tie(name, gene["disp"], r)
    assert e[~tie].max() < 1e-6, g.gene[np.argmax(np.where(tie, 0, e))]
    assert tie.sum() <= 5
    e = rel(mp["disp"], g.dispMAP.to_numpy())
    assert np.quantile(e, 0.99) < 1e-8 and e.max() < 1e-5
    # the message sizes the rounds used: K points in the first rounds, a few genes after
    first = out["gw_points"][0]
    assert first.max() == len(dp.FIRST_OFFSETS)
    later = np.concatenate(out["gw_points"][1:] + out["map_points"])
    assert later.max() <= dp.GRID_WIDTH


@pytest.mark.parametrize("name", ["real_marioni", "synth_small"])
def test_scheme_equals_the_port(name):
    """The rounds reach the exact port's values (no R noise in between) to 1e-8."""
    ours, exact = scheme_cached(name), port(name)
    assert rel(ours["gene"]["disp"], exact["gene"]).max() < 1e-8
    assert rel(ours["map"]["disp"], exact["map"]).max() < 1e-8


# -- (c) federated = one site -------------------------------------------------------------------
@pytest.mark.parametrize(("name", "n_sites"), [("real_pasilla", 3), ("real_pasilla", 2),
                                              ("real_marioni", 3), ("synth_small", 3)])
def test_federated_equals_one_site(name, n_sites):
    """Sums over 2-3 sites of unequal size, added in reverse site order."""
    s = study(name)
    n = s["X"].shape[0]
    rng = np.random.default_rng(7 + n_sites)
    cut = np.sort(rng.choice(np.arange(1, n), size=n_sites - 1, replace=False))
    sites = np.split(rng.permutation(n), cut)[::-1]
    fed, one = scheme(name, sites=sites), scheme_cached(name)
    for key in ("gene", "map"):
        a, b = fed[key], one[key]
        assert rel(a["disp"], b["disp"]).max() <= 1e-8
        np.testing.assert_array_equal(a["iter"], b["iter"])
        np.testing.assert_array_equal(a["refit"], b["refit"])


# -- pieces -------------------------------------------------------------------------------------
def test_surrogate_is_exact_at_evaluated_points_and_accurate_between():
    s = study("real_pasilla")
    rows = np.arange(200)
    a0 = np.log(s["genes"].alpha_hat.to_numpy()[rows])
    a0 = np.where(a0 < -12, -4.0, a0)
    obj = Objective(s["y"], s["mu"], s["X"])
    pts = a0[:, None] + np.linspace(-1.5, 1.5, 9)[None, :]
    raw = sur.memory_add(sur.memory_empty(rows.size), pts, *obj(pts, rows))
    mem = sur.index(raw)
    at = sur.surrogate(mem, pts[:, 3])
    f, g, _ = obj(pts[:, 3:4], rows)
    np.testing.assert_array_equal(at["f"], f[:, 0])
    assert (at["ef"] == 0).all()
    x = a0 + 0.61
    mid = sur.surrogate(mem, x)
    f, g, _ = obj(x[:, None], rows)
    scale = 1 + np.abs(f[:, 0])
    assert (np.abs(mid["f"] - f[:, 0]) / scale).max() < 1e-11
    assert np.abs(mid["g"] - g[:, 0]).max() < 1e-7
    # the error bound holds (rounding aside)
    err = np.abs(mid["f"] - f[:, 0])
    assert (err <= sur.error_bounds(mid, x, s["X"].shape[0], 0.0)["f"] + 1e-12 * scale).all()
    # memory travels packed between tasks
    back = sur.memory_unpack(sur.memory_pack(raw))
    for key in raw:
        np.testing.assert_array_equal(back[key], raw[key])


def test_path_step_follows_armijo_backtracking():
    """On f(a) = -(a - 1)^2 from 0: kappa 1 overshoots to 2 (no gain: rejected, halved),
    kappa 0.5 lands on the optimum (accepted), then the next step gains nothing: stop."""
    def fg(a):
        return -((a - 1.0) ** 2), -2.0 * (a - 1.0)
    a = np.array([0.0])
    path = dp.path_start(a, *fg(a))
    seen = []
    while not path["done"].all():
        prop, _ = dp.path_proposal(path)
        seen.append(float(prop[0]))
        path = dp.path_step(path, *fg(prop))
    assert seen == [2.0, 1.0, 1.0]
    assert path["iter"][0] == 3 and path["iter_accept"][0] == 2 and path["a"][0] == 1.0


def test_round_cap_closes_on_the_prediction():
    s = study("synth_small")
    rows = np.arange(300)
    obj = Objective(s["y"][:, rows], s["mu"][:, rows], s["X"])
    st = dp.start(np.log(s["genes"].alpha_hat.to_numpy()[rows]), n_samples=s["X"].shape[0],
                  max_disp=s["max_disp"], max_rounds=1)
    pts = dp.propose(st)
    st = dp.update(st, pts, *obj.at(pts))
    assert dp.done(st)
    res = dp.result(st)
    assert res["uncertain"].any() and np.isfinite(res["disp"]).all()
    assert res["final"].all()


def test_index_lookups_read_nan_out_of_range():
    """The index pads every gene's sorted points with NaN (:func:`disp_surrogate.index`):
    a lookup (the compiled kernel's ``_read``) reads the point, or NaN where the gene has
    none there, indices below -1 or past the width reading the pads; genes with no point,
    one point and three points (one not finite, dropped)."""
    from fed_de.core.kernels import _read

    x = np.array([[np.nan, np.nan, np.nan], [0.5, np.nan, np.nan], [2.0, -1.0, np.nan]])
    x[2, 2] = 1.0
    values = np.where(np.isfinite(x), x * 10, np.nan)
    mem = sur.memory_add(sur.memory_empty(3), x, values, values, values)
    ix = sur.index(mem)["all"]
    width = mem["x"].shape[1]
    expect = np.array([[np.nan] * (width + 2), [np.nan, 0.5] + [np.nan] * width,
                       [np.nan, -1.0, 1.0, 2.0] + [np.nan] * (width - 2)])
    for i in range(-3, width + 3):
        col = expect[:, min(max(i, -1), width) + 1]
        got = [_read(ix["x"][g], i) for g in range(3)]
        np.testing.assert_array_equal(got, col)
        np.testing.assert_array_equal([_read(ix["f"][g], i) for g in range(3)], col * 10)
