"""The screen's control-cell disclosure rules, and group sizes counted on non-empty cells
(issue 12).

With the site as a design factor, a design cell's control sums (``GroupSums.ctrl_*``, the
control fit's score, information and Fisher weights per design cell) are one site's sums. A
gene whose controls in some design cell hold 1 .. ``min_nonzero - 1`` expressing cells is
withheld whole; a design cell needs ``min_pooled_group`` control cells. Cells without counts
enter no sum, so they count toward no group's size.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fed_de
from fed_de.core.screen_testing import bh_by_row
from fed_de.errors import DisclosureError, FitWarning
from fed_de.screening.data import make_screen

KW = {"perturbation_column": "perturbation", "control": "non-targeting"}
KEYS = ("log2FoldChange", "lfcSE", "stat", "pvalue", "baseMean")


def _control_expressing(sites: dict, genes: list[str]) -> np.ndarray:
    """Control cells with counts expressing each gene, per site: ``(sites, G)``."""
    out = []
    for a in sites.values():
        lib = np.asarray(a.X.sum(axis=1)).ravel()
        ctrl = (a.obs["perturbation"].to_numpy() == KW["control"]) & (lib > 0)
        out.append((a[:, genes].X.toarray()[ctrl] > 0).sum(axis=0))
    return np.array(out)


def _quiet(sites, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fed_de.screen(sites, **KW, **kwargs)


@pytest.fixture(scope="module")
def screen():
    """Six perturbations with >= 15 cells at every site (the group rule touches none); a
    quarter of the genes have a site whose controls hold one expressing cell."""
    scr = make_screen(n_cells=3000, n_genes=120, n_perturbations=6, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on = fed_de.screen(scr.sites, **KW, shrink=False)
    off = _quiet(scr.sites, shrink=False, min_cell_size=0)
    genes = list(on.study.genes)
    single = _control_expressing(scr.sites, genes)
    withheld = ((single > 0) & (single < 2)).any(axis=0)
    return scr, on, off, withheld, caught


def test_control_rule_withholds_the_genes_of_single_expressing_controls(screen):
    """Exactly the genes with a site whose controls hold one expressing cell are withheld:
    every pair NaN and untested, no control mean, counted in the facts, with a warning."""
    _, on, off, withheld, caught = screen
    assert 10 <= withheld.sum() < withheld.size
    assert on.facts["genes_withheld"] == int(withheld.sum())
    assert off.tested[:, withheld].sum() > 50  # answers the rule costs on this screen
    assert not on.tested[:, withheld].any()
    for key in (*KEYS, "padj"):
        assert np.isnan(on.arrays[key][:, withheld]).all(), key
    assert np.isnan(on.gene_table["control_mean"].to_numpy()[withheld]).all()
    assert np.isfinite(on.gene_table["control_mean"].to_numpy()[~withheld]).all()
    assert any(issubclass(w.category, FitWarning) and "gene(s) withheld" in str(w.message)
               for w in caught)


def test_control_rule_keeps_the_other_genes(screen):
    """Without the trend (shared by every gene) the other genes' results are those of a run
    with every rule off; BH runs over the pairs still tested."""
    _, on, off, withheld, _ = screen
    keep = on.tested
    assert keep.sum() > 200 and not (on.tested & ~off.tested).any()
    assert np.array_equal(on.tested[:, ~withheld], off.tested[:, ~withheld])
    for key in KEYS:
        a, b = on.arrays[key][keep], off.arrays[key][keep]
        assert np.allclose(a, b, rtol=1e-9, atol=0), key
    ref = bh_by_row(np.where(keep, off.arrays["pvalue"], np.nan))
    assert np.allclose(on.arrays["padj"][keep], ref[keep], rtol=1e-9, atol=0)


def test_control_rule_defaults_move_only_the_trend(screen):
    """Defaults (MAP shrinkage): the genes withheld leave the dispersion trend, as all-zero
    genes do; the other genes' gene-wise dispersions are unchanged."""
    scr, _, _, withheld, _ = screen
    on = _quiet(scr.sites)
    off = _quiet(scr.sites, min_cell_size=0)
    a = on.gene_table["dispersion_genewise"].to_numpy()
    b = off.gene_table["dispersion_genewise"].to_numpy()
    assert np.allclose(a[~withheld], b[~withheld], rtol=1e-12, atol=0, equal_nan=True)
    assert np.isnan(a[withheld]).all()
    assert on.tested.sum() > 200


def test_control_rule_on_design_cells_shared_by_sites(screen):
    """Without site effects a design cell pools the sites: the aggregator withholds a gene
    when the pooled controls hold one expressing cell, though a site's hold one."""
    scr, _, _, withheld, _ = screen
    res = _quiet(scr.sites, site_effects=False)
    pooled = _control_expressing(scr.sites, list(res.study.genes)).sum(axis=0)
    expect = (pooled > 0) & (pooled < 2)
    assert expect.sum() < withheld.sum()
    assert res.facts["genes_withheld"] == int(expect.sum())
    assert not res.tested[:, expect].any() and res.tested[:, withheld & ~expect].any()


def _relabel(a, rows: np.ndarray, label: str):
    a = a.copy()
    labels = a.obs["perturbation"].astype(str).to_numpy().copy()
    labels[rows] = label
    a.obs["perturbation"] = labels
    return a


def test_empty_cells_count_in_no_group():
    """A site's group of 3 labelled cells, one without counts, sums 2 cells: left out
    (``min_cell_size``); a design cell of 15 control cells, one empty, is refused."""
    scr = make_screen(n_cells=1200, n_genes=40, n_perturbations=4, seed=0)
    sites = dict(scr.sites)
    libs = {k: np.asarray(a.X.sum(axis=1)).ravel() for k, a in sites.items()}
    a, lib = sites["site_a"], libs["site_a"]
    is_pert = a.obs["perturbation"].to_numpy() != KW["control"]
    rows = np.concatenate([np.flatnonzero(is_pert & (lib > 0))[:2],
                           np.flatnonzero(is_pert & (lib == 0))[:1]])
    sites["site_a"] = _relabel(a, rows, "pX")
    b, lib_b = sites["site_b"], libs["site_b"]
    is_pert_b = b.obs["perturbation"].to_numpy() != KW["control"]
    sites["site_b"] = _relabel(b, np.flatnonzero(is_pert_b & (lib_b > 0))[:20], "pX")
    res = _quiet(sites, site_effects=False)
    assert res.n_cells["pX"] == 20  # site_a's 2 non-empty cells are left out, not summed

    ctrl = np.flatnonzero(~is_pert)
    full, empty = ctrl[lib[ctrl] > 0], ctrl[lib[ctrl] == 0]
    assert empty.size and full.size > 14
    # 14 control cells with counts and one without: the rest become a perturbation
    sites = dict(scr.sites)
    sites["site_a"] = _relabel(a, np.concatenate([full[14:], empty[1:]]),
                               str(a.obs["perturbation"].to_numpy()[is_pert][0]))
    with pytest.raises(DisclosureError, match="site 'site_a'.*14 control cell"):
        _quiet(sites)


def test_a_screen_left_without_a_trend_says_so_and_how_to_go_on():
    """A small screen whose rules withhold the genes with dispersion above the floor: the
    trend cannot be fitted (R stops too); the error counts the genes left and names fixes
    that work."""
    from fed_de.errors import FedDEError

    scr = make_screen(n_cells=3000, n_genes=40, n_perturbations=3, n_sites=3, seed=5)
    kw = dict(perturbation_column="perturbation", control="non-targeting", method="nb_glm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FedDEError, match=r"cannot be fitted on the \d+ of 40 genes"):
            fed_de.screen(scr.sites, **kw)
        res = fed_de.screen(scr.sites, fit_type="mean", **kw)
    assert np.isfinite(res.gene_table["dispersion_map"]).any()
