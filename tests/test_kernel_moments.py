"""Unit tests of :mod:`fed_de.core.moments` (DESeq2's starting values from sums).

Reference: R DESeq2 1.38.3 on the pooled samples (``tests/data/kernels/moments``, made by
``make_moments_refs.R``): baseMean and baseVar (``getBaseMeansAndVariances``),
``momentsDispEstimate``, ``roughDispEstimate`` (linear-fit means floored at 1),
``linearModelMu``, the clipped ``alpha_hat`` and the QR start of ``fitNbinomGLMs``; fed_de's
second IRLS start (least squares of log(max(linear fit, 0.1))) against ``numpy.linalg.lstsq``
on R's linear fit. The sums are those of two "sites" (per design cell for
:func:`start_from_cell_sums`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fed_de.core import moments, nb
from tests.conftest import DATA

REF = DATA / "kernels" / "moments"
SCALE = 1.7  # raw size factors = final ones * SCALE (poscounts rescales them this way)


@pytest.fixture(scope="module")
def pooled():
    counts = pd.read_csv(REF / "counts.csv", index_col=0)
    meta = pd.read_csv(REF / "metadata.csv", index_col=0).loc[counts.index]
    ref = pd.read_csv(REF / "r_starts.csv", index_col=0).loc[counts.columns]
    lin = pd.read_csv(REF / "linear_mu.csv", index_col=0).loc[counts.index, counts.columns]
    b = (meta["batch"] == "b2").to_numpy(float)
    c = (meta["condition"] == "B").to_numpy(float)
    X = np.column_stack([np.ones(len(b)), b, c])
    return (counts.to_numpy(float), meta["size_factor"].to_numpy(), X, X[:, :2], ref,
            lin.to_numpy())


def sites(n: int) -> list[np.ndarray]:
    first = np.zeros(n, dtype=bool)
    first[[0, 3, 4, 9]] = True
    return [first, ~first]


def test_moments_from_site_sums_equal_deseq2(pooled):
    y, sf, _, _, ref, _ = pooled
    n = y.shape[0]
    raw = sf * SCALE
    tot = [0.0, 0.0, 0.0]
    for m in sites(n):
        x = y[m] / raw[m, None]
        tot = [tot[0] + x.sum(axis=0), tot[1] + (x * x).sum(axis=0), tot[2] + (1 / raw[m]).sum()]
    got = moments.moments(*tot, n, SCALE)
    np.testing.assert_allclose(got["base_mean"], ref["base_mean"], rtol=1e-12)
    np.testing.assert_allclose(got["moments_disp"], ref["moments_disp"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["xim"], np.mean(1 / sf), rtol=1e-13)


def test_rough_start_from_site_sums_equals_deseq2(pooled):
    y, sf, X, Xr, ref, lin_r = pooled
    n, p = X.shape
    norm = y / sf[:, None]
    # the linear fit from summed X'X and X'(normalised counts), as the aggregator forms it
    beta_lin = np.linalg.solve(X.T @ X, (norm.T @ X).T).T
    lin = X @ beta_lin.T
    np.testing.assert_allclose(lin, lin_r, rtol=1e-10, atol=1e-10)
    rough, xt_logy, xt_loglin, xr_logy, xr_loglin = 0, 0, 0, 0, 0
    for m in sites(n):
        mu = np.maximum(lin[m], 1.0)
        rough = rough + (((norm[m] - mu) ** 2 - mu) / mu**2).sum(axis=0)
        xt_logy = xt_logy + np.log(norm[m] + 0.1).T @ X[m]
        xt_loglin = xt_loglin + np.log(np.maximum(lin[m], 0.1)).T @ X[m]
        xr_logy = xr_logy + np.log(norm[m] + 0.1).T @ Xr[m]
        xr_loglin = xr_loglin + np.log(np.maximum(lin[m], 0.1)).T @ Xr[m]
    m_disp = ref["moments_disp"].to_numpy()
    alpha_hat, max_disp, beta0, beta_alt = moments.rough_start(
        rough, m_disp, float(n), p, nb.gram(X, np.ones(n)), xt_logy, xt_loglin)
    assert max_disp == max(10, n)
    np.testing.assert_allclose(alpha_hat, ref["alpha_hat"], rtol=1e-9)
    assert (alpha_hat == 1e-8).sum() >= 2  # genes whose rough or moments estimate is <= 0
    cols = [f"beta_init_{j}" for j in range(3)]
    np.testing.assert_allclose(beta0, ref[cols], rtol=1e-10, atol=1e-12)
    alt = np.linalg.lstsq(X, np.log(np.maximum(lin_r, 0.1)), rcond=None)[0].T
    np.testing.assert_allclose(beta_alt, alt, rtol=1e-10, atol=1e-12)
    r0, r_alt = moments.reduced_starts(nb.gram(Xr, np.ones(n)), xr_logy, xr_loglin)
    np.testing.assert_allclose(r0, ref[["beta_init_reduced_0", "beta_init_reduced_1"]],
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r_alt, np.linalg.lstsq(Xr, np.log(np.maximum(lin_r, 0.1)),
                                                      rcond=None)[0].T, rtol=1e-10, atol=1e-12)


def test_start_from_cell_sums_equals_deseq2_on_the_samples(pooled):
    y, sf, X, Xr, ref, lin_r = pooled
    n = y.shape[0]
    norm = y / sf[:, None]
    rows, cell = np.unique(X, axis=0, return_inverse=True)  # 4 cells of ~ batch + condition
    cell = cell.ravel()
    assert len(rows) == 4
    onehot = (cell[:, None] == np.arange(4)[None, :]).astype(float)
    s1, s2, lg = 0, 0, 0
    for m in sites(n):
        s1 = s1 + norm[m].T @ onehot[m]
        s2 = s2 + (norm[m] ** 2).T @ onehot[m]
        lg = lg + np.log(norm[m] + 0.1).T @ onehot[m]
    out = moments.start_from_cell_sums(s1, s2, lg, onehot.sum(axis=0), float(np.mean(1 / sf)),
                                       float(max(10, n)), rows, rows[:, :2])
    np.testing.assert_allclose(out["base_mean"], ref["base_mean"], rtol=1e-12)
    np.testing.assert_allclose(out["moments_disp"], ref["moments_disp"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["alpha_hat"], ref["alpha_hat"], rtol=1e-9)
    np.testing.assert_allclose(out["beta_lin"] @ X.T, lin_r.T, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out["beta_init"], ref[[f"beta_init_{j}" for j in range(3)]],
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["beta_init_reduced"],
                               ref[["beta_init_reduced_0", "beta_init_reduced_1"]],
                               rtol=1e-10, atol=1e-12)
    log_lin = np.log(np.maximum(lin_r, 0.1))
    np.testing.assert_allclose(out["beta_alt"], np.linalg.lstsq(X, log_lin, rcond=None)[0].T,
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["beta_alt_reduced"],
                               np.linalg.lstsq(Xr, log_lin, rcond=None)[0].T,
                               rtol=1e-10, atol=1e-12)
