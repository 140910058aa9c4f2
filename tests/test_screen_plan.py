"""The screen's plan: phases, rounds and fused aggregations of every variant, and message
schemas that follow the plan's constants.

The number of points per gene a dispersion round evaluates is read from the aggregator's
request, so changing the first round's start offsets or anchors changes what the sites send
and what is checked together; the answer stays the one of the unperturbed plan (more start
points only bracket the maxima sooner).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import fed_de
from fed_de.backends.plan import record_plan
from fed_de.errors import DisclosureError
from fed_de.federation.calls import as_call
from fed_de.federation.secure import KEY_ROUND_STEPS
from fed_de.federation.strategy import schedule
from fed_de.screening.data import make_screen
from fed_de.screening.strategy import ScreenStrategy
from fed_de.screening.study import ScreenStudy

KW = {"perturbation_column": "perturbation", "control": "non-targeting"}
SITES = ["s0", "s1", "s2"]
NB = {"setup": 1, "sums": 1, "genewise": 4, "trend_prior_map": 3, "fit": 5}


def _strategy(**options) -> ScreenStrategy:
    study = ScreenStudy(genes=[f"g{i}" for i in range(20)], perturbations=["P0", "P1"],
                        control="non-targeting", perturbation_column="perturbation",
                        factors=[["site", SITES]], site_factor=True)
    return ScreenStrategy(study.to_dict(), **options)


def _names(steps) -> list[str]:
    return [as_call(s).fn.__name__ for s in steps]


@pytest.mark.parametrize("options,rounds", [
    ({}, NB),
    ({"size_factors": "poscounts"}, {**NB, "size_factors": 1}),
    ({"dispersion": "moments"}, {"setup": 1, "sums": 1, "fit": 5}),
    ({"shrink": False}, {"setup": 1, "sums": 1, "genewise": 4, "fit": 5}),
    ({"genewise_rounds": 2, "map_rounds": 1, "fit_rounds": 1},
     {"setup": 1, "sums": 1, "genewise": 2, "trend_prior_map": 1, "fit": 1}),
    ({"method": "wilcoxon"}, {"setup": 1, "rank_tests": 1}),
    ({"method": "t_test", "size_factors": "poscounts"},
     {"setup": 1, "size_factors": 1, "rank_tests": 1}),
])
def test_rounds_per_phase(options, rounds):
    strategy = _strategy(**options)
    got = Counter(name for name, _ in schedule(strategy.phases()))
    assert dict(got) == rounds
    keys = KEY_ROUND_STEPS if len(SITES) > 1 else 0  # secure aggregation's key round
    assert record_plan(strategy, SITES).sequential_steps == 2 * sum(rounds.values()) + keys


def test_fused_aggregations():
    """Each phase's opening steps run in the previous phase's last aggregation."""
    rounds = schedule(_strategy().phases())
    chains = [(name, _names(r.steps)) for name, r in rounds]
    assert chains[1] == ("sums", ["summarise", "dispersion_groups", "fit_starts",
                                  "first_points"])
    assert chains[2] == ("genewise", ["genewise_start"])
    assert chains[5] == ("genewise", ["search_step", "genewise_estimate", "trend_and_prior",
                                      "map_begin"])
    assert chains[8] == ("trend_prior_map", ["search_step", "map_finish", "start_fit"])
    assert chains[-1] == ("fit", ["fit_step", "wald_tests"])
    assert as_call(rounds[-1][1].local).params == (("final", True),)
    moments = [_names(r.steps) for _, r in schedule(_strategy(dispersion="moments").phases())]
    assert moments[1][-2:] == ["moments_dispersions", "start_fit"]
    unshrunk = [_names(r.steps) for _, r in schedule(_strategy(shrink=False).phases())]
    assert unshrunk[5][-3:] == ["trend_and_prior", "unshrunk", "start_fit"]


@pytest.fixture(scope="module")
def screen_sites():
    return make_screen(n_cells=1500, n_genes=80, n_perturbations=5, seed=2).sites


def test_dispersion_cells_all_is_refused_under_the_disclosure_rules(screen_sites):
    with pytest.raises(DisclosureError, match="single expressing cell"):
        fed_de.screen(screen_sites, **KW, dispersion_cells="all")


@pytest.mark.parametrize("cells", ["control", "all"])
@pytest.mark.parametrize("constant,value", [
    ("START_OFFSETS", (0.0, -1.0, 1.0, 0.5)),
    ("ANCHORS", (None, float(np.log(1e-3)), float(np.log(1e-2)), float(np.log(0.1)),
                 float(np.log(10.0)), None)),
])
def test_perturbed_start_points_keep_schemas_and_answer(screen_sites, monkeypatch, cells,
                                                        constant, value):
    rules = {"min_cell_size": 0} if cells == "all" else {}  # "all": audited studies only
    ref = fed_de.screen(screen_sites, **KW, dispersion_cells=cells, **rules)
    monkeypatch.setattr(f"fed_de.screening.dispersion.{constant}", value)
    res = fed_de.screen(screen_sites, **KW, dispersion_cells=cells, record_messages=True,
                        secure_aggregation=False, **rules)
    first = next(m for m in res.facts["messages"] if m["step"] == "disp_sums")
    assert first["message"]["ll"].shape == (80, 9)  # one point more than the plan's 8
    for col in ("log2FoldChange", "lfcSE", "pvalue"):
        a, b = ref.arrays[col], res.arrays[col]
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=col)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=col)
