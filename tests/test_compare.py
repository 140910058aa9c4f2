"""fed_de.compare: reading results tables and comparing them, on real R DESeq2 outputs.

Tables used (all in tests/data): R 1.34 (``r134/multi_factor/r_test_res.csv``, quoted
``write.csv`` with an empty first header) and R 1.38.3 (``r138/synth_multi``) results of the
same analysis of PyDESeq2's synthetic data; R 1.38.3 on pasilla with the parametric and the
local dispersion trend (``r_extra/real/pasilla``: a gene subset, plus ``calls.csv.gz``, R's
padj NA pattern and calls on every gene).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import fed_de
from fed_de.compare import (
    RESULT_COLUMNS,
    compare_results,
    format_report,
    main,
    read_results_table,
)

DATA = Path(__file__).parent / "data"
R134 = DATA / "r134" / "multi_factor" / "r_test_res.csv"
R138 = DATA / "r138" / "synth_multi" / "results.csv.gz"
R138_NOIF = DATA / "r138" / "synth_multi" / "results_noindfilt.csv.gz"
PASILLA = DATA / "r_extra" / "real" / "pasilla"


def test_reads_quoted_r_table_and_gzipped_table_alike():
    r134, r138 = read_results_table(R134), read_results_table(R138)
    assert list(r134.index) == list(r138.index)
    assert r134.index.name == r138.index.name == "gene"
    assert r134.index[0] == "gene1"
    for col in RESULT_COLUMNS:
        assert r134[col].dtype == float and r138[col].dtype == float
    # the same numbers as pandas reads them directly
    raw = pd.read_csv(R134, index_col=0)
    np.testing.assert_array_equal(r134["stat"].to_numpy(), raw["stat"].to_numpy())


def test_reads_pydeseq2_layout_and_run_folder(tmp_path):
    ref = read_results_table(R138)
    # PyDESeq2's results_df.to_csv(): unnamed index, NaN written as empty cells
    ref.rename_axis(None).to_csv(tmp_path / "pydeseq2.csv")
    # a fed_de run folder: results.csv with a ``gene`` column
    run = tmp_path / "run"
    run.mkdir()
    ref.reset_index().to_csv(run / "results.csv", index=False)
    for path in (tmp_path / "pydeseq2.csv", run):
        back = read_results_table(path)
        pd.testing.assert_frame_equal(back, ref, check_exact=True)


def test_refuses_tables_without_gene_ids_or_results(tmp_path):
    pd.DataFrame({"baseMean": [1.0], "padj": [0.1]}).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(ValueError, match="gene ids"):
        read_results_table(tmp_path / "a.csv")
    pd.DataFrame({"gene": ["g"], "x": [1.0]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(ValueError, match="result columns"):
        read_results_table(tmp_path / "b.csv")
    with pytest.raises(FileNotFoundError):
        read_results_table(tmp_path / "missing")


def test_r134_and_r138_agree_to_print_precision():
    report = compare_results(read_results_table(R138), read_results_table(R134), alpha=0.05)
    assert report["n_shared"] == report["n_ours"] == report["n_ref"] == len(pd.read_csv(R134))
    assert report["calls"]["n_differing"] == 0
    assert report["calls"]["n_ours"] == report["calls"]["n_ref"] > 0
    assert report["spearman_stat"] == pytest.approx(1.0, abs=1e-12)
    for col, s in report["columns"].items():
        # the two versions print 15 significant digits of (nearly) the same doubles
        assert s["max_rel_error"] < 1e-11, (col, s)
        assert not s["na_only_ours"] and not s["na_only_ref"]


def test_independent_filtering_shows_as_na_pattern():
    ours, ref = read_results_table(R138), read_results_table(R138_NOIF)
    report = compare_results(ours, ref, alpha=0.05)
    padj = report["columns"]["padj"]
    expected = ours.index[ours["padj"].isna() & ref["padj"].notna()].tolist()
    assert padj["na_only_ours"] == expected
    assert padj["na_only_ref"] == []
    # the statistics themselves do not depend on the filter
    assert report["columns"]["stat"]["max_rel_error"] == 0.0


def pasilla_tables():
    default = read_results_table(PASILLA / "default.csv.gz")
    local = read_results_table(PASILLA / "local.csv.gz")
    calls = pd.read_csv(PASILLA / "calls.csv.gz", index_col=0).loc[default.index]
    return default, local, calls


def test_local_trend_against_parametric_on_pasilla():
    default, local, calls = pasilla_tables()
    report = compare_results(local, default, alpha=0.05)
    # R's own record of each gene's call (calls.csv.gz, every gene) gives the same lists
    ours_only = calls.index[(calls.local_call != 0) & (calls.default_call == 0)]
    ref_only = calls.index[(calls.default_call != 0) & (calls.local_call == 0)]
    assert report["calls"]["ours_only"] == sorted(ours_only)
    assert report["calls"]["ref_only"] == sorted(ref_only)
    assert report["calls"]["n_differing"] > 0
    flips = calls.index[(calls.local_call * calls.default_call) < 0]
    assert report["calls"]["opposite_sign"] == sorted(flips)
    na_local = calls.index[(calls.local_padjNA == 1) & (calls.default_padjNA == 0)]
    assert report["columns"]["padj"]["na_only_ours"] == list(na_local)
    both = local["stat"].notna() & default["stat"].notna()
    rho = local.loc[both, "stat"].corr(default.loc[both, "stat"], method="spearman")
    assert report["spearman_stat"] == pytest.approx(rho, rel=1e-12)
    assert 0.9 < report["spearman_stat"] < 1.0
    lfc = report["columns"]["log2FoldChange"]
    rel = ((local.log2FoldChange - default.log2FoldChange).abs() / default.log2FoldChange.abs())
    assert lfc["max_rel_error"] == pytest.approx(rel.max(), rel=1e-12)
    assert lfc["worst_gene"] == rel.idxmax()
    assert lfc["median_rel_error"] == pytest.approx(rel.median(), rel=1e-12)


def test_genes_in_one_table_only_are_reported():
    default, local, _ = pasilla_tables()
    report = compare_results(local.iloc[5:], default.iloc[:-3], alpha=0.05)
    assert report["only_in_ours"] == sorted(local.index[-3:])
    assert report["only_in_ref"] == sorted(default.index[:5])
    assert report["n_shared"] == len(default) - 8
    with pytest.raises(ValueError, match="in common"):
        compare_results(local.iloc[:5], default.iloc[5:])
    with pytest.raises(ValueError, match="alpha"):
        compare_results(local, default, alpha=1.5)


def test_format_report_carries_the_numbers():
    default, local, _ = pasilla_tables()
    report = compare_results(local, default, alpha=0.05)
    text = format_report(report, limit=3)
    calls = report["calls"]
    assert (f"calls at padj < 0.05: ours {calls['n_ours']}, reference {calls['n_ref']}, "
            f"differing {calls['n_differing']}") in text
    assert f"Spearman(stat): {report['spearman_stat']:.6f}" in text
    assert f"called by ours only ({len(calls['ours_only'])}): " \
           f"{', '.join(calls['ours_only'][:3])}" in text
    assert report["columns"]["log2FoldChange"]["worst_gene"] in text


def test_fed_de_run_folder_against_r(tmp_path, capsys):
    counts = pd.read_csv(DATA / "pydeseq2_synthetic" / "counts.csv", index_col=0)
    meta = pd.read_csv(DATA / "pydeseq2_synthetic" / "metadata.csv", index_col=0)
    adata = ad.AnnData(X=counts.to_numpy(), obs=meta.loc[counts.index].astype(str),
                       var=pd.DataFrame(index=counts.columns))
    res = fed_de.deseq2({"one": adata}, "~group + condition", contrasts=[("condition", "B", "A")],
                        min_cell_size=0)
    run = tmp_path / "run"
    run.mkdir()
    res.results(alpha=0.05).reset_index().to_csv(run / "results.csv", index=False)
    assert main([str(run), str(R138), "--alpha", "0.05"]) == 0
    text = capsys.readouterr().out
    report = compare_results(read_results_table(run), read_results_table(R138), alpha=0.05)
    assert report["calls"]["n_differing"] == 0
    assert report["spearman_stat"] > 0.99999
    assert report["columns"]["log2FoldChange"]["max_rel_error"] < 0.02
    assert "differing 0 (0.000 % of shared genes)" in text
    assert main([str(tmp_path / "nowhere"), str(R138)]) == 2
