"""Benchmark: fed_de (3-site in-process simulation) against pooled PyDESeq2, same data, one process.

For each of two designs (``~ batch + condition`` and ``~ condition``) on a seeded demo study
(:func:`fed_de.demo_data.make_demo_study`, three hospitals), this script times

(a) ``fed_de.deseq2(sites, design, contrasts=[("condition", "B", "A")], ...)`` followed by
    ``result.results()`` (the Wald table), and
(b) pooled PyDESeq2: ``DeseqDataSet(...).deseq2()`` then ``DeseqStats(...).summary()``,
    with ``refit_cooks=False`` and ``cooks_filter=False`` (fed_de run with ``cooks=False``: this is
    the like-for-like comparison), and once more with PyDESeq2's defaults (Cook's refit and
    filter on) for reference.

Every timing is the median of ``--repeats`` runs, measured with ``time.perf_counter`` after a
warm-up of both tools on a small data set. BLAS/OpenMP are limited to one thread (set below,
before numpy is imported) and PyDESeq2 runs with ``n_cpus=1``.

Usage::

    python benchmarks/bench_deseq2.py                       # 90 samples x 10,000 genes
    python benchmarks/bench_deseq2.py --samples 150 --genes 5000
    python benchmarks/bench_deseq2.py --profile             # also cProfile one fed_de run

The JSON goes to ``benchmarks/results/bench_<samples>x<genes>_seed<seed>.json`` unless ``--out``.
"""

from __future__ import annotations

import os

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
for _var in _THREAD_VARS:  # must happen before numpy is imported anywhere
    os.environ[_var] = "1"

import argparse  # noqa: E402
import cProfile  # noqa: E402
import datetime as _dt  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import fed_de  # noqa: E402
from fed_de.demo_data import make_demo_study  # noqa: E402

CONTRAST = ("condition", "B", "A")
ALPHA = 0.1
DESIGNS = ("~ batch + condition", "~ condition")
TARGET_RATIO = 0.3
TARGET_BYTES_PER_GENE_TWO_COEF = 4500.0
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------
# the two tools
# --------------------------------------------------------------------------------------------

def _levels_for(study, design: str) -> dict:
    return {k: v for k, v in study.levels.items() if k in design}


def run_fed(study, design: str, cooks: bool = False):
    """fed_de's simulation, 3 sites, then the Wald table of the contrast (``cooks``: with
    DESeq2's Cook's filtering, replacement and refit).

    Warnings raised by fed_de are recorded (counted in the report), not printed.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fed_de.deseq2(study.sites, design, contrasts=[CONTRAST], alpha=ALPHA,
                               levels=_levels_for(study, design), genes=study.genes,
                               cooks=cooks)
        table = result.results(CONTRAST)
    seen = sorted({f"{w.category.__name__}: {w.message} ({Path(w.filename).name}:{w.lineno})"
                   for w in caught})
    return table, dict(result.facts, coef_names=list(result.study.coef_names), warnings=seen)


def pooled_inputs(study) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Counts (samples x genes) and metadata of the pooled data, as PyDESeq2 takes them."""
    adata = study.pooled()
    counts = pd.DataFrame(np.asarray(adata.X), index=adata.obs_names, columns=adata.var_names)
    metadata = adata.obs[["condition", "batch"]].copy()
    return counts, metadata


def run_pydeseq2(counts: pd.DataFrame, metadata: pd.DataFrame, design: str, cooks: bool):
    """Pooled PyDESeq2; ``cooks=False`` turns off the Cook's refit and the Cook's p-value filter."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    dds = DeseqDataSet(counts=counts, metadata=metadata, design=design, refit_cooks=cooks,
                       quiet=True, n_cpus=1)
    dds.deseq2()
    stats = DeseqStats(dds, contrast=list(CONTRAST), alpha=ALPHA, cooks_filter=cooks,
                       quiet=True, n_cpus=1)
    stats.summary()
    return stats.results_df


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


# --------------------------------------------------------------------------------------------
# agreement
# --------------------------------------------------------------------------------------------

def agreement(fed: pd.DataFrame, ref: pd.DataFrame, alpha: float = ALPHA) -> dict:
    """log2FoldChange relative error and padj < alpha call differences, fed_de vs PyDESeq2."""
    ref = ref.reindex(fed.index)
    a = fed["log2FoldChange"].to_numpy(float)
    b = ref["log2FoldChange"].to_numpy(float)
    both = np.isfinite(a) & np.isfinite(b)
    abs_err = np.abs(a[both] - b[both])
    rel_err = abs_err / np.maximum(np.abs(b[both]), 1e-12)
    # relative error on genes with a non-negligible fold change (|LFC| >= 0.1), less noisy
    big = np.abs(b[both]) >= 0.1
    expressed = ref["baseMean"].to_numpy(float)[both] >= 10
    call_a = (fed["padj"].to_numpy(float) < alpha)  # NaN < alpha is False
    call_b = (ref["padj"].to_numpy(float) < alpha)
    pa, pb = fed["padj"].to_numpy(float), ref["padj"].to_numpy(float)
    fin = np.isfinite(pa) & np.isfinite(pb)
    worst = None
    if rel_err.size:
        i = int(np.argmax(rel_err))
        gene = fed.index[np.flatnonzero(both)[i]]
        worst = {"gene": str(gene), "baseMean": float(ref.at[gene, "baseMean"]),
                 "lfc_fed": float(fed.at[gene, "log2FoldChange"]),
                 "lfc_pydeseq2": float(ref.at[gene, "log2FoldChange"]),
                 "padj_fed": float(fed.at[gene, "padj"]),
                 "padj_pydeseq2": float(ref.at[gene, "padj"])}
    return {
        "genes_compared_lfc": int(both.sum()),
        "lfc_nan_mismatch": int((np.isfinite(a) != np.isfinite(b)).sum()),
        "lfc_rel_err_median": float(np.median(rel_err)) if rel_err.size else None,
        "lfc_rel_err_max": float(np.max(rel_err)) if rel_err.size else None,
        "lfc_rel_err_max_abs_lfc_ge_0.1": float(np.max(rel_err[big])) if big.any() else None,
        "lfc_rel_err_max_basemean_ge_10": (float(np.max(rel_err[expressed]))
                                           if expressed.any() else None),
        "lfc_abs_err_max": float(np.max(abs_err)) if abs_err.size else None,
        "padj_nan_mismatch": int((np.isfinite(pa) != np.isfinite(pb)).sum()),
        "padj_abs_err_max": float(np.max(np.abs(pa[fin] - pb[fin]))) if fin.any() else None,
        "n_sig_fed": int(call_a.sum()),
        "n_sig_pydeseq2": int(call_b.sum()),
        "padj_calls_differing": int((call_a != call_b).sum()),
        "genes_lfc_rel_err_gt_1e-3": int((rel_err > 1e-3).sum()),
        "worst_lfc_gene": worst,
    }


# --------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------

def profile_fed(study, design: str, top: int = 5) -> dict:
    """cProfile one fed_de run; top functions by cumulative time, fed_de/core and all fed_de."""
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    run_fed(study, design)
    prof.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        rows.append({"file": filename, "line": line, "function": func, "ncalls": ncalls,
                     "tottime_s": round(tottime, 4), "cumtime_s": round(cumtime, 4)})

    def rel(path: str) -> str:
        norm = path.replace("\\", "/")
        i = norm.rfind("fed_de/")
        return norm[i:] if i >= 0 else norm

    def pick(pred, key):
        chosen = sorted((r for r in rows if pred(r["file"].replace("\\", "/"))),
                        key=lambda r: r[key], reverse=True)[:top]
        return [{**r, "file": rel(r["file"])} for r in chosen]

    in_core = lambda f: "/fed_de/core/" in f  # noqa: E731
    in_fed = lambda f: "/fed_de/" in f and "/fed_de/simulation/" not in f  # noqa: E731
    return {
        "design": design,
        "profiled_wall_seconds": round(wall, 3),
        "core_top_by_cumtime": pick(in_core, "cumtime_s"),
        "core_top_by_tottime": pick(in_core, "tottime_s"),
        "fed_de_top_by_tottime": pick(in_fed, "tottime_s"),
        "all_top_by_tottime": pick(lambda f: True, "tottime_s"),
    }


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def bench_design(study, counts, metadata, design: str, repeats: int, cooks_repeats: int) -> dict:
    fed_times, pyd_times, pyd_cooks_times = [], [], []
    fed_table = facts = pyd_table = pyd_cooks_table = None
    for _ in range(repeats):
        t, (fed_table, facts) = timed(run_fed, study, design)
        fed_times.append(t)
        t, pyd_table = timed(run_pydeseq2, counts, metadata, design, cooks=False)
        pyd_times.append(t)
    fed_cooks_times, fed_cooks_table, cooks_facts = [], None, None
    for _ in range(cooks_repeats):
        t, pyd_cooks_table = timed(run_pydeseq2, counts, metadata, design, cooks=True)
        pyd_cooks_times.append(t)
        t, (fed_cooks_table, cooks_facts) = timed(run_fed, study, design, True)
        fed_cooks_times.append(t)
    n_genes = len(study.genes)
    fed_s = statistics.median(fed_times)
    pyd_s = statistics.median(pyd_times)
    site_bytes = facts["bytes_sent_by_site"]
    out = {
        "design": design,
        "coefficients": facts["coef_names"],
        "fed_de_seconds": round(fed_s, 4),
        "pydeseq2_seconds": round(pyd_s, 4),
        "ratio_fed_over_pydeseq2": round(fed_s / pyd_s, 4),
        "fed_de_seconds_min": round(min(fed_times), 4),
        "pydeseq2_seconds_min": round(min(pyd_times), 4),
        "fed_de_seconds_all": [round(x, 4) for x in fed_times],
        "pydeseq2_seconds_all": [round(x, 4) for x in pyd_times],
        "fed_de_warnings": facts["warnings"],
        "sequential_steps": facts["sequential_steps"],
        "tasks": facts["tasks"],
        "bytes_sent_by_site": site_bytes,
        "bytes_per_gene_by_site": {k: round(v / n_genes, 1) for k, v in site_bytes.items()},
        "max_bytes_per_gene_per_site": round(max(site_bytes.values()) / n_genes, 1),
        "bytes_sent_by_aggregator": facts["bytes_sent_by_aggregator"],
        "aggregator_bytes_per_gene": round(facts["bytes_sent_by_aggregator"] / n_genes, 1),
        "agreement_vs_pydeseq2_no_cooks": agreement(fed_table, pyd_table),
    }
    if pyd_cooks_times:
        cooks_s = statistics.median(pyd_cooks_times)
        out["pydeseq2_cooks_seconds"] = round(cooks_s, 4)
        out["pydeseq2_cooks_seconds_all"] = [round(x, 4) for x in pyd_cooks_times]
        fed_cooks_s = statistics.median(fed_cooks_times)
        out["fed_de_cooks_seconds"] = round(fed_cooks_s, 4)
        out["ratio_fed_cooks_over_pydeseq2_cooks"] = round(fed_cooks_s / cooks_s, 4)
        out["fed_de_cooks_sequential_steps"] = cooks_facts["sequential_steps"]
        out["fed_de_cooks_max_bytes_per_gene_per_site"] = round(
            max(cooks_facts["bytes_sent_by_site"].values()) / n_genes, 1)
        out["agreement_cooks_vs_pydeseq2_cooks_default"] = agreement(fed_cooks_table,
                                                                     pyd_cooks_table)
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n}"


def format_table(report: dict) -> str:
    cfg = report["config"]
    head = (f"fed_de vs PyDESeq2 {report['versions']['pydeseq2']}: {cfg['samples']} samples x "
            f"{cfg['genes']} genes, 3 sites, seed {cfg['seed']}, median of {cfg['repeats']} "
            f"run(s); BLAS/OpenMP threads = 1, PyDESeq2 n_cpus=1; "
            f"{report['machine']['cpus']} CPU(s)")
    git = report.get("git") or {}
    if git.get("commit"):
        head += (f"\nfed_de at commit {git['commit']}"
                 f"{' + uncommitted changes in fed_de/' if git.get('fed_de_dirty') else ''}")
    lines = [head, ""]
    cols = [r["design"] for r in report["results"]]
    rows = []

    def row(label, fn):
        rows.append([label] + [fn(r) for r in report["results"]])

    row("fed_de seconds", lambda r: f"{r['fed_de_seconds']:.2f}")
    row("PyDESeq2 seconds (no Cook's)", lambda r: f"{r['pydeseq2_seconds']:.2f}")
    row("ratio fed/PyDESeq2 (goal <= 0.3)", lambda r: f"{r['ratio_fed_over_pydeseq2']:.3f}")
    row("  fastest run: fed_de / PyDESeq2 s",
        lambda r: f"{r['fed_de_seconds_min']:.2f} / {r['pydeseq2_seconds_min']:.2f}")
    if "pydeseq2_cooks_seconds" in report["results"][0]:
        row("PyDESeq2 seconds (default, Cook's)", lambda r: f"{r['pydeseq2_cooks_seconds']:.2f}")
        row("fed_de seconds with Cook's", lambda r: f"{r['fed_de_cooks_seconds']:.2f}")
        row("ratio fed/PyDESeq2, both with Cook's",
            lambda r: f"{r['ratio_fed_cooks_over_pydeseq2_cooks']:.3f}")
        row("steps / bytes per gene per site with Cook's",
            lambda r: f"{r['fed_de_cooks_sequential_steps']} / "
                      f"{_fmt_bytes(r['fed_de_cooks_max_bytes_per_gene_per_site'])}")
    row("sequential steps", lambda r: str(r["sequential_steps"]))
    row("tasks", lambda r: str(r["tasks"]))
    row("bytes sent per site (max)", lambda r: _fmt_bytes(max(r["bytes_sent_by_site"].values())))
    row("bytes per gene per site (max)", lambda r: _fmt_bytes(r["max_bytes_per_gene_per_site"]))
    row("bytes sent by aggregator", lambda r: _fmt_bytes(r["bytes_sent_by_aggregator"]))
    row("aggregator bytes per gene", lambda r: _fmt_bytes(r["aggregator_bytes_per_gene"]))
    ag = "agreement_vs_pydeseq2_no_cooks"
    row("LFC rel. error median", lambda r: f"{r[ag]['lfc_rel_err_median']:.2e}")
    row("LFC rel. error max", lambda r: f"{r[ag]['lfc_rel_err_max']:.2e}")
    row("LFC rel. error max (|LFC|>=0.1)",
        lambda r: f"{r[ag]['lfc_rel_err_max_abs_lfc_ge_0.1']:.2e}")
    row("LFC rel. error max (baseMean>=10)",
        lambda r: f"{r[ag]['lfc_rel_err_max_basemean_ge_10']:.2e}")
    row("LFC abs. error max", lambda r: f"{r[ag]['lfc_abs_err_max']:.2e}")
    row("genes with LFC rel. error > 1e-3", lambda r: str(r[ag]["genes_lfc_rel_err_gt_1e-3"]))
    row("padj<0.1 calls (fed / PyDESeq2)",
        lambda r: f"{r[ag]['n_sig_fed']} / {r[ag]['n_sig_pydeseq2']}")
    row("padj<0.1 calls differing", lambda r: str(r[ag]["padj_calls_differing"]))
    if "agreement_vs_pydeseq2_cooks_default" in report["results"][0]:
        ck = "agreement_vs_pydeseq2_cooks_default"
        row("  vs default (Cook's): LFC rel. err max",
            lambda r: f"{r[ck]['lfc_rel_err_max']:.2e}")
        row("  vs default (Cook's): calls differing",
            lambda r: str(r[ck]["padj_calls_differing"]))
    w0 = max(len(r[0]) for r in rows + [["metric"]])
    wc = [max(len(c), *(len(r[i + 1]) for r in rows)) for i, c in enumerate(cols)]
    lines.append(f"{'metric':<{w0}}  "
                 + "  ".join(f"{c:>{w}}" for c, w in zip(cols, wc, strict=True)))
    lines.append("-" * (w0 + 2 + sum(wc) + 2 * (len(cols) - 1)))
    for r in rows:
        lines.append(f"{r[0]:<{w0}}  "
                     + "  ".join(f"{v:>{w}}" for v, w in zip(r[1:], wc, strict=True)))
    warned = sorted({w for r in report["results"] for w in r.get("fed_de_warnings", [])})
    if warned:
        lines.append("")
        lines.append("fed_de raised warnings: " + "; ".join(warned))
    if any(r["design"] == "~ condition" for r in report["results"]):
        two = next(r for r in report["results"] if r["design"] == "~ condition")
        ok = two["max_bytes_per_gene_per_site"] <= TARGET_BYTES_PER_GENE_TWO_COEF
        lines.append("")
        lines.append(f"two-coefficient design: {two['max_bytes_per_gene_per_site']:.0f} B per gene "
                     f"per site (target <= {TARGET_BYTES_PER_GENE_TWO_COEF:.0f}): "
                     f"{'met' if ok else 'NOT met'}")
    return "\n".join(lines)


def format_profile(prof: dict) -> str:
    lines = [f"cProfile of one fed_de run, design {prof['design']!r} "
             f"({prof['profiled_wall_seconds']:.2f} s under the profiler)",
             "  fed_de/core, top by cumulative time:"]
    for r in prof["core_top_by_cumtime"]:
        lines.append(f"    {r['cumtime_s']:8.3f} s cum  {r['tottime_s']:8.3f} s own  "
                     f"{r['ncalls']:>7} calls  {r['file']}:{r['line']} {r['function']}")
    lines.append("  everything, top by own time:")
    for r in prof["all_top_by_tottime"]:
        lines.append(f"    {r['tottime_s']:8.3f} s own  {r['cumtime_s']:8.3f} s cum  "
                     f"{r['ncalls']:>7} calls  {r['file']}:{r['line']} {r['function']}")
    return "\n".join(lines)


def _git_state() -> dict:
    """Commit of the checkout and whether fed_de/ has uncommitted changes (code moves fast)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "fed_de"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "fed_de_dirty": None}
    return {"commit": head, "fed_de_dirty": bool(dirty)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=90)
    parser.add_argument("--genes", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--cooks-repeats", type=int, default=1,
                        help="timed runs of PyDESeq2 with its default Cook's refit (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS))
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile one extra fed_de run per design (not timed)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)

    import pydeseq2

    warnings.filterwarnings("ignore", category=UserWarning, module="pydeseq2")
    out = args.out or RESULTS_DIR / f"bench_{args.samples}x{args.genes}_seed{args.seed}.json"

    # warm-up: imports, first-call overheads (numba/scipy lazies) of both tools
    t0 = time.perf_counter()
    warm = make_demo_study(n_samples=60, n_genes=300, seed=args.seed + 1000)
    wc, wm = pooled_inputs(warm)
    for design in args.designs:
        run_fed(warm, design)
        run_pydeseq2(wc, wm, design, cooks=False)
        if args.cooks_repeats:
            run_pydeseq2(wc, wm, design, cooks=True)
    print(f"warm-up done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    study = make_demo_study(n_samples=args.samples, n_genes=args.genes, seed=args.seed)
    counts, metadata = pooled_inputs(study)

    results, profiles = [], []
    for design in args.designs:
        t0 = time.perf_counter()
        res = bench_design(study, counts, metadata, design, args.repeats, args.cooks_repeats)
        results.append(res)
        print(f"{design}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.profile:
            profiles.append(profile_fed(study, design))

    report = {
        "benchmark": "fed_de (3-site in-process simulation) vs pooled PyDESeq2",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": {"samples": args.samples, "genes": args.genes, "seed": args.seed,
                   "repeats": args.repeats, "cooks_repeats": args.cooks_repeats,
                   "contrast": list(CONTRAST), "alpha": ALPHA,
                   "sites": {k: int(v.n_obs) for k, v in study.sites.items()}},
        "threads": {v: os.environ.get(v) for v in _THREAD_VARS} | {"pydeseq2_n_cpus": 1},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "git": _git_state(),
        "versions": {"fed_de": getattr(fed_de, "__version__", "unknown"),
                     "pydeseq2": pydeseq2.__version__, "numpy": np.__version__,
                     "pandas": pd.__version__},
        "timing": "time.perf_counter around fed_de.deseq2()+results() and around "
                  "DeseqDataSet()+deseq2()+DeseqStats()+summary(); data generation and "
                  "pooling not timed; both warmed up on a 60 x 300 study first",
        "targets": {"ratio_fed_over_pydeseq2": TARGET_RATIO,
                    "bytes_per_gene_per_site_two_coefficients": TARGET_BYTES_PER_GENE_TWO_COEF},
        "results": results,
    }
    if profiles:
        report["profiles"] = profiles

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    for prof in profiles:
        print()
        print(format_profile(prof))
    print(f"\nJSON written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
