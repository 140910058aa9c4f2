"""The compiled loops (:mod:`fed_de.core.kernels`) give the numbers of the numpy expressions
they replaced, bit for bit: every element's operations are the same, and sums over samples
run in sample order (numpy's reduction over the first axis of a C-ordered block)."""

import numpy as np
import pytest
from scipy.special import digamma, gammaln, polygamma

from fed_de.core import disp_surrogate as sur
from fed_de.core import kernels, nb, trimmed
from fed_de.core.disp_path import _nearest_gap


def bits(a):
    """Values and signs, NaN equal to NaN."""
    a = np.asarray(a, dtype=float)
    return np.where(np.isnan(a), np.nan, a), np.signbit(a)


def assert_same(a, b):
    np.testing.assert_array_equal(*[bits(v)[0] for v in (a, b)])
    np.testing.assert_array_equal(*[bits(v)[1] for v in (a, b)])


def test_count_below_equals_the_comparison_table():
    rng = np.random.default_rng(1)
    x = np.floor(rng.gamma(0.5, 20.0, size=(37, 60)))  # ties, zeros
    x[3, 5] = np.nan
    thr = np.sort(rng.gamma(0.5, 20.0, size=(60, 7)), axis=1)
    thr[:, 0] = trimmed.TINY
    thr[4, -1] = np.inf
    table = (x.T[:, :, None] < thr[:, None, :]).sum(axis=1).astype(float)
    assert_same(trimmed.count_below(x, thr), table)
    # a strided view (a group's columns) reads the same values
    assert_same(trimmed.count_below(x[:, ::3], thr[::3]), table[::3])
    # columns read in place (a request's open genes)
    genes = np.array([7, 2, 2, 59])
    assert_same(trimmed.count_below(x, thr[genes], genes), table[genes])


@pytest.mark.parametrize("integer", [False, True])
def test_disp_likelihood_sums_equal_the_array_expressions(integer):
    rng = np.random.default_rng(2)
    n, P = 23, 40
    y = rng.poisson(rng.gamma(1.0, 30.0, size=(1, P)), size=(n, P)).astype(float)
    mu = np.maximum(y * rng.uniform(0.5, 1.5, size=y.shape), 0.5)
    alpha = np.exp(rng.uniform(-9.0, 2.0, size=P))
    r = 1.0 / alpha
    t = y + r
    l1 = np.log1p(mu / r)
    inv = 1.0 / (mu + r)
    ll = (gammaln(t) - gammaln(r) - (np.log(r) + l1) * y - r * l1).sum(axis=0)
    dl = (digamma(t) - digamma(r) - l1 - t * inv + 1.0).sum(axis=0)
    d2 = (nb.trigamma(t) - nb.trigamma(r) - inv - (mu - y) * inv * inv + 1.0 / r).sum(axis=0)
    w = mu / (alpha * mu + 1.0)
    dw = -alpha * w * w
    out = [np.empty(P) for _ in range(3)] + [np.empty_like(mu), np.empty_like(mu)]
    yy = y.astype(np.int64) if integer else y
    kernels.disp_likelihood_sums(yy, mu, l1, r, np.log(r), gammaln(r), digamma(r),
                                 nb.trigamma(r), gammaln(t).ravel(), digamma(t).ravel(),
                                 nb.trigamma(t).ravel(), np.arange(n * P).reshape(n, P),
                                 *out[:3], alpha, *out[3:])
    for got, want in zip(out, (ll, dl, d2, w, dw), strict=True):
        assert_same(got, want)


def test_dispersion_sums_with_and_without_the_distinct_table():
    """A block read through the table of distinct counts and the same block evaluated
    element by element give the same sums (the table path is taken for repeated counts)."""
    rng = np.random.default_rng(3)
    n, G = 40, 12
    y = rng.poisson(3.0, size=(n, G)).astype(float)  # few distinct counts: the table path
    mu = np.maximum(y.mean(axis=0, keepdims=True) * np.ones((n, 1)), 0.5)
    X = np.column_stack([np.ones(n), np.arange(n) % 2])
    pts = np.log(rng.uniform(0.01, 2.0, size=(G, 3)))
    genes = np.repeat(np.arange(G), 3)
    tabled = nb.disp_summands_at(y, mu, X, genes, pts.ravel())
    old = nb.DISTINCT_MAX
    try:
        nb.DISTINCT_MAX = -1.0  # never tabulate
        plain = nb.disp_summands_at(y, mu, X, genes, pts.ravel())
    finally:
        nb.DISTINCT_MAX = old
    for key in tabled:
        assert_same(tabled[key], plain[key])


def _trigamma_array_form(x):
    """The numpy form ``nb.trigamma`` had: the recurrence over the arguments below 8, in
    passes, then the series in place."""
    z = np.asarray(x, dtype=np.float64).ravel().copy()
    idx = np.flatnonzero(z < 8.0)
    small, acc = z[idx], np.zeros(idx.size)
    live = small < 8.0
    while live.any():
        step = np.where(live, 1.0 / (small * small), 0.0)
        acc = np.where(live, acc + step, acc)
        small = np.where(live, small + 1.0, small)
        live = small < 8.0
    z[idx] = small
    inv = np.divide(1.0, z)
    inv2 = inv * inv
    s = inv2 * 5.0
    s /= 66.0
    for c in (1.0 / 30.0, 1.0 / 42.0, 1.0 / 30.0):
        np.subtract(c, s, out=s)
        s *= inv2
    np.subtract(1.0 / 6.0, s, out=s)
    s *= inv * inv2
    inv += 0.5 * inv2
    inv += s
    inv[idx] += acc
    return inv.reshape(np.shape(x))


def test_trigamma_equals_the_array_form():
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.uniform(1e-8, 8.5, 200_000), rng.lognormal(2.0, 3.0, 200_000),
                        np.arange(1.0, 40.0), [7.999999999999999, 8.0, 1e300, np.nan]])
    assert_same(nb.trigamma(x), _trigamma_array_form(x))
    grid = x[:600].reshape(20, 30)[:, ::2]  # any shape and layout
    assert_same(nb.trigamma(grid), _trigamma_array_form(grid))
    np.testing.assert_allclose(nb.trigamma(x[:-1]), polygamma(1, x[:-1]), rtol=1e-11)


def test_nearest_gap_equals_the_broadcast_minimum():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(30, 6))
    b = rng.normal(size=(30, 9))
    a[2, 1] = b[5, 3] = np.nan
    b[7] = np.nan  # a gene with no point: inf
    rows = rng.random(30) < 0.6
    with np.errstate(invalid="ignore"):
        want = np.fmin.reduce(np.abs(a[:, :, None] - b[:, None, :]), axis=2, initial=np.inf)
    want[~rows] = np.inf
    assert_same(_nearest_gap(a, b, rows), want)
    assert np.isinf(_nearest_gap(a, b)[7]).all()


def test_surrogate_edge_cases():
    """No point: no value, ``dist`` and ``outside`` infinite; fewer than HERMITE_NODES
    nodes: NaN (no surrogate); an evaluated point returns its value with estimates 0; a
    point beyond the evaluated ones reports how far."""
    x = np.full((3, 8), np.nan)
    x[1, :3] = [0.0, 0.5, 1.0]
    x[2, :] = np.linspace(-1.0, 1.0, 8)
    f, g, h = np.sin(x), np.cos(x), -np.sin(x)
    ix = sur.index(sur.memory_add(sur.memory_empty(3), x, f, g, h))
    s = sur.surrogate(ix, np.array([0.3, 0.7, 0.3]))
    assert np.isnan(s["f"][0]) and np.isinf(s["dist"][0]) and np.isinf(s["outside"][0])
    assert np.isnan(s["f"][1]) and s["dist"][1] == pytest.approx(0.2)
    assert abs(s["f"][2] - np.sin(0.3)) < 1e-9 and abs(s["g"][2] - np.cos(0.3)) < 1e-7
    at = sur.surrogate(ix, np.array([0.0, 0.5, x[2, 3]]))
    assert at["f"][2] == f[2, 3] and at["ef"][2] == 0 and at["eg"][2] == 0
    beyond = sur.surrogate(ix, np.array([0.0, 1.75, 1.25]))
    assert beyond["outside"][1] == 0.75 and beyond["outside"][2] == 0.25


def test_warm_compiles_every_type_an_analysis_uses():
    """:func:`kernels.warm` (run when a container image is built) compiles each kernel for
    the argument types a run passes: an analysis afterwards compiles nothing new, so no task
    of a plan compiles in its fresh process."""
    import fed_de
    from fed_de.demo_data import make_demo_study

    names = ("surrogate_values", "count_below", "disp_likelihood_sums", "nearest_gap",
             "ring_add", "ring_sub", "ring_add_masks", "from_limbs", "to_limbs",
             "pack_fields", "index_tables", "refine_brackets", "irls_weights", "irls_response")
    before = {n: set(getattr(kernels, n).signatures) for n in names}
    kernels.warm()
    warm = {n: set(getattr(kernels, n).signatures) - before[n] for n in names}
    assert all(getattr(kernels, n).signatures for n in names)
    study = make_demo_study(n_samples=150, n_genes=80, seed=5)
    fed_de.deseq2(study.sites, study.design, levels=study.levels,
                  contrasts=[("condition", "B", "A")], shrink="normal")
    fed_de.deseq2(study.sites, study.design, levels=study.levels, test="LRT",
                  reduced="~ batch")
    for n in names:
        new = set(getattr(kernels, n).signatures) - before[n]
        assert new <= warm[n], f"{n} compiled {new - warm[n]} beyond warm()"


def test_index_sorts_and_thins_each_gene_as_the_greedy_rule_says():
    """Against a plain per-gene reference: finite points sorted (stable: equal x keep their
    order), thinned greedily (kept when at least NODE_SEPARATION above the last kept), both
    padded with NaN; duplicates, NaN gaps, -0.0 and a gene with no point."""
    rng = np.random.default_rng(6)
    G, M = 40, 9
    x = rng.normal(size=(G, M)).round(1)
    x[rng.random((G, M)) < 0.3] = np.nan
    x[3] = np.nan
    x[5, :3] = [-0.0, 0.0, -0.0]
    f, g, h = (np.where(np.isnan(x), np.nan, rng.normal(size=(G, M))) for _ in range(3))
    ix = sur.index({"x": x, "f": f, "g": g, "h": h})
    for gi in range(G):
        pts = sorted((v, j) for j, v in enumerate(x[gi]) if np.isfinite(v))  # stable by j
        order = [j for _, j in pts]
        thin, last = [], -np.inf
        for j in order:
            if x[gi, j] - last >= sur.NODE_SEPARATION:
                thin.append(j)
                last = x[gi, j]
        assert ix["n_all"][gi] == len(order) and ix["n_thin"][gi] == len(thin)
        for key, v in (("x", x), ("f", f), ("g", g), ("h", h)):
            row, trow = ix["all"][key][gi], ix["thin"][key][gi]
            assert np.isnan(row[0]) and np.isnan(row[len(order) + 1:]).all()
            assert_same(row[1:len(order) + 1], v[gi, order])
            assert np.isnan(trow[0]) and np.isnan(trow[len(thin) + 1:]).all()
            assert_same(trow[1:len(thin) + 1], v[gi, thin])


def test_kernels_compile_where_nothing_can_be_cached(tmp_path):
    """A read-only install and home (a hardened container) leave numba nowhere to keep
    compiled code, and numba then refuses ``cache=True`` when a function is decorated: the
    kernels are compiled in the process instead, with the same answers."""
    import os
    import subprocess
    import sys
    import textwrap

    (tmp_path / "nolocator.py").write_text(textwrap.dedent("""
        class NoLocator:
            @classmethod
            def from_function(cls, py_func, source_path):
                return None
    """))
    script = textwrap.dedent("""
        import numpy as np
        from fed_de.core import kernels
        x = np.array([[0.0, 5.0], [2.0, 1.0], [7.0, 3.0]])
        got = kernels.count_below(x, np.arange(2), np.array([[1.0, 3.0], [2.0, 9.0]]))
        print(type(kernels.count_below._cache).__name__, got.tolist())
    """)
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "nolocator.NoLocator",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "NullCache"
    assert out.stdout.strip().endswith("[[1.0, 2.0], [1.0, 3.0]]")
