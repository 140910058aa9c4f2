"""fed_de (one site) against the R references of tests/data/r_extra/real/demo3 and demo3_age.

    python benchmarks/accuracy/demo_refs_check.py

Prints, per analysis, fed_de.compare's report against R (alpha 0.05) and the zero-group genes.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pandas as pd

import fed_de
from fed_de.compare import compare_results, format_report

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "r_extra" / "real"
ZEROED = [f"G{i:05d}" for i in range(101, 107)]


def load(name: str) -> ad.AnnData:
    counts = pd.read_csv(DATA / name / "counts.csv.gz", index_col=0)
    meta = pd.read_csv(DATA / name / "metadata.csv.gz", index_col=0).loc[counts.index]
    meta = meta.drop(columns="site")
    obs = meta.astype({c: str for c in meta.columns if c != "age"})
    return ad.AnnData(X=counts.to_numpy(), obs=obs, var=pd.DataFrame(index=counts.columns))


def ref_table(name: str, prefix: str) -> pd.DataFrame:
    r = pd.read_csv(DATA / name / "results.csv.gz", index_col=0)
    cols = {f"{prefix}_{c}": c for c in ("log2FoldChange", "lfcSE", "stat", "pvalue", "padj")}
    return r[["baseMean", *cols]].rename(columns=cols)


def main() -> None:
    runs = {"demo3": ("~ batch + condition", [("b3_vs_b2", ("batch", "b3", "b2")),
                                              ("condition", "condition_B_vs_A")]),
            "demo3_age": ("~ age + batch + condition", [("age", "age"),
                                                        ("condition", "condition_B_vs_A")])}
    for name, (design, contrasts) in runs.items():
        res = fed_de.deseq2({"one": load(name)}, design, alpha=0.05, min_cell_size=0)
        for prefix, contrast in contrasts:
            ours = res.results(contrast, alpha=0.05)
            ref = ref_table(name, prefix)
            print(f"## {name} {prefix}\n")
            print(format_report(compare_results(ours.loc[ref.index], ref, 0.05)))
            if prefix == "b3_vs_b2":
                print("\nzero-group genes (fed_de | R):")
                cols = ["log2FoldChange", "lfcSE", "stat", "pvalue"]
                print(pd.concat([ours.loc[ZEROED, cols], ref.loc[ZEROED, cols]], axis=1,
                                keys=["fed_de", "R"]).to_string())
            print()
        disp = res.dispersions
        r = pd.read_csv(DATA / name / "results.csv.gz", index_col=0)
        rel = ((disp.loc[r.index, "final"] - r.dispersion).abs() / r.dispersion)
        print(f"final dispersion rel. error: median {rel.median():.2g}, max {rel.max():.3g} "
              f"({rel.idxmax()}), > 1e-3: {(rel > 1e-3).sum()}\n")


if __name__ == "__main__":
    main()
