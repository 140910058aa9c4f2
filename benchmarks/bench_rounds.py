"""How the unrolled round counts were chosen: accuracy against a run with many rounds.

For each candidate setting of the loop counts (IRLS for the dispersion-fit means, gene-wise
and MAP dispersion searches, final IRLS, fallback), runs the federated pipeline on the demo
study and compares log2FoldChange and dispersions with the same pipeline run with 30-40
rounds per loop (which converges every gene), and with fed_de on the pooled data.

    python benchmarks/bench_rounds.py [--samples 150 --genes 3000 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np

import fed_de
from fed_de.demo_data import make_demo_study

SETTINGS = [  # mu, genewise, map, final, fallback
    (6, 4, 1, 6, 1), (4, 4, 1, 4, 1), (4, 3, 1, 4, 1), (3, 3, 1, 3, 1), (10, 5, 3, 10, 1),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=150)
    ap.add_argument("--genes", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cooks", action="store_true",
                    help="Cook's on (the reference is then one site: it replaces outliers)")
    ap.add_argument("--settings", nargs="*", default=None, metavar="MU,GW,MAP,FINAL,FB",
                    help="loop counts to compare (default: the table's)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    study = make_demo_study(n_samples=args.samples, n_genes=args.genes, seed=args.seed)
    kw = dict(contrasts=[("condition", "B", "A")], levels=study.levels, genes=study.genes,
              cooks=args.cooks)
    ref = fed_de.deseq2({"pooled": study.pooled()}, study.design, **kw,
                        rounds=dict(mu=40, genewise=30, map=30, final=40, fallback=0))
    ref_lfc, ref_disp = ref.results().log2FoldChange, ref.dispersions["final"]
    rows, first = [], None
    settings = ([tuple(int(v) for v in s.split(",")) for s in args.settings]
                if args.settings else SETTINGS)
    for mu, gw, mp, fin, fb in settings:
        rounds = dict(mu=mu, genewise=gw, map=mp, final=fin, fallback=fb)
        fed = fed_de.deseq2(study.sites, study.design, **kw, rounds=rounds)
        lfc, disp = fed.results().log2FoldChange, fed.dispersions["final"]
        ok = lfc.notna() & ref_lfc.notna()
        rel = (np.abs(lfc - ref_lfc) / np.maximum(np.abs(ref_lfc), 1e-3))[ok]
        nz = ~fed.dispersions["allZero"]
        drel = (np.abs(disp - ref_disp) / ref_disp)[nz]
        first = (lfc, disp) if first is None else first
        base = (np.abs(lfc - first[0]) / np.maximum(np.abs(first[0]), 1e-3))[ok]
        rows.append({
            "lfc_rel_max_vs_first": float(base.max()),
            "disp_rel_max_vs_first": float((np.abs(disp - first[1]) / first[1])[nz].max()),
            "rounds": rounds, "steps": fed.facts["sequential_steps"],
            "lfc_rel_median": float(rel.median()), "lfc_rel_max": float(rel.max()),
            "genes_lfc_rel_gt_1e-4": int((rel > 1e-4).sum()),
            "disp_rel_max": float(drel.max()),
            "betaConv_false": int((~fed.dispersions["betaConv"] & nz).sum()),
        })
        r = rows[-1]
        print(f"{rounds} steps={r['steps']:3d} LFC rel median={r['lfc_rel_median']:.1e} "
              f"max={r['lfc_rel_max']:.1e} (>1e-4: {r['genes_lfc_rel_gt_1e-4']}) "
              f"disp max={r['disp_rel_max']:.1e} betaConv=FALSE: {r['betaConv_false']}; "
              f"vs the first setting: LFC max={r['lfc_rel_max_vs_first']:.1e} "
              f"disp max={r['disp_rel_max_vs_first']:.1e}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
