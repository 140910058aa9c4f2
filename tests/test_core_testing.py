"""Tests of fed_de.core.testing against R DESeq2 / stats reference values.

Reference files (read only from tests/data, never computed with R at test time):

* ``r134/``: R DESeq2 1.34.0 results from PyDESeq2's test suite (10 and 40 genes).
  The ``greater``/``greaterAbs``/``lessAbs`` files use ``lfcThreshold=0.5``; ``less`` too
  (PyDESeq2 calls it ``lfc_null=-0.5``, i.e. R's ``lfcThreshold=0.5, altHypothesis="less"``).
* ``r138/synth_multi``: DESeq2 1.38.3 results (with and without independent filtering).
* ``r_extra/testing``: written by ``make_refs.R`` beside them (R 4.2.2, DESeq2 1.38.3):
  DESeq2 results on 3,000 genes for every altHypothesis, ``pvalueAdjustment`` on synthetic
  tables with many rejections (where lowess decides the threshold), ``p.adjust``, ``lowess``,
  ``quantile`` and ``pnorm`` values.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import ndtr

from fed_de.core.testing import (
    ALT_HYPOTHESES,
    adjust_pvalues,
    contrast_vector,
    independent_filtering,
    p_adjust_bh,
    r_lowess,
    r_quantile7,
    wald_test,
)

DATA = Path(__file__).parent / "data"
R134 = DATA / "r134"
R138 = DATA / "r138"
REXTRA = DATA / "r_extra" / "testing"
LN2 = math.log(2)


def read(path: Path) -> pd.DataFrame:
    # round_trip: pandas' default float parser is off by a few ulps on 17-digit numbers.
    return pd.read_csv(path, index_col=None, float_precision="round_trip")


def read_r134(case: str, name: str) -> pd.DataFrame:
    return pd.read_csv(R134 / case / name, index_col=0, float_precision="round_trip")


def assert_close(actual, expected, rtol: float, atol: float = 0.0, what: str = "") -> float:
    """Same NaN pattern and |a - e| <= rtol * |e| + atol; returns the max relative error."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, what
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"NaN pattern {what}")
    m = ~np.isnan(e)
    err = np.abs(a[m] - e[m])
    bad = err > rtol * np.abs(e[m]) + atol
    assert not bad.any(), f"{what}: max abs err {err.max():.3g} at {np.flatnonzero(bad)[:5]}"
    nz = m.copy()
    nz[m] = e[m] != 0
    return float(np.max(np.abs(a[nz] - e[nz]) / np.abs(e[nz]), initial=0.0))


def bh_loop(p: np.ndarray) -> np.ndarray:
    """Textbook BH with explicit loops (independent of the vectorised implementation)."""
    out = np.full(len(p), np.nan)
    idx = [i for i in range(len(p)) if not np.isnan(p[i])]
    n = len(idx)
    if n <= 1:
        return p.astype(float).copy()
    order = sorted(idx, key=lambda i: p[i])  # ascending
    running = 1.0
    for rank in range(n, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * n / rank)
        out[i] = running
    return out


# ---------------------------------------------------------------------------------------------
# Wald test
# ---------------------------------------------------------------------------------------------

R134_WALD = [
    ("single_factor", "r_test_res.csv", "greaterAbs", 0.0),
    ("single_factor", "r_test_res_greaterAbs.csv", "greaterAbs", 0.5),
    ("single_factor", "r_test_res_lessAbs.csv", "lessAbs", 0.5),
    ("single_factor", "r_test_res_greater.csv", "greater", 0.5),
    ("single_factor", "r_test_res_less.csv", "less", 0.5),
    ("multi_factor", "r_test_res.csv", "greaterAbs", 0.0),
    ("continuous", "r_test_res.csv", "greaterAbs", 0.0),
    ("wide", "r_test_res.csv", "greaterAbs", 0.0),
]


@pytest.mark.parametrize(("case", "name", "alt", "thr"), R134_WALD)
def test_wald_matches_r134(case, name, alt, thr):
    r = read_r134(case, name)
    lfc, se, stat, pvalue = wald_test(
        r.log2FoldChange.values * LN2, r.lfcSE.values * LN2, lfc_threshold=thr, alt_hypothesis=alt
    )
    assert_close(lfc, r.log2FoldChange, 1e-13, what="log2FoldChange")
    assert_close(se, r.lfcSE, 1e-13, what="lfcSE")
    assert_close(stat, r.stat, 1e-8, what="stat")
    assert_close(pvalue, r.pvalue, 1e-8, what="pvalue")


DESEQ2_138 = [
    ("default", "greaterAbs", 0.0),
    ("greaterAbs", "greaterAbs", 0.5),
    ("lessAbs", "lessAbs", 0.5),
    ("greater", "greater", 0.5),
    ("less", "less", 0.5),
    ("greaterAbs_T1", "greaterAbs", 1.0),
    ("lessAbs_T2", "lessAbs", 2.0),
]


@pytest.mark.parametrize(("case", "alt", "thr"), DESEQ2_138)
def test_wald_matches_deseq2_138_on_3000_genes(case, alt, thr):
    r = read(REXTRA / f"deseq2_{case}.csv.gz")
    lfc, se, stat, pvalue = wald_test(
        r.log2FoldChange.values * LN2, r.lfcSE.values * LN2, lfc_threshold=thr, alt_hypothesis=alt
    )
    assert_close(stat, r.stat, 1e-8, what="stat")  # includes the 60 all-zero (NaN) genes
    # R blanks the p-values of Cook's outliers after the test; compare the others.
    cooks = np.isnan(r.pvalue.values) & ~np.isnan(r.stat.values)
    assert 0 < cooks.sum() < 10
    assert_close(np.where(cooks, np.nan, pvalue), r.pvalue, 1e-8, what="pvalue")


def test_wald_far_tail_follows_r_pnorm():
    r = read(REXTRA / "pnorm_upper.csv.gz")
    q = r.q.values
    _, _, stat, p_two = wald_test(q, np.ones_like(q))
    assert_close(stat, q, 1e-14, what="stat")
    _, _, _, p_one = wald_test(q, np.ones_like(q), 0.0, "greater")
    pos = r.upper.values > 0
    assert_close(p_one[pos], r.upper.values[pos], 1e-10, what="one-sided")
    assert_close(p_two[pos], 2 * r.upper.values[pos], 1e-10, what="two-sided")
    # no earlier underflow than R: wherever R is positive so are we
    assert (p_two[pos] > 0).all()


def test_wald_nan_in_nan_out_and_zero_se():
    lfc = np.array([np.nan, 1.0, 0.5, 0.0])
    se = np.array([0.3, np.nan, 0.2, 0.2])
    for alt in ALT_HYPOTHESES:
        out = wald_test(lfc, se, 0.5, alt)
        for col in out[2:]:
            assert np.isnan(col[:2]).all()
            assert np.isfinite(col[2:]).all()


def test_wald_mirror_symmetries():
    rng = np.random.default_rng(11)
    lfc = rng.normal(0, 2, 500)
    se = rng.uniform(0.05, 1.5, 500)
    _, _, s1, p1 = wald_test(lfc, se, 0.7, "greaterAbs")
    _, _, s2, p2 = wald_test(-lfc, se, 0.7, "greaterAbs")
    np.testing.assert_array_equal(s1, -s2)
    np.testing.assert_array_equal(p1, p2)
    # "less" on x is "greater" on -x, with the statistic's sign flipped
    _, _, sl, pl = wald_test(lfc, se, 0.7, "less")
    _, _, sg, pg = wald_test(-lfc, se, 0.7, "greater")
    np.testing.assert_array_equal(sl, -sg)
    np.testing.assert_array_equal(pl, pg)
    # lessAbs: statistic non-negative, p-value the larger one-sided tail
    _, _, sa, pa = wald_test(lfc, se, 0.7, "lessAbs")
    assert (sa >= 0).all() and (pa <= 1).all()
    # threshold 0 two-sided: classic Wald
    _, _, s0, p0 = wald_test(lfc, se)
    np.testing.assert_allclose(s0, lfc / se, rtol=1e-14)
    _, _, _, p_up = wald_test(lfc, se, 0.0, "greater")
    _, _, _, p_down = wald_test(lfc, se, 0.0, "less")
    np.testing.assert_allclose(p0, 2 * np.minimum(p_up, p_down), rtol=1e-14)
    assert ((p0 >= 0) & (p0 <= 1)).all()


def test_wald_errors():
    x = np.ones(3)
    with pytest.raises(ValueError, match="greaterAbs, lessAbs, greater, less"):
        wald_test(x, x, 0.5, "two.sided")
    with pytest.raises(ValueError, match=">= 0"):
        wald_test(x, x, -0.5, "less")
    with pytest.raises(ValueError, match="positive lfc_threshold"):
        wald_test(x, x, 0.0, "lessAbs")
    with pytest.raises(ValueError, match="shape"):
        wald_test(x, np.ones(2))


# ---------------------------------------------------------------------------------------------
# Contrasts
# ---------------------------------------------------------------------------------------------

COEFS = ["Intercept", "group_Y_vs_X", "condition_B_vs_A", "condition_C_vs_A", "condition_D_vs_A"]


@pytest.mark.parametrize(
    ("factor", "level", "ref", "base", "expected"),
    [
        ("condition", "B", "A", "A", [0, 0, 1, 0, 0]),
        ("condition", "A", "B", "A", [0, 0, -1, 0, 0]),
        ("condition", "C", "B", "A", [0, 0, -1, 1, 0]),
        ("condition", "B", "D", "A", [0, 0, 1, 0, -1]),
        ("group", "Y", "X", "X", [0, 1, 0, 0, 0]),
        ("group", "X", "Y", "X", [0, -1, 0, 0, 0]),
    ],
)
def test_contrast_vector(factor, level, ref, base, expected):
    c = contrast_vector(COEFS, factor, level, ref, base)
    assert c.dtype == np.float64
    np.testing.assert_array_equal(c, expected)


def test_contrast_vector_gives_the_contrast_lfc():
    beta = np.array([[2.0, 0.1, 0.7, -0.4, 1.3]])  # natural log, one gene
    c = contrast_vector(COEFS, "condition", "C", "B", "A")
    assert (beta @ c)[0] == pytest.approx(-1.1)
    # reversing the contrast flips the sign
    assert (beta @ contrast_vector(COEFS, "condition", "B", "C", "A"))[0] == pytest.approx(1.1)


def test_contrast_vector_errors():
    with pytest.raises(ValueError, match=r"factor 'batch'.*group_Y_vs_X"):
        contrast_vector(COEFS, "batch", "b2", "b1", "b1")
    with pytest.raises(ValueError, match=r"level 'E' is not a level of factor 'condition'.*'D'"):
        contrast_vector(COEFS, "condition", "E", "A", "A")
    with pytest.raises(ValueError, match=r"reference 'Z'.*\['A', 'B', 'C', 'D'\]"):
        contrast_vector(COEFS, "condition", "B", "Z", "A")
    with pytest.raises(ValueError, match="must be different"):
        contrast_vector(COEFS, "condition", "B", "B", "A")
    # a wrong base level means no column matches
    with pytest.raises(ValueError, match="no column"):
        contrast_vector(COEFS, "condition", "B", "C", "B")


# ---------------------------------------------------------------------------------------------
# Benjamini-Hochberg
# ---------------------------------------------------------------------------------------------


def test_p_adjust_bh_matches_r():
    r = read(REXTRA / "padjust_bh.csv.gz")
    assert_close(p_adjust_bh(r.p.values), r.padj.values, 1e-15, what="BH")


def test_p_adjust_bh_matches_loop_and_properties():
    rng = np.random.default_rng(3)
    p = rng.uniform(size=2000) ** 2
    p[rng.choice(2000, 100, replace=False)] = np.nan
    p[:20] = 0.05  # ties
    adj = p_adjust_bh(p)
    assert_close(adj, bh_loop(p), 1e-14, what="loop")
    ok = ~np.isnan(p)
    o = np.argsort(p[ok])
    assert (np.diff(adj[ok][o]) >= 0).all()  # monotone in p
    assert (adj[ok] >= p[ok]).all() and (adj[ok] <= 1).all()
    assert len(set(adj[:20])) == 1  # ties share their value


def test_p_adjust_bh_small_and_empty():
    np.testing.assert_array_equal(p_adjust_bh(np.array([0.3])), [0.3])
    np.testing.assert_array_equal(p_adjust_bh(np.array([np.nan, 0.3])), [np.nan, 0.3])
    assert p_adjust_bh(np.array([])).size == 0
    assert np.isnan(p_adjust_bh(np.full(4, np.nan))).all()
    np.testing.assert_allclose(p_adjust_bh(np.array([0.01, 0.04])), [0.02, 0.04])


# ---------------------------------------------------------------------------------------------
# lowess and quantiles
# ---------------------------------------------------------------------------------------------


def _lowess_cases():
    r = read(REXTRA / "lowess.csv.gz")
    return [(case, g) for case, g in r.groupby("case", sort=False)]


@pytest.mark.parametrize(("case", "g"), _lowess_cases(), ids=[c for c, _ in _lowess_cases()])
def test_r_lowess_matches_r(case, g):
    row = g.iloc[0]
    delta = None if np.isnan(row.delta) else float(row.delta)
    fit = r_lowess(g.x.values, g.y.values, f=float(row.f), iter=int(row.iter), delta=delta)
    assert_close(fit, g.fit.values, 1e-12, atol=1e-12, what=case)


def test_r_lowess_hand_checkable():
    x = np.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0, 5.5, 3.5])
    # a straight line is reproduced exactly by local linear fits, robust or not
    for f, it in [(2 / 3, 3), (0.3, 0), (1.0, 1)]:
        fit = r_lowess(x, 2 - 0.5 * x, f, it)
        np.testing.assert_allclose(fit, 2 - 0.5 * np.sort(x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(r_lowess(x, np.full(10, 7.0)), 7.0, rtol=1e-14)
    np.testing.assert_array_equal(r_lowess(np.array([4.0]), np.array([2.5])), [2.5])
    np.testing.assert_allclose(r_lowess(np.array([2.0, 1.0]), np.array([5.0, 3.0])), [3.0, 5.0])
    # R stops robustifying when 6 * median|residual| < 1e-7 * mean|residual|: with an exact
    # line plus one outlier the median residual is 0, so iter=3 equals iter=0 (R: same values)
    xs = np.arange(20.0)
    ys = 1 + 0.2 * xs
    ys[10] += 50
    robust = r_lowess(xs, ys, f=0.5, iter=3)
    np.testing.assert_array_equal(robust, r_lowess(xs, ys, f=0.5, iter=0))
    far = np.abs(xs - 10) >= 5  # windows of 10 points that do not reach the outlier
    np.testing.assert_allclose(robust[far], (1 + 0.2 * xs)[far], rtol=1e-12)
    np.testing.assert_allclose(robust[10] - 3.0, 8.6376, atol=1e-4)  # R: 8.6376
    # output follows sorted x whatever the input order
    perm = np.random.default_rng(0).permutation(10)
    y = np.sin(x)
    np.testing.assert_array_equal(r_lowess(x[perm], y[perm], f=0.5), r_lowess(x, y, f=0.5))


def test_r_lowess_errors():
    x = np.arange(5.0)
    with pytest.raises(ValueError, match="'f'"):
        r_lowess(x, x, f=0)
    with pytest.raises(ValueError, match="'iter'"):
        r_lowess(x, x, iter=-1)
    with pytest.raises(ValueError, match="'delta'"):
        r_lowess(x, x, delta=-1.0)
    with pytest.raises(ValueError, match="finite"):
        r_lowess(x, np.array([0, 1, np.nan, 3, 4.0]))
    with pytest.raises(ValueError, match="at least one"):
        r_lowess(np.array([]), np.array([]))


def test_r_quantile7_matches_r_and_numpy():
    q = read(REXTRA / "quantile7.csv.gz")
    x = read(REXTRA / "quantile7_x.csv.gz").x.values
    ours = r_quantile7(x, q.prob.values)
    np.testing.assert_array_equal(ours, q.q.values)  # R's own arithmetic: bit for bit
    np.testing.assert_allclose(ours, np.quantile(x, q.prob.values), rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# Independent filtering / padj
# ---------------------------------------------------------------------------------------------

R134_PADJ = [
    ("single_factor", "r_test_res.csv"),
    ("single_factor", "r_test_res_greaterAbs.csv"),
    ("single_factor", "r_test_res_lessAbs.csv"),
    ("single_factor", "r_test_res_greater.csv"),
    ("single_factor", "r_test_res_less.csv"),
    ("multi_factor", "r_test_res.csv"),
    ("continuous", "r_test_res.csv"),
    ("wide", "r_test_res.csv"),
]


@pytest.mark.parametrize(("case", "name"), R134_PADJ)
def test_padj_matches_r134(case, name):
    r = read_r134(case, name)
    padj, info = independent_filtering(r.baseMean.values, r.pvalue.values)
    assert_close(padj, r.padj, 1e-10, what="padj")
    assert info["filterTheta"] == 0.0  # too few genes for more than 10 rejections


def test_padj_without_filtering_matches_r134():
    r = read_r134("single_factor", "r_test_res_no_independent_filtering.csv")
    padj, info = adjust_pvalues(r.baseMean.values, r.pvalue.values, independent_filtering=False)
    assert info == {}
    assert_close(padj, r.padj, 1e-10, what="padj")


@pytest.mark.parametrize(("name", "filt"), [("results", True), ("results_noindfilt", False)])
def test_padj_matches_r138_synth_multi(name, filt):
    r = read(R138 / "synth_multi" / f"{name}.csv.gz")
    padj, _ = adjust_pvalues(r.baseMean.values, r.pvalue.values, 0.1, independent_filtering=filt)
    assert_close(padj, r.padj, 1e-10, what=name)


def test_padj_without_filtering_matches_deseq2_138_on_3000_genes():
    r = read(REXTRA / "deseq2_noindfilt.csv.gz")
    assert np.isnan(r.pvalue).sum() > 60  # all-zero genes and Cook's outliers
    padj, _ = adjust_pvalues(r.baseMean.values, r.pvalue.values, independent_filtering=False)
    assert_close(padj, r.padj, 1e-10, what="padj")


def _adjust_cases():
    meta = read(REXTRA / "adjust_meta.csv.gz")
    return [tuple(row) for row in meta.itertuples(index=False)]


@pytest.mark.parametrize(
    ("case", "alpha", "threshold", "theta_j"), _adjust_cases(), ids=[c[0] for c in _adjust_cases()]
)
def test_independent_filtering_matches_r_pvalue_adjustment(case, alpha, threshold, theta_j):
    r = read(REXTRA / f"{case}.csv.gz")
    curves = read(REXTRA / "adjust_curves.csv.gz")
    curve = curves[curves.case == case]
    padj, info = independent_filtering(r.baseMean.values, r.pvalue.values, alpha=alpha)
    np.testing.assert_array_equal(info["numRej"], curve.numRej.values.astype(np.int64))
    assert_close(info["theta"], curve.theta.values, 1e-15, what="theta")
    assert_close(info["loFitY"], curve.loFitY.values, 1e-12, atol=1e-9, what="lo.fit$y")
    assert info["filterTheta"] == pytest.approx(theta_j, rel=1e-15, abs=1e-300)
    assert info["filterThreshold"] == pytest.approx(threshold, rel=1e-14, abs=1e-300)
    assert_close(padj, r.padj, 1e-10, what="padj")


def test_reference_cases_exercise_the_lowess_rule():
    # guard: the R references must cover thresholds picked by the lowess rule, not only j = 1
    meta = read(REXTRA / "adjust_meta.csv.gz").set_index("case")
    curves = read(REXTRA / "adjust_curves.csv.gz")
    first_theta = curves.groupby("case", sort=False).theta.first()
    assert (meta.filterTheta > first_theta.loc[meta.index]).sum() >= 8
    assert curves.groupby("case").numRej.max().max() > 1000


def _synthetic_table(seed: int = 2024, n: int = 2000):
    rng = np.random.default_rng(seed)
    base_mean = np.exp(rng.normal(3, 2, n))
    base_mean[rng.choice(n, 80, replace=False)] = 0.0
    de = rng.uniform(size=n) < 0.25
    z = rng.normal(np.where(de, 0.9 * np.log1p(base_mean), 0.0))
    pvalue = 2 * ndtr(-np.abs(z))
    pvalue[base_mean == 0] = np.nan
    pvalue[rng.choice(n, 20, replace=False)] = np.nan
    return base_mean, pvalue


def test_independent_filtering_properties_on_2000_genes():
    base_mean, pvalue = _synthetic_table()
    alpha = 0.1
    padj, info = independent_filtering(base_mean, pvalue, alpha=alpha)
    theta = info["theta"]
    assert theta.size == 50
    assert theta[0] == np.mean(base_mean == 0) and theta[-1] == 0.95
    assert info["numRej"].max() > 10 and info["filterTheta"] > 0  # the lowess rule is used
    j = int(np.flatnonzero(theta == info["filterTheta"])[0])
    assert info["filterThreshold"] == r_quantile7(base_mean, theta[j : j + 1])[0]

    kept = base_mean >= info["filterThreshold"]
    # filtered genes and NaN p-values get NaN; kept genes are BH-adjusted among themselves
    assert np.isnan(padj[~kept]).all()
    np.testing.assert_array_equal(np.isnan(padj), ~kept | np.isnan(pvalue))
    assert_close(padj[kept], bh_loop(pvalue[kept]), 1e-14, what="BH within kept")
    ok = kept & ~np.isnan(pvalue)
    order = np.argsort(pvalue[ok])
    assert (np.diff(padj[ok][order]) >= 0).all()
    assert (padj[ok] >= pvalue[ok]).all()
    # the rejection counts are those of the filtered BH at every theta
    for k in (0, j, 49):
        use = base_mean >= r_quantile7(base_mean, theta[k : k + 1])[0]
        adj = np.full(base_mean.size, np.nan)
        adj[use] = bh_loop(pvalue[use])
        assert info["numRej"][k] == np.count_nonzero(adj < alpha)
    assert info["numRej"][j] == np.count_nonzero(padj < alpha)
    # DESeq2's rule, re-derived from the returned curve
    nr, lo = info["numRej"], info["loFitY"]
    resid = nr[nr > 0] - lo[nr > 0]
    thresh = lo.max() - np.sqrt(np.mean(resid**2))
    assert j == int(np.flatnonzero(nr > thresh)[0])
    # gene order does not matter
    perm = np.random.default_rng(5).permutation(base_mean.size)
    padj_p, info_p = independent_filtering(base_mean[perm], pvalue[perm], alpha=alpha)
    np.testing.assert_array_equal(padj_p, padj[perm])
    assert info_p["filterThreshold"] == info["filterThreshold"]


def test_independent_filtering_few_rejections_is_plain_bh():
    rng = np.random.default_rng(9)
    base_mean = rng.exponential(50, 2000)
    pvalue = rng.uniform(size=2000)
    padj, info = independent_filtering(base_mean, pvalue)
    assert info["numRej"].max() <= 10 and info["filterTheta"] == 0.0
    assert info["filterThreshold"] == base_mean.min()
    np.testing.assert_array_equal(padj, p_adjust_bh(pvalue))


def test_independent_filtering_all_nan_pvalues_and_custom_theta():
    base_mean = np.arange(1.0, 101.0)
    padj, info = independent_filtering(base_mean, np.full(100, np.nan))
    assert np.isnan(padj).all() and (info["numRej"] == 0).all()
    pvalue = np.linspace(1e-6, 1e-3, 100)
    padj, info = independent_filtering(base_mean, pvalue, theta=np.array([0.0, 0.5]))
    np.testing.assert_array_equal(info["theta"], [0.0, 0.5])
    np.testing.assert_array_equal(padj, p_adjust_bh(pvalue))  # all reject at theta 0


def test_adjust_pvalues_dispatch():
    base_mean, pvalue = _synthetic_table(7)
    a, ia = adjust_pvalues(base_mean, pvalue, 0.05)
    b, ib = independent_filtering(base_mean, pvalue, alpha=0.05)
    np.testing.assert_array_equal(a, b)
    assert ia["filterThreshold"] == ib["filterThreshold"]
    c, ic = adjust_pvalues(base_mean, pvalue, 0.05, independent_filtering=False)
    np.testing.assert_array_equal(c, p_adjust_bh(pvalue))
    assert ic == {}


def test_independent_filtering_errors():
    x = np.ones(5)
    with pytest.raises(ValueError, match="shape"):
        independent_filtering(x, np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        independent_filtering(np.array([1.0, np.nan]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="alpha"):
        independent_filtering(x, x, alpha=1.0)
    with pytest.raises(ValueError, match="two quantiles"):
        independent_filtering(x, x, theta=np.array([0.5]))
    with pytest.raises(ValueError, match="at least one gene"):
        independent_filtering(np.array([]), np.array([]))
