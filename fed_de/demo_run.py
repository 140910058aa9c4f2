"""What ``fed-de demo`` runs: a simulated multi-hospital study, federated vs pooled."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

import fed_de
from fed_de.cli_common import print_facts
from fed_de.demo_data import make_demo_study

CONTRAST = ("condition", "B", "A")


def run_demo(n_samples: int = 150, n_genes: int = 5000, seed: int = 0,
             out: Path | None = None, console: Console | None = None,
             alpha: float = 0.1, report: Path | None = None,
             progress=False) -> dict:
    """Generate the bundled study, run the federated pipeline with apeglm shrinkage and a
    federated PCA, report agreement with pooling, and write the HTML report to ``report``.

    The pooled reference is fed_de on the concatenated data as one site (the claim is that
    federation changes nothing), and PyDESeq2 on the pooled data when it is installed.
    ``progress=True`` shows a bar per run (tasks done of the plan's total, time left).
    """
    console = console or Console()
    study = make_demo_study(n_samples=n_samples, n_genes=n_genes, seed=seed)
    sizes = {k: v.n_obs for k, v in study.sites.items()}
    console.print(f"[bold]fed_de demo[/]: {n_samples} samples x {n_genes} genes over "
                  f"{len(sizes)} hospitals ("
                  + ", ".join(f"{k} {v}" for k, v in sizes.items())
                  + " samples; hospital_c has no batch b3), "
                  f"design {study.design!r}, contrast {CONTRAST}", highlight=False)
    sites = study.sites
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        sites = study.write(out / "sites")
    kw = dict(contrasts=[CONTRAST], levels=study.levels, genes=study.genes, alpha=alpha,
              shrink="apeglm", pca=True)
    console.print("1/2 federated run: each hospital sends sums only", highlight=False)
    t0 = time.perf_counter()
    fed = fed_de.deseq2(sites, study.design, progress=progress, **kw)
    t_fed = time.perf_counter() - t0
    res = fed.results()
    console.print("2/2 pooled reference: the same analysis on all samples in one place",
                  highlight=False)
    # the same analysis on one site: Cook's outliers filtered as in the federated run, and
    # without the genes the disclosure rule withheld (they take no part in the federated one)
    same = fed.facts["options"]["min_replicates_for_replace"]
    withheld = fed.gene_results.withheld
    analysed = [g for g, w in zip(study.genes, withheld, strict=True) if not w] \
        if withheld is not None else study.genes
    pooled_fit = fed_de.deseq2({"pooled": study.pooled()[:, analysed].copy()}, study.design,
                               progress=progress, min_replicates_for_replace=same,
                               **{**kw, "genes": analysed})
    pooled = pooled_fit.results()

    top = res.dropna(subset=["padj"]).sort_values("padj").head(10)
    table = Table(title=f"Top genes, {CONTRAST[0]} {CONTRAST[1]} vs {CONTRAST[2]}")
    for col in ["gene", "baseMean", "log2FoldChange", "lfcSE", "padj", "true log2FC"]:
        table.add_column(col, justify="right")
    for gene, row in top.iterrows():
        table.add_row(gene, f"{row.baseMean:.1f}", f"{row.log2FoldChange:+.3f}",
                      f"{row.lfcSE:.3f}", f"{row.padj:.2e}",
                      f"{study.truth.loc[gene, 'log2_fold_change']:+.3f}")
    console.print(table)
    console.print(str(fed.summary()), highlight=False, markup=False)
    console.print(_shrunk_table(fed, study, alpha))

    summary = {"n_significant": int((res.padj < alpha).sum()), "fed_seconds": round(t_fed, 3)}
    summary["vs_pooled_fed_de"] = _agreement(res, pooled, alpha)
    truth = study.truth.loc[res.index]
    sig = res.padj < alpha
    summary["true_positives"] = int((sig & truth.is_de).sum())
    summary["false_discovery_proportion"] = float((sig & ~truth.is_de).sum() / max(sig.sum(), 1))
    try:
        summary["vs_pooled_pydeseq2"] = _agreement(res, _pydeseq2(study, alpha), alpha)
    except ImportError:
        summary["vs_pooled_pydeseq2"] = "PyDESeq2 not installed (pip install pydeseq2)"
    console.print(f"{summary['n_significant']} genes with padj < {alpha}: "
                  f"{summary['true_positives']} truly DE, false discovery proportion "
                  f"{summary['false_discovery_proportion']:.3f}", highlight=False)
    console.print(agreement_table(summary, alpha))
    summary["vs_pooled_shrunk"] = _shrunk_agreement(fed, pooled_fit)
    console.print("apeglm shrunken log2FC, federated vs pooled: largest difference "
                  f"{summary['vs_pooled_shrunk']['max_abs_diff']:.2g}", highlight=False)
    post = fed.facts["postfit"]
    console.print(f"shrinkage and PCA added {post['rounds']} rounds "
                  f"({post['sequential_steps']} sequential steps) and "
                  f"{post['payload_bytes_per_site_per_gene']:,.0f} B per gene per site")
    print_facts(fed.facts, console=console)
    summary["facts"] = fed.facts
    if out is not None:
        fed.shrunk_results().reset_index().to_csv(out / "results.csv", index=False)
    if report is None:
        report = (out / "report.html") if out is not None else Path(
            "fed_de_demo_report.html")
    from fed_de.report import write_report

    write_report(fed, report, reference=pooled,
                 reference_name="the pooled analysis (fed_de on one site)",
                 title="fed_de demo: three simulated hospitals")
    console.print(f"wrote the report {report}")
    summary["report"] = str(report)
    return summary


def _shrunk_table(fed, study, alpha: float) -> Table:
    """Top genes by apeglm's shrunken LFC among those called: MLE, shrunken LFC, posterior
    SD, lfsr, padj, and the truth."""
    table = fed.shrunk_results()
    called = table[table.padj < alpha]
    top = called.reindex(called.log2FoldChangeShrunk.abs().sort_values(ascending=False)
                         .index).head(10)
    out = Table(title=f"Top genes by shrunken log2FC (apeglm) among padj < {alpha}")
    for col in ["gene", "baseMean", "MLE", "shrunken", "post. SD", "lfsr", "truth"]:
        out.add_column(col, justify="right")
    for gene, row in top.iterrows():
        out.add_row(gene, f"{row.baseMean:.1f}", f"{row.log2FoldChange:+.3f}",
                    f"{row.log2FoldChangeShrunk:+.3f}", f"{row.posteriorSD:.3f}",
                    f"{row.lfsr:.0e}", f"{study.truth.loc[gene, 'log2_fold_change']:+.3f}")
    return out


def _shrunk_agreement(a, b) -> dict:
    x = a.lfc_shrink().log2FoldChange
    y = b.lfc_shrink().log2FoldChange.reindex(x.index)
    ok = x.notna() & y.notna()
    return {"max_abs_diff": float(f"{np.abs(x - y)[ok].max():.3g}")}


REFERENCES = {
    "vs_pooled_fed_de": "fed_de, all samples pooled as one site",
    "vs_pooled_pydeseq2": "PyDESeq2, all samples pooled",
}


def agreement_table(report: dict, alpha: float) -> Table:
    """The federated result against each pooled reference: log2 fold changes (median and
    largest relative difference) and significance calls (padj < alpha) that differ."""
    table = Table(title="Federated vs pooled: 'pooled' = the same analysis run on every "
                        "sample gathered in one place, which federation avoids")
    for col in ("reference", "median rel. diff. log2FC", "max rel. diff. log2FC",
                f"calls differing (padj < {alpha:g})"):
        table.add_column(col, justify="right" if col != "reference" else "left")
    for key, label in REFERENCES.items():
        row = report.get(key)
        if isinstance(row, dict):
            table.add_row(label, f"{row['lfc_median_rel_err']:.2g}",
                          f"{row['lfc_max_rel_err']:.2g}", str(row["differing_calls"]))
        else:
            table.add_row(label, str(row), "", "")
    return table


def _agreement(a: pd.DataFrame, b: pd.DataFrame, alpha: float) -> dict:
    """LFC relative differences and differing calls over the genes both tables report."""
    b = b.reindex(a.index)
    ok = a.log2FoldChange.notna() & b.log2FoldChange.notna()
    rel = (np.abs(a.log2FoldChange - b.log2FoldChange) / np.abs(b.log2FoldChange))[ok]
    calls_a, calls_b = a.padj < alpha, b.padj < alpha
    return {"lfc_median_rel_err": float(f"{rel.median():.3g}"),
            "lfc_max_rel_err": float(f"{rel.max():.3g}"),
            "differing_calls": int((calls_a != calls_b).sum())}


def _pydeseq2(study, alpha: float) -> pd.DataFrame:
    import warnings

    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    pooled = study.pooled()
    counts = pd.DataFrame(np.asarray(pooled.X), index=pooled.obs_names, columns=pooled.var_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # defaults: Cook's filtering and refit on, as in fed_de (and DESeq2)
        dds = DeseqDataSet(counts=counts, metadata=pooled.obs, design=study.design, quiet=True)
        dds.deseq2()
        stats = DeseqStats(dds, contrast=list(CONTRAST), alpha=alpha, quiet=True)
        stats.summary()
    return stats.results_df
