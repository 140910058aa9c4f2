"""DESeq2's local dispersion trend (fed_de.core.locfit) against R DESeq2 1.38.3 + locfit 1.5-9.7.

References (``data/r_extra/trendfilt/``, made by ``make_refs.R``; no R at test time):

* ``<study>_genes.csv.gz`` for the real studies pasilla (7 x 14,599) and marioni (10 x 5,088):
  R's own ``dispGeneEst`` and ``baseMean`` fed to ``estimateDispersionsFit(fitType="local")``;
  ``dispFit`` kept for 2,000 sampled genes plus every gene outside the fitted mean range (where
  the fit extrapolates); ``locfit_vertices_<study>.csv.gz``: locfit's own tree vertices,
  values and slopes; ``local_summary.csv``: ``varLogDispEsts``, ``dispPriorVar`` and locfit's
  parametric component.
* ``paramfail_deseq.csv.gz``: a full ``DESeq()`` run (1,500 simulated genes, dispersion
  growing with the mean) where R's parametric trend fails and R substitutes the local fit.

Measured: trend within 6e-14 (relative) of R on both studies and 2.2e-16 on the DESeq() run;
tolerance 1e-12.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fed_de.core.locfit import (
    LocfitError,
    local_dispersion_fit,
    local_trend_values,
    locfit_fit,
    locfit_predict,
    unpack_locfit,
)
from fed_de.core.trend import (
    TrendFitError,
    disp_outliers,
    disp_prior_variance,
    fit_dispersion_trend,
    fit_parametric_trend,
    trend_values,
    var_log_disp_ests,
)

REF = Path(__file__).parent / "data" / "r_extra" / "trendfilt"
RTOL = 1e-12


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a / b - 1.0)))


def _read(name: str, **kw) -> pd.DataFrame:
    # round_trip: pandas' default float parser is off by a few ulps on long numbers
    return pd.read_csv(REF / name, float_precision="round_trip", **kw)


def _study(name: str) -> tuple[pd.DataFrame, pd.Series]:
    return _read(f"{name}_genes.csv.gz"), _read("local_summary.csv", index_col="case").loc[name]


def _inputs(genes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    # R's all-zero genes: baseMean 0 and dispGeneEst NA
    return genes["baseMean"].to_numpy(), genes["dispGeneEst"].to_numpy()


@pytest.mark.parametrize("study", ["pasilla", "marioni"])
def test_local_trend_matches_r_on_real_studies(study):
    genes, ref = _study(study)
    base_mean, disp_gene = _inputs(genes)
    res = fit_dispersion_trend(base_mean, disp_gene, fit_type="local",
                               n_samples=int(ref["m"]), n_coefs=int(ref["p"]))
    assert res["fit_type"] == res["requested_fit_type"] == "local"
    kept = genes["dispFit"].notna().to_numpy()
    assert _rel(res["disp_fit"][kept], genes["dispFit"][kept]) <= RTOL
    # the reference includes the genes below the fitted range (linear extrapolation + the
    # global quadratic), and all-zero genes get NaN
    used = np.nan_to_num(disp_gene) > 1e-6
    below = base_mean < base_mean[used].min()
    assert np.count_nonzero(kept & below & (base_mean > 0)) > 100
    np.testing.assert_array_equal(np.isnan(res["disp_fit"]), np.isnan(disp_gene))
    assert _rel(res["var_log_disp_ests"], ref["varLogDispEsts"]) <= RTOL
    assert _rel(res["disp_prior_var"], ref["dispPriorVar"]) <= RTOL


def test_local_trend_prior_variance_closed_form_on_marioni():
    # marioni: m - p = 7, prior variance above the 0.25 floor, so the closed form is exercised
    genes, ref = _study("marioni")
    base_mean, disp_gene = _inputs(genes)
    fit = trend_values(local_dispersion_fit(base_mean, disp_gene), base_mean)
    var_log = var_log_disp_ests(disp_gene, fit)
    prior = disp_prior_variance(disp_gene, fit, var_log, int(ref["m"]), int(ref["p"]))
    assert ref["dispPriorVar"] > 0.3
    assert _rel(prior, ref["dispPriorVar"]) <= RTOL


@pytest.mark.parametrize("study", ["pasilla", "marioni"])
def test_locfit_structure_matches_r(study):
    genes, ref = _study(study)
    model = local_dispersion_fit(*_inputs(genes))
    parts = unpack_locfit(model)
    vert = _read(f"locfit_vertices_{study}.csv.gz").sort_values("x")
    assert len(parts["x"]) == len(vert) == int(ref["nv"])
    np.testing.assert_allclose(parts["x"], vert["x"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(parts["value"], vert["value"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(parts["slope"], vert["slope"], rtol=0, atol=1e-9)
    assert parts["xbar"] == pytest.approx(ref["xbar"], rel=1e-12)
    np.testing.assert_allclose(parts["pc"], ref[["pc0", "pc1", "pc2"]].to_numpy(float),
                               rtol=1e-9)


def test_parametric_failure_in_deseq_run_substitutes_local():
    genes = _read("paramfail_deseq.csv.gz")
    ref = _read("local_summary.csv", index_col="case").loc["paramfail_deseq"]
    base_mean = genes["baseMean"].to_numpy()
    disp_gene = genes["dispGeneEst"].to_numpy()
    with pytest.raises(TrendFitError):
        fit_parametric_trend(base_mean, disp_gene)
    with pytest.warns(UserWarning, match="local regression fit was automatically substituted"):
        res = fit_dispersion_trend(base_mean, disp_gene, n_samples=int(ref["m"]),
                                   n_coefs=int(ref["p"]))
    assert res["fit_type"] == "local" and res["requested_fit_type"] == "parametric"
    np.testing.assert_array_equal(np.isnan(res["disp_fit"]), genes["dispFit"].isna())
    ok = genes["dispFit"].notna().to_numpy()
    assert ok.sum() == len(genes) - 5
    assert _rel(res["disp_fit"][ok], genes["dispFit"][ok]) <= RTOL
    assert _rel(res["var_log_disp_ests"], ref["varLogDispEsts"]) <= RTOL
    assert res["disp_prior_var"] == pytest.approx(ref["dispPriorVar"], rel=RTOL)
    # dispersion outliers (they keep their gene-wise estimate) are R's
    flags = disp_outliers(disp_gene, res["disp_fit"], res["var_log_disp_ests"])
    assert flags.sum() > 10
    np.testing.assert_array_equal(flags, genes["dispOutlier"].eq(True).to_numpy())


def test_trend_values_reevaluates_a_local_trend_at_new_means():
    genes, _ = _study("marioni")
    base_mean, disp_gene = _inputs(genes)
    res = fit_dispersion_trend(base_mean, disp_gene, fit_type="local")
    coefs = np.asarray(res["coefficients"], dtype=float)  # as the shared state stores it
    np.testing.assert_array_equal(trend_values(coefs, base_mean), res["disp_fit"])
    np.testing.assert_array_equal(trend_values(coefs, base_mean, "local"), res["disp_fit"])
    new = np.array([0.0, np.nan, 0.5, 50.0, 1e6])
    values = trend_values(coefs, new)
    assert np.isnan(values[:2]).all() and np.all(values[2:] > 0)
    with pytest.raises(ValueError, match="packed locfit model"):
        trend_values(coefs[:7], new)


def test_locfit_reproduces_a_quadratic_everywhere():
    # Local quadratics fit a quadratic exactly; so does the global parametric component, so
    # interpolation inside and extrapolation outside the data range both return it -- up to
    # locfit's own solver precision: its Jacobi eigen-decomposition stops once off-diagonal
    # entries are below ~3e-8 of the diagonal (ported as is; R's values agree to 1e-12).
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 5, 400)
    y = 0.3 - 1.2 * x + 0.25 * x**2
    model = locfit_fit(x, y, rng.uniform(0.5, 2, 400))
    grid = np.linspace(-6, 9, 61)
    np.testing.assert_allclose(locfit_predict(model, grid), 0.3 - 1.2 * grid + 0.25 * grid**2,
                               rtol=0, atol=1e-6)


def test_locfit_interpolates_the_vertex_fits():
    rng = np.random.default_rng(1)
    x = np.sort(rng.uniform(0, 10, 300))
    y = np.sin(x) + rng.normal(0, 0.2, 300)
    model = locfit_fit(x, y, np.ones_like(x))
    parts = unpack_locfit(model)
    # at a vertex the prediction is the vertex's local fit (its stored value plus the global
    # quadratic); between vertices it is a smooth cubic: continuous at the cell boundaries
    pc, xbar = parts["pc"], parts["xbar"]
    dx = parts["x"] - xbar
    at_vertices = parts["value"] + pc[0] + pc[1] * dx + pc[2] * dx * dx / 2
    np.testing.assert_allclose(locfit_predict(model, parts["x"]), at_vertices, atol=1e-12)
    eps = 1e-9
    left = locfit_predict(model, parts["x"][1:-1] - eps)
    right = locfit_predict(model, parts["x"][1:-1] + eps)
    np.testing.assert_allclose(left, right, atol=1e-7)
    # the input order only changes rounding (sums run in data order, as locfit's; its
    # Jacobi solve amplifies rounding differences to ~1e-12)
    perm = rng.permutation(x.size)
    np.testing.assert_allclose(locfit_fit(x[perm], y[perm], np.ones_like(x)), model, rtol=1e-9,
                               atol=1e-9)


def test_locfit_out_of_vertex_space_raises_as_r():
    # R: locfit(y ~ x) on these data stops with "newsplit: out of vertex space" (checked with
    # locfit 1.5-9.7): 80 % of the points in a tiny interval force more than 19 vertices.
    x = np.r_[np.linspace(-0.001, 0.001, 800), np.linspace(1, 1000, 200)]
    with pytest.raises(LocfitError, match="out of vertex space"):
        locfit_fit(x, np.sin(x), np.ones_like(x))


def test_local_dispersion_fit_inputs():
    with pytest.raises(ValueError, match="100 \\* minDisp"):
        local_dispersion_fit(np.array([1.0, 2.0]), np.array([1e-8, 1e-7]))
    with pytest.raises(ValueError, match="differ in length"):
        local_dispersion_fit(np.array([1.0, 2.0]), np.array([0.1]))
    with pytest.raises(ValueError, match="finite"):
        locfit_fit(np.array([1.0, np.inf]), np.array([0.0, 1.0]), np.ones(2))
    with pytest.raises(ValueError, match="not a packed locfit model"):
        local_trend_values(np.array([3.0, 1.0, 2.0]), np.array([1.0]))


def test_explicit_local_fit_emits_no_warning():
    genes, _ = _study("marioni")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = fit_dispersion_trend(*_inputs(genes), fit_type="local")
    assert res["fit_type"] == "local"


def test_genes_at_one_base_mean_give_rs_constant_trend():
    """R's locfit on a single abscissa predicts a constant, the weighted mean of the
    responses (locfit 1.5-9.7: ``locfit(log(disps) ~ lp(log(means)), weights = means)`` on one
    gene with dispersion 0.1 predicts -2.302585 everywhere; on two genes at mean 5 with 0.1
    and 0.2, -1.956012): the port's tree would divide by the zero-width box."""
    at = np.array([1.0, 5.0, 50.0])
    one = local_trend_values(local_dispersion_fit(np.array([5.0]), np.array([0.1])), at)
    np.testing.assert_allclose(np.log(one), -2.302585, rtol=1e-6)
    two = local_dispersion_fit(np.array([5.0, 5.0, 0.0]), np.array([0.1, 0.2, np.nan]))
    np.testing.assert_allclose(np.log(local_trend_values(two, at)), -1.956012, rtol=1e-6)


def test_a_two_gene_study_follows_r_through_the_constant_local_trend():
    """Two genes over three sites (``r_extra/two_genes``, DESeq2 1.38.3 and locfit 1.5-9.7,
    ``make_refs.R``): the parametric trend fails, one gene's estimate is above 100 * minDisp,
    and R's local fit predicts its dispersion everywhere. fed_de reaches R's trend and MAP
    dispersions, coefficients and p-values (its IRLS goes to DESeq2's fixed point, R's stops
    an iterate short: the fold change differs by 6e-5)."""
    import fed_de
    from tests.conftest import DATA, split_sites

    folder = DATA / "r_extra" / "two_genes"
    counts = pd.read_csv(folder / "counts.csv", index_col=0).T
    meta = pd.read_csv(folder / "metadata.csv", index_col=0).loc[counts.index]
    ref = pd.read_csv(folder / "r_results.csv", index_col=0)
    sites = split_sites(counts, meta, 3, stratify="condition")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fed_de.deseq2(sites, "~ batch + condition", min_cell_size=0,
                            levels={"batch": ["b1", "b2", "b3"], "condition": ["A", "B"]})
    disp = res.dispersions.loc[ref.index]
    np.testing.assert_allclose(disp["trend"], disp.loc["G00001", "genewise"], rtol=1e-15)
    np.testing.assert_allclose(disp["trend"], ref["dispFit"], rtol=1e-6)
    np.testing.assert_allclose(disp["final"], ref["dispersion"], rtol=1e-6)
    table = res.results().loc[ref.index]
    np.testing.assert_allclose(table["log2FoldChange"], ref["log2FoldChange"], rtol=1e-4)
    np.testing.assert_allclose(table["pvalue"], ref["pvalue"], rtol=1e-3)
