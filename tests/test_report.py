"""The command line's post-fit outputs: results columns, run facts, plots (PNG + SVG) and the
self-contained HTML report; the demo's report; the report rendered in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from fed_de.cli import app
from fed_de.demo_data import make_demo_study
from tests.test_plots import check_written

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "wbr"}


class StrictHTML(HTMLParser):
    """Every element closed in order; collects the embedded images and the headings."""

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.headings, self.errors = [], [], [], []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in VOID:
            self.stack.append(tag)
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()
        self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)


def parse_report(path) -> StrictHTML:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    parser = StrictHTML()
    parser.feed(text)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert "src=\"http" not in text and "<script" not in text  # nothing fetched, nothing run
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        img = imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert img[..., :3].mean(axis=2).std() > 0.02  # not blank
    return parser


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    study = make_demo_study(n_samples=48, n_genes=300, seed=1)
    folders = study.write(tmp / "sites")
    pooled = tmp / "pooled.csv"
    import fed_de

    fed_de.deseq2({"pooled": study.pooled()}, study.design, levels=study.levels,
                  contrasts=[("condition", "B", "A")]).results().to_csv(pooled)
    args = ["run", *[a for name, path in folders.items() for a in ("--site", f"{name}={path}")],
            "--design", study.design, "--contrast", "condition", "B", "A",
            "--levels", "batch=b1,b2,b3", "--levels", "condition=A,B", "--out", str(tmp / "out"),
            "--shrink", "apeglm", "--posterior-threshold", "0.5", "--pca",
            "--plots", str(tmp / "plots"), "--report", str(tmp / "report.html"),
            "--reference", str(pooled),
            # 48 samples (a PCA block spanning the covariance): pooled design cells below the
            # disclosure minimum, so the rules are off here (tests/test_privacy.py tests them)
            "--min-cell-size", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return tmp, study


def test_results_file_and_run_facts(cli_run):
    tmp, study = cli_run
    table = pd.read_csv(tmp / "out" / "results.csv", index_col=0)
    assert list(table.columns) == ["baseMean", "log2FoldChange", "lfcSE", "stat", "pvalue",
                                   "padj", "log2FoldChangeShrunk", "lfcSEShrunk",
                                   "posteriorSD", "lfsr", "svalue", "probAbsLFCgt",
                                   "credLower", "credUpper"]
    ok = table.lfsr.notna()
    assert ok.sum() > 250
    # shrinkage pulls towards zero (but for a rare barely expressed gene: apeglm does not
    # floor the means at 0.5 as DESeq2's MLE does); P(|LFC| > 0.5) is a probability
    pulled = (table.log2FoldChangeShrunk.abs() <= table.log2FoldChange.abs() + 1e-9)[ok]
    assert pulled.mean() > 0.99
    assert table.probAbsLFCgt[ok].between(0, 1).all()
    facts = json.loads((tmp / "out" / "run.json").read_text())
    assert facts["postfit"]["rounds"] == 6 and facts["postfit"]["sequential_steps"] == 12
    assert facts["postfit"]["payload_bytes_per_site"] > 0
    assert facts["shrink"]["type"] == "apeglm" and facts["posterior_threshold"] == 0.5
    assert facts["pca"]["genes"] == 300 and facts["pca"]["exact_block"]  # 47 <= block 50
    centroids = pd.read_csv(tmp / "out" / "pca_centroids.csv")
    assert set(centroids.site) == set(study.sites) and set(centroids.level) == {"A", "B"}


def test_plots_are_written_and_not_blank(cli_run):
    tmp, study = cli_run
    names = ["ma", "volcano", "dispersions", "pvalues", "pca"] + [f"pca_{s}" for s in
                                                                  study.sites]
    for name in names:
        check_written([tmp / "plots" / f"{name}.png", tmp / "plots" / f"{name}.svg"])


def test_report_is_self_contained_html(cli_run):
    tmp, _ = cli_run
    parser = parse_report(tmp / "report.html")
    assert len(parser.images) == 8
    for heading in ("Summary", "Top genes", "Plots", "Run facts", "Privacy settings",
                    "Versions", "Warnings"):
        assert heading in parser.headings
    assert any(h.startswith("Agreement with") for h in parser.headings)
    text = (tmp / "report.html").read_text()
    assert "differing calls" in text and "secure aggregation" in text
    assert "log2FoldChangeShrunk" in text and "post-fit rounds" in text


@pytest.mark.slow
def test_demo_shows_shrunken_top_genes_and_writes_the_report(tmp_path):
    from rich.console import Console

    from fed_de.demo_run import run_demo

    console = Console(record=True, width=120)
    summary = run_demo(n_samples=150, n_genes=300, seed=2, out=tmp_path, console=console)
    printed = console.export_text()
    assert "Top genes by shrunken log2FC (apeglm)" in printed and "lfsr" in printed
    # the pooled reference leaves out the genes the disclosure rule withheld, as the
    # federated run does (they are in neither the trend nor the apeglm prior)
    assert summary["vs_pooled_shrunk"]["max_abs_diff"] < 1e-8
    parse_report(tmp_path / "report.html")
    table = pd.read_csv(tmp_path / "results.csv")
    assert "log2FoldChangeShrunk" in table.columns


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(cli_run):
    tmp, _ = cli_run
    shot = tmp / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp / 'chromium'}", "--hide-scrollbars",
           "--window-size=1280,3000", f"--screenshot={shot}",
           (tmp / "report.html").resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    img = imread(shot)
    assert img.shape[0] >= 3000 and img.shape[1] >= 1280
    gray = img[..., :3].mean(axis=2)
    assert gray.std() > 0.05 and (gray < 0.5).mean() > 0.005  # text and plots drawn
    # the plots are drawn: rows further down the page hold coloured pixels (scatter points)
    colour = np.abs(img[..., 0] - img[..., 2]) > 0.2
    assert colour[1000:].mean() > 1e-4
