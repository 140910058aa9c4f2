"""fed_de.plots: every plot renders headless to PNG and SVG with visible content."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from fed_de import plots


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(0)
    G = 800
    base = np.exp(rng.normal(4, 2, G))
    lfc = np.where(rng.random(G) < 0.1, rng.normal(0, 2, G), 0.0) + rng.normal(0, 0.3, G)
    lfc[:3] = [9.0, -8.0, 0.2]  # beyond the MA plot's range
    p = np.clip(rng.uniform(size=G) ** (1 + 20 * (np.abs(lfc) > 1)), 1e-300, 1)
    p[5] = np.nan
    res = pd.DataFrame({"baseMean": base, "log2FoldChange": lfc, "pvalue": p,
                        "padj": np.minimum(p * 5, 1)})
    trend = 0.05 + 2.0 / base
    gw = trend * np.exp(rng.normal(0, 0.6, G))
    disp = pd.DataFrame({"baseMean": base, "genewise": gw, "trend": trend,
                         "final": np.sqrt(gw * trend), "outlier": rng.random(G) < 0.02})
    return res, disp


def check_written(paths):
    png, svg = paths
    img = imread(png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    gray = img[..., :3].mean(axis=2)
    assert gray.std() > 0.02  # not blank
    assert (gray < 0.5).mean() > 0.001  # some dark ink (axes, points, text)
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert sum(1 for _ in root.iter()) > 50


def test_ma_volcano_hist_dispersions(tables, tmp_path):
    res, disp = tables
    figs = {
        "ma": plots.plot_ma(res, alpha=0.1, title="MA"),
        "ma_shrunk": plots.plot_ma(res.assign(log2FoldChange=res.log2FoldChange / 2),
                                   shrunk=True),
        "volcano": plots.plot_volcano(res, lfc_threshold=1.0),
        "pvalues": plots.plot_pvalue_histogram(res),
        "dispersions": plots.plot_dispersions(disp),
    }
    for name, fig in figs.items():
        check_written(plots.save(fig, tmp_path / name))


def test_ma_marks_values_beyond_the_range(tables):
    res, _ = tables
    fig = plots.plot_ma(res, ylim=2.0)
    ax = fig.axes[0]
    offsets = np.vstack([c.get_offsets() for c in ax.collections if len(c.get_offsets())])
    assert np.abs(offsets[:, 1]).max() == pytest.approx(2.0)  # clipped to the edge
    assert len(offsets) == res.log2FoldChange.notna().sum()  # no gene lost


def test_pca_plots(tmp_path):
    rng = np.random.default_rng(1)
    coords = np.vstack([rng.normal(m, 1, (6, 2)) for m in (-3, 3)])
    groups = ["A"] * 6 + ["B"] * 6
    check_written(plots.save(plots.plot_pca(coords, groups, percent_var=[0.6, 0.2]),
                             tmp_path / "pca_site"))
    by_site = rng.normal(0, 2, (3, 2, 2))
    by_site[2, 1] = np.nan  # a group under min_cell_size
    fig = plots.plot_pca_centroids(by_site, ["a", "b", "c"], ["A", "B"], percent_var=[0.6, 0.2])
    drawn = sum(len(c.get_offsets()) for c in fig.axes[0].collections)
    assert drawn == 5  # 3 sites x 2 levels - 1 undisclosed (legend handles are empty)
    check_written(plots.save(fig, tmp_path / "pca_centroids"))
