"""fed_de's normal-prior shrinkage end to end (its own fit, one site) against R DESeq2 1.38.3's
``lfcShrink(type="normal")`` on the real studies of tests/data/r_extra/shrink (pasilla,
marioni, demo3): max and median |LFC - R| (log2) and max relative lfcSE error per target.

    python benchmarks/shrink_vs_r.py
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import fed_de

EXTRA = Path(__file__).parents[1] / "tests" / "data" / "r_extra" / "shrink"
STUDIES = {  # folder: (design, factors, coefficients, contrasts), as make_refs.R ran them
    "pasilla": ("~ type + condition", ["type", "condition"],
                ["condition_untreated_vs_treated", "type_single_read_vs_paired_end"],
                [("condition", "untreated", "treated")]),
    "marioni": ("~ run + tissue", ["run", "tissue"], ["tissue_Liver_vs_Kidney"],
                [("tissue", "Liver", "Kidney")]),
    "demo3": ("~ batch + condition", ["batch", "condition"],
              ["condition_B_vs_A", "batch_b3_vs_b1"],
              [("batch", "b3", "b2"), ("condition", "B", "A")]),
}


def main() -> None:
    warnings.simplefilter("ignore")
    for name, (design, factors, coefs, contrasts) in STUDIES.items():
        folder = EXTRA / name
        counts = pd.read_csv(folder / "counts.csv.gz", index_col=0)
        meta = pd.read_csv(folder / "metadata.csv", index_col=0).loc[counts.index]
        site = ad.AnnData(counts.astype(float), obs=meta)
        levels = {f: sorted(meta[f].astype(str).unique()) for f in factors}
        for targets in (coefs, contrasts):
            res = fed_de.deseq2({name: site}, design, levels=levels, shrink="normal",
                                shrink_coef=list(targets), min_cell_size=0)
            for target in targets:
                key = target if isinstance(target, str) else "_".join(target)
                ref = pd.read_csv(folder / f"normal_{key}.csv.gz", index_col=0)
                ours = res.lfc_shrink(target).loc[ref.index]
                err = np.abs(ours.log2FoldChange - ref.log2FoldChange)
                se = np.abs(ours.lfcSE / ref.lfcSE - 1)
                print(f"{name:8s} {key:32s} LFC max {err.max():.1e} median {err.median():.1e}"
                      f"  lfcSE max rel {se.max():.1e}")


if __name__ == "__main__":
    main()
