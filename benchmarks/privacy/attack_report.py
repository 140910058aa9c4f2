"""Run the aggregator-side attack (tests/attacker.py) on the current protocol and write what
it recovers to ``benchmarks/results/privacy_attack.json``.

Usage (from the repository root)::

    python benchmarks/privacy/attack_report.py            # every scenario (~2-4 min)
    python benchmarks/privacy/attack_report.py --quick    # no threshold table

Scenarios: audit settings (secure aggregation off, disclosure rules off, design cells of 4
at a site) per site and in totals; defaults (secure aggregation and rules on, pooled cells
of 15) with Cook's on and off; the demo study (150 samples, ``~ batch + condition``); two
sites (what one site, colluding with the aggregator or reading the shared state, learns of
the other); screens with the rules off and on; and the pooled-cell threshold table (totals
view, k = 3..20 samples per pooled cell: a site needs p + 1 = 3 samples).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import attack_scenarios as scen  # noqa: E402
import attacker as atk  # noqa: E402

QUICK = {"starts": 2, "effort": 20, "max_obs": 800}
KW_SCREEN = {"perturbation_column": "perturbation", "control": "non-targeting"}


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _bounds(tasks, geo, truth) -> list[float]:
    ws = atk.weight_sums(tasks, geo)
    return [atk.size_factor_bound(ws[c], truth.size_factors[truth.cells == c])
            for c in range(geo.C)]


def bulk(cells, *, design="~ condition", outliers=0, views=("totals",), sf_kwargs=None,
         demo=False, **options) -> dict:
    """One bulk run and the attack on each view."""
    if demo:
        sites, _, _, design = scen.demo_study(150, n_genes=150, seed=1)
    else:
        sites, _, _ = scen.bulk_sites(cells, n_genes=150, seed=3, outliers=outliers)
    rec = atk.record_run(sites, design, **options)
    geo = atk.Geometry(rec["study"])
    truth = scen.truth_of(sites, geo)
    out = {"sites": {k: int(v.n_obs) for k, v in sites.items()},
           "pooled_cells": np.bincount(truth["total"].cells, minlength=geo.C).tolist(),
           "options": options, "design": design, "views": {}}
    facts = rec["result"].facts
    if "bytes_sent_by_site" in facts:
        out["bytes_sent_by_site"] = facts["bytes_sent_by_site"]
    for v in views:
        tasks = atk.view(rec, v)
        t0 = time.time()
        res = atk.attack_view(tasks, geo, sf_kwargs=sf_kwargs)
        key = "total" if v == "totals" else v
        sc = atk.score_view(res, truth[key])
        sc["seconds"] = round(time.time() - t0, 1)
        sc["sf_bound_min"] = min(_bounds(tasks, geo, truth[key]))
        sc["sources_of_n"] = res["sizes"]["sources"]
        out["views"][v] = sc
    return out


def screen(**options) -> dict:
    """One screen run and the attack on the totals view."""
    sites = scen.screen_sites(n_cells=600, n_perturbations=40, n_genes=200, seed=0)
    rec = atk.record_run(sites, screen=True, **KW_SCREEN, **options)
    st = rec["study"]
    tasks = atk.view(rec, "totals")
    truth = scen.screen_truth(sites, "total", list(st.perturbations), list(st.genes),
                              min_cell_size=options.get("min_cell_size", 3))
    sc = atk.score_screen(atk.attack_screen(tasks), truth)
    group = next(t for t in tasks if t.kind == "GroupSums").message
    n_p = np.asarray(group["pert_n"]).sum(axis=1)
    sc["groups_sent"] = int((n_p > 0).sum())
    sc["groups_declared"] = len(st.perturbations)
    sc["cells"] = int(sum(x.shape[0] for x, _ in truth.values()))
    return sc


def pca_site_centroids() -> dict:
    """Opt-in PCA with per-site centroids (defaults otherwise): each site's samples per level
    and its centroid sums travel in their own slot, so secure aggregation does not hide them."""
    sites, _, _ = scen.bulk_sites(scen.pooled_cells(15), n_genes=150, seed=3)
    rec = atk.record_run(sites, "~ condition", pca=True, cooks=False)
    msg = next(t.message for t in atk.view(rec, "totals")
               if "centroids.by_site.n" in t.message)
    seen = np.asarray(msg["centroids.by_site.n"])
    true = np.array([[int((s.obs["condition"] == lv).sum()) for lv in ("A", "B")]
                     for s in sites.values()])
    return {"per_site_level_counts_seen": seen.tolist(), "true": true.tolist(),
            "exact": bool(np.array_equal(seen, true))}


def threshold_table(ks) -> list[dict]:
    """Totals view (secure aggregation on, rules off so small cells run), Cook's off."""
    rows = []
    for k in ks:
        cells = scen.pooled_cells(k, site_min=2)
        r = bulk(cells, min_cell_size=0, cooks=False, sf_kwargs=None)
        sc = r["views"]["totals"]
        rows.append({"k": k, "sites": len(cells), "counts_right": sc["counts_right"],
                     "counts_wrong": sc["counts_wrong"], "counts_total": sc["counts_total"],
                     "sf_right": sc["sf_right"], "sf_wrong": sc["sf_wrong"],
                     "sf_total": sc["sf_total"], "sf_bound_min": sc["sf_bound_min"]})
        print(f"k={k}: {rows[-1]}", flush=True)
    return rows


def main() -> None:
    """Run every scenario and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the threshold table")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/privacy_attack.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    try:
        import fpylll  # noqa: F401
        lattice = "fpylll"
    except ImportError:
        lattice = "fincke-pohst"
    small = [(4, 4), (4, 4), (5, 5)]
    t0 = time.time()
    report = {
        "lattice": lattice,
        "audit": {
            "cooks": bulk(small, outliers=3, views=("site0", "site1", "site2", "totals"),
                          secure_aggregation=False, min_cell_size=0),
            "no_cooks": bulk(small, views=("site0", "site1", "site2", "totals"),
                             secure_aggregation=False, min_cell_size=0, cooks=False),
        },
        "defaults": {
            "cooks": bulk(scen.pooled_cells(15), outliers=4, sf_kwargs=QUICK),
            "no_cooks": bulk(scen.pooled_cells(15), cooks=False, sf_kwargs=QUICK),
            "demo": bulk(None, demo=True, sf_kwargs=QUICK),
        },
        # two sites: what site0 (with the aggregator, or from the shared state) learns of
        # site1 = total - own; the per-site view of site1 with the rules on measures it
        "two_sites_other_site": bulk([(8, 8), (7, 7)], views=("site1",), cooks=False,
                                     secure_aggregation=False),
        "screens": {"rules_off": screen(min_cell_size=0), "defaults": screen()},
        "pca_site_centroids": pca_site_centroids(),
    }
    print(f"scenarios: {time.time() - t0:.0f} s", flush=True)
    if not args.quick:
        report["threshold"] = threshold_table(range(3, 21))
    Path(args.out).write_text(json.dumps(_plain(report), indent=1) + "\n")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
