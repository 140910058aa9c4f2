"""Loop counts against R DESeq2 1.38.3 on real data: differing padj < 0.05 calls, the NA
pattern, and the worst log2FoldChange and dispersion against R, per setting.

    python benchmarks/rounds_vs_r.py [--settings MU,GW,MAP,FINAL,FB ...] [--no-cooks]

The studies and R's results are those of ``tests/test_real_refs.py`` (pasilla, marioni; one
site, Cook's on as in R unless ``--no-cooks``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import pandas as pd

import fed_de

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_real_refs import REAL, load  # noqa: E402

STUDIES = [("marioni", "~ run + tissue", ("tissue", "Liver", "Kidney")),
           ("pasilla", "~ type + condition", ("condition", "treated", "untreated"))]


def compare(study: str, design: str, contrast, rounds: dict, cooks: bool) -> dict:
    """One fit of ``study`` with ``rounds``: its calls and values against R's."""
    res = fed_de.deseq2({"one": load(study)}, design, alpha=0.05, min_cell_size=0,
                        rounds=rounds, cooks=cooks)
    ours = res.results(contrast)
    calls = pd.read_csv(REAL / study / "calls.csv.gz", index_col=0)
    r_call = (calls["default_call"] != 0).to_numpy()
    our_call = (ours.loc[calls.index, "padj"] < 0.05).to_numpy()
    r_na = calls["default_padjNA"].to_numpy() == 1
    ref = pd.read_csv(REAL / study / "default.csv.gz", index_col=0)
    ok = ref["log2FoldChange"].notna() & ours["log2FoldChange"].notna()
    lfc = ((ours["log2FoldChange"] - ref["log2FoldChange"]).abs()
           / (ref["log2FoldChange"].abs() + 1e-2))[ok]
    disp = res.dispersions["final"].reindex(ref.index)
    d_ok = ref["dispersion"].notna() & disp.notna()
    drel = ((disp - ref["dispersion"]).abs() / ref["dispersion"])[d_ok]
    return {"study": study, "steps": res.facts["sequential_steps"],
            "differing_calls": int((r_call != our_call).sum()),
            "na_differs": int((ours.loc[calls.index, "padj"].isna().to_numpy() != r_na).sum()),
            "lfc_err_max": float(lfc.max()), "lfc_err_median": float(lfc.median()),
            "disp_rel_max": float(drel.max()),
            "betaConv_false": int((~res.dispersions["betaConv"]
                                   & ~res.dispersions["allZero"]).sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="*", default=["6,4,1,6,1"], metavar="MU,GW,MAP,FINAL,FB")
    ap.add_argument("--no-cooks", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for setting in args.settings:
        mu, gw, mp, fin, fb = (int(v) for v in setting.split(","))
        rounds = dict(mu=mu, genewise=gw, map=mp, final=fin, fallback=fb)
        for study, design, contrast in STUDIES:
            row = {"rounds": rounds, **compare(study, design, contrast, rounds,
                                               not args.no_cooks)}
            rows.append(row)
            print(f"{setting} {study}: steps={row['steps']} calls differing="
                  f"{row['differing_calls']} NA differing={row['na_differs']} LFC err max="
                  f"{row['lfc_err_max']:.1e} median={row['lfc_err_median']:.1e} disp max="
                  f"{row['disp_rel_max']:.1e} betaConv=FALSE {row['betaConv_false']}",
                  flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
