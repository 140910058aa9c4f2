"""An aggregation sends only the run-state parts a later step reads (fed_de.federation.liveness):
the answer is unchanged, to the bit, and the sites receive less."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import fed_de
from fed_de.bulk.strategy import DESeq2Strategy
from fed_de.demo_data import make_demo_study
from fed_de.federation import liveness


@pytest.fixture(scope="module")
def demo():
    return make_demo_study(n_samples=150, n_genes=150, seed=4)


def _run(demo, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fed_de.deseq2(demo.sites, demo.design, levels=demo.levels, **kw)


def _same_answer_fewer_bytes(less, more, factor: float = 1.0) -> None:
    """The same results to the bit; each site received less than ``factor`` x ``more``'s."""
    for part in ("results", "dispersions", "coefficients"):
        a, b = getattr(less, part), getattr(more, part)
        a, b = (a(), b()) if callable(a) else (a, b)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    got = less.facts["bytes_received_by_site"]
    full = more.facts["bytes_received_by_site"]
    assert all(got[s] < factor * full[s] for s in full), (got, full)


@pytest.mark.parametrize("kw", [{}, {"test": "LRT", "reduced": "~ batch"},
                                {"shrink": "normal", "pca": True}])
def test_dead_parts_are_not_sent_and_the_answer_is_unchanged(demo, monkeypatch, kw):
    trimmed = _run(demo, **kw)
    monkeypatch.setattr(DESeq2Strategy, "kept_parts", lambda self: None)
    everything = _run(demo, **kw)
    _same_answer_fewer_bytes(trimmed, everything, 0.9)


def test_the_dispersion_search_stops_travelling_after_the_map_round(demo):
    study = fed_de.make_study(demo.design, demo.genes, demo.levels)
    live = liveness.live_after(DESeq2Strategy(study.to_dict(), n_sites=3))
    chains = list(live)
    first_final = next(c for c in chains if "stage='final'" in c and "irls_step" in c)
    genewise = next(c for c in chains if c.endswith("genewise_step"))
    assert "disp" in live[genewise]  # still searched
    assert "disp" not in live[first_final] and "irls_mu" not in live[chains[-1]]
    assert live[chains[-1]] == frozenset()  # nothing runs after the last aggregation


def test_the_dispersion_fit_means_stop_travelling_once_the_final_fit_starts(demo):
    """The IRLS steps name both fits but read the one their stage names (``reads_except``):
    from the first final IRLS round on, the dispersion-fit means' fit is dead, and the
    mu-IRLS rounds never carry a final fit they do not read."""
    from fed_de.bulk import irls
    from fed_de.federation.calls import step_reads

    assert "irls_mu" not in step_reads(irls.irls_sums, {"stage": "final"})
    assert "irls_final" not in step_reads(irls.irls_step, {"stage": "mu"})
    study = fed_de.make_study(demo.design, demo.genes, demo.levels)
    live = liveness.live_after(DESeq2Strategy(study.to_dict(), n_sites=3))
    chains = list(live)
    first_final = next(c for c in chains if "stage='final'" in c and "irls_step" in c)
    last_mu = [c for c in chains if "stage='mu'" in c][-1]
    assert "irls_mu" not in live[first_final]
    assert "irls_mu" in live[last_mu]  # the dispersion rounds and the final fit's start


def test_a_settled_mu_fit_sends_less_and_leaves_the_answer_unchanged(demo, monkeypatch):
    """Once its rounds are over, the dispersion-fit means' fit travels as its coefficients and
    flags (``settle_mu_fit``): the same answer to the bit as with the whole fit, fewer bytes."""
    from fed_de.bulk import irls as bulk_irls
    from fed_de.core.irls import settled, start_irls

    fit = start_irls(np.ones((5, 3)), np.zeros(5, dtype=bool), np.zeros((5, 3)))
    slim = settled(fit)
    np.testing.assert_array_equal(slim.beta, fit.beta)
    assert slim.candidates.shape == (5, 0, 3) and slim.converged.shape == (5,)
    settled_run = _run(demo)
    monkeypatch.setattr(bulk_irls, "settled", lambda fit: fit)
    whole = _run(demo)
    _same_answer_fewer_bytes(settled_run, whole)


def test_fit_state_nobody_reads_stops_travelling(demo, monkeypatch):
    """The dispersion-fit means' fit keeps no X'WX at its accepted coefficients (only the
    final fit's covariance and Cook's hat diagonals read one), and the results keep which
    design cells hold counts, not their sums: the same answer to the bit, fewer bytes."""
    from fed_de.bulk import irls as bulk_irls
    from fed_de.bulk import refit
    from fed_de.core.irls import start_irls

    kw = {"test": "LRT", "reduced": "~ batch"}
    slim = _run(demo, **kw)
    g = slim.state.genes
    assert g.cell_nonzero.dtype == bool and g.cell_nonzero.shape[0] == len(demo.genes)

    def keeping(*args, keep_xtwx=True, **kwargs):
        return start_irls(*args, **kwargs)

    for module in (bulk_irls, refit):
        monkeypatch.setattr(module, "start_irls", keeping)
    whole = _run(demo, **kw)
    _same_answer_fewer_bytes(slim, whole)
