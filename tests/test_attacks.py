"""An honest-but-curious aggregator attacks a run (issue 12): what it recovers, measured.

The attacker (``tests/attacker.py``) keeps every message the aggregator receives and its own
outputs, and claims a value only when one possibility remains. Two settings:

- **audit** (``secure_aggregation=False``, ``min_cell_size=0``: every disclosure rule off,
  design cells of 4 at a site): the attacker must still recover a small site's size factors
  and counts -- it is sharp on the current protocol;
- **defaults** (secure aggregation on, the disclosure rules on, pooled cells of >= 15): the
  totals view gives no count and no size factor exactly; the bound on how close the weight
  sums can pin a size factor is measured too. The Cook's replacement differencing residual is
  measured and documented (``benchmarks/privacy/README.md``).

Every claim is graded against the truth; a wrong claim fails the test.
"""

from __future__ import annotations

import attack_scenarios as scen
import attacker as atk
import numpy as np
import pytest

QUICK = {"starts": 2, "effort": 20, "max_obs": 800}  # size-factor fit of the totals views
KW_SCREEN = {"perturbation_column": "perturbation", "control": "non-targeting"}


def _fpylll() -> bool:
    try:
        import fpylll  # noqa: F401
    except ImportError:
        return False
    return True


# -- (a) the attacker is sharp: audit settings ------------------------------------------------
@pytest.fixture(scope="module")
def audit_run():
    sites, _, _ = scen.bulk_sites([(4, 4), (4, 4), (5, 5)], n_genes=150, seed=3, outliers=3)
    rec = atk.record_run(sites, "~ condition", secure_aggregation=False, min_cell_size=0)
    geo = atk.Geometry(rec["study"])
    return rec, geo, scen.truth_of(sites, geo)


def test_audit_site_view_recovers_a_small_site(audit_run):
    """Plain messages, no disclosure rule, cells of 4: the site's n, cell sizes, every size
    factor and a large share of its counts, with no wrong claim."""
    rec, geo, truth = audit_run
    genes = range(40)
    res = atk.attack_view(atk.view(rec, "site0"), geo, genes=genes)
    sc = atk.score_view(res, truth["site0"])
    assert sc["n_right"] and sc["cells_right"]
    assert sc["sf_right"] == sc["sf_total"] == 8 and sc["sf_wrong"] == 0
    decoded = sc["n_samples"] * len(genes)
    assert sc["counts_right"] >= 0.3 * decoded, sc
    assert sc["counts_wrong"] == 0


def test_audit_cooks_differencing_names_the_outlier(audit_run):
    """Plain messages: the replaced outlier's original count, from the closing round's cell
    sums minus round 2's, at the site that holds it."""
    rec, geo, truth = audit_run
    right = wrong = named = 0
    for name in rec["sites"]:
        tasks = atk.view(rec, name)
        sizes = atk.attack_sizes(tasks, geo)
        sf = atk.attack_size_factors(tasks, geo, sizes["cells"])
        s_cells = [f.values if f.claimed else np.full(f.values.size, np.nan) for f in sf]
        claims = atk.attack_cooks(tasks, geo, s_cells)
        sc = atk.score_view({"sizes": sizes, "counts": None, "cooks": claims}, truth[name])
        right += sc["cooks_right"]
        wrong += sc["cooks_wrong"]
        named += sum("count" in c for c in claims)
    assert named >= 1 and right >= named and wrong == 0


NEEDS_FPYLLL = pytest.mark.skipif(
    not _fpylll(), reason="fpylll is not installed (pip install 'fed_de[test]'): the "
    "Fincke-Pohst fallback enumerates too few points to reach this bound")


@NEEDS_FPYLLL
def test_totals_view_solves_small_pooled_cells():
    """Secure aggregation alone does not protect small pooled cells: with the rules off and
    pooled cells of 6 (two sites of 3 per cell), the totals give a cell's size factors and
    many counts -- the totals decoder works, so the zeros below are the rules' doing."""
    sites, _, _ = scen.bulk_sites(scen.pooled_cells(6, site_min=3), n_genes=150, seed=3)
    rec = atk.record_run(sites, "~ condition", min_cell_size=0, cooks=False)
    geo = atk.Geometry(rec["study"])
    sc = atk.score_view(atk.attack_view(atk.view(rec, "totals"), geo, genes=range(60)),
                        scen.truth_of(sites, geo)["total"])
    assert sc["sf_right"] >= sc["sf_total"] // 2 and sc["sf_wrong"] == 0
    assert sc["counts_right"] >= 0.3 * sc["n_samples"] * 60 and sc["counts_wrong"] == 0


# -- (b) the promise: defaults, totals view ------------------------------------------------------
def _masked_uniform(rec: dict, site: str) -> float:
    """Share of set top bits in a site's masked words (1/2 when they are uniform)."""
    words = atk.masked_view_values(rec, site).astype(np.uint64)
    return float(((words >> np.uint64(63)) & np.uint64(1)).mean())


@pytest.fixture(scope="module", params=[True, False], ids=["cooks", "no_cooks"])
def default_run(request):
    sites, _, _ = scen.bulk_sites(scen.pooled_cells(15), n_genes=150, seed=3,
                               outliers=4 if request.param else 0)
    rec = atk.record_run(sites, "~ condition", cooks=request.param)
    geo = atk.Geometry(rec["study"])
    return rec, geo, scen.truth_of(sites, geo)


def test_default_bulk_totals_view_nothing_exact(default_run):
    """Secure aggregation and the disclosure rules on, pooled cells of 15 (three sites of 5
    per cell): a site's own sums are masked; from the totals, no count and no size factor."""
    rec, geo, truth = default_run
    assert all(r.sites is None and r.masked is not None for r in rec["rounds"])
    with pytest.raises(ValueError, match="masked"):
        atk.view(rec, "site0")
    for name in rec["sites"]:
        assert abs(_masked_uniform(rec, name) - 0.5) < 0.01
    tasks = atk.view(rec, "totals")
    res = atk.attack_view(tasks, geo, sf_kwargs=QUICK)
    sc = atk.score_view(res, truth["total"])
    assert sc["n_right"]  # the pooled study's n: a study-level fact, not a site's
    assert sc["counts_right"] == 0 and sc["counts_wrong"] == 0
    assert sc["sf_right"] == 0 and sc["sf_wrong"] == 0
    ws = atk.weight_sums(tasks, geo)
    tot = truth["total"]
    bounds = [atk.size_factor_bound(ws[c], tot.size_factors[tot.cells == c])
              for c in range(geo.C)]
    assert min(bounds) > 1e-3  # no decoder of these sums pins a size factor


def test_default_cooks_step_replaces_nothing_so_differencing_finds_nothing(default_run):
    """Defaults from two sites: outliers are filtered (p-value NA), not replaced, so no refit
    sum differs from a first-fit sum by an outlier; the differencing attack claims nothing."""
    rec, geo, truth = default_run
    tasks = atk.view(rec, "totals")
    # without Cook's the closing sums ride on the last IRLS round (BoxedSums)
    close = next((t for t in tasks if t.kind == "ClosingSums"), None)
    assert (close is not None) == rec["result"].facts["options"]["cooks"]
    assert atk.attack_cooks(tasks, geo) == []
    if close is not None:  # Cook's on: outliers seen, none replaced
        assert not np.any(close.message["cooks.n_replaced"])
        assert "cooks.start.cell_sum" not in close.message  # no refit start is sent
        assert int(np.sum(rec["result"].cooks["outlier"])) >= 1
        assert rec["result"].facts["options"]["min_replicates_for_replace"] == np.inf


def test_cooks_replacement_opt_in_residual():
    """The residual of opting in to DESeq2's replacement (min_replicates_for_replace=7): for a
    gene with one replaced sample, the totals of round 2 and of the closing round differ by
    that sample alone, so its normalised count (not its count: its size factor stays
    unknown) is exact."""
    sites, _, _ = scen.bulk_sites(scen.pooled_cells(15), n_genes=150, seed=3, outliers=4)
    with pytest.warns(UserWarning, match="min_replicates_for_replace=7"):
        rec = atk.record_run(sites, "~ condition", min_replicates_for_replace=7)
    geo = atk.Geometry(rec["study"])
    truth = scen.truth_of(sites, geo)
    tasks = atk.view(rec, "totals")
    close = next(t for t in tasks if t.kind == "ClosingSums")
    single = int((np.abs(np.asarray(close.message["cooks.n_replaced"]) - 1) < 1e-9).sum())
    claims = atk.attack_cooks(tasks, geo)
    sc = atk.score_view({"sizes": atk.attack_sizes(tasks, geo), "counts": None, "cooks": claims},
                      truth["total"])
    assert single >= 1
    assert sc["cooks_right"] == single and sc["cooks_wrong"] == 0
    assert not any("count" in c for c in claims)


def test_pca_site_centroids_residual():
    """Documented residual of the opt-in PCA with per-site centroids: a site's own slot of
    the site x level sums holds its sample count per level, in the clear of the totals."""
    sites, _, _ = scen.bulk_sites([(5, 6), (4, 5), (6, 4)], n_genes=80, seed=3)
    rec = atk.record_run(sites, "~ condition", pca=True, cooks=False, min_pooled_cell_size=10)
    msg = next(t.message for t in atk.view(rec, "totals") if "centroids.by_site.n" in t.message)
    true = [[int((s.obs["condition"] == lv).sum()) for lv in ("A", "B")]
            for s in sites.values()]
    assert np.array_equal(msg["centroids.by_site.n"], true)


def test_two_sites_residual():
    """Documented residual with two sites: a site colluding with the aggregator removes its
    own masks, so the other site's messages are in the clear; with the rules on (pooled
    cells of 15, the other site's cells of 7), its counts are partly solved."""
    sites, _, _ = scen.bulk_sites([(8, 8), (7, 7)], n_genes=150, seed=3)
    rec = atk.record_run(sites, "~ condition", cooks=False, secure_aggregation=False)
    geo = atk.Geometry(rec["study"])
    sc = atk.score_view(atk.attack_view(atk.view(rec, "site1"), geo, genes=range(60)),
                        scen.truth_of(sites, geo)["site1"])
    assert sc["counts_right"] > 0 and sc["counts_wrong"] == 0 and sc["sf_wrong"] == 0


def test_default_demo_totals_view_nothing_exact():
    """The demo's three hospitals (150 samples, ``~ batch + condition``, pooled cells of 20
    to 33): nothing exact from the totals."""
    sites, _, _, design = scen.demo_study(150, n_genes=150, seed=1)
    rec = atk.record_run(sites, design)
    geo = atk.Geometry(rec["study"])
    truth = scen.truth_of(sites, geo)
    res = atk.attack_view(atk.view(rec, "totals"), geo, sf_kwargs=QUICK)
    sc = atk.score_view(res, truth["total"])
    assert sc["counts_right"] == sc["counts_wrong"] == 0
    assert sc["sf_right"] == sc["sf_wrong"] == 0
    assert sc["cooks_wrong"] == 0


# -- (c) screens ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def screen_data():
    return scen.screen_sites(n_cells=600, n_perturbations=40, n_genes=200, seed=0)


def _screen_attack(sites, **kwargs):
    rec = atk.record_run(sites, screen=True, **KW_SCREEN, **kwargs)
    st = rec["study"]
    tasks = atk.view(rec, "totals")
    res = atk.attack_screen(tasks)
    truth = scen.screen_truth(sites, "total", list(st.perturbations), list(st.genes),
                           min_cell_size=kwargs.get("min_cell_size", 3))
    return rec, tasks, atk.score_screen(res, truth)


def test_screen_rules_off_single_expressors_leak(screen_data):
    """Without the disclosure rules (``min_cell_size=0``), even the cross-site totals give
    single expressing cells' counts and, from them, whole groups' library sizes."""
    _, _, sc = _screen_attack(screen_data, min_cell_size=0)
    assert sc["single_right"] >= 0.04 * sc["nonzero_total"], sc
    assert sc["lib_right"] > 0 and sc["counts_right"] > 0
    assert sc.get("single_wrong", 0) == 0 and sc.get("counts_wrong", 0) == 0
    assert sc.get("lib_wrong", 0) == 0


def test_screen_defaults_nothing_exact(screen_data):
    """Defaults: no per-(perturbation, gene) sum has a single expressing cell, groups of
    fewer than 15 pooled cells are left out, and the attacker recovers nothing."""
    rec, tasks, sc = _screen_attack(screen_data)
    group = next(t for t in tasks if t.kind == "GroupSums")
    expr = np.asarray(group.message["pert_expr"])
    assert not ((expr > 0) & (expr < 2)).any()
    n_pert = np.asarray(group.message["pert_n"]).sum(axis=1)
    assert not ((n_pert > 0) & (n_pert < 15)).any()
    assert sc.get("single_right", 0) == sc.get("counts_right", 0) == sc.get("lib_right", 0) == 0
    assert sc.get("single_wrong", 0) == sc.get("counts_wrong", 0) == 0


def test_screen_rules_keep_other_answers():
    """The rules change nothing but the pairs they withhold: with groups of >= 15 cells at
    every site, results equal a run with the rules off except on withheld pairs (NaN). No MAP
    shrinkage: the genes withheld whole leave the trend every gene shares."""
    import fed_de

    sites = scen.screen_sites(n_cells=900, n_perturbations=6, n_genes=80, seed=1)
    on = fed_de.screen(sites, **KW_SCREEN, shrink=False)
    off = fed_de.screen(sites, **KW_SCREEN, shrink=False, min_cell_size=0)
    withheld = on.tested != off.tested
    assert withheld.any() and not (on.tested & ~off.tested).any()
    for key in ("log2FoldChange", "pvalue", "baseMean"):
        a, b = on.arrays[key], off.arrays[key]
        assert np.isnan(a[withheld]).all(), key
        keep = on.tested
        assert np.allclose(a[keep], b[keep], rtol=1e-9, equal_nan=True), key


# -- the decoder -------------------------------------------------------------------------------
@NEEDS_FPYLLL
def test_fpylll_and_fincke_pohst_agree():
    """Both enumerations list the same integer points of an ellipsoid."""
    rng = np.random.default_rng(0)
    M = rng.normal(size=(9, 5)) * np.array([3.0, 1.0, 0.5, 2.0, 0.8])
    y = rng.integers(0, 20, size=5).astype(float)
    t = M @ y + rng.normal(scale=0.05, size=9)
    a = atk._fpylll_points(M, t, 4.0, 500, 40.0)
    b = atk._fincke_pohst(M, t, 4.0, 500)
    assert a is not None and b is not None
    sa = {tuple(r) for r in np.rint(a).astype(int)}
    sb = {tuple(r) for r in np.rint(b).astype(int)}
    assert tuple(y.astype(int)) in sb and sb <= sa


# -- (d) the later rounds: fallback, shrinkage, PCA, refit (issue 12, item 6) ----------------------
def _later_run(cells, shrink, **kwargs):
    """A run with shrinkage and PCA whose final IRLS stops after 2 rounds and sends every
    unconverged gene to the fallback (two rounds): the fallback's sums then cover ~all
    genes. (By default the fallback takes only diverged or stagnating genes, rare on these
    data; what a site sends for a fallback gene is the same whatever sent it there.)"""
    import fed_de.bulk.fallback as fb

    sites, _, _ = scen.bulk_sites(cells, n_genes=150, seed=3)
    orig = fb.start_fallback
    fb.start_fallback = lambda beta, conv, div, stag, zero: orig(beta, conv, ~conv, stag, zero)
    try:
        rec = atk.record_run(sites, "~ condition", cooks=False, shrink=shrink, pca=True,
                             rounds={"final": 2, "fallback": 2}, **kwargs)
    finally:
        fb.start_fallback = orig
    geo = atk.Geometry(rec["study"])
    active = [int(np.sum(r.received.fallback.active)) for r in rec["rounds"]
              if r.kind == "FallbackSums"]
    assert len(active) == 2 and min(active) >= 100  # the fallback ran on most genes
    return rec, geo, scen.truth_of(sites, geo)


def _counts(tasks, geo, truth, **kwargs) -> dict:
    sizes = atk.attack_sizes(tasks, geo)
    cl = atk.attack_counts(tasks, geo, sizes, **kwargs)
    return atk.score_view({"sizes": sizes, "counts": cl, "cooks": []}, truth)


@NEEDS_FPYLLL
@pytest.mark.parametrize("shrink", ["normal", "apeglm"])
def test_audit_later_sums_alone_solve_a_small_site(shrink):
    """Plain messages, rules off, cells of 4: the fallback's gradient and observed
    information, and the shrinkage's sums, each alone (no X'Wz, no cell sum of normalised
    counts) give most of a site's counts -- the decoders of these rounds work."""
    rec, geo, truth = _later_run([(4, 4), (4, 4), (5, 5)], shrink,
                                 secure_aggregation=False, min_cell_size=0)
    tasks = atk.view(rec, "site0")
    base = _counts(tasks, geo, truth["site0"], only=())  # bounds only: all-zero cells
    for kind in ("FallbackSums", "PostFitSums"):
        sc = _counts(tasks, geo, truth["site0"], only=(kind,))
        assert sc["counts_wrong"] == 0 and sc["sf_wrong"] == 0
        assert sc["counts_right"] >= base["counts_right"] + 0.5 * sc["counts_total"], (kind, sc)


@NEEDS_FPYLLL
def test_default_later_sums_nothing_exact():
    """Defaults (secure aggregation, rules, pooled cells of 15) with the fallback on ~all
    genes, normal-prior shrinkage and PCA: every later round's equations and the ridge's
    X'WX weight sums added, the totals give no count and no size factor. Handed the true size
    factors (no aggregator has them), the same equations would give a share of the counts:
    the size factors' being out of reach is what protects them."""
    rec, geo, truth = _later_run(scen.pooled_cells(15), "normal")
    tasks = atk.view(rec, "totals")
    tot = truth["total"]
    sc = atk.score_view(atk.attack_view(tasks, geo, sf_kwargs=QUICK), tot)
    assert sc["counts_right"] == sc["counts_wrong"] == 0
    assert sc["sf_right"] == sc["sf_wrong"] == 0
    ws = atk.weight_sums(tasks, geo)
    assert any(t.kind == "PostFitSums" and "normal.xtwx" in t.message for t in tasks)
    bounds = [atk.size_factor_bound(ws[c], tot.size_factors[tot.cells == c])
              for c in range(geo.C)]
    assert min(bounds) > 1e-3
    oracle = [np.sort(tot.size_factors[tot.cells == c]) for c in range(geo.C)]
    base = _counts(tasks, geo, tot, oracle_s=oracle, only=())
    told = _counts(tasks, geo, tot, oracle_s=oracle)
    assert told["counts_wrong"] == 0
    assert told["counts_right"] > base["counts_right"] + 0.1 * told["counts_total"], told


def test_refit_opt_in_adds_nothing_beyond_the_replaced_values():
    """Replacement opted in: the refit's rounds (mu-IRLS, dispersions, final IRLS on the
    replaced counts) add weight sums and equations; the attacker still gets the replaced
    samples' normalised counts (the known residual) and nothing else: no count, no size
    factor. With defaults the refit is not in the plan at all."""
    sites, _, _ = scen.bulk_sites(scen.pooled_cells(15), n_genes=150, seed=3, outliers=4)
    with pytest.warns(UserWarning, match="min_replicates_for_replace=7"):
        rec = atk.record_run(sites, "~ condition", min_replicates_for_replace=7)
    geo = atk.Geometry(rec["study"])
    truth = scen.truth_of(sites, geo)["total"]
    tasks = atk.view(rec, "totals")
    refit = [t for t in tasks if t.kind == "IRLSSums" and t.state.rows is not None]
    assert refit  # the refit's rounds are in this recording
    res = atk.attack_view(tasks, geo, sf_kwargs=QUICK)
    sc = atk.score_view(res, truth)
    assert sc["counts_right"] == sc["counts_wrong"] == 0
    assert sc["sf_right"] == sc["sf_wrong"] == 0
    close = next(t for t in tasks if t.kind == "ClosingSums")
    single = int((np.abs(np.asarray(close.message["cooks.n_replaced"]) - 1) < 1e-9).sum())
    assert sc["cooks_right"] == single and sc["cooks_wrong"] == 0
    assert not any("count" in c for c in res["cooks"])
    ws = atk.weight_sums(tasks, geo)
    assert min(atk.size_factor_bound(ws[c], truth.size_factors[truth.cells == c])
               for c in range(geo.C)) > 1e-3


def test_default_plan_has_no_refit_round(default_run):
    """Defaults from two sites: no round runs on replaced counts (no refit in the plan)."""
    rec, _, _ = default_run
    assert not any(getattr(r.received, "rows", None) is not None for r in rec["rounds"])


def _subgroup_attack(sites, max_cells: int, **kwargs):
    """Record a screen, attack each site's (perturbation, design cell) groups of up to
    ``max_cells`` cells through ``WaldSums.pert_wx``, grade the claimed library sizes."""
    rec = atk.record_run(sites, screen=True, **KW_SCREEN, **kwargs)
    st = rec["study"]
    tasks = atk.view(rec, "totals")
    grp = next(t for t in tasks if t.kind == "GroupSums")
    scale = float(np.exp(grp.state.scale.sf_log_scale))
    claims = atk.attack_screen_subgroups(tasks, st, max_cells=max_cells)
    right = wrong = 0
    names = list(sites)
    for cl in claims:
        tr = scen.screen_truth(sites, names[cl["cell"]], list(st.perturbations),
                               list(st.genes), min_cell_size=kwargs.get("min_cell_size", 3))
        lib = np.sort(tr[cl["perturbation"]][1])
        good = lib.size == cl["s"].size and np.allclose(cl["s"] * scale, lib, rtol=1e-6)
        right += int(lib.size) if good else 0
        wrong += 0 if good else int(cl["s"].size)
    return tasks, st, right, wrong


def test_screen_site_subgroups_audit(screen_data):
    """Audit (every disclosure rule off): the screen's design has the site as a factor, so
    its per-design-cell sums are per-site sums in the clear of the totals, and the last
    round's ``WaldSums.pert_wx`` (per perturbation, gene and design cell: the sum of the
    Fisher weights) gives the size factors -- library sizes exactly -- of a site's 1-7 cells
    of a perturbation, with no wrong claim. (Before the per-group rule, the same held under
    the defaults for groups of 3-7 cells at a site inside pooled groups of >= 15.)"""
    _, _, right, wrong = _subgroup_attack(screen_data, 7, min_cell_size=0)
    assert right >= 10 and wrong == 0, (right, wrong)


@pytest.fixture(scope="module")
def screen_mixed():
    """A screen whose groups at a site hold 0-44 cells."""
    return scen.screen_sites(n_cells=3000, n_perturbations=40, n_genes=200, seed=0)


def test_screen_site_subgroups_defaults_nothing(screen_mixed):
    """Defaults: a (perturbation, design cell) group of fewer than 15 cells is left out at
    its site, so no per-design-cell sum covers fewer than 15 cells -- ``pert_n``, and the
    Newton (``pert_hx``) and Wald (``pert_wx``) sums per design cell are zero on every group
    left out -- and the attack on the smallest groups sent (15-20 cells) claims nothing."""
    tasks, st, right, wrong = _subgroup_attack(screen_mixed, 20)
    grp = next(t for t in tasks if t.kind == "GroupSums")
    pn = np.asarray(grp.message["pert_n"])
    assert not ((pn > 0) & (pn < 15)).any()
    assert ((pn >= 15) & (pn <= 20)).sum() >= 10  # what the attack tried
    assert grp.state.scale.n_groups_out > 0  # the rule left groups out on this screen
    to_cells = np.linalg.pinv(st.fit_design)
    for t in tasks:
        if t.kind != "FitSums":
            continue
        for key in ("pert_hx", "wald.pert_wx"):
            if key in t.message:
                per_cell = np.asarray(t.message[key]) @ to_cells  # P x G x C
                assert np.allclose(per_cell.transpose(0, 2, 1)[pn == 0], 0.0, atol=1e-9), key
    assert right == wrong == 0, (right, wrong)


def _control_single_expressor_attack(sites, **kwargs):
    """Read every (design cell, gene) control sum of ``GroupSums`` with one expressing cell
    as that cell's count and, from ``ctrl_y / ctrl_norm``, its library size; grade the claims
    against the truth. Returns the recording's totals view, and claims right and wrong."""
    rec = atk.record_run(sites, screen=True, **KW_SCREEN, **kwargs)
    st = rec["study"]
    tasks = atk.view(rec, "totals")
    grp = next(t for t in tasks if t.kind == "GroupSums")
    E, Y, N = (np.asarray(grp.message[k]) for k in ("ctrl_expr", "ctrl_y", "ctrl_norm"))
    scale = float(np.exp(grp.state.scale.sf_log_scale))
    names, genes = list(sites), list(st.genes)
    right = wrong = 0
    for c, g in zip(*np.nonzero(np.abs(E - 1) < 1e-9), strict=True):
        a = sites[names[c]]
        ctrl = (a.obs["perturbation"] == KW_SCREEN["control"]).to_numpy()
        x = np.asarray(a[:, genes[g]].X.toarray()).ravel()[ctrl]
        lib = np.asarray(a.X.sum(axis=1)).ravel()[ctrl]
        hit = np.flatnonzero(x > 0)
        ok = (hit.size == 1 and x[hit[0]] == Y[c, g]
              and abs(Y[c, g] / N[c, g] * scale - lib[hit[0]]) <= 1e-6 * lib[hit[0]])
        right += int(ok)
        wrong += int(not ok)
    return tasks, right, wrong


def test_screen_control_single_expressor_audit(screen_mixed):
    """Audit (every disclosure rule off): with the site as a design factor the control sums
    per design cell (``GroupSums.ctrl_y`` / ``ctrl_norm`` / ``ctrl_expr``) are per-site sums,
    and a (site, gene) control sum with one expressing cell gives that control cell's count
    and, from ``ctrl_y / ctrl_norm``, its library size -- exactly, with no wrong claim (61
    such sums on this screen; before the control rule, the same under the defaults)."""
    _, right, wrong = _control_single_expressor_attack(screen_mixed, min_cell_size=0)
    assert right >= 20 and wrong == 0, (right, wrong)


def _gene_axes(cls, prefix: str = "") -> dict:
    """Dotted field name -> position of the gene axis, for every array of a message type
    that has one."""
    import dataclasses
    import typing

    from fed_de.federation.messages import Message

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        shape = f.metadata.get("shape")
        if shape is not None:
            if "G" in shape:
                out[prefix + f.name] = shape.index("G")
            continue
        for kind in typing.get_args(hints[f.name]):
            if isinstance(kind, type) and issubclass(kind, Message):
                out.update(_gene_axes(kind, f"{prefix}{f.name}."))
    return out


def test_screen_control_single_expressors_defaults_nothing(screen_mixed):
    """Defaults: a gene whose controls in some design cell hold one expressing cell is
    withheld (the site flags its own design cells in the setup round): no control sum of
    any later message has a single expressing cell, every array of every later message is
    zero on the withheld genes (group sums, the Newton and Wald sums of the control fit and
    effects, the dispersion sums), and the attack claims nothing."""
    from fed_de.screening import dispersion, fit, setup

    tasks, right, wrong = _control_single_expressor_attack(screen_mixed)
    assert right == wrong == 0, (right, wrong)
    grp = next(t for t in tasks if t.kind == "GroupSums")
    E = np.asarray(grp.message["ctrl_expr"])
    assert not ((E > 0) & (E < 2)).any()
    genes = grp.state.scale.genes_withheld
    assert genes.sum() >= 20  # the genes the audit's attack read
    types = {"GroupSums": setup.GroupSums, "FitSums": fit.FitSums,
             "DispSums": dispersion.DispSums}
    seen = set()
    for t in tasks:
        if t.kind not in types:
            continue
        for key, axis in _gene_axes(types[t.kind]).items():
            if key in t.message:
                value = np.moveaxis(np.asarray(t.message[key]), axis, 0)
                assert not value[genes].any(), (t.kind, key)
                seen.add((t.kind, key))
    assert {("FitSums", "ctrl_score"), ("FitSums", "wald.ctrl_info"),
            ("DispSums", "A")} <= seen
