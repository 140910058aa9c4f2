"""DESeq2's VST (fed_de.core.vst) against R.

With R's size factors and R's trend (coefficients, or the local trend's values on DESeq2's
grid), per-site VST values equal R's:

* PyDESeq2's references (R DESeq2 1.34, synthetic single-factor data): blind parametric, not
  blind parametric, blind mean trend: max relative error ~6e-15;
* pasilla (R DESeq2 1.38.3, ``blind=FALSE``, every 10th gene; make_refs.R): parametric, mean and
  local trends: max relative error ~5e-10 (the references are stored with 10 digits).

End to end, the VST is as close to R as fed_de's trend is: on the synthetic data fed_de's own
parametric trend gives R's ``blind=FALSE`` VST to 2e-5 (its 10-gene trend fit differs by 5e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fed_de.core import vst as vs

DATA = Path(__file__).parent / "data"
EXTRA = DATA / "r_extra" / "shrink"


def pasilla():
    counts = pd.read_csv(EXTRA / "pasilla" / "counts.csv.gz", index_col=0)
    sf = pd.read_csv(EXTRA / "pasilla" / "size_factors.csv", index_col=0).loc[counts.index]
    cfg = json.loads((EXTRA / "pasilla" / "vst.json").read_text())
    return counts, sf.iloc[:, 0].to_numpy(), cfg


@pytest.mark.parametrize("fname,kind,key", [
    ("r_vst.csv", "parametric", "blind_parametric"),
    ("r_vst_with_design.csv", "parametric", "design_parametric"),
    ("r_mean_vst.csv", "mean", "blind_mean"),
])
def test_vst_matches_r_134(fname, kind, key):
    counts = pd.read_csv(DATA / "pydeseq2_synthetic" / "counts.csv", index_col=0)
    cfg = json.loads((EXTRA / "synthetic" / "vst.json").read_text())
    c = cfg[key]
    coefs = [c["asymptDisp"], c["extraPois"]] if kind == "parametric" else [c]
    ours = vs.vst(counts.to_numpy(float), np.array(cfg["size_factors"]), kind, coefs)
    ref = pd.read_csv(DATA / "r134" / "single_factor" / fname, index_col=0).T.loc[counts.index]
    np.testing.assert_allclose(ours, ref.to_numpy(), rtol=1e-13)


@pytest.mark.parametrize("kind", ["parametric", "mean", "local"])
def test_vst_matches_r_on_pasilla(kind):
    counts, sf, cfg = pasilla()
    ref = pd.read_csv(EXTRA / "pasilla" / f"vst_{kind}.csv.gz", index_col=0)
    y = counts[ref.index].to_numpy(float)
    if kind == "parametric":
        ours = vs.vst(y, sf, kind, [cfg[kind]["asymptDisp"], cfg[kind]["extraPois"]])
    elif kind == "mean":
        ours = vs.vst(y, sf, kind, [cfg[kind]])
    else:
        on_grid = pd.read_csv(EXTRA / "pasilla" / "local_trend_grid.csv.gz", index_col=0)
        grid = vs.local_grid(cfg["local_max_ncount"])
        np.testing.assert_allclose(grid, on_grid.x, rtol=1e-9)
        base_mean = (counts.to_numpy(float) / sf[:, None]).mean(axis=0)
        spline = vs.local_vst_spline(on_grid.trend.to_numpy(), grid, float(np.mean(1 / sf)),
                                    base_mean)
        ours = vs.vst_local(y, sf, spline)
    np.testing.assert_allclose(ours, ref.to_numpy().T, rtol=2e-9)


def test_vst_per_site_equals_pooled():
    """Each site transforms its own samples: the stacked site values are the pooled ones."""
    counts, sf, cfg = pasilla()
    y = counts.to_numpy(float)
    coefs = [cfg["parametric"]["asymptDisp"], cfg["parametric"]["extraPois"]]
    pooled = vs.vst(y, sf, "parametric", coefs)
    parts = [vs.vst(y[s], sf[s], "parametric", coefs) for s in (slice(0, 3), slice(3, 7))]
    np.testing.assert_array_equal(np.vstack(parts), pooled)


def test_fmm_spline_reproduces_cubics_and_interpolates():
    """R's fmm end conditions make the spline exact for a cubic (also when extrapolating)."""
    x = np.sort(np.random.default_rng(3).uniform(0, 5, 30))

    def f(t):
        return 0.3 * t**3 - t**2 + 2.0 * t - 1.0

    sp = vs.fmm_spline(x, f(x))
    u = np.linspace(-0.5, 5.5, 101)
    np.testing.assert_allclose(vs.spline_eval(sp, u), f(u), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(vs.spline_eval(sp, x), f(x), rtol=1e-12, atol=1e-12)
