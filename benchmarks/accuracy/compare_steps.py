"""Step-by-step comparison of fed_de with R DESeq2 1.38.3 on the real studies (issue 13).

    python benchmarks/accuracy/run_fed_de.py                  # fed_de runs -> DATADIR
    Rscript tests/data/r_extra/real/make_refs.R FULLDIR all   # R refs, every gene
    Rscript benchmarks/accuracy/r_internals.R pasilla         # R's path, objectives, plug-ins
    Rscript benchmarks/accuracy/r_internals.R marioni
    python benchmarks/accuracy/compare_steps.py pasilla marioni > tables.md

DATADIR = /work/scratch/accuracy_data, FULLDIR = /work/scratch/rrefs_full (override with the
environment variables ACC_DATA and ACC_FULL). Prints markdown tables: every intermediate of
fed_de (one site) against R's, the cause of each divergence (DESeq2's objective evaluated at
both values and at the optimum), the calls each cause explains (R's own pipeline with
dispersions replaced), the LRT, independent filtering, and marioni over two sites.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fed_de.compare import compare_results
from fed_de.core import testing, trend

DATA = Path(os.environ.get("ACC_DATA", "/work/scratch/accuracy_data"))
FULL = Path(os.environ.get("ACC_FULL", "/work/scratch/rrefs_full"))
SHARED = Path(os.environ.get("ACC_SHARED", "/work/shared/data"))
ALPHA = 0.05
MIN_DISP = 1e-8
F_TOL = 1e-6  # objective within this of the optimum counts as "at the optimum" (R's dispTol)
N_COEFS = {"pasilla": 3, "marioni": 3}
N_SAMPLES = {"pasilla": 7, "marioni": 10}
BM_BUCKETS = [(0, 1), (1, 10), (10, 100), (100, 1000), (1000, np.inf)]


def rel(a, b) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, np.abs(a - b) / np.abs(b), np.abs(a - b))


def stats_row(label: str, a: pd.Series, b: pd.Series, mask=None) -> str:
    """| label | n | >1e-6 | >1e-3 | median | max | worst gene (fed / R) |"""
    if mask is None:
        mask = np.ones(len(a), bool)
    mask = np.asarray(mask) & np.isfinite(a.to_numpy(float)) & np.isfinite(b.to_numpy(float))
    r = rel(a[mask], b[mask])
    if not mask.any():
        return f"| {label} | 0 | | | | | |"
    k = int(np.argmax(r))
    g = a.index[mask][k]
    return (f"| {label} | {mask.sum()} | {(r > 1e-6).sum()} | {(r > 1e-3).sum()} | "
            f"{np.median(r):.2g} | {r[k]:.3g} | {g} ({a[g]:.6g} / {b[g]:.6g}) |")


STATS_HEAD = ("| quantity | genes | rel > 1e-6 | rel > 1e-3 | median rel | max rel | "
              "worst gene (fed_de / R) |\n|---|---|---|---|---|---|---|")


def markdown(tab: pd.DataFrame) -> str:
    """A crosstab as a markdown table (no tabulate dependency)."""
    head = f"| {tab.index.name} \\ {tab.columns.name} | " + " | ".join(map(str, tab.columns))
    lines = [head + " |", "|---" * (len(tab.columns) + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(str(v) for v in row) + " |"
              for i, row in zip(tab.index, tab.to_numpy(), strict=True)]
    return "\n".join(lines)


def calls(padj) -> np.ndarray:
    return np.nan_to_num(np.asarray(padj, float), nan=1.0) < ALPHA


def load(study: str) -> dict:
    shared = SHARED / f"real_{study}" / "ref_deseq2_1.38.3"
    full = FULL / study
    r = pd.read_csv(full / "default.csv.gz", index_col=0)
    it = pd.read_csv(full / "iterations.csv.gz", index_col=0)
    mc = pd.read_csv(full / "mcols.csv.gz", index_col=0)
    r = r.join(it[["betaIter", "betaConv"]]).join(mc)
    cooks = pd.read_csv(shared / "cooks.csv.gz", index_col=0)
    fed = pd.read_csv(DATA / f"fed_{study}_one.csv.gz", index_col=0)
    genes = r.index  # R's non-zero genes
    out = {
        "r": r, "fed": fed.loc[genes], "fed_all": fed, "genes": genes,
        "r_cooks": cooks, "facts": json.loads((full / "facts.json").read_text()),
        "r_trend": json.loads((shared / "dispersion_trend.json").read_text()),
        "fed_trend": json.loads((DATA / f"fed_{study}_one_trend.json").read_text()),
        "int": pd.read_csv(DATA / f"r_{study}_genes.csv.gz", index_col=0).loc[genes],
        "r_sf": pd.read_csv(shared / "size_factors.csv.gz", index_col=0)["size_factor"],
        "fed_sf": pd.read_csv(DATA / f"fed_{study}_one_sf.csv", index_col=0).iloc[:, 0],
        "r_mu": pd.read_csv(DATA / f"r_{study}_mu.csv.gz", index_col=0),
        "fed_mu": pd.read_csv(DATA / f"fed_{study}_one_mu.csv.gz", index_col=0),
        "r_results_all": pd.read_csv(shared / "results.csv.gz", index_col=0),
    }
    for tag in ("r", "fed", "optmap", "fedfix", "fedgw", "optgw"):
        p = DATA / f"r_{study}_plug_{tag}.csv.gz"
        if p.exists():
            out[f"plug_{tag}"] = pd.read_csv(p, index_col=0).loc[genes]
    for tag in ("fedgw", "optgw"):
        p = DATA / f"r_{study}_plug_{tag}_trend.json"
        if p.exists():
            out[f"plug_{tag}_trend"] = json.loads(p.read_text())
    return out


def floor_class(v: pd.Series) -> np.ndarray:
    return np.select([v <= MIN_DISP * (1 + 1e-6), v < 100 * MIN_DISP], ["floor", "near"],
                     "rest")


# ---- sections ---------------------------------------------------------------------------------


def section_inputs(d: dict, out: list) -> None:
    sf = rel(d["fed_sf"].loc[d["r_sf"].index], d["r_sf"])
    g = d["genes"]
    fi, ri = d["fed"]["alpha_init"], d["int"]["alpha_init"]
    rm, fm = d["r_mu"].loc[g], d["fed_mu"].loc[g, d["r_mu"].columns]
    mu_rel = pd.Series(rel(fm.to_numpy(), rm.to_numpy()).max(axis=1), index=g)
    out += ["### Inputs of the dispersion search", "",
            f"- size factors: max rel. error {sf.max():.2g}",
            f"- gene-wise start (min(rough, moments), clipped): {stats_row('', fi, ri)[4:]}",
            f"- means of the dispersion fit (max over samples per gene): median "
            f"{mu_rel.median():.2g}, max {mu_rel.max():.3g} ({mu_rel.idxmax()}); genes > 1e-6: "
            f"{(mu_rel > 1e-6).sum()}, > 1e-4: {(mu_rel > 1e-4).sum()}", ""]
    d["mu_rel"] = mu_rel


def section_genewise(d: dict, out: list) -> None:
    r, f, it = d["r"], d["fed"], d["int"]
    cls = floor_class(r["dispGeneEst"])
    out += ["### Gene-wise dispersions", "", STATS_HEAD]
    out.append(stats_row("all non-zero genes", f["disp_gene"], r["dispGeneEst"]))
    for c, name in (("floor", "R at the 1e-8 floor"), ("near", "R in (1e-8, 1e-6)"),
                    ("rest", "R >= 1e-6 (trend genes)")):
        out.append(stats_row(name, f["disp_gene"], r["dispGeneEst"], cls == c))
    for lo, hi in BM_BUCKETS:
        m = (r["baseMean"] >= lo) & (r["baseMean"] < hi)
        out.append(stats_row(f"baseMean [{lo}, {hi})", f["disp_gene"], r["dispGeneEst"], m))
    out.append("")
    # causes: R's path x who reaches DESeq2's optimum (objective at R's mu)
    rr = rel(f["disp_gene"], r["dispGeneEst"])
    diff = rr > 1e-6
    # R's order: noIncrease restores the start, then genes with iter 1 or 100 whose value
    # is above 1e-7 are refitted on the grid (so the grid wins over noIncrease)
    path = np.select([it["gw_gridRefit"] & (it["gw_iter"] == 1), it["gw_gridRefit"],
                      it["gw_noIncrease"]],
                     ["grid refit after 1 iteration", "grid refit after 100 iterations",
                      "noIncrease: start kept"], "line search stopped (change < 1e-6)")
    f_opt, f_r, f_fed = it["gw_f_opt_mur"], it["gw_f_r_mur"], it["gw_f_fed_mur"]
    r_at = (f_opt - f_r) <= F_TOL
    fed_at = (f_opt - f_fed) <= F_TOL
    who = np.select([~r_at & fed_at, r_at & ~fed_at, ~r_at & ~fed_at],
                    ["R short of optimum, fed_de at it", "fed_de short, R at optimum",
                     "both short"], "both at optimum (flat)")
    tab = pd.crosstab(pd.Series(path[diff], name="R's path"),
                      pd.Series(who[diff], name="objective at R's mu"))
    big = diff & (rr > 1e-3) & (r["baseMean"] >= 1).to_numpy()
    tab2 = pd.crosstab(pd.Series(path[big], name="R's path"),
                       pd.Series(who[big], name="objective at R's mu"))
    out += [f"Genes whose gene-wise value differs (rel > 1e-6): {diff.sum()}; by R's path and "
            f"by which value is at the optimum of DESeq2's objective (log-lik + Cox-Reid at "
            f"R's means; 'at' = within {F_TOL:g}):", "", markdown(tab), "",
            f"Of these, rel > 1e-3 and baseMean >= 1: {big.sum()}", "", markdown(tab2), ""]
    # fed_de against its own optimum (its own mu), where it does not keep DESeq2's start on
    # purpose (noIncrease / first-step rules, which hold the start or the floor)
    searched = (rel(f["disp_gene"], f["alpha_init"]) > 1e-12) & (f["disp_gene"] > MIN_DISP)
    own_short = searched & ((it["gw_f_opt_mufed"] - it["gw_f_fed_mufed"]) > F_TOL)
    r_vs_opt = rel(it["gw_opt_mur"], r["dispGeneEst"])
    out += [f"- R's value differs from the optimum of its own objective (rel > 1e-3) on "
            f"{(r_vs_opt > 1e-3).sum()} genes ({((r_vs_opt > 1e-3) & (cls == 'floor')).sum()}"
            f" of them at the floor, where the objective rises towards a larger alpha that "
            f"the search from 1e-8 never sees: the gradient in log alpha is ~alpha there)",
            f"- fed_de short of the optimum of its own objective (its mu) by > {F_TOL:g}, "
            f"among the {searched.sum()} genes where it neither keeps the start nor sits at "
            f"the floor: {own_short.sum()} (by > 1e-3 in objective: "
            f"{(searched & ((it['gw_f_opt_mufed'] - it['gw_f_fed_mufed']) > 1e-3)).sum()})",
            f"- worst objective gap fed_de vs R at R's mu (f_R - f_fed): "
            f"{(f_r - f_fed).max():.3g} ({(f_r - f_fed).idxmax()}); R vs fed "
            f"(f_fed - f_R): {(f_fed - f_r).max():.3g} ({(f_fed - f_r).idxmax()})", ""]
    d["gw_path"], d["gw_who"] = path, who


def section_trend(d: dict, out: list) -> None:
    r, f = d["r"], d["fed"]
    r_set = set(r.index[r["dispGeneEst"] >= 100 * MIN_DISP])
    f_set = set(f.index[f["disp_gene"] >= 100 * MIN_DISP])
    bm = np.where(d["fed_all"]["all_zero"], np.nan, d["fed_all"]["base_mean"])
    rgw = r["dispGeneEst"].reindex(d["fed_all"].index).to_numpy()
    ours_on_r = trend.fit_dispersion_trend(bm, rgw, MIN_DISP, "parametric",
                                           n_samples=N_SAMPLES[d["study"]],
                                           n_coefs=N_COEFS[d["study"]])
    rt, ft = d["r_trend"], d["fed_trend"]
    rows = [("R", rt["asymptDisp"], rt["extraPois"], rt["varLogDispEsts"], rt["dispPriorVar"]),
            ("fed_de", *ft["trend_coefficients"], ft["var_log_disp_ests"],
             ft["disp_prior_var"]),
            ("fed_de's trend code on R's gene-wise", *ours_on_r["coefficients"],
             ours_on_r["var_log_disp_ests"], ours_on_r["disp_prior_var"])]
    if "plug_fedgw_trend" in d:
        t = d["plug_fedgw_trend"]
        rows.append(("R's trend code on fed_de's gene-wise", t["coefficients"]["asymptDisp"],
                     t["coefficients"]["extraPois"], t["varLogDispEsts"], t["dispPriorVar"]))
    if "plug_optgw_trend" in d:
        t = d["plug_optgw_trend"]
        rows.append(("R's trend code on the exact gene-wise optima",
                     t["coefficients"]["asymptDisp"], t["coefficients"]["extraPois"],
                     t["varLogDispEsts"], t["dispPriorVar"]))
    out += ["### Trend, varLogDispEsts, prior variance", "",
            f"Trend gene set (dispGeneEst >= 100 minDisp): R {len(r_set)}, fed_de "
            f"{len(f_set)}, in R's only {len(r_set - f_set)}, in fed_de's only "
            f"{len(f_set - r_set)}.", "",
            "| fitted on | asymptDisp | extraPois | varLogDispEsts | dispPriorVar |",
            "|---|---|---|---|---|"]
    out += [f"| {a} | {b:.10g} | {c:.10g} | {e:.10g} | {g:.10g} |" for a, b, c, e, g in rows]
    out += ["", STATS_HEAD, stats_row("dispFit (trend values)", f["disp_fit"], r["dispFit"]), ""]


def section_map(d: dict, out: list) -> None:
    r, f, it = d["r"], d["fed"], d["int"]
    cls = floor_class(r["dispGeneEst"])
    out += ["### MAP and final dispersions", "", STATS_HEAD,
            stats_row("dispMAP, all", f["disp_map"], r["dispMAP"])]
    for c, name in (("floor", "gene-wise at floor"), ("near", "gene-wise in (1e-8, 1e-6)"),
                    ("rest", "gene-wise >= 1e-6")):
        out.append(stats_row(f"dispMAP, {name}", f["disp_map"], r["dispMAP"], cls == c))
    for lo, hi in BM_BUCKETS:
        m = (r["baseMean"] >= lo) & (r["baseMean"] < hi)
        out.append(stats_row(f"dispMAP, baseMean [{lo}, {hi})", f["disp_map"], r["dispMAP"], m))
    out.append(stats_row("final dispersion", f["dispersion"], r["dispersion"]))
    out.append(stats_row("final, baseMean >= 1", f["dispersion"], r["dispersion"],
                         r["baseMean"] >= 1))
    out.append("")
    fl = cls == "floor"
    ratio_r = (r["dispMAP"] / r["dispFit"])[fl & (r["baseMean"] >= 10)]
    ratio_f = (f["disp_map"] / f["disp_fit"])[fl & (r["baseMean"] >= 10)]
    # objectives
    r_short = (it["map_f_opt_mur"] - it["map_f_r_mur"]) > F_TOL
    fed_short_r = (it["map_f_opt_mur"] - it["map_f_fed_mur"]) > F_TOL
    fed_short_own = (it["mapfed_f_opt_mufed"] - it["mapfed_f_fed_mufed"]) > F_TOL
    r_better = (it["map_f_r_mur"] - it["map_f_fed_mur"]) > F_TOL
    own_gap = rel(f["disp_map"], it["mapfed_opt_mufed"])
    vc = f["disp_map"].round(6).value_counts()
    stuck = vc[vc >= 5]
    out += [f"- floor genes with baseMean >= 10: median MAP / trend R {ratio_r.median():.3f}, "
            f"fed_de {ratio_f.median():.3f}",
            f"- R's MAP short of the optimum of R's MAP objective (R's mu and prior) by > "
            f"{F_TOL:g}: {r_short.sum()} genes; rel > 1e-3 from that optimum: "
            f"{(rel(r['dispMAP'], it['map_opt_mur']) > 1e-3).sum()} (dispIter of R: max "
            f"{int(it['map_iter'].max())}, {(it['map_iter'] >= 100).sum()} at the cap)",
            f"- fed_de's MAP short of that optimum: {fed_short_r.sum()}; R's MAP has the higher "
            f"objective on {r_better.sum()} genes",
            f"- fed_de's MAP short of the optimum of its own objective (fed_de's mu, trend, "
            f"prior): {fed_short_own.sum()} genes, rel > 1e-3 from it: "
            f"{(own_gap > 1e-3).sum()} ({((own_gap > 1e-3) & fl).sum()} with the gene-wise "
            f"estimate at the floor)",
            "- values shared by >= 5 genes in fed_de's MAP: "
            + ", ".join(f"{v:g} x{n}" for v, n in stuck.items()),
            f"- dispOutlier: R {int(r['dispOutlier'].sum())}, fed_de "
            f"{int(f['disp_outlier'].sum())}, differing "
            f"{int((r['dispOutlier'].astype(bool) != f['disp_outlier'].astype(bool)).sum())}",
            ""]


def section_fit(d: dict, out: list) -> None:
    r, f = d["r"], d["fed"]
    names = [c[len("coef_"):] for c in r.columns if c.startswith("coef_")]
    ln2 = np.log(2)
    res = d["fed"].filter(like="res_").rename(columns=lambda c: c[4:])
    out += ["### Coefficients, lfcSE, Wald statistics (default contrast)", "", STATS_HEAD]
    for n in names:
        out.append(stats_row(f"coef {n}", f[f"beta_{n}"] / ln2, r[f"coef_{n}"],
                             r["baseMean"] >= 1))
    for col in ("log2FoldChange", "lfcSE", "stat", "pvalue"):
        out.append(stats_row(f"{col} (baseMean >= 1)", res[col], r[col], r["baseMean"] >= 1))
    if "plug_fed" in d:
        p = d["plug_fed"]
        for col in ("log2FoldChange", "lfcSE", "stat", "pvalue"):
            out.append(stats_row(f"{col}: fed_de vs R with fed_de's dispersions",
                                 res[col], p[col], r["baseMean"] >= 1))
    bc = int((~r["betaConv"].astype(bool)).sum())
    out += ["", f"- betaConv FALSE: R {bc}, fed_de "
            f"{int((~f['beta_converged'].astype(bool)).sum())}; R's betaIter max "
            f"{int(r['betaIter'].max())}", ""]


def section_cooks(d: dict, out: list) -> None:
    rc = d["r_cooks"].loc[d["genes"]]
    rf = rc["cooks_outlier_filtered"].astype(bool)
    ff = d["fed"]["cooks_outlier"].astype(bool)
    out += ["### Cook's distances", "",
            f"- R: maxCooks finite on {int(rc['maxCooks'].notna().sum())} genes, "
            f"Cook's-filtered {int(rf.sum())}; fed_de Cook's-filtered {int(ff.sum())}; "
            f"flags differing: {int((rf != ff).sum())} "
            f"(fed_de keeps maxCooks at the sites: only the flags can be compared)", ""]


def section_filter(d: dict, out: list) -> None:
    res_all = d["r_results_all"]
    rf = d["facts"]["alpha0.05"]
    fed_all = d["fed_all"]
    # fed_de's threshold (its own p-values) and R's p-values through fed_de's filter
    fed_p = fed_all["res_pvalue"].to_numpy()
    padj_f, info_f = testing.independent_filtering(fed_all["res_baseMean"].to_numpy(), fed_p,
                                                   ALPHA)
    padj_r, info_r = testing.independent_filtering(res_all["baseMean"].to_numpy(),
                                                   res_all["pvalue"].to_numpy(), ALPHA)
    same_padj = np.allclose(np.nan_to_num(padj_r, nan=-1), np.nan_to_num(
        res_all["padj"].to_numpy(), nan=-1), rtol=1e-12, atol=0)
    own_same = np.allclose(np.nan_to_num(padj_f, nan=-1),
                           np.nan_to_num(fed_all["res_padj"].to_numpy(), nan=-1), rtol=1e-12)
    fed_na = fed_all["res_padj"].isna()
    r_na = res_all["padj"].isna().reindex(fed_all.index)
    out += ["### Independent filtering", "",
            "| | filterThreshold (baseMean) | filterTheta | padj NA | calls |",
            "|---|---|---|---|---|",
            f"| R | {rf['filterThreshold']:.10g} | {rf['filterTheta']:.10g} | "
            f"{rf['nPadjNA']} | {rf['nCalls']} |",
            f"| fed_de (its p-values) | {info_f['filterThreshold']:.10g} | "
            f"{info_f['filterTheta']:.10g} | {int(fed_na.sum())} | "
            f"{int(calls(fed_all['res_padj']).sum())} |",
            f"| fed_de's filter on R's p-values | {info_r['filterThreshold']:.10g} | "
            f"{info_r['filterTheta']:.10g} | {int(np.isnan(padj_r).sum())} | "
            f"{int(calls(padj_r).sum())} |", "",
            f"- fed_de's filter on R's p-values reproduces R's padj to 1e-12: {same_padj} "
            f"(max rel. {np.nanmax(rel(padj_r, res_all['padj'].to_numpy())):.2g})",
            f"- padj NA pattern: NA in fed_de only {int((fed_na & ~r_na).sum())}, in R only "
            f"{int((r_na & ~fed_na).sum())}; fed_de's padj equals its own filter "
            f"recomputed: {own_same}",
            ""]


def n_diff(a, b) -> int:
    return int((calls(a) != calls(b)).sum())


def section_calls(d: dict, out: list) -> None:
    r = d["r_results_all"].loc[d["genes"]]
    fed = d["fed"]["res_padj"]
    fed_vs_r = calls(fed) != calls(r["padj"])
    rep = compare_results(d["fed"].filter(like="res_").rename(columns=lambda c: c[4:]), r,
                          ALPHA)
    out += ["### Calls at padj < 0.05 and what explains them", "",
            f"fed_de vs R: {rep['calls']['n_differing']} differing "
            f"({100 * rep['calls']['fraction_differing']:.2f} % of non-zero genes; R "
            f"{rep['calls']['n_ref']}, fed_de {rep['calls']['n_ours']}, R's missed by fed_de "
            f"{len(rep['calls']['ref_only'])}, fed_de's not R's "
            f"{len(rep['calls']['ours_only'])}), Spearman(stat) {rep['spearman_stat']:.6f}.",
            "", "R's own pipeline (nbinomWaldTest + results) with the dispersions replaced:", "",
            "| dispersions plugged into R | calls | differing from R | of fed_de's differing "
            "calls, also differing here | Spearman(stat) vs R |", "|---|---|---|---|---|"]
    labels = {"r": "R's own (check of the plug-in path)",
              "fed": "fed_de's final dispersions",
              "fedfix": "fed_de's, MAP run to its optimum (fed_de's mu, trend, prior)",
              "optmap": "R's gene-wise + trend, MAP at the exact optimum",
              "fedgw": "fed_de's gene-wise, then R's trend, prior and MAP",
              "optgw": "exact gene-wise optima, then R's trend, prior and MAP"}
    for tag, label in labels.items():
        key = f"plug_{tag}"
        if key not in d:
            continue
        p = d[key]
        dif = calls(p["padj"]) != calls(r["padj"])
        rep2 = compare_results(p, r, ALPHA)
        out.append(f"| {label} | {int(calls(p['padj']).sum())} | {int(dif.sum())} | "
                   f"{int((dif & fed_vs_r).sum())} of {int(fed_vs_r.sum())} | "
                   f"{rep2['spearman_stat']:.7f} |")
    if "plug_fed" in d:
        p = d["plug_fed"]
        out += ["", f"- fed_de vs R with fed_de's dispersions (what is not dispersions: IRLS, "
                f"SE, Cook's, filtering): {n_diff(fed, p['padj'])} differing calls"]
    out.append("")


def section_lrt(d: dict, out: list) -> None:
    if d["study"] != "pasilla":
        return
    shared = SHARED / "real_pasilla" / "ref_deseq2_1.38.3"
    r1 = pd.read_csv(shared / "results_lrt.csv.gz", index_col=0).loc[d["genes"]]
    rt = pd.read_csv(FULL / "pasilla" / "lrt_reduced_type.csv.gz", index_col=0).loc[d["genes"]]
    out += ["### LRT (pasilla)", "", STATS_HEAD]
    bm = d["r"]["baseMean"] >= 1
    rows = []
    for tag, ref_stat, ref_padj, col in (("lrt", r1["stat"], r1["padj"], "lrt1"),
                                         ("lrt_type", rt["lrt_stat"], rt["lrt_padj"],
                                          "lrttype")):
        fed = pd.read_csv(DATA / f"fed_pasilla_{tag}.csv.gz", index_col=0).loc[d["genes"]]
        name = "~ 1" if tag == "lrt" else "~ type"
        out.append(stats_row(f"LR stat, reduced {name}", fed["res_stat"], ref_stat, bm))
        p = d.get("plug_fed")
        if p is not None:
            out.append(stats_row(f"LR stat, reduced {name}: fed_de vs R with fed_de's "
                                 f"dispersions", fed["res_stat"], p[f"{col}_stat"], bm))
            rows.append((name, n_diff(fed["res_padj"], ref_padj),
                         n_diff(p[f"{col}_padj"], ref_padj),
                         n_diff(fed["res_padj"], p[f"{col}_padj"]),
                         fed.loc["FBgn0000078", "res_stat"], ref_stat["FBgn0000078"],
                         p.loc["FBgn0000078", f"{col}_stat"]))
        fix = d.get("plug_fedfix")
        if fix is not None:
            rows[-1] = rows[-1] + (n_diff(fix[f"{col}_padj"], ref_padj),)
    out += ["", "| reduced | calls differing fed_de vs R | R with fed_de's dispersions vs R | "
            "fed_de vs R with fed_de's dispersions | FBgn0000078 fed_de / R / R with fed_de's"
            " dispersions | R with fed_de's MAP at its optimum vs R |", "|---|---|---|---|---|---|"]
    for row in rows:
        extra = f" {row[7]} |" if len(row) > 7 else " |"
        out.append(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]:.6g} / "
                   f"{row[5]:.6g} / {row[6]:.6g} |{extra}")
    out.append("")


def section_split(out: list) -> None:
    one = pickle.load(open(DATA / "marioni_one.pkl", "rb"))
    two = pickle.load(open(DATA / "marioni_split.pkl", "rb"))
    genes = one["genes"]
    a, b = one["state"], two["state"]
    out += ["### marioni over two sites (first 5 + last 5 samples) against one site", "",
            "| state key | max rel. difference | genes > 1e-8 |", "|---|---|---|"]
    keys = ["base_mean", "alpha_init", "beta_init", "disp_gene", "disp_fit", "disp_map",
            "dispersion", "beta", "deviance"]
    pair = None
    if (DATA / "marioni_nocooks_one_split.pkl").exists():
        pair = pickle.load(open(DATA / "marioni_nocooks_one_split.pkl", "rb"))
    for k in keys:
        r = rel(np.asarray(b[k], float), np.asarray(a[k], float))
        r = r.reshape(len(r), -1).max(axis=1) if r.ndim > 1 else r
        out.append(f"| {k} | {np.nanmax(r):.3g} | {int(np.nansum(r > 1e-8))} |")
    if pair is not None:
        for k in ("irls_mu", "gw_search", "map_search"):
            key = "beta" if k == "irls_mu" else "x"
            x1, x2 = np.asarray(pair["one"][k][key], float), np.asarray(pair["split"][k][key])
            d = np.abs(x2 - x1).reshape(len(x1), -1).max(axis=1)
            out.append(f"| {k}.{key} (Cook's off; absolute, log scale) | {np.nanmax(d):.3g} | "
                       f"{int(np.nansum(d > 1e-8))} |")
    ra, rb = one["results"], two["results"]
    out += ["", f"- calls at padj < 0.05 differing split vs one site: "
            f"{n_diff(ra['padj'], rb['padj'])}; max rel. difference of padj "
            f"{np.nanmax(rel(rb['padj'], ra['padj'])):.3g}"]
    r = rel(b["disp_gene"], a["disp_gene"])
    for i in np.flatnonzero(r > 1e-8):
        out.append(f"- gene-wise differs: {genes[i]} one site {a['disp_gene'][i]:.10g}, two "
                   f"sites {b['disp_gene'][i]:.10g} (rel {r[i]:.2g})")
    out.append("")


def main(studies: list[str]) -> None:
    out: list[str] = []
    for study in studies:
        d = load(study)
        d["study"] = study
        out += [f"## {study}", ""]
        section_inputs(d, out)
        section_genewise(d, out)
        section_trend(d, out)
        section_map(d, out)
        section_fit(d, out)
        section_cooks(d, out)
        section_filter(d, out)
        section_calls(d, out)
        section_lrt(d, out)
        if study == "marioni" and (DATA / "marioni_split.pkl").exists():
            section_split(out)
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:] or ["pasilla", "marioni"])
