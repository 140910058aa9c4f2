"""Differential privacy (``dp_epsilon``): per-sample decomposition, clipping, noise, accountant,
and whole runs (fed_de.federation.dp, fed_de.bulk.dp)."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest

import fed_de
from fed_de.bulk import dp as bulk_dp
from fed_de.bulk.strategy import DESeq2Strategy
from fed_de.demo_data import make_demo_study
from fed_de.federation import dp
from fed_de.federation.calls import invoke
from fed_de.federation.messages import arrays

CONTRAST = ("condition", "B", "A")


@pytest.fixture(scope="module")
def study():
    return make_demo_study(n_samples=150, n_genes=60, seed=3)


def _kw(study):
    return dict(levels=study.levels, genes=study.genes, cooks=False, contrasts=[CONTRAST])


@pytest.fixture(scope="module")
def plain(study):
    """The run without DP; DP drops the min_nonzero rule's counts, so it is off here too."""
    return fed_de.deseq2(study.sites, study.design, min_nonzero=0, **_kw(study))


# -- the one-sample decomposition -----------------------------------------------------------------
def test_one_sample_views_add_up_to_every_message(study, monkeypatch):
    """For every site step of a default run (Cook's off), the step evaluated on each sample's
    one-sample view sums to the step's message; public arrays do not move with the counts."""
    seen, worst = {}, {}

    def checking(self, fn, state, provided, params):
        site = provided["site"]
        before = copy.copy(site.kept)
        message = invoke(fn, state, provided, params)
        kind = type(message).__name__
        if kind == "KeyOffer":
            return message
        parts = bulk_dp.contributions(fn, state, provided, params, before, invoke)
        flat = arrays(message)
        for key, value in flat.items():
            got = np.sum([p[key] for p in parts], axis=0)
            ok = np.ones(np.shape(value), dtype=bool)
            if (kind, key) == ("LogSums", "sum_log"):
                # ratio size factors zero a gene's log sum when one of the site's samples is
                # zero (the aggregator drops such genes): a per-site rule, not a sum
                ok = flat["n_zero"] == 0
            err = np.abs(got - value)[ok] / np.maximum(1.0, np.abs(value)[ok])
            worst[(kind, key)] = max(worst.get((kind, key), 0.0), float(err.max(initial=0)))
            if bulk_dp.rule(kind, key) == "public":  # the same with other counts
                counts = np.asarray(site.data.counts) * 3 + 1
                other = replace(site, data=replace(site.data, counts=counts),
                                kept=copy.copy(before))
                moved = arrays(invoke(fn, state, {**provided, "site": other}, params))[key]
                np.testing.assert_array_equal(moved, value)
        seen[fn.__name__] = seen.get(fn.__name__, 0) + 1
        return message

    monkeypatch.setattr(DESeq2Strategy, "site_message", checking)
    fed_de.deseq2(study.sites, study.design, **_kw(study))
    # the rough sums ride on the moments round (per design cell), the closing sums on the
    # last IRLS round
    assert {"log_sums", "moment_sums", "irls_sums", "disp_sums",
            "closing_fit_sums"} <= set(seen)
    assert ("MomentSums", "cells.logsum") in worst
    bad = {k: v for k, v in worst.items() if v > 1e-10}
    assert not bad, bad
    assert len(worst) >= 20  # every array of every message kind above was compared


# -- mechanism -------------------------------------------------------------------------------------
def test_clipped_contributions_never_exceed_the_bound():
    rng = np.random.default_rng(0)
    c = rng.standard_cauchy((40, 30, 4, 3)) * 2  # heavy tails: many rows far above
    out = dp.clip_rows(c, 5.0)
    norms = np.sqrt((out.reshape(40, 30, -1) ** 2).sum(-1))
    assert norms.max() <= 5.0 * (1 + 1e-12)
    small = np.sqrt((c.reshape(40, 30, -1) ** 2).sum(-1)) <= 5.0
    assert small.any() and (~small).any()
    np.testing.assert_array_equal(out.reshape(40, 30, -1)[small], c.reshape(40, 30, -1)[small])
    scalars = dp.clip_rows(np.array([-7.0, 0.5, 3.0]), 2.0)
    np.testing.assert_array_equal(scalars, [-2.0, 0.5, 2.0])


def test_noise_shares_add_up_to_the_calibrated_variance():
    """k sites' shares of sigma = z * 2c sqrt(rows): their sum has variance sigma^2."""
    rng = np.random.default_rng(12345)
    k, rows, c, z = 3, 50, 4.0, 0.7
    sigma = z * dp.sensitivity(c, rows)
    draws = 2000  # 2000 x 50 = 100 000 values per site
    total = np.zeros((draws, rows))
    for _ in range(k):
        zero = np.zeros((1, rows))
        total += np.stack([dp.release(zero, c, z, k, rng) for _ in range(draws)])
    var = total.var()
    # standard error of a variance from 1e5 normal draws: sqrt(2 / 1e5) = 0.45 %
    assert abs(var / sigma**2 - 1) < 0.02
    assert abs(total.mean()) < 5 * sigma / math.sqrt(total.size)
    one = np.stack([dp.noise_share((rows,), sigma, k, rng) for _ in range(draws)])
    assert abs(one.var() / (sigma**2 / k) - 1) < 0.02


# -- accountant ------------------------------------------------------------------------------------
def test_accountant_matches_the_gaussian_zcdp_formulas():
    delta = 1e-6
    assert dp.gaussian_rho(3.0, 2.0) == pytest.approx(9.0 / 8.0)
    for rho in (0.01, 0.5, 3.0, 200.0):
        eps = rho + 2 * math.sqrt(rho * math.log(1 / delta))
        assert dp.epsilon_from_rho(rho, delta) == pytest.approx(eps, rel=1e-14)
        assert dp.rho_from_epsilon(eps, delta) == pytest.approx(rho, rel=1e-10)
    # n releases, each sigma = z * Delta, compose to the target rho
    z = dp.noise_multiplier(94, 1.5)
    assert 94 * dp.gaussian_rho(2.0, z * 2.0) == pytest.approx(1.5, rel=1e-12)
    plan = bulk_dp.budget(10.0, delta, {"a": 30, "b": 64}, n_sites=3, clip=1.0)
    assert sum(p["rho"] for p in plan["per_phase"].values()) == pytest.approx(plan["rho"])
    assert dp.epsilon_from_rho(plan["rho"], delta) == pytest.approx(10.0, rel=1e-10)
    assert plan["per_phase"]["a"]["epsilon"] < 10.0
    # one colluding site of three removes a third of the noise variance: rho x 3/2
    assert plan["if_t_sites_collude"]["1"]["rho"] == pytest.approx(plan["rho"] * 1.5)


# -- whole runs ------------------------------------------------------------------------------------
def test_no_noise_no_clipping_equals_the_plain_run(study, plain):
    run = fed_de.deseq2(study.sites, study.design, dp_epsilon=math.inf, dp_clip=math.inf,
                        dp_floor=False, **_kw(study))
    a, b = plain.results(CONTRAST), run.results(CONTRAST)
    for col in ("baseMean", "log2FoldChange", "lfcSE", "stat", "pvalue"):
        x, y = a[col].to_numpy(), b[col].to_numpy()
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
        ok = ~np.isnan(x)
        np.testing.assert_allclose(y[ok], x[ok], rtol=1e-9, atol=1e-12, err_msg=col)
    budget = run.facts["privacy"]["differential_privacy"]
    assert budget["noise_multiplier"] == 0.0 and budget["releases"] > 50


def test_centred_log_likelihoods_keep_the_answer(study, plain, monkeypatch):
    """With noise on, the dispersion searches read log likelihoods centred per gene; without
    the noise itself (and no clipping) the fit moves only by the searches' relative
    tolerances (measured: LFC within 3e-5, dispersions within 0.3 %)."""
    monkeypatch.setattr(dp, "noise_share", lambda shape, *a: np.zeros(shape))
    run = fed_de.deseq2(study.sites, study.design, dp_epsilon=1e12, dp_clip=math.inf,
                        dp_floor=False, **_kw(study))
    assert run.facts["privacy"]["differential_privacy"]["noise_multiplier"] > 0
    a = plain.results(CONTRAST)
    b = run.results(CONTRAST)
    for col in ("log2FoldChange", "pvalue"):
        x, y = a[col].to_numpy(), b[col].to_numpy()
        ok = np.isfinite(x)
        np.testing.assert_allclose(y[ok], x[ok], rtol=1e-3, atol=1e-4, err_msg=col)
    disp = run.gene_results.dispersions.final
    np.testing.assert_allclose(disp, plain.gene_results.dispersions.final, rtol=5e-3)


def test_clipping_alone_costs_little_on_demo_like_data(study, plain):
    """No noise, the public bounds: the bounds were set on the demo generator, so clipping
    alone moves a study of the same kind (another seed) little."""
    run = fed_de.deseq2(study.sites, study.design, dp_epsilon=math.inf, dp_floor=False,
                        **_kw(study))
    a = plain.results(CONTRAST)["log2FoldChange"].to_numpy()
    b = run.results(CONTRAST)["log2FoldChange"].to_numpy()
    ok = np.isfinite(a) & np.isfinite(b)
    assert ok.sum() >= 55
    assert 0 < np.median(np.abs(a[ok] - b[ok])) < 0.01


def test_small_epsilon_run_differs_and_reports_its_budget(study, plain, monkeypatch):
    calls = []
    release = dp.release

    def counting(*args, **kwargs):
        calls.append(1)
        return release(*args, **kwargs)

    monkeypatch.setattr(dp, "release", counting)
    run = fed_de.deseq2(study.sites, study.design, dp_epsilon=1.0, dp_delta=1e-5,
                        **_kw(study))
    budget = run.facts["privacy"]["differential_privacy"]
    disp = run.gene_results.dispersions  # dp_floor (default): never below the trend
    ok = np.isfinite(disp.final) & np.isfinite(disp.fit)
    assert ok.sum() > 0 and np.all(disp.final[ok] >= disp.fit[ok])
    # the accountant's count of releases is what the sites released (3 sites)
    assert len(calls) == 3 * budget["releases"]
    assert budget["clip_bounds"]["DispSums.ll"] == bulk_dp.BOUNDS[("DispSums", "ll")]
    assert budget["epsilon"] == 1.0 and budget["delta"] == 1e-5
    assert dp.epsilon_from_rho(budget["rho"], 1e-5) == pytest.approx(1.0)
    assert sum(p["releases"] for p in budget["per_phase"].values()) == budget["releases"]
    assert set(budget["per_phase"]) >= {"size_factors", "mu_fit", "genewise", "final_fit"}
    a = plain.results(CONTRAST)["log2FoldChange"].to_numpy()
    b = run.results(CONTRAST)["log2FoldChange"].to_numpy()
    ok = np.isfinite(a) & np.isfinite(b)
    assert np.median(np.abs(a[ok] - b[ok])) > 1e-3


def test_dp_refuses_what_it_does_not_cover(study):
    kw = _kw(study)
    with pytest.raises(ValueError, match="pca"):
        fed_de.deseq2(study.sites, study.design, dp_epsilon=1.0, pca=True, **kw)
    with pytest.raises(ValueError, match="LRT"):
        fed_de.deseq2(study.sites, study.design, dp_epsilon=1.0, test="LRT",
                      reduced="~ batch", **kw)
    with pytest.raises(ValueError, match="secure aggregation"):
        fed_de.deseq2(study.sites, study.design, dp_epsilon=1.0, secure_aggregation=False,
                      **kw)
    with pytest.raises(ValueError, match="dp_epsilon must be positive"):
        fed_de.deseq2(study.sites, study.design, dp_epsilon=0.0, **kw)
    assert bulk_dp.rule("MomentSums", "xtx") == "public"
    with pytest.raises(ValueError, match="no differential-privacy rule"):
        bulk_dp.rule("MomentSums", "new_field")


def test_cooks_is_turned_off_with_a_warning(study):
    kw = {**_kw(study), "cooks": True}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = fed_de.deseq2(study.sites, study.design, dp_epsilon=math.inf, **kw)
    assert any("Cook's outlier filtering is off" in str(w.message) for w in caught)
    assert run.facts["options"]["cooks"] is False
