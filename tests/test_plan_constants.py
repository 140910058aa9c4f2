"""Message schemas follow the plan's constants: change them and every message still matches.

Shapes a request names (the dispersion search's (gene, point) pairs, IRLS and fallback
candidates, the trimmed-mean search's thresholds and open targets) are read from the request
itself, so the declared schema of a site step cannot drift from what it sends. This test
perturbs such constants, runs a study whose Cook's refit exercises every step, and checks the
run completes (any mismatch would stop it with a MessageSchemaError) with the answer of the
unperturbed plan.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_cooks import LEVELS, injected_sites, run


@pytest.fixture(scope="module")
def reference():
    return run(injected_sites(True), "~ batch + condition", levels=LEVELS)


@pytest.mark.parametrize("constants", [
    {"fed_de.core.fallback.STEPS": (1.0, 0.5, 0.25), "fed_de.bulk.cooks.K_THRESHOLDS": 9},
    {"fed_de.bulk.cooks.K_THRESHOLDS": 23},
    {"fed_de.core.irls.N_CANDIDATES": 2},
])
def test_perturbed_plan_constants_keep_schemas_and_answer(reference, monkeypatch, constants):
    for target, value in constants.items():
        monkeypatch.setattr(target, value)
    fit = run(injected_sites(True), "~ batch + condition", levels=LEVELS,
              rounds={"final": 10, "robust": 12} if constants.get(
                  "fed_de.core.irls.N_CANDIDATES") or constants.get(
                  "fed_de.bulk.cooks.K_THRESHOLDS") == 9 else None)
    assert fit.state.refit.n_refit == reference.state.refit.n_refit
    a, b = fit.results(), reference.results()
    np.testing.assert_array_equal(a.isna().to_numpy(), b.isna().to_numpy())
    for col in ("log2FoldChange", "lfcSE", "stat"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-4, atol=1e-8, err_msg=col)
