"""``fed-de screen`` through typer's test runner (a local app: the command is registered in
``fed_de.cli`` as ``app.command("screen")(screen_command)``)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from fed_de.screening.cli import screen_command
from fed_de.screening.data import make_screen

app = typer.Typer()
app.command("screen")(screen_command)


@app.callback()
def _main() -> None:
    """Test app."""


@pytest.fixture(scope="module")
def site_files(tmp_path_factory):
    scr = make_screen(n_cells=1500, n_genes=60, n_perturbations=5, seed=2)
    return scr, scr.write(tmp_path_factory.mktemp("sites"))


def _args(paths, out, *extra):
    sites = [a for name, p in paths.items() for a in ("--site", f"{name}={p}")]
    return ["screen", *sites, "--perturbation-column", "perturbation", "--control",
            "non-targeting", "--out", str(out), *extra]


@pytest.mark.parametrize("method", ["nb_glm", "wilcoxon", "t_test"])
def test_screen_writes_results(site_files, tmp_path, method):
    scr, paths = site_files
    res = CliRunner().invoke(app, _args(paths, tmp_path, "--method", method, "--alpha", "0.1"))
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "results.csv")
    assert list(table.columns) == ["perturbation", "gene", "baseMean", "log2FoldChange",
                                   "lfcSE", "stat", "pvalue", "padj"]
    assert len(table) == 5 * 60
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["sequential_steps"] <= 30 and run["tasks"] > 0
    assert set(run["bytes_sent_by_site"]) == set(paths)
    assert set(run["peak_memory_by_site"]) == set(paths)
    assert run["wall_seconds"] > 0 and run["params"]["alpha"] == 0.1
    h5 = ad.read_h5ad(tmp_path / "screen.h5ad")
    assert h5.shape == (5, 60)
    for layer in ("log2FoldChange", "lfcSE", "stat", "pvalue", "padj"):
        assert layer in h5.layers
    pv = pd.DataFrame(h5.layers["pvalue"], index=h5.obs_names, columns=h5.var_names)
    long = table.pivot(index="perturbation", columns="gene", values="pvalue")
    assert np.allclose(pv.to_numpy(), long.loc[pv.index, pv.columns].to_numpy(),
                       equal_nan=True)
    rgg = h5.uns["rank_genes_groups"]
    assert rgg["params"]["reference"] == "non-targeting"
    assert set(rgg["names"].dtype.names) == set(scr.perturbations)


def test_screen_backed_and_errors(site_files, tmp_path):
    _, paths = site_files
    res = CliRunner().invoke(app, _args(paths, tmp_path, "--backed", "--chunk-size", "200"))
    assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(app, ["screen", "--site", "a=missing.h5ad",
                                   "--perturbation-column", "perturbation", "--control", "x",
                                   "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "does not exist" in bad.output
    wrong = CliRunner().invoke(app, _args(paths, tmp_path, "--method", "deseq"))
    assert wrong.exit_code != 0
    no_ctrl = CliRunner().invoke(app, _args(paths, tmp_path)[:-4] + ["--control", "NT",
                                                                     "--out", str(tmp_path)])
    assert no_ctrl.exit_code == 2 and "no cell is labelled" in no_ctrl.output
