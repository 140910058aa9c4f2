"""The screen's per-(perturbation, design cell) disclosure rule (issue 12).

With the site as a design factor a design cell is one site's, so a (perturbation, design cell)
group of fewer than ``min_pooled_group`` cells is left out at that site, before anything is
sent. The rule must leave every other perturbation's results as they were (checked against a
run with every rule off), and a perturbation it touches must be the analysis of its remaining
cells (checked against a rules-off run in which the cells left out carry another label). The
runs compared skip the MAP shrinkage: the genes the control rule withholds
(``tests/test_screen_control_rule.py``) leave the dispersion trend, which every gene shares.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fed_de
from fed_de.screening.data import make_screen

KW = {"perturbation_column": "perturbation", "control": "non-targeting"}
NO_TREND = {"shrink": False}  # results per gene, so a withheld gene changes no other
KEYS = ("log2FoldChange", "lfcSE", "pvalue", "baseMean")


def _groups(sites: dict, perturbations: list[str]) -> np.ndarray:
    """Cells with counts of each perturbation at each site: ``(P, sites)``."""
    out = np.zeros((len(perturbations), len(sites)), dtype=int)
    for j, a in enumerate(sites.values()):
        lib = np.asarray(a.X.sum(axis=1)).ravel()
        labels = a.obs["perturbation"].to_numpy()[lib > 0]
        for i, p in enumerate(perturbations):
            out[i, j] = int((labels == p).sum())
    return out


@pytest.fixture(scope="module")
def mixed():
    """A screen whose groups at a site hold 0-44 cells: the rule touches some perturbations."""
    scr = make_screen(n_cells=3000, n_genes=60, n_perturbations=40, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on = fed_de.screen(scr.sites, **KW, **NO_TREND)
        off = fed_de.screen(scr.sites, **KW, **NO_TREND, min_cell_size=0)
    perts = list(on.study.perturbations)
    return scr, on, off, perts, _groups(scr.sites, perts)


def test_group_rule_reports_what_it_left_out(mixed):
    _, on, _, _, tab = mixed
    small = (tab > 0) & (tab < 15)
    assert on.facts["groups_left_out"] == int(small.sum()) > 0
    assert on.facts["perturbations_left_out"] == []  # each keeps a group of >= 15 here
    assert np.array_equal(on.n_cells.to_numpy(), np.where(small, 0, tab).sum(axis=1))


def test_group_rule_keeps_unaffected_results(mixed):
    """Perturbations with no small group: the same results as with every rule off (the pairs
    and genes the ``min_nonzero`` rules withhold aside)."""
    _, on, off, _, tab = mixed
    rows = ~((tab > 0) & (tab < 15)).any(axis=1)
    assert rows.sum() >= 10
    keep = rows[:, None] & on.tested
    assert keep.sum() > 100 and not (on.tested & ~off.tested)[rows].any()
    for key in KEYS:
        a, b = on.arrays[key][keep], off.arrays[key][keep]
        assert np.allclose(a, b, rtol=1e-9, atol=0), key


def test_group_rule_fits_the_remaining_cells(mixed):
    """An affected perturbation's results are those of its groups of >= 15 cells alone: a
    rules-off run where the cells left out carry another label (a perturbation of its own,
    so they stay in the size factors' scale; groups of 1-2, which the sites leave out of the
    scale too, an undeclared one) gives the same numbers."""
    scr, on, _, perts, tab = mixed
    small = (tab > 0) & (tab < 15)
    rows = small.any(axis=1)
    sites = {}
    for j, (name, a) in enumerate(scr.sites.items()):
        a = a.copy()
        labels = a.obs["perturbation"].astype(str).to_numpy().copy()
        for i in np.flatnonzero(small[:, j]):
            labels[labels == perts[i]] = "held_out" if tab[i, j] >= 3 else "unused"
        a.obs["perturbation"] = labels
        sites[name] = a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fed_de.screen(sites, **KW, **NO_TREND, min_cell_size=0,
                            perturbations=[*perts, "held_out"])
    keep = rows[:, None] & on.tested
    assert keep.sum() > 100
    for key in KEYS:
        a, b = on.arrays[key][keep], ref.arrays[key][:len(perts)][keep]
        assert np.allclose(a, b, rtol=1e-9, atol=0), key


def test_group_rule_on_design_cells_shared_by_sites():
    """Without site effects a design cell pools the sites: the aggregator applies the rule to
    the masked totals, and a perturbation is left out exactly when its pooled cells (all
    sites) are fewer than 15, though each site's share is smaller."""
    scr = make_screen(n_cells=1200, n_genes=40, n_perturbations=40, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fed_de.screen(scr.sites, **KW, site_effects=False)
    perts = list(res.study.perturbations)
    tab = _groups(scr.sites, perts)
    # min_cell_size (3) is checked at the site on the group's cells with counts
    pooled = np.where(tab >= 3, tab, 0).sum(axis=1)
    share = ((tab > 0) & (tab < 15)).any(axis=1) & (pooled >= 15)
    assert share.sum() >= 10  # analysed though a site holds fewer than 15 of their cells
    small = [p for p, n in zip(perts, pooled, strict=True) if 0 < n < 15]
    assert small and res.facts["perturbations_left_out"] == small
    assert np.isnan(res.arrays["pvalue"][[perts.index(p) for p in small]]).all()
    assert res.tested[pooled >= 15].sum() > 100
