"""The plots DESeq2 users read: MA, volcano, dispersion estimates, p-value histogram, PCA.

Each function takes plain DataFrames / arrays (a results table, the dispersion table, PCA
coordinates), returns a :class:`matplotlib.figure.Figure` and never touches pyplot's global
state, so it runs headless (Agg) in a server or a test. :func:`save` writes PNG and SVG.

Inputs follow fed_de's tables: results with ``baseMean``, ``log2FoldChange``, ``pvalue``,
``padj`` (DESeq2's columns); dispersions with ``baseMean``, ``genewise``, ``trend``, ``final``
and optionally ``outlier`` (``DESeq2Result.dispersions``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["plot_ma", "plot_volcano", "plot_dispersions", "plot_pvalue_histogram",
           "plot_pca", "plot_pca_centroids", "save"]

SIG_COLOR = "#1f77b4"
OTHER_COLOR = "#9e9e9e"
TREND_COLOR = "#d62728"


def _figure(figsize=(6.0, 4.5)):
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots()


def save(fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "svg"),
         dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``stem.png``, ``stem.svg`` (any matplotlib format); returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_suffix("." + fmt)
        fig.savefig(path, format=fmt, dpi=dpi)
        paths.append(path)
    return paths


def plot_ma(results: pd.DataFrame, alpha: float = 0.1, ylim: float | None = None,
            shrunk: bool = False, title: str | None = None) -> Figure:
    """MA plot as DESeq2's ``plotMA``: log2 fold change against mean of normalised counts
    (log axis), genes with ``padj < alpha`` coloured, values beyond ``ylim`` drawn as triangles
    at the edge.

    Parameters
    ----------
    results
        ``baseMean``, ``log2FoldChange``, ``padj`` (shrunken LFCs from ``lfc_shrink`` keep the
        unshrunken test's ``padj``, as DESeq2).
    ylim
        Half-height of the y range; default: a little beyond the largest |LFC| (at most 5 if
        unshrunken, as ``plotMA``'s outlier arrows).
    """
    df = results[(results["baseMean"] > 0) & results["log2FoldChange"].notna()]
    x = df["baseMean"].to_numpy(float)
    y = df["log2FoldChange"].to_numpy(float)
    sig = (df["padj"] < alpha).to_numpy() if "padj" in df else np.zeros(len(df), bool)
    if ylim is None:
        top = float(np.nanmax(np.abs(y))) * 1.1 if y.size else 1.0
        ylim = min(top, 5.0) if not shrunk else top
        ylim = max(ylim, 0.5)
    out = np.abs(y) > ylim
    fig, ax = _figure()
    for mask, color, label in ((~sig, OTHER_COLOR, "not significant"),
                               (sig, SIG_COLOR, f"padj < {alpha:g}")):
        inside = mask & ~out
        ax.scatter(x[inside], y[inside], s=4, c=color, label=label, linewidths=0,
                   rasterized=True)
        for sign, marker in ((1.0, "^"), (-1.0, "v")):  # beyond the y range: at the edge
            edge = mask & out & (np.sign(y) == sign)
            if edge.any():
                ax.scatter(x[edge], np.full(edge.sum(), sign * ylim), s=14, c=color,
                           marker=marker, linewidths=0)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(-ylim * 1.05, ylim * 1.05)
    ax.set_xlabel("mean of normalised counts")
    ax.set_ylabel(("shrunken " if shrunk else "") + "log2 fold change")
    ax.legend(loc="upper right", frameon=False, markerscale=3, fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def plot_volcano(results: pd.DataFrame, alpha: float = 0.1, lfc_threshold: float = 1.0,
                 title: str | None = None) -> Figure:
    """Volcano plot: -log10 p-value against log2 fold change; genes with ``padj < alpha`` and
    ``|LFC| >= lfc_threshold`` coloured, the thresholds drawn."""
    df = results[results["pvalue"].notna() & results["log2FoldChange"].notna()]
    x = df["log2FoldChange"].to_numpy(float)
    p = np.clip(df["pvalue"].to_numpy(float), np.finfo(float).tiny, 1.0)
    y = -np.log10(p)
    sig = (df["padj"] < alpha).to_numpy() & (np.abs(x) >= lfc_threshold)
    fig, ax = _figure()
    ax.scatter(x[~sig], y[~sig], s=4, c=OTHER_COLOR, linewidths=0, rasterized=True,
               label="other")
    ax.scatter(x[sig], y[sig], s=6, c=TREND_COLOR, linewidths=0, rasterized=True,
               label=f"padj < {alpha:g}, |LFC| >= {lfc_threshold:g}")
    if lfc_threshold > 0:
        for v in (-lfc_threshold, lfc_threshold):
            ax.axvline(v, color="k", lw=0.6, ls="--")
    ax.set_xlabel("log2 fold change")
    ax.set_ylabel("-log10 p-value")
    ax.legend(loc="upper left", frameon=False, markerscale=3, fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def plot_dispersions(dispersions: pd.DataFrame, title: str | None = None) -> Figure:
    """DESeq2's ``plotDispEsts``: gene-wise estimates (black), the fitted trend (red), final
    estimates (blue), dispersion outliers (final = gene-wise) circled; log-log axes."""
    df = dispersions[dispersions["baseMean"] > 0]
    x = df["baseMean"].to_numpy(float)
    gw = df["genewise"].to_numpy(float)
    fin = df["final"].to_numpy(float)
    trend = df["trend"].to_numpy(float)
    floor = np.nanmin(fin[fin > 0]) / 10.0 if (fin > 0).any() else 1e-8
    fig, ax = _figure()
    ok = np.isfinite(gw)
    ax.scatter(x[ok], np.maximum(gw[ok], floor), s=3, c="black", linewidths=0,
               rasterized=True, label="gene-wise")
    ax.scatter(x, fin, s=3, c=SIG_COLOR, linewidths=0, rasterized=True, label="final")
    order = np.argsort(x)
    ax.plot(x[order], trend[order], c=TREND_COLOR, lw=1.5, label="fitted")
    if "outlier" in df:
        out = df["outlier"].to_numpy(bool)
        ax.scatter(x[out], fin[out], s=24, facecolors="none", edgecolors=SIG_COLOR,
                   linewidths=0.8, label="outlier")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean of normalised counts")
    ax.set_ylabel("dispersion")
    ax.legend(loc="lower left", frameon=False, markerscale=3, fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def plot_pvalue_histogram(results: pd.DataFrame, bins: int = 40,
                          title: str | None = None) -> Figure:
    """Histogram of the p-values (genes tested); a flat floor means well-calibrated nulls."""
    p = results["pvalue"].dropna().to_numpy(float)
    fig, ax = _figure()
    ax.hist(p, bins=np.linspace(0.0, 1.0, bins + 1), color=SIG_COLOR, edgecolor="white",
            linewidth=0.4)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("p-value")
    ax.set_ylabel("genes")
    if title:
        ax.set_title(title)
    return fig


def _pc_labels(ax, percent_var: Sequence[float] | None, pcs: tuple[int, int]) -> None:
    for axis, pc in zip(("x", "y"), pcs, strict=True):
        label = f"PC{pc + 1}"
        if percent_var is not None:
            label += f": {100.0 * percent_var[pc]:.0f}% variance"
        getattr(ax, f"set_{axis}label")(label)


def plot_pca(coords: np.ndarray | pd.DataFrame, groups: Sequence | None = None,
             percent_var: Sequence[float] | None = None, pcs: tuple[int, int] = (0, 1),
             title: str | None = None) -> Figure:
    """A site's own samples on the principal axes, coloured by group (``plotPCA``).

    ``coords`` is samples x k (from :func:`fed_de.core.pca.site_coordinates`); ``groups`` a
    label per sample (e.g. condition)."""
    c = np.asarray(coords, dtype=float)
    g = np.asarray(groups if groups is not None else ["samples"] * len(c), dtype=object)
    fig, ax = _figure((5.5, 4.5))
    for lv in pd.unique(g):
        m = g == lv
        ax.scatter(c[m, pcs[0]], c[m, pcs[1]], s=28, label=str(lv))
    _pc_labels(ax, percent_var, pcs)
    ax.legend(frameon=False, fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def plot_pca_centroids(by_site: np.ndarray, sites: Sequence[str], levels: Sequence[str],
                       percent_var: Sequence[float] | None = None,
                       pcs: tuple[int, int] = (0, 1), title: str | None = None) -> Figure:
    """Overall PCA view the aggregator can draw: one point per site x level centroid (groups
    below ``min_cell_size`` are NaN and not drawn); colour = level, marker = site.

    ``by_site`` is sites x levels x k (:func:`fed_de.core.pca.centroids`)."""
    markers = "osD^vP*Xh<>p"
    cen = np.asarray(by_site, dtype=float)
    fig, ax = _figure((5.5, 4.5))
    colors = [f"C{i % 10}" for i in range(len(levels))]
    for si in range(len(sites)):
        for li in range(len(levels)):
            pt = cen[si, li]
            if not np.isfinite(pt[list(pcs)]).all():
                continue
            ax.scatter(pt[pcs[0]], pt[pcs[1]], s=60, c=colors[li],
                       marker=markers[si % len(markers)], edgecolors="black", linewidths=0.5)
    for li, level in enumerate(levels):
        ax.scatter([], [], c=colors[li], s=40, label=str(level))
    for si, site in enumerate(sites):
        ax.scatter([], [], c="white", edgecolors="black", marker=markers[si % len(markers)],
                   s=40, label=str(site))
    _pc_labels(ax, percent_var, pcs)
    ax.legend(frameon=False, fontsize="small")
    if title:
        ax.set_title(title)
    return fig
