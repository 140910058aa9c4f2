"""Plots and a self-contained HTML report of a federated DESeq2 run (``fed-de run --plots``,
``--report``; ``fed-de demo``).

:func:`figures` draws what DESeq2 users read (MA, volcano, dispersions, p-value histogram,
PCA); :func:`save_plots` writes them as PNG and SVG; :func:`write_report` writes one HTML file
with everything embedded (no external file, script or font): the summary, the top genes, the
plots, the run facts (steps, bytes per site, the post-fit phase), the privacy settings, the
package versions, the warnings, and the agreement with a pooled reference when one is given
(:func:`fed_de.compare.compare_results`).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from pathlib import Path

import pandas as pd

from fed_de import plots
from fed_de.provenance import PACKAGES, package_versions

__all__ = ["figures", "save_plots", "build_report", "write_report", "package_versions"]


def _title(res, contrast) -> str:
    if contrast is None and res.contrasts:
        contrast = res.contrasts[0]
    if contrast is None:
        return res.study.coef_names[-1]
    if isinstance(contrast, (tuple, list)) and len(contrast) == 3:
        return f"{contrast[0]} {contrast[1]} vs {contrast[2]}"
    return str(contrast)


def figures(res, contrast=None) -> dict:
    """The run's plots by name: ``ma``, ``volcano``, ``dispersions``, ``pvalues``, and with
    PCA ``pca`` (centroids per site x level) and ``pca_<site>`` for every site whose own
    coordinates this process holds (simulation)."""
    name = _title(res, contrast)
    out = {"ma": res.plot_ma(contrast, title=f"MA plot: {name}"),
           "volcano": res.plot_volcano(contrast, title=f"Volcano: {name}"),
           "dispersions": res.plot_dispersions(title="Dispersion estimates"),
           "pvalues": res.plot_pvalue_histogram(contrast, title=f"p-values: {name}")}
    if res.state.pca is not None and res.state.pca.axes is not None:
        out["pca"] = res.plot_pca()
        for site in res.site_pca:
            out[f"pca_{site}"] = res.plot_pca(site)
    return out


def save_plots(res, folder: str | Path, contrast=None) -> list[Path]:
    """Write every plot of :func:`figures` to ``folder`` as PNG and SVG; returns the paths."""
    folder = Path(folder)
    paths = []
    for name, fig in figures(res, contrast).items():
        paths += plots.save(fig, folder / name)
    return paths


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _table(rows: dict | list, header: tuple = ("", "")) -> str:
    items = rows.items() if isinstance(rows, dict) else rows
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in items)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _frame(frame: pd.DataFrame) -> str:
    return frame.to_html(float_format=lambda v: f"{v:.4g}", na_rep="NA", border=0)


def _top_genes(res, contrast, alpha: float, n: int) -> tuple[str, pd.DataFrame]:
    table = res.results(contrast)
    shrunk = res.state.shrink is not None
    if shrunk:
        from fed_de.bulk.shrink import ShrinkNotComputedError

        try:
            table = res.shrunk_results(contrast)
        except ShrinkNotComputedError:
            shrunk = False
    top = table.dropna(subset=["padj"]).sort_values("padj").head(n)
    cols = ["baseMean", "log2FoldChange", "lfcSE", "padj"]
    if shrunk:
        cols = ["baseMean", "log2FoldChange", "log2FoldChangeShrunk", "lfcSEShrunk", "lfsr",
                "svalue", "padj"]
    note = (f"{n} genes with the smallest padj (alpha {alpha:g}); "
            + ("shrunken LFC and its posterior beside the MLE." if shrunk else "MLE LFC."))
    return note, top[cols]


def _facts_rows(facts: dict) -> list:
    rows = [("sequential steps", facts.get("sequential_steps")), ("tasks", facts.get("tasks")),
            ("distinct functions", facts.get("distinct_functions")),
            ("wall seconds", facts.get("wall_seconds"))]
    for site, b in facts.get("bytes_sent_by_site", {}).items():
        rows.append((f"bytes sent by {site}", f"{b:,}"))
    agg = facts.get("bytes_sent_by_aggregator")  # None: not measured (substra backends)
    rows.append(("bytes sent by the aggregator", f"{agg:,}" if agg is not None else "n/a"))
    post = facts.get("postfit")
    if post:
        rows += [("post-fit rounds (shrinkage, PCA)", post["rounds"]),
                 ("post-fit sequential steps", post["sequential_steps"]),
                 ("post-fit payload per site (bytes)", f"{post['payload_bytes_per_site']:,}"),
                 ("post-fit payload per site per gene",
                  f"{post['payload_bytes_per_site_per_gene']:.0f}"),
                 ("post-fit encoding", post["encoding"])]
    sh = facts.get("shrink")
    if sh:
        for name, prior in sh["targets"].items():
            prior_text = (f"Cauchy scale {prior['prior_scale']:.4g}" if "prior_scale" in prior
                          else "prior variances (log2) " + ", ".join(
                              f"{v:.4g}" for v in prior["prior_var_log2"]))
            rows.append((f"shrinkage of {name}", f"{sh['type']}, {prior_text}, {sh['rounds']} "
                         f"rounds, {sh['genes_moving_over_1e-6'][name]} gene(s) still moving"))
    pc = facts.get("pca")
    if pc:
        pv = ", ".join(f"{100 * v:.1f} %" for v in pc["percent_var"])
        est = pc["axis_error_estimate"]
        err = ("exact (the block spans the covariance)" if pc["exact_block"] else
               "axis error unknown (one round)" if est is None else f"axis error estimate "
               f"{est:.1e}")
        rows.append(("PCA", f"{pc['genes']} genes, {pc['axes']} axes ({pv}), block "
                            f"{pc['block']}, {pc['rounds']} rounds, {err}"))
    return rows


def _privacy_rows(res) -> list:
    f = res.facts
    secure = f.get("secure_aggregation")
    return [
        ("sites", f.get("n_sites")),
        ("secure aggregation", "on: the aggregator sees cross-site totals only" if secure
         else "off"),
        ("min_cell_size", f"{f.get('min_cell_size')} (a site refuses a design cell or PCA "
                          "group with fewer samples)"),
        ("min_pooled_cell_size", f"{f.get('min_pooled_cell_size')} (the study refuses a "
                                 "pooled design cell with fewer samples; two sites on)"),
        ("genes withheld", f"{f.get('genes_withheld', 0)} (a pooled design cell with fewer "
                           f"than min_nonzero={f.get('min_nonzero')} non-zero counts)"),
        ("Cook's outliers", "replaced and refitted in pooled cells of >= "
                            f"{f.get('options', {}).get('min_replicates_for_replace')} samples "
                            "(inf: filtered, p-value NA)"),
        ("what leaves a site", "per-gene sums over its samples; shapes in study sizes only"),
        ("stays at the sites", "counts, size factors, fitted means, VST values, PCA "
                               "coordinates"),
    ]


def _warnings(res) -> list[str]:
    out = list(res.facts.get("warnings", []))
    trend = res.state.trend
    if trend is not None:
        out += [w for w in (f"dispersion trend: {t}" for t in trend.warnings) if w not in out]
    if res.facts.get("n_sites") == 2 and res.facts.get("secure_aggregation"):
        out.append("secure aggregation with two sites: each site can infer the other's sums")
    return out


def _agreement(res, contrast, reference, alpha: float) -> str:
    from fed_de.compare import compare_results, format_report, read_results_table

    ref = reference if isinstance(reference, pd.DataFrame) else read_results_table(reference)
    rep = compare_results(res.results(contrast), ref, alpha=alpha)
    calls = rep.get("calls", {})
    rows = [("genes compared", rep["n_shared"]),
            ("calls (ours / reference)", f"{calls.get('n_ours')} / {calls.get('n_ref')}"),
            ("differing calls", calls.get("n_differing")),
            ("Spearman(stat)", f"{rep.get('spearman_stat', float('nan')):.6f}")]
    rows += [(f"{col}: median / max relative error",
              f"{s['median_rel_error']:.2e} / {s['max_rel_error']:.2e}")
             for col, s in rep["columns"].items()]
    return (_table(rows, ("", "")) + "<details><summary>full comparison</summary><pre>"
            + html.escape(format_report(rep)) + "</pre></details>")


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:72rem;
color:#222;padding:0 1rem}h1{font-size:1.6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2rem}table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}td,th{padding:.2rem
.6rem;border-bottom:1px solid #eee;text-align:right}th{background:#f4f4f4}td:first-child,
th:first-child{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0;
flex:1 1 30rem}figure img{width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.8rem;
color:#555}.warn{color:#8a4b00}pre{font-size:.75rem;background:#f8f8f8;padding:.5rem;
overflow-x:auto}
"""


def build_report(res, contrast=None, *, reference=None, reference_name: str = "reference",
                 title: str | None = None, top: int = 20, alpha: float | None = None) -> str:
    """The HTML text of :func:`write_report`."""
    alpha = res.alpha if alpha is None else alpha
    name = _title(res, contrast)
    table = res.results(contrast)
    n_sig = int((table.padj < alpha).sum())
    up = int(((table.padj < alpha) & (table.log2FoldChange > 0)).sum())
    summary = [("design", res.study.design), ("contrast", name), ("test", res.test),
               ("genes", len(res.genes)),
               ("samples", int(res.state.totals.n_samples) if res.state.totals else "?"),
               ("sites", res.facts.get("n_sites")),
               (f"padj < {alpha:g}", f"{n_sig} ({up} up, {n_sig - up} down)"),
               ("shrinkage", res.state.shrink.type if res.state.shrink else "none"),
               ("PCA", "yes" if res.state.pca is not None else "no")]
    note, top_table = _top_genes(res, contrast, alpha, top)
    figs = "".join(
        f'<figure><img alt="{html.escape(k)}" src="data:image/png;base64,{_png(fig)}">'
        f"<figcaption>{html.escape(k)}</figcaption></figure>"
        for k, fig in figures(res, contrast).items())
    warns = _warnings(res)
    warn_html = ("<ul>" + "".join(f'<li class="warn">{html.escape(w)}</li>' for w in warns)
                 + "</ul>") if warns else "<p>none</p>"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title or f'fed_de: {name}')}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title or f'fed_de federated DESeq2: {name}')}</h1>",
        f"<p>{dt.datetime.now().isoformat(timespec='seconds')}</p>",
        "<h2>Summary</h2>", _table(summary, ("", "")),
        "<h2>Top genes</h2>", f"<p>{html.escape(note)}</p>", _frame(top_table),
        "<h2>Plots</h2>", f'<div class="plots">{figs}</div>',
        "<h2>Run facts</h2>", _table(_facts_rows(res.facts), ("fact", "value")),
        "<h2>Privacy settings</h2>", _table(_privacy_rows(res), ("setting", "value")),
        "<h2>Versions</h2>", _table(package_versions(PACKAGES + ("matplotlib",)),
                                    ("package", "version")),
        "<h2>Warnings</h2>", warn_html,
    ]
    if reference is not None:
        parts += [f"<h2>Agreement with {html.escape(reference_name)}</h2>",
                  _agreement(res, contrast, reference, alpha)]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(res, path: str | Path, contrast=None, *, reference=None,
                 reference_name: str = "reference", title: str | None = None, top: int = 20,
                 alpha: float | None = None) -> Path:
    """Write the self-contained HTML report of ``res`` to ``path``.

    Parameters
    ----------
    res
        A :class:`fed_de.bulk.results.DESeq2Result`.
    contrast
        The contrast reported (default: the run's first, else the last coefficient).
    reference
        A pooled reference results table (DataFrame, CSV path or fed_de run folder): its
        agreement with this run is reported.
    top
        Number of top genes listed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(res, contrast, reference=reference,
                                 reference_name=reference_name, title=title, top=top,
                                 alpha=alpha), encoding="utf-8")
    return path

