"""The cost of the screen's per-(perturbation, design cell) disclosure rule, measured.

On seeded synthetic screens (:func:`fed_de.screening.data.make_screen`, 3 sites, the site a
design factor), runs ``fed_de.screen`` with the defaults (the rule on) and with
``min_cell_size=0`` (every disclosure rule off), and reports: (perturbation, design cell)
groups and cells left out, perturbations left out, pairs tested, and for the perturbations
the rule touched ("affected") against those it did not: |log2FC - truth| on non-null tested
pairs, the ratio of standard errors (rule on / off) and the share of true effects found at
padj < 0.05. Unaffected perturbations must give the same results either way (up to the pairs
the ``min_nonzero`` rule withholds); the largest relative difference is printed.

``--save FILE.npz`` also keeps the default run's arrays, to compare with a run of another
fed_de checkout (``--compare FILE.npz``: largest relative difference of log2FoldChange,
lfcSE, pvalue, baseMean over the perturbations this run leaves untouched).

Usage::

    python benchmarks/privacy/screen_group_rule.py --cells 3000 --perturbations 40
    python benchmarks/privacy/screen_group_rule.py --cells 6000 --perturbations 100 --genes 200
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np

import fed_de
from fed_de.screening.data import make_screen

KW = {"perturbation_column": "perturbation", "control": "non-targeting"}
KEYS = ("log2FoldChange", "lfcSE", "pvalue", "baseMean")


def group_table(sites: dict, perturbations: list[str]) -> np.ndarray:
    """Cells of each perturbation at each site (non-empty cells): ``(P, sites)``."""
    out = np.zeros((len(perturbations), len(sites)))
    index = {p: i for i, p in enumerate(perturbations)}
    for j, a in enumerate(sites.values()):
        lib = np.asarray(a.X.sum(axis=1)).ravel()
        for label, n in a.obs["perturbation"][lib > 0].value_counts().items():
            if label in index:
                out[index[label], j] = n
    return out


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest relative difference where both are finite (inf if NaN patterns differ)."""
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("inf")
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-300)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=3000)
    ap.add_argument("--genes", type=int, default=200)
    ap.add_argument("--perturbations", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="keep the default run's arrays (npz)")
    ap.add_argument("--compare", help="compare with arrays saved by another checkout (npz)")
    ap.add_argument("--no-off", action="store_true", help="skip the rules-off run")
    a = ap.parse_args()
    scr = make_screen(n_cells=a.cells, n_genes=a.genes, n_perturbations=a.perturbations,
                      seed=a.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on = fed_de.screen(scr.sites, **KW)
        off = None if a.no_off else fed_de.screen(scr.sites, **KW, min_cell_size=0)
    perts = list(on.study.perturbations)
    tab = group_table(scr.sites, perts)
    small = (tab > 0) & (tab < 15)
    affected = small.any(axis=1)
    report = {"cells": a.cells, "genes": a.genes, "perturbations": a.perturbations,
              "seed": a.seed, "groups": int((tab > 0).sum()),
              "groups_left_out": on.facts.get("groups_left_out"),
              "cells_left_out": int(tab[small].sum()), "cells_perturbed": int(tab.sum()),
              "perturbations_affected": int(affected.sum()),
              "perturbations_left_out": len(on.facts.get("perturbations_left_out", [])),
              "pairs_tested": int(on.tested.sum())}
    if off is not None:
        report["pairs_tested_rules_off"] = int(off.tested.sum())
        truth = scr.truth_lfc.loc[perts, list(on.study.genes)].to_numpy()
        active = truth != 0
        for name, rows in (("affected", affected), ("unaffected", ~affected)):
            m = rows[:, None] & on.tested & off.tested
            err_on = np.abs(on.arrays["log2FoldChange"] - truth)[m & active]
            err_off = np.abs(off.arrays["log2FoldChange"] - truth)[m & active]
            se = (on.arrays["lfcSE"] / off.arrays["lfcSE"])[m]
            found_on = ((on.arrays["padj"] < 0.05) & active & rows[:, None]).sum()
            found_off = ((off.arrays["padj"] < 0.05) & active & rows[:, None]).sum()
            report[name] = {
                "perturbations": int(rows.sum()), "pairs_tested_on": int((on.tested
                                                                          & rows[:, None]).sum()),
                "pairs_tested_off": int((off.tested & rows[:, None]).sum()),
                "median_abs_lfc_error_on": float(np.median(err_on)) if err_on.size else None,
                "median_abs_lfc_error_off": float(np.median(err_off)) if err_off.size else None,
                "median_se_ratio": float(np.median(se)) if se.size else None,
                "true_effects_found_on": int(found_on), "true_effects_found_off": int(found_off)}
        keep = ~affected[:, None] & on.tested
        report["unaffected_max_rel_diff_vs_rules_off"] = {
            k: rel_diff(np.where(keep, on.arrays[k], np.nan), np.where(keep, off.arrays[k],
                                                                       np.nan)) for k in KEYS}
    if a.save:
        np.savez(a.save, tested=on.tested, affected=affected,
                 **{k: on.arrays[k] for k in KEYS})
    if a.compare:
        old = np.load(a.compare)
        rows = ~affected[:, None]
        report["unaffected_max_rel_diff_vs_saved"] = {
            k: rel_diff(np.where(rows, on.arrays[k], np.nan), np.where(rows, old[k], np.nan))
            for k in KEYS}
        report["unaffected_tested_equal_saved"] = bool(
            np.array_equal(on.tested[~affected], old["tested"][~affected]))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
