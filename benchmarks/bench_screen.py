"""Benchmark: fed_de's federated screen (3-site simulation) against crispyx pooled, one script.

On a seeded synthetic screen (:func:`fed_de.screening.data.make_screen`: ~90 % zeros, library
size and site depth variation, a per-gene batch effect per site, null perturbations,
knock-down targets and off-target effects), this script measures:

- **rounds**: sequential steps and tasks of the ``nb_glm`` plan for 100 and 1,000
  perturbations (dry-run plan, nothing executed): budget <= 30 whatever the number;
- **time**: ``fed_de.screen(...)`` over the 3 site ``.h5ad`` files (loading included) against
  ``crispyx.nb_glm_test`` on the pooled ``.h5ad`` in its fastest measured configuration
  (``freeze_control=True, min_mu=0.01``, library-size factors passed in,
  ``memory_limit_gb=2``; ``n_jobs`` = all cores unless ``--crispyx-jobs``), median of
  ``--repeats`` alternating runs after a warm-up of both on a small screen;
  goal fed_de / crispyx <= 0.5;
- **memory**: each site's peak working memory (tracemalloc over its tasks, in a separate
  untimed run) plus the count matrix it holds: goal <= 1 GB per site;
- **quality**, both tools on the same truth: fraction of null-perturbation p-values below
  0.05, false discovery proportion at padj < 0.05, Pearson r of log2 fold changes with the
  truth (non-null tested pairs); fed_de also without site effects (crispyx's model);
- **messages**: bytes each site sends (total and per gene).

BLAS/OpenMP are limited to one thread (set below, before numpy is imported): fed_de's
simulation runs every site in this one process, single-threaded; crispyx uses its own
worker processes.

Usage::

    python benchmarks/bench_screen.py                        # 50,000 x 2,000 x 100, 3 sites
    python benchmarks/bench_screen.py --cells 20000 --genes 1000 --perturbations 50

The JSON goes to ``benchmarks/results/bench_screen_<cells>x<genes>x<perts>_seed<seed>.json``
unless ``--out``.
"""

from __future__ import annotations

import os

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
for _var in _THREAD_VARS:  # must happen before numpy is imported anywhere
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from fed_de.backends.plan import record_plan  # noqa: E402
from fed_de.screening.api import screen  # noqa: E402
from fed_de.screening.data import make_screen  # noqa: E402
from fed_de.screening.strategy import ScreenStrategy  # noqa: E402
from fed_de.screening.study import ScreenStudy  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KW = {"perturbation_column": "perturbation", "control": "non-targeting"}
TARGET_RATIO = 0.5
TARGET_PEAK_BYTES = 1 << 30
MAX_STEPS = 30


# -- the two tools -----------------------------------------------------------------------------
def run_fed(paths: dict, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return screen(paths, **KW, **options)


def library_factors(pooled: ad.AnnData) -> np.ndarray:
    """Library size over its geometric mean: the same factors fed_de computes by default."""
    lib = np.asarray(pooled.X.sum(axis=1)).ravel()
    return lib / np.exp(np.mean(np.log(lib)))


def run_crispyx(path: Path, sf: np.ndarray, out: Path, n_jobs: int | None):
    import crispyx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crispyx.nb_glm_test(str(path), perturbation_column="perturbation",
                            control_label="non-targeting", size_factors=sf,
                            freeze_control=True, min_mu=0.01, memory_limit_gb=2,
                            output_path=str(out), verbose=False, n_jobs=n_jobs, force=True)
    res = ad.read_h5ad(out)
    return res


def crispyx_arrays(res: ad.AnnData, perts: list[str], genes: list[str]) -> dict:
    """crispyx's output reordered to fed_de's perturbations x genes."""
    rows = res.obs_names.get_indexer(perts)
    cols = res.var_names.get_indexer(genes)
    take = lambda layer: np.asarray(res.layers[layer])[np.ix_(rows, cols)]  # noqa: E731
    return {"pvalue": take("pvalue"), "padj": take("pvalue_adj"),
            "log2FoldChange": take("logfoldchange_raw_ln") / np.log(2)}


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


# -- quality -----------------------------------------------------------------------------------
def quality(arrays: dict, scr) -> dict:
    truth = scr.truth_lfc.to_numpy()
    nulls = [scr.perturbations.index(p) for p in scr.null_perturbations]
    pv = arrays["pvalue"][nulls]
    pv = pv[np.isfinite(pv)]
    padj = np.nan_to_num(arrays["padj"], nan=1.0)
    disc = padj < 0.05
    lfc = arrays["log2FoldChange"]
    nonnull = np.isfinite(lfc) & (truth != 0)
    allp = np.isfinite(lfc)
    targets = [(scr.perturbations.index(p), scr.genes.index(g)) for p, g in scr.targets.items()]
    return {
        "null_pvalues": int(pv.size),
        "null_fraction_below_0.05": round(float((pv < 0.05).mean()), 4),
        "discoveries_padj_0.05": int(disc.sum()),
        "false_discoveries": int((disc & (truth == 0)).sum()),
        "fdp": round(float((disc & (truth == 0)).sum() / max(disc.sum(), 1)), 4),
        "true_effects_found": int((disc & (truth != 0)).sum()),
        "true_effects_total": int((truth != 0).sum()),
        "knockdown_targets_found": int(sum(disc[i, j] for i, j in targets)),
        "knockdown_targets": len(targets),
        "lfc_pearson_r_nonnull": round(float(np.corrcoef(lfc[nonnull], truth[nonnull])[0, 1]), 4),
        "lfc_pearson_r_all_tested": round(float(np.corrcoef(lfc[allp], truth[allp])[0, 1]), 4),
        "pairs_tested": int(allp.sum()),
    }


def plan_steps(n_perts: int, n_genes: int = 2000, sites: int = 3) -> dict:
    study = ScreenStudy(genes=[f"g{i}" for i in range(n_genes)],
                        perturbations=[f"P{i}" for i in range(n_perts)],
                        control="non-targeting", perturbation_column="perturbation",
                        factors=[["site", [f"s{k}" for k in range(sites)]]], site_factor=True)
    out = {}
    for sf in ("library", "poscounts"):
        rec = record_plan(ScreenStrategy(study.to_dict(), size_factors=sf),
                          [f"s{k}" for k in range(sites)])
        out[sf] = {"sequential_steps": rec.sequential_steps, "tasks": len(rec.tasks)}
    return out


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        return ""


# -- main --------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=50000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--perturbations", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--crispyx-jobs", type=int, default=None,
                    help="crispyx n_jobs (default: all cores, crispyx's own default)")
    ap.add_argument("--no-crispyx", action="store_true", help="time fed_de only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    report: dict = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "blas_threads": 1},
        "commit": _git("rev-parse", "--short", "HEAD"),
        "fed_de_dirty": bool(_git("status", "--porcelain", "--", "fed_de")),
        "data": {"cells": args.cells, "genes": args.genes,
                 "perturbations": args.perturbations, "sites": 3, "seed": args.seed},
    }
    report["rounds"] = {f"{p}_perturbations": plan_steps(p, args.genes)
                        for p in (args.perturbations, 1000)}
    print("rounds:", json.dumps(report["rounds"]))

    scr = make_screen(args.cells, args.genes, args.perturbations, seed=args.seed)
    report["data"]["zero_fraction"] = round(scr.zero_fraction(), 4)
    report["data"]["cells_by_site"] = {k: int(a.n_obs) for k, a in scr.sites.items()}
    report["data"]["control_cells"] = int(sum((a.obs["perturbation"] == "non-targeting").sum()
                                              for a in scr.sites.values()))
    have_crispyx = not args.no_crispyx
    if have_crispyx:
        try:
            import crispyx
            report["crispyx_version"] = crispyx.__version__
        except ImportError:
            have_crispyx = False
            report["crispyx_version"] = "not installed"

    with tempfile.TemporaryDirectory(prefix="bench_screen_") as tmp:
        tmp = Path(tmp)
        paths = scr.write(tmp / "sites")
        pooled = scr.pooled()
        pooled.X = sp.csr_matrix(pooled.X)
        pooled_path = tmp / "pooled.h5ad"
        pooled.write_h5ad(pooled_path)
        sf = library_factors(pooled)

        # warm-up: imports, numba compilation, first-call costs
        small = make_screen(3000, 200, 6, seed=99)
        small_paths = small.write(tmp / "small")
        run_fed(small_paths)
        if have_crispyx:
            sp_pooled = small.pooled()
            sp_pooled.X = sp.csr_matrix(sp_pooled.X)
            sp_pooled.write_h5ad(tmp / "small_pooled.h5ad")
            run_crispyx(tmp / "small_pooled.h5ad", library_factors(sp_pooled),
                        tmp / "small_out.h5ad", args.crispyx_jobs)

        t_fed, t_cx = [], []
        fed = cx = None
        for i in range(args.repeats):
            t, fed = timed(run_fed, paths)
            t_fed.append(t)
            print(f"fed_de run {i + 1}: {t:.2f} s")
            if have_crispyx:
                t, cx = timed(run_crispyx, pooled_path, sf, tmp / f"cx_{i}.h5ad",
                              args.crispyx_jobs)
                t_cx.append(t)
                print(f"crispyx run {i + 1}: {t:.2f} s")
        t, _ = timed(run_fed, scr.sites)
        report["time"] = {
            "fed_de_seconds": round(statistics.median(t_fed), 3),
            "fed_de_runs": [round(x, 3) for x in t_fed],
            "fed_de_in_memory_sites_seconds": round(t, 3),
        }
        if have_crispyx:
            report["time"].update(crispyx_seconds=round(statistics.median(t_cx), 3),
                                  crispyx_runs=[round(x, 3) for x in t_cx],
                                  ratio_fed_over_crispyx=round(statistics.median(t_fed)
                                                               / statistics.median(t_cx), 3),
                                  target_ratio=TARGET_RATIO,
                                  crispyx_n_jobs=args.crispyx_jobs or os.cpu_count())

        mem = run_fed(paths, measure_memory=True)
        report["memory"] = {k: {kk: int(vv) for kk, vv in v.items()}
                            for k, v in mem.facts["peak_memory_by_site"].items()}
        report["memory_max_site_MB"] = round(max(v["total_bytes"] for v in
                                                 report["memory"].values()) / 2**20, 1)
        backed = run_fed(paths, measure_memory=True, backed=True)
        report["memory_backed"] = {k: {kk: int(vv) for kk, vv in v.items()}
                                   for k, v in backed.facts["peak_memory_by_site"].items()}
        report["facts"] = {k: fed.facts[k] for k in ("sequential_steps", "tasks",
                                                     "bytes_sent_by_site",
                                                     "bytes_per_gene_by_site",
                                                     "bytes_sent_by_aggregator")}
        report["quality"] = {"fed_de": quality(fed.arrays, scr)}
        nosite = run_fed(paths, site_effects=False)
        report["quality"]["fed_de_no_site_effects"] = quality(nosite.arrays, scr)
        if have_crispyx:
            report["quality"]["crispyx"] = quality(
                crispyx_arrays(cx, scr.perturbations, scr.genes), scr)
            ca = crispyx_arrays(cx, scr.perturbations, scr.genes)["log2FoldChange"]
            both = np.isfinite(ca) & np.isfinite(nosite.arrays["log2FoldChange"])
            report["agreement_crispyx_vs_fed_de_no_site_effects"] = {
                "pairs": int(both.sum()),
                "lfc_pearson_r": round(float(np.corrcoef(
                    ca[both], nosite.arrays["log2FoldChange"][both])[0, 1]), 5)}

    steps = report["rounds"][f"{args.perturbations}_perturbations"]["library"]
    report["verdict"] = {
        "steps_within_budget": steps["sequential_steps"] <= MAX_STEPS
        and report["rounds"]["1000_perturbations"]["library"]["sequential_steps"] <= MAX_STEPS,
        "memory_within_1GB": report["memory_max_site_MB"] * 2**20 <= TARGET_PEAK_BYTES,
        "null_calibrated": 0.03 <= report["quality"]["fed_de"]["null_fraction_below_0.05"]
        <= 0.07,
    }
    if have_crispyx:
        report["verdict"]["time_ratio_within_0.5"] = (
            report["time"]["ratio_fed_over_crispyx"] <= TARGET_RATIO)
        report["verdict"]["fdp_not_worse_than_crispyx"] = (
            report["quality"]["fed_de"]["fdp"] <= report["quality"]["crispyx"]["fdp"])
    out = args.out or RESULTS_DIR / (f"bench_screen_{args.cells}x{args.genes}x"
                                     f"{args.perturbations}_seed{args.seed}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("time", "memory_max_site_MB", "facts", "quality",
                                             "verdict") if k in report}, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
