"""Compare two DESeq2 results tables: what ``fed-de compare OURS REF`` prints.

A consortium checks a federated run against a pooled one (R DESeq2, PyDESeq2 or another fed_de
run) gene by gene: which genes are called at ``padj < alpha`` by one and not the other, how
well the Wald (or LRT) statistics rank alike, how far each column is from the reference, and
where one table has NA and the other a value.

Command line (until the ``fed-de`` CLI wires it in)::

    python -m fed_de.compare OURS REF [--alpha 0.05]

``OURS`` and ``REF`` are each a results table (CSV, optionally gzipped: R's
``write.csv(results(dds))``, a PyDESeq2 ``results_df.to_csv()``, fed_de's ``results.csv``) or
a fed_de run folder holding ``results.csv``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

__all__ = ["RESULT_COLUMNS", "read_results_table", "compare_results", "format_report", "main"]

#: The columns of DESeq2's ``results()``, in its order.
RESULT_COLUMNS = ("baseMean", "log2FoldChange", "lfcSE", "stat", "pvalue", "padj")
_GENE_NAMES = ("gene", "genes", "gene_id", "id", "")


def read_results_table(path: str | Path) -> pd.DataFrame:
    """Read a DESeq2-style results table into a frame indexed by gene id.

    Parameters
    ----------
    path
        A CSV file (``.csv`` or ``.csv.gz``) whose first column holds the gene ids and whose
        other columns include some of :data:`RESULT_COLUMNS` -- R's ``write.csv`` of a
        ``results()`` table (empty first header), a PyDESeq2 ``results_df.to_csv()``, fed_de's
        ``results.csv`` (first column ``gene``) -- or a fed_de run folder (``fed-de run --out``)
        holding ``results.csv``.

    Returns
    -------
    pandas.DataFrame
        Indexed by gene id (strings), the result columns present, as floats (R's ``NA`` and
        empty cells become NaN). Other columns are kept as read.

    Raises
    ------
    FileNotFoundError
        The path, or the run folder's ``results.csv``, does not exist.
    ValueError
        The table has no result column, or repeats a gene id.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a results CSV or a fed_de "
                                "run folder holding results.csv)")
    frame = pd.read_csv(path, na_values=["NA", "NaN", ""], keep_default_na=True)
    first = str(frame.columns[0])
    if first in RESULT_COLUMNS:
        raise ValueError(f"{path}: the first column is {first!r}; expected gene ids there")
    if not any(c in frame.columns for c in RESULT_COLUMNS):
        raise ValueError(f"{path}: none of the result columns {RESULT_COLUMNS} is present "
                         f"(columns: {list(frame.columns)[:10]})")
    frame = frame.set_index(frame.columns[0])
    frame.index = frame.index.astype(str)
    frame.index.name = "gene"
    if frame.index.has_duplicates:
        dup = frame.index[frame.index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"{path}: gene ids repeat (e.g. {dup})")
    for col in RESULT_COLUMNS:
        if col in frame.columns:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    return frame


def _relative_errors(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    # |ours - ref| / |ref|; where the reference is exactly 0, the absolute difference
    diff = np.abs(ours - ref)
    scale = np.abs(ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, diff / scale, diff)


def _column_summary(ours: pd.Series, ref: pd.Series) -> dict:
    a, b = ours.to_numpy(float), ref.to_numpy(float)
    fin = np.isfinite(a) & np.isfinite(b)
    na_a, na_b = np.isnan(a), np.isnan(b)
    out = {
        "n_compared": int(fin.sum()),
        "na_only_ours": ours.index[na_a & ~na_b].tolist(),
        "na_only_ref": ours.index[na_b & ~na_a].tolist(),
    }
    if fin.any():
        rel = _relative_errors(a[fin], b[fin])
        k = int(np.argmax(rel))
        out.update(median_rel_error=float(np.median(rel)), max_rel_error=float(rel[k]),
                   worst_gene=str(ours.index[fin][k]), worst_ours=float(a[fin][k]),
                   worst_ref=float(b[fin][k]))
    else:
        out.update(median_rel_error=math.nan, max_rel_error=math.nan, worst_gene=None,
                   worst_ours=math.nan, worst_ref=math.nan)
    return out


def compare_results(ours: pd.DataFrame, ref: pd.DataFrame, alpha: float = 0.05) -> dict:
    """Gene-by-gene comparison of two results tables (see :func:`read_results_table`).

    Parameters
    ----------
    ours, ref
        Results tables indexed by gene id with some of :data:`RESULT_COLUMNS`; ``ref`` is the
        reference (R, or the pooled run). Only the genes in both are compared.
    alpha
        Calls are genes with ``padj < alpha`` (NA is not a call).

    Returns
    -------
    dict
        ``alpha``; ``n_ours``, ``n_ref``, ``n_shared`` genes, ``only_in_ours`` /
        ``only_in_ref`` (gene lists); ``calls``: ``n_ours``, ``n_ref``, ``ours_only`` and
        ``ref_only`` (genes called by one table only, sorted by gene id), ``n_differing``,
        ``fraction_differing`` (of the shared genes), ``opposite_sign`` (called by both with
        log2FoldChange of opposite signs); ``spearman_stat`` (Spearman correlation of
        ``stat`` over genes where both are finite; NaN when that is not computable) and
        ``n_stat``; ``columns``: per result column present in both, ``n_compared`` (genes
        where both are finite), ``median_rel_error``, ``max_rel_error`` (relative to
        ``ref``; the absolute difference where ``ref`` is 0), ``worst_gene`` with its two
        values, and the NA pattern: ``na_only_ours``, ``na_only_ref`` (gene lists).

    Raises
    ------
    ValueError
        ``alpha`` outside (0, 1), or no gene in common.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    shared = ours.index.intersection(ref.index, sort=False)
    if shared.empty:
        raise ValueError("the two tables have no gene id in common")
    a, b = ours.loc[shared], ref.loc[shared]
    report: dict = {
        "alpha": alpha, "n_ours": int(len(ours)), "n_ref": int(len(ref)),
        "n_shared": int(len(shared)),
        "only_in_ours": ours.index.difference(ref.index).tolist(),
        "only_in_ref": ref.index.difference(ours.index).tolist(),
    }
    if "padj" in a.columns and "padj" in b.columns:
        call_a = (a["padj"] < alpha).to_numpy()
        call_b = (b["padj"] < alpha).to_numpy()
        ours_only = sorted(shared[call_a & ~call_b])
        ref_only = sorted(shared[call_b & ~call_a])
        opposite: list[str] = []
        if "log2FoldChange" in a.columns and "log2FoldChange" in b.columns:
            flip = np.sign(a["log2FoldChange"].to_numpy()) != np.sign(
                b["log2FoldChange"].to_numpy())
            opposite = sorted(shared[call_a & call_b & flip])
        report["calls"] = {
            "n_ours": int(call_a.sum()), "n_ref": int(call_b.sum()),
            "ours_only": ours_only, "ref_only": ref_only,
            "n_differing": len(ours_only) + len(ref_only),
            "fraction_differing": (len(ours_only) + len(ref_only)) / len(shared),
            "opposite_sign": opposite,
        }
    if "stat" in a.columns and "stat" in b.columns:
        sa, sb = a["stat"].to_numpy(float), b["stat"].to_numpy(float)
        fin = np.isfinite(sa) & np.isfinite(sb)
        rho = math.nan
        if fin.sum() >= 2 and np.ptp(sa[fin]) > 0 and np.ptp(sb[fin]) > 0:
            rho = float(spearmanr(sa[fin], sb[fin]).statistic)
        report["spearman_stat"] = rho
        report["n_stat"] = int(fin.sum())
    report["columns"] = {col: _column_summary(a[col], b[col]) for col in RESULT_COLUMNS
                         if col in a.columns and col in b.columns}
    return report


def _genes(genes: list[str], limit: int = 10) -> str:
    if not genes:
        return "-"
    more = f" ... (+{len(genes) - limit})" if len(genes) > limit else ""
    return ", ".join(genes[:limit]) + more


def format_report(report: dict, limit: int = 10) -> str:
    """Plain-text rendering of :func:`compare_results`'s dictionary.

    Parameters
    ----------
    report
        The dictionary returned by :func:`compare_results`.
    limit
        At most this many gene ids are printed per list (the count is always printed).

    Returns
    -------
    str
        Lines: genes compared, calls (counts, differing genes both ways), Spearman(stat),
        then one row per column with relative errors, the worst gene and the NA pattern.
    """
    lines = [f"genes: ours {report['n_ours']}, reference {report['n_ref']}, "
             f"shared {report['n_shared']}"]
    if report["only_in_ours"] or report["only_in_ref"]:
        lines.append(f"  only in ours ({len(report['only_in_ours'])}): "
                     f"{_genes(report['only_in_ours'], limit)}")
        lines.append(f"  only in reference ({len(report['only_in_ref'])}): "
                     f"{_genes(report['only_in_ref'], limit)}")
    calls = report.get("calls")
    if calls is not None:
        lines.append(f"calls at padj < {report['alpha']}: ours {calls['n_ours']}, "
                     f"reference {calls['n_ref']}, differing {calls['n_differing']} "
                     f"({100 * calls['fraction_differing']:.3f} % of shared genes)")
        lines.append(f"  called by ours only ({len(calls['ours_only'])}): "
                     f"{_genes(calls['ours_only'], limit)}")
        lines.append(f"  called by the reference only ({len(calls['ref_only'])}): "
                     f"{_genes(calls['ref_only'], limit)}")
        if calls["opposite_sign"]:
            lines.append(f"  called by both with opposite signs "
                         f"({len(calls['opposite_sign'])}): "
                         f"{_genes(calls['opposite_sign'], limit)}")
    if "spearman_stat" in report:
        lines.append(f"Spearman(stat): {report['spearman_stat']:.6f} "
                     f"over {report['n_stat']} genes")
    if report["columns"]:
        lines.append(f"{'column':<15}{'genes':>7}{'median rel':>12}{'max rel':>11}  "
                     f"{'worst gene (ours / reference)':<45}{'NA ours only':>13}"
                     f"{'NA ref only':>12}")
    for col, s in report["columns"].items():
        worst = "-" if s["worst_gene"] is None else (
            f"{s['worst_gene']} ({s['worst_ours']:.6g} / {s['worst_ref']:.6g})")
        lines.append(f"{col:<15}{s['n_compared']:>7}{s['median_rel_error']:>12.3g}"
                     f"{s['max_rel_error']:>11.3g}  {worst:<45}{len(s['na_only_ours']):>13}"
                     f"{len(s['na_only_ref']):>12}")
    for col, s in report["columns"].items():
        for side, key in (("ours", "na_only_ours"), ("reference", "na_only_ref")):
            if s[key]:
                lines.append(f"  {col} NA in {side} only: {_genes(s[key], limit)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m fed_de.compare OURS REF [--alpha A]``: print the comparison."""
    parser = argparse.ArgumentParser(prog="fed-de compare", description=__doc__.splitlines()[0])
    parser.add_argument("ours", help="results CSV or fed_de run folder")
    parser.add_argument("ref", help="reference results CSV (R, PyDESeq2) or fed_de run folder")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--limit", type=int, default=10, help="gene ids printed per list")
    args = parser.parse_args(argv)
    try:
        report = compare_results(read_results_table(args.ours), read_results_table(args.ref),
                                 alpha=args.alpha)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report, limit=args.limit))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
