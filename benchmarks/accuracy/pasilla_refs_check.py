"""fed_de (one site) against the extra pasilla R references of tests/data/r_extra/real/pasilla.

    python benchmarks/accuracy/pasilla_refs_check.py [FULLDIR]

FULLDIR (default /work/scratch/rrefs_full) holds the every-gene tables written by
``make_refs.R FULLDIR all``; without it the committed gene subsets are used (calls over the
subset only). Prints fed_de.compare's summary for lfcThreshold = 1 (greaterAbs, lessAbs), the
LRT against ``~ type``, and the interaction design (interaction and condition coefficients).
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import pandas as pd

import fed_de
from fed_de.compare import compare_results

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "r_extra" / "real"
CONTRAST = ("condition", "treated", "untreated")


def load() -> ad.AnnData:
    counts = pd.read_csv(DATA / "pasilla" / "counts.csv.gz", index_col=0)
    meta = pd.read_csv(DATA / "pasilla" / "metadata.csv", index_col=0).loc[counts.index]
    return ad.AnnData(X=counts.to_numpy(), obs=meta.astype(str),
                      var=pd.DataFrame(index=counts.columns))


def ref(folder: Path, file: str, prefix: str, default: pd.DataFrame) -> pd.DataFrame:
    r = pd.read_csv(folder / file, index_col=0)
    cols = {c: c[len(prefix) + 1:] for c in r.columns if c.startswith(prefix + "_")}
    out = r[list(cols)].rename(columns=cols)
    for c in ("baseMean", "log2FoldChange", "lfcSE"):
        if c not in out.columns:
            out[c] = default.loc[out.index, c]
    return out


def line(label: str, ours: pd.DataFrame, r: pd.DataFrame) -> str:
    rep = compare_results(ours.loc[r.index], r, 0.05)
    c = rep["calls"]
    cols = rep["columns"]
    return (f"| {label} | {len(r)} | {c['n_ref']} | {c['n_ours']} | {c['n_differing']} | "
            f"{rep['spearman_stat']:.6f} | {cols['stat']['median_rel_error']:.2g} / "
            f"{cols['stat']['max_rel_error']:.3g} | "
            f"{len(cols['padj']['na_only_ours'])} / {len(cols['padj']['na_only_ref'])} |")


def main(full: Path) -> None:
    folder = full / "pasilla" if (full / "pasilla" / "default.csv.gz").exists() else \
        DATA / "pasilla"
    default = pd.read_csv(folder / "default.csv.gz", index_col=0)
    adata = load()
    rows = ["| analysis | genes | R calls | fed_de calls | differing | Spearman(stat) | "
            "stat rel. err median / max | padj NA fed_de only / R only |",
            "|---|---|---|---|---|---|---|---|"]
    wald = fed_de.deseq2({"one": adata}, "~ type + condition", contrasts=[CONTRAST],
                         alpha=0.05, min_cell_size=0)
    rows.append(line("Wald (default)", wald.results(), default))
    for alt in ("greaterAbs", "lessAbs"):
        ours = wald.results(lfc_threshold=1, alt_hypothesis=alt)
        rows.append(line(f"lfcThreshold 1, {alt}",
                         ours, ref(folder, "lfc_threshold1.csv.gz", alt, default)))
    lrt = fed_de.deseq2({"one": adata}, "~ type + condition", contrasts=[CONTRAST],
                        alpha=0.05, min_cell_size=0, test="LRT", reduced="~ type")
    rows.append(line("LRT, reduced ~ type", lrt.results(),
                     ref(folder, "lrt_reduced_type.csv.gz", "lrt", default)))
    try:
        inter = fed_de.deseq2({"one": adata}, "~ type + condition + type:condition",
                              alpha=0.05, min_cell_size=0)
        names = inter.study.coef_names
        for prefix, idx in (("interaction", -1), ("condition", 2)):
            rows.append(line(f"interaction design: {names[idx]}",
                             inter.results(names[idx]),
                             ref(folder, "interaction.csv.gz", prefix, default)))
    except Exception as err:  # noqa: BLE001 - report what fed_de says about the design
        rows.append(f"| interaction design | fed_de refuses: {err} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/scratch/rrefs_full"))
