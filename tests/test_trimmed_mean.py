"""Federated exact trimmed means (the building block of DESeq2's outlier replacement)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import trim_mean

from fed_de.api import declare_study, load_sites
from fed_de.core import order_stats
from fed_de.demo_data import make_demo_study
from fed_de.simulation.strict import run_strict
from fed_de.steps.trimmed_mean import TrimmedMeanStrategy


@pytest.mark.parametrize("n_sites", [1, 3])
def test_federated_trimmed_mean_equals_pooled(n_sites):
    demo = make_demo_study(n_samples=60, n_genes=300, seed=7)
    pooled = demo.pooled()
    sites = {"a": pooled} if n_sites == 1 else demo.sites
    loaded = load_sites(sites)
    study = declare_study(loaded, "~ condition", {"condition": ["A", "B"]}, demo.genes)
    run = run_strict(TrimmedMeanStrategy(study.to_dict(), size_factors="poscounts",
                                         min_cell_size=0), loaded)
    sf = np.concatenate([run.local_states[s.name]["size_factors"] for s in loaded])
    counts = np.concatenate([np.asarray(sites[s.name].X, float) for s in loaded])
    ref = trim_mean(counts / sf[:, None], 0.2, axis=0)  # R's mean(x, trim = 0.2)
    np.testing.assert_allclose(run.shared_state["trimmed_mean"], ref, rtol=1e-12)
    assert run.ledger.sequential_steps == 2 * (2 + 8 + 1)


def test_order_statistics_with_ties_and_zeros_are_exact():
    rng = np.random.default_rng(3)
    x = rng.poisson(3.0, (41, 50)).astype(float)  # many ties, many zeros
    x[:, 0] = 0.0
    lo, hi = order_stats.trim_ranks(41, 0.2)
    ranks = np.tile([lo, hi], (50, 1)).astype(float)
    thr, state = order_stats.first_thresholds(50, 2, 15), None
    for _ in range(8):
        state = order_stats.refine(thr, order_stats.interval_sums(x, thr), ranks, state)
        thr = state["thresholds"]
    srt = np.sort(x, axis=0)
    assert state["done"].all()
    np.testing.assert_array_equal(state["value"][:, 0], srt[lo - 1])
    np.testing.assert_array_equal(state["value"][:, 1], srt[hi - 1])
    parts = order_stats.trimmed_sum_parts(x, state["value"][:, 0], state["value"][:, 1])
    tm = order_stats.trimmed_mean(parts, state["value"][:, 0], state["value"][:, 1], lo, hi)
    np.testing.assert_allclose(tm, trim_mean(x, 0.2, axis=0), rtol=1e-13)
