"""DESeq2's linear-mu shortcut reads the model matrix: a cell-means design (as many distinct
rows as coefficients) takes the dispersion-fit means from the linear fit, with no IRLS.

A factor the study declares but the formula leaves out (``batch`` beside ``~ condition``)
splits the study's cells, not the design's rows, so it must not turn the shortcut off: the
fit, and the plan's rounds, are those of the study that does not declare it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import fed_de
from fed_de.bulk.state import DESeq2Options
from fed_de.demo_data import make_demo_study
from fed_de.design import make_study, n_distinct_rows


@pytest.fixture(scope="module")
def demo():
    return make_demo_study(n_samples=120, n_genes=200, seed=8)


def _fit(demo, levels, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fed_de.deseq2(demo.sites, "~ condition", levels=levels, min_cell_size=0,
                             cooks=False, **kw)


def test_distinct_design_rows_not_cells(demo):
    both = make_study("~ condition", demo.genes, demo.levels)
    assert n_distinct_rows(both) == 2 == both.n_coefs
    full = make_study("~ batch + condition", demo.genes, demo.levels)
    assert n_distinct_rows(full) == 6 > full.n_coefs
    only_b = np.array([c[list(demo.levels).index("condition")] == "B"
                       for c in fed_de.design.design_cells(both)])
    assert n_distinct_rows(both, present=only_b) == 1


def test_an_undeclared_factor_does_not_change_the_fit(demo):
    declared = _fit(demo, demo.levels)
    alone = _fit(demo, {"condition": demo.levels["condition"]})
    for part in ("results", "dispersions", "coefficients"):
        a, b = getattr(declared, part), getattr(alone, part)
        a, b = (a(), b()) if callable(a) else (a, b)
        # the same fit; the moments round's cell sums are added over finer cells (batch x
        # condition); the unrolled fits carry that to ~1e-11
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-12)
    assert declared.state.totals.linear_mu and alone.state.totals.linear_mu
    # no rounds of IRLS for the dispersion-fit means in either plan
    assert declared.facts["sequential_steps"] == alone.facts["sequential_steps"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fuller = fed_de.deseq2(demo.sites, "~ batch + condition", levels=demo.levels,
                               min_cell_size=0, cooks=False)
    mu_steps = 2 * DESeq2Options().mu_rounds
    assert fuller.facts["sequential_steps"] == declared.facts["sequential_steps"] + mu_steps
