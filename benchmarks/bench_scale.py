"""Scale benchmark: fed_de's simulation against pooled PyDESeq2 0.5.4 and R DESeq2, fresh processes.

Every run is a fresh Python (or R) process started by this script; the parent measures the
whole process from outside: CPU seconds (user + system, the kernel's accounting of the child
and every descendant it waited for), wall seconds, the peak resident memory of the largest
process (``ru_maxrss``) and the peak of the summed proportional set size (PSS) of the process
tree, sampled every 0.1 s (it counts worker processes; memory they share is split between
them). Inside each child the analysis alone is timed too (its CPU, excluding imports and
loading the data), since importing substrafl or loading DESeq2 in R costs seconds.

- **fed_de**: ``fed_de.deseq2`` on the sites' ``.h5ad`` files (strict in-process simulation,
  secure aggregation on, Cook's on: DESeq2's default), then ``results()``.
- **PyDESeq2 0.5.4**: ``DeseqDataSet(..., n_cpus=1).deseq2()`` then
  ``DeseqStats(..., n_cpus=1).summary()`` on the pooled ``.h5ad`` (defaults: Cook's refit and
  filter on).
- **R DESeq2** (where ``Rscript`` with DESeq2 is installed): ``DESeq()`` and ``results()`` on
  the pooled counts (defaults).

The tools take turns (fed_de, PyDESeq2, R, fed_de, ...) so that background load hits them
alike. BLAS and OpenMP run one thread in every child (``OMP_NUM_THREADS`` & co. = 1). Data:
:func:`fed_de.demo_data.make_demo_study` (``~ batch + condition``, seeded), written once per
size to ``--data-dir`` by a separate process.

Reported per point: CPU and wall of each tool and fed_de / PyDESeq2 ratios, peak memory,
sequential steps, bytes per gene per site (what is sent: pickled, masked when secure
aggregation is on; and the plaintext float64 payload), padj < 0.1 calls differing from
PyDESeq2 and from R, fed_de's CPU per step per million counts, and growth exponents of CPU
in samples and in genes where the points allow.

Usage::

    python benchmarks/bench_scale.py --quick                  # a few minutes
    python benchmarks/bench_scale.py --issue                  # the table of issue 15
    python benchmarks/bench_scale.py --point 150x30000x3 --point 300x5000x20
    python benchmarks/bench_scale.py --samples 300 1000 --genes 5000 --sites 3 20
    python benchmarks/bench_scale.py --full                   # the whole grid (hours)
    python benchmarks/bench_scale.py --quick --workers 2      # fed_de with n_jobs=2
    python benchmarks/bench_scale.py --table results/scale_x.json   # print a saved table

A point is ``SAMPLESxGENESxSITES``. Results go to ``benchmarks/results/scale_<label>.json``
(``--out``), the markdown table to stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
DESIGN = "~ batch + condition"
CONTRAST = ("condition", "B", "A")
ALPHA = 0.1
TOOLS = ("fed_de", "pydeseq2", "r")

GRID_GENES = (2_000, 10_000, 30_000, 60_000)
GRID_SAMPLES = (50, 300, 1_000, 2_000)
GRID_SITES = (2, 5, 10, 20)


@dataclass(frozen=True)
class Point:
    """One study size: samples, genes, sites."""

    samples: int
    genes: int
    sites: int

    @property
    def label(self) -> str:
        return f"{self.samples}x{self.genes}x{self.sites}"

    @classmethod
    def parse(cls, text: str) -> Point:
        try:
            n, g, k = (int(x.replace(",", "").replace("_", "")) for x in text.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"a point is SAMPLESxGENESxSITES, e.g. 150x30000x3; got {text!r}") from None
        return cls(n, g, k)

    def feasible(self) -> bool:
        """Every hospital holds one batch with three samples of each condition."""
        return self.samples >= 6 * self.sites


PRESETS = {
    # a few minutes on 2 cores: samples 50 -> 300, 3 vs 20 sites
    "quick": [Point(50, 2_000, 3), Point(300, 2_000, 3), Point(300, 2_000, 20)],
    # the table of issue 15
    "issue": [Point(150, 2_000, 3), Point(150, 30_000, 3), Point(300, 5_000, 3),
              Point(1_000, 5_000, 3), Point(300, 5_000, 20)],
}


def full_grid() -> list[Point]:
    """Every combination of the issue's genes, samples and sites that the data allow."""
    pts = [Point(n, g, k) for g, n, k in itertools.product(GRID_GENES, GRID_SAMPLES, GRID_SITES)]
    return [p for p in pts if p.feasible()]


# --------------------------------------------------------------------------------------------
# measuring a child process from outside
# --------------------------------------------------------------------------------------------

def _children_of() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def _tree_pss_kb(root: int) -> int:
    """Summed PSS (kB) of ``root`` and its descendants (Linux /proc)."""
    kids = _children_of()
    todo, total = [root], 0
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def measure(cmd: list[str], env: dict, timeout: float) -> dict:
    """Run ``cmd``; CPU (user + sys of it and its waited-for descendants), wall, peak memory."""
    peak = {"pss_kb": 0}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = threading.Event()
    log: list[bytes] = []

    def drain():
        for line in proc.stdout:
            log.append(line)

    def sample():
        can_read = os.path.exists("/proc/self/smaps_rollup")
        while can_read and not done.wait(0.1):
            peak["pss_kb"] = max(peak["pss_kb"], _tree_pss_kb(proc.pid))

    threads = [threading.Thread(target=drain, daemon=True),
               threading.Thread(target=sample, daemon=True)]
    for t in threads:
        t.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    timer.cancel()
    done.set()
    for t in threads:
        t.join(timeout=5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "timed_out": wall >= timeout,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "user_s": round(usage.ru_utime, 3),
        "sys_s": round(usage.ru_stime, 3),
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kB
        "peak_tree_pss_mb": round(peak["pss_kb"] / 1024, 1) or None,
        "log_tail": b"".join(log)[-3000:].decode(errors="replace"),
    }


def child_env() -> dict:
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def data_folder(root: Path, point: Point, seed: int) -> Path:
    return root / f"{point.label}_seed{seed}"


def prepare(root: Path, point: Point, seed: int, with_r: bool, timeout: float) -> Path:
    """Write the study once (a separate process: the generator needs several copies)."""
    folder = data_folder(root, point, seed)
    need = ["study.json"] + (["counts.int32"] if with_r else [])
    if all((folder / f).exists() for f in need):
        return folder
    spec = {"samples": point.samples, "genes": point.genes, "sites": point.sites, "seed": seed,
            "folder": str(folder), "with_r": with_r}
    res = measure([sys.executable, __file__, "_prepare", json.dumps(spec)], child_env(), timeout)
    if res["returncode"] != 0:
        raise RuntimeError(f"preparing {point.label} failed:\n{res['log_tail']}")
    print(f"  data {point.label}: written in {res['wall_s']:.0f} s "
          f"(generator peak {res['peak_rss_mb']:.0f} MB)", file=sys.stderr)
    return folder


def _prepare(spec: dict) -> None:
    import numpy as np

    from fed_de.demo_data import make_demo_study

    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    study = make_demo_study(spec["samples"], spec["genes"], spec["seed"],
                            n_sites=spec["sites"])
    for name, adata in study.sites.items():
        adata.write_h5ad(folder / f"{name}.h5ad")
    pooled = study.pooled()
    del study
    pooled.write_h5ad(folder / "pooled.h5ad")
    if spec["with_r"]:
        # genes x samples, column-major for R's matrix(): the samples x genes C array as is
        np.asarray(pooled.X, dtype=np.int32).tofile(folder / "counts.int32")
        pooled.obs[["condition", "batch"]].to_csv(folder / "coldata.csv")
    meta = {"sites": [p.stem for p in sorted(folder.glob("hospital_*.h5ad"))],
            "samples": pooled.n_obs, "genes": pooled.n_vars,
            "levels": {"condition": ["A", "B"], "batch": ["b1", "b2", "b3"]}}
    (folder / "study.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------------------------
# the children: one analysis each, timed inside as well
# --------------------------------------------------------------------------------------------

def _cpu_now() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _save_calls(path: Path, genes, padj, lfc) -> None:
    import numpy as np

    np.savez(path, genes=np.asarray(genes, dtype=str), padj=np.asarray(padj, dtype=float),
             lfc=np.asarray(lfc, dtype=float))


def _child_fed(spec: dict) -> dict:
    import inspect

    import fed_de

    folder = Path(spec["folder"])
    meta = json.loads((folder / "study.json").read_text())
    sites = {name: folder / f"{name}.h5ad" for name in meta["sites"]}
    kwargs = {}
    params = inspect.signature(fed_de.deseq2).parameters
    if spec.get("no_secure"):
        kwargs["secure_aggregation"] = False
    for key in ("n_jobs", "spill_dir"):
        if spec.get(key) is not None:
            if key not in params:
                raise SystemExit(f"this fed_de has no deseq2({key}=...)")
            kwargs[key] = spec[key]
    cpu0, wall0 = _cpu_now(), time.perf_counter()
    res = fed_de.deseq2(sites, DESIGN, contrasts=[CONTRAST], alpha=ALPHA, levels=meta["levels"],
                        cooks=spec["cooks"], **kwargs)
    table = res.results()
    cpu, wall = _cpu_now() - cpu0, time.perf_counter() - wall0
    _save_calls(Path(spec["calls"]), table.index, table["padj"], table["log2FoldChange"])
    facts = {k: v for k, v in res.facts.items() if k != "messages"}
    return {"analysis_cpu_s": round(cpu, 3), "analysis_wall_s": round(wall, 3),
            "facts": facts, "fed_de_file": fed_de.__file__}


def _child_pydeseq2(spec: dict) -> dict:
    import anndata as ad
    import pandas as pd
    import pydeseq2
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    adata = ad.read_h5ad(Path(spec["folder"]) / "pooled.h5ad")
    counts = pd.DataFrame(adata.X, index=adata.obs_names, columns=adata.var_names)
    metadata = adata.obs[["condition", "batch"]].astype(str)
    del adata
    cpu0, wall0 = _cpu_now(), time.perf_counter()
    dds = DeseqDataSet(counts=counts, metadata=metadata, design=DESIGN, refit_cooks=spec["cooks"],
                       quiet=True, n_cpus=1)
    dds.deseq2()
    stats = DeseqStats(dds, contrast=list(CONTRAST), alpha=ALPHA, cooks_filter=spec["cooks"],
                       quiet=True, n_cpus=1)
    stats.summary()
    cpu, wall = _cpu_now() - cpu0, time.perf_counter() - wall0
    df = stats.results_df
    _save_calls(Path(spec["calls"]), df.index, df["padj"], df["log2FoldChange"])
    return {"analysis_cpu_s": round(cpu, 3), "analysis_wall_s": round(wall, 3),
            "version": pydeseq2.__version__}


R_SCRIPT = r"""
args <- commandArgs(trailingOnly = TRUE)
folder <- args[1]; out <- args[2]; cooks <- args[3] == "TRUE"
suppressPackageStartupMessages(library(DESeq2))
coldata <- read.csv(file.path(folder, "coldata.csv"), row.names = 1)
coldata$condition <- factor(coldata$condition, levels = c("A", "B"))
coldata$batch <- factor(coldata$batch, levels = c("b1", "b2", "b3"))
n <- nrow(coldata); g <- as.integer(args[4])
counts <- matrix(readBin(file.path(folder, "counts.int32"), "integer", n * g, size = 4),
                 nrow = g, ncol = n)
rownames(counts) <- sprintf(args[5], seq_len(g)); colnames(counts) <- rownames(coldata)
t0 <- proc.time()
dds <- DESeqDataSetFromMatrix(counts, coldata, design = ~ batch + condition)
if (cooks) {  # DESeq2's defaults
  dds <- DESeq(dds, quiet = TRUE)
  res <- results(dds, contrast = c("condition", "B", "A"), alpha = 0.1)
} else {
  dds <- DESeq(dds, quiet = TRUE, minReplicatesForReplace = Inf)
  res <- results(dds, contrast = c("condition", "B", "A"), alpha = 0.1, cooksCutoff = FALSE)
}
t1 <- proc.time() - t0
write.csv(data.frame(gene = rownames(res), padj = res$padj, lfc = res$log2FoldChange),
          out, row.names = FALSE)
cat(sprintf('{"analysis_cpu_s": %.3f, "analysis_wall_s": %.3f, "version": "%s"}\n',
            t1[["user.self"]] + t1[["sys.self"]], t1[["elapsed"]],
            as.character(packageVersion("DESeq2"))), file = paste0(out, ".json"))
"""


def r_available() -> bool:
    if shutil.which("Rscript") is None:
        return False
    ok = subprocess.run(["Rscript", "-e", "suppressPackageStartupMessages(library(DESeq2))"],
                        capture_output=True)
    return ok.returncode == 0


# --------------------------------------------------------------------------------------------
# one point
# --------------------------------------------------------------------------------------------

def run_tool(tool: str, folder: Path, point: Point, args, scratch: Path, rep: int) -> dict:
    calls = scratch / f"{tool}_{point.label}_{rep}.npz"
    spec = {"folder": str(folder), "cooks": not args.no_cooks, "calls": str(calls),
            "n_jobs": args.workers, "spill_dir": str(scratch / "spill") if args.spill else None,
            "no_secure": args.no_secure}
    info_path = scratch / f"{tool}_{point.label}_{rep}.json"
    if tool == "r":
        script = scratch / "bench_scale.R"
        script.write_text(R_SCRIPT)
        width = max(5, len(str(point.genes)))
        csv = calls.with_suffix(".csv")
        cmd = ["Rscript", str(script), str(folder), str(csv), str(not args.no_cooks).upper(),
               str(point.genes), f"G%0{width}d"]
        res = measure(cmd, child_env(), args.timeout)
        if res["returncode"] == 0:
            res.update(json.loads(Path(str(csv) + ".json").read_text()))
            _csv_to_npz(csv, calls)
    else:
        cmd = [sys.executable, __file__, "_run", tool, json.dumps(spec), str(info_path)]
        res = measure(cmd, child_env(), args.timeout)
        if res["returncode"] == 0:
            res.update(json.loads(info_path.read_text()))
    if res["returncode"] == 0:
        res["calls_file"] = str(calls)
        res.pop("log_tail")
    else:
        print(f"  {tool} {point.label} failed (exit {res['returncode']}):\n{res['log_tail']}",
              file=sys.stderr)
    return res


def _csv_to_npz(csv: Path, dest: Path) -> None:
    import pandas as pd

    df = pd.read_csv(csv)
    _save_calls(dest, df["gene"], df["padj"], df["lfc"])


def calls_differing(a: str, b: str) -> dict:
    import numpy as np

    x, y = np.load(a), np.load(b)
    if list(x["genes"]) != list(y["genes"]):
        order = {g: i for i, g in enumerate(y["genes"])}
        idx = np.array([order[g] for g in x["genes"]])
        y = {k: y[k][idx] for k in ("padj", "lfc")}
    ca, cb = x["padj"] < ALPHA, y["padj"] < ALPHA
    fin = np.isfinite(x["lfc"]) & np.isfinite(y["lfc"])
    rel = np.abs(x["lfc"][fin] - y["lfc"][fin]) / np.maximum(np.abs(y["lfc"][fin]), 1e-12)
    return {"calls_differing": int((ca != cb).sum()), "n_sig": [int(ca.sum()), int(cb.sum())],
            "padj_na_mismatch": int((np.isfinite(x["padj"]) != np.isfinite(y["padj"])).sum()),
            "lfc_rel_diff_median": float(np.median(rel)) if rel.size else None}


def bench_point(point: Point, args, tools: list[str], scratch: Path) -> dict:
    folder = prepare(args.data_dir, point, args.seed, "r" in tools, args.timeout)
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    for rep in range(args.repeats):
        for tool in tools:  # take turns: fed_de, PyDESeq2, R, fed_de, ...
            t0 = time.monotonic()
            runs[tool].append(run_tool(tool, folder, point, args, scratch, rep))
            r = runs[tool][-1]
            print(f"  {point.label} {tool} run {rep + 1}: cpu {r['cpu_s']:.1f} s, wall "
                  f"{r['wall_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MB "
                  f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    out = {"point": asdict(point), "label": point.label, "runs": runs}
    ok = {t: [r for r in rs if r["returncode"] == 0] for t, rs in runs.items()}
    if ok.get("fed_de") and ok.get("pydeseq2"):
        out["vs_pydeseq2"] = calls_differing(ok["fed_de"][0]["calls_file"],
                                             ok["pydeseq2"][0]["calls_file"])
    if ok.get("fed_de") and ok.get("r"):
        out["vs_r"] = calls_differing(ok["fed_de"][0]["calls_file"], ok["r"][0]["calls_file"])
    return out


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------

def _median(values: list[float]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def summarise(point_result: dict) -> dict:
    """Medians over the repeats, the ratios, steps and bytes of one point."""
    p = point_result["point"]
    row: dict = {"label": point_result["label"], **p}
    for tool, runs in point_result["runs"].items():
        ok = [r for r in runs if r["returncode"] == 0]
        if not ok:
            row[f"{tool}_failed"] = True
            continue
        for key in ("cpu_s", "wall_s", "peak_rss_mb", "peak_tree_pss_mb", "analysis_cpu_s",
                    "analysis_wall_s"):
            row[f"{tool}_{key}"] = _median([r.get(key) for r in ok])
    fed = [r for r in point_result["runs"].get("fed_de", []) if r["returncode"] == 0]
    if fed:
        facts = fed[0]["facts"]
        g = p["genes"]
        row["steps"] = facts["sequential_steps"]
        row["tasks"] = facts["tasks"]
        row["sent_per_gene_per_site"] = max(facts["bytes_sent_by_site"].values()) / g
        payload = facts.get("payload_bytes_by_site")
        row["payload_per_gene_per_site"] = max(payload.values()) / g if payload else None
        row["aggregator_per_gene"] = facts["bytes_sent_by_aggregator"] / g
        received = facts.get("bytes_received_by_site")
        row["received_per_gene_per_site"] = max(received.values()) / g if received else None
        critical = facts.get("critical_path_cpu_seconds")
        if critical is not None:  # the plan's tasks replaced by their costliest chain
            tasks = (sum(facts["site_task_cpu_seconds"].values())
                     + facts["aggregator_cpu_seconds"])
            row["fed_de_critical_path_cpu_s"] = critical
            row["fed_de_site_per_machine_cpu_s"] = fed[0]["cpu_s"] - tasks + critical
        counts_m = p["samples"] * g / 1e6
        row["fed_ms_per_step_per_mcounts"] = (1e3 * row["fed_de_analysis_cpu_s"]
                                              / row["steps"] / counts_m)
    for tool in ("pydeseq2", "r"):
        if row.get("fed_de_cpu_s") and row.get(f"{tool}_cpu_s"):
            row[f"cpu_ratio_{tool}"] = row["fed_de_cpu_s"] / row[f"{tool}_cpu_s"]
            row[f"analysis_cpu_ratio_{tool}"] = (row["fed_de_analysis_cpu_s"]
                                                 / row[f"{tool}_analysis_cpu_s"])
    for key in ("vs_pydeseq2", "vs_r"):
        if key in point_result:
            row[f"calls_differing_{key[3:]}"] = point_result[key]["calls_differing"]
    return row


def exponents(rows: list[dict], tool: str, along: str, key: str = "cpu_s") -> list[dict]:
    """Growth exponent d log(CPU) / d log(size) between points differing in ``along`` only."""
    fixed = [k for k in ("samples", "genes", "sites") if k != along]
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get(f"{tool}_{key}"):
            groups.setdefault(tuple(r[k] for k in fixed), []).append(r)
    for ident, grp in groups.items():
        grp = sorted(grp, key=lambda r: r[along])
        for a, b in itertools.pairwise(grp):
            slope = (math.log(b[f"{tool}_{key}"] / a[f"{tool}_{key}"])
                     / math.log(b[along] / a[along]))
            out.append({"tool": tool, "along": along, "from": a[along], "to": b[along],
                        **dict(zip(fixed, ident, strict=True)), "exponent": round(slope, 2)})
    return out


def site_ratios(rows: list[dict]) -> list[dict]:
    """fed_de's cost with more sites over fewer, for points differing in sites only: the
    whole process on one machine, and with each site on its own machine (the plan's tasks
    replaced by their costliest chain: what ``n_jobs`` workers give with a core per site)."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("fed_de_cpu_s"):
            groups.setdefault((r["samples"], r["genes"]), []).append(r)
    for (samples, genes), grp in groups.items():
        grp = sorted(grp, key=lambda r: r["sites"])
        for a, b in itertools.pairwise(grp):
            per_machine = [r.get("fed_de_site_per_machine_cpu_s") for r in (a, b)]
            out.append({"samples": samples, "genes": genes, "from": a["sites"],
                        "to": b["sites"], "cpu_ratio": round(b["fed_de_cpu_s"]
                                                             / a["fed_de_cpu_s"], 2),
                        "site_per_machine_ratio": (round(per_machine[1] / per_machine[0], 2)
                                                   if all(per_machine) else None)})
    return out


def _f(x, fmt="{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _bullets(lines: list[str], title: str, items: list[str]) -> None:
    """Append a titled bullet list to ``lines`` (nothing when there are no items)."""
    if items:
        lines += ["", title, "", *(f"- {item}" for item in items)]


def markdown(rows: list[dict], slopes: list[dict]) -> str:
    """The CPU / memory table, the bytes table, the growth exponents and the cost of more
    sites."""
    head = ("| study | sites | fed_de CPU s | PyDESeq2 CPU s | **ratio** | ratio, analysis "
            "only | R CPU s (analysis) | fed_de wall s | fed_de peak MB | PyDESeq2 peak MB | "
            "steps | ms/step/M counts | calls ≠ PyD / R |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        fed_peak = r.get("fed_de_peak_tree_pss_mb") or r.get("fed_de_peak_rss_mb")
        pyd_peak = r.get("pydeseq2_peak_tree_pss_mb") or r.get("pydeseq2_peak_rss_mb")
        lines.append(
            f"| {r['samples']:,} × {r['genes']:,} | {r['sites']} | {_f(r.get('fed_de_cpu_s'))} | "
            f"{_f(r.get('pydeseq2_cpu_s'))} | **{_f(r.get('cpu_ratio_pydeseq2'), '{:.2f}')}** | "
            f"{_f(r.get('analysis_cpu_ratio_pydeseq2'), '{:.2f}')} | "
            f"{_f(r.get('r_cpu_s'))} ({_f(r.get('r_analysis_cpu_s'))}) | "
            f"{_f(r.get('fed_de_wall_s'))} | {_f(fed_peak, '{:.0f}')} | "
            f"{_f(pyd_peak, '{:.0f}')} | {r.get('steps', '–')} | "
            f"{_f(r.get('fed_ms_per_step_per_mcounts'), '{:.2f}')} | "
            f"{r.get('calls_differing_pydeseq2', '–')} / {r.get('calls_differing_r', '–')} |")
    kb = lambda r, k: _f(r.get(k) and r[k] / 1e3)  # noqa: E731
    lines += ["", "| study | sites | KB/gene/site payload | KB/gene/site sent | "
                  "KB/gene/site received | KB/gene aggregator output |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['samples']:,} × {r['genes']:,} | {r['sites']} | "
                     f"{kb(r, 'payload_per_gene_per_site')} | {kb(r, 'sent_per_gene_per_site')} | "
                     f"{kb(r, 'received_per_gene_per_site')} | {kb(r, 'aggregator_per_gene')} |")
    def fixed(s: dict) -> str:
        return ", ".join(f"{k} {s[k]:,}" for k in ("samples", "genes", "sites") if k in s)

    _bullets(lines, "Growth exponents of whole-process CPU (d log CPU / d log size):", [
        f"{s['tool']}: {s['along']} {s['from']:,} → {s['to']:,} ({fixed(s)}): "
        f"**{s['exponent']}**" for s in slopes])
    _bullets(lines, "fed_de with more sites, same samples (CPU over the fewer sites'; one "
             "machine per site: the plan's tasks counted along their costliest chain):", [
                 f"{s['samples']:,} × {s['genes']:,}, {s['from']} → {s['to']} sites: one "
                 f"machine **{s['cpu_ratio']}×**, one machine per site "
                 f"**{_f(s['site_per_machine_ratio'], '{:.2f}')}×**"
                 for s in site_ratios(rows)])
    return "\n".join(lines)


def report_table(report: dict) -> str:
    rows = [summarise(p) for p in report["points"]]
    slopes = [s for tool in ("fed_de", "pydeseq2") for along in ("samples", "genes")
              for s in exponents(rows, tool, along)]
    return markdown(rows, slopes)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def _git() -> dict:
    root = HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "fed_de"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}
    return {"commit": head, "fed_de_dirty": bool(dirty)}


def select_points(args) -> list[Point]:
    points = list(args.point or [])
    if args.quick:
        points += PRESETS["quick"]
    if args.issue:
        points += PRESETS["issue"]
    if args.full:
        points += full_grid()
    if args.samples or args.genes or args.sites:
        points += [Point(n, g, k) for g in (args.genes or [5_000])
                   for n in (args.samples or [300]) for k in (args.sites or [3])]
    if not points:
        raise SystemExit("choose points: --quick, --issue, --full, --point NxGxK, or "
                         "--samples/--genes/--sites")
    bad = [p.label for p in points if not p.feasible()]
    if bad:
        raise SystemExit(f"points {bad} have fewer than 6 samples per site; drop them")
    return list(dict.fromkeys(points))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_prepare":
        _prepare(json.loads(argv[1]))
        return 0
    if argv and argv[0] == "_run":
        tool, spec, info = argv[1], json.loads(argv[2]), Path(argv[3])
        fn = {"fed_de": _child_fed, "pydeseq2": _child_pydeseq2}[tool]
        info.write_text(json.dumps(fn(spec), default=str))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"points {PRESETS['quick']}")
    ap.add_argument("--issue", action="store_true", help="the points of issue 15's table")
    ap.add_argument("--full", action="store_true",
                    help="genes x samples x sites grid (2k-60k x 50-2,000 x 2-20)")
    ap.add_argument("--point", type=Point.parse, action="append",
                    help="SAMPLESxGENESxSITES (repeatable)")
    ap.add_argument("--samples", type=int, nargs="+", help="grid of these samples ...")
    ap.add_argument("--genes", type=int, nargs="+", help="... these genes ...")
    ap.add_argument("--sites", type=int, nargs="+", help="... and these site counts")
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool; medians reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cooks", action="store_true", help="all tools without Cook's")
    ap.add_argument("--workers", type=int, default=None, help="fed_de n_jobs (default: none)")
    ap.add_argument("--spill", action="store_true", help="fed_de spill_dir (shared states "
                    "kept as files)")
    ap.add_argument("--no-secure", action="store_true",
                    help="fed_de without secure aggregation (to see what masking costs)")
    ap.add_argument("--data-dir", type=Path,
                    default=Path(tempfile.gettempdir()) / "fed_de_bench_scale",
                    help="where the studies are written (kept between calls)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    ap.add_argument("--out", type=Path, help="JSON path (default results/scale_<label>.json)")
    ap.add_argument("--label", default=None, help="name of the results file")
    ap.add_argument("--table", type=Path, help="print the table of a saved JSON and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(report_table(json.loads(args.table.read_text())))
        return 0
    points = select_points(args)
    tools = list(args.tools)
    if "r" in tools and not r_available():
        print("Rscript with DESeq2 not found: R is left out", file=sys.stderr)
        tools.remove("r")
    label = args.label or ("quick" if args.quick and len(points) == 3 else
                           "_".join(p.label for p in points[:3])
                           + ("_etc" if len(points) > 3 else ""))
    out = args.out or RESULTS_DIR / f"scale_{label}.json"
    report = {
        "benchmark": "bench_scale: fed_de simulation vs pooled PyDESeq2 and R DESeq2, "
                     "fresh processes",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": _git(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "config": {"design": DESIGN, "contrast": list(CONTRAST), "alpha": ALPHA,
                   "cooks": not args.no_cooks, "seed": args.seed, "repeats": args.repeats,
                   "workers": args.workers, "spill": args.spill,
                   "secure_aggregation": not args.no_secure, "tools": tools,
                   "threads": {v: "1" for v in THREAD_VARS}},
        "points": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        for point in points:
            t0 = time.monotonic()
            print(f"{point.label} ...", file=sys.stderr)
            report["points"].append(bench_point(point, args, tools, Path(tmp)))
            print(f"{point.label} done in {time.monotonic() - t0:.0f} s", file=sys.stderr)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1, default=str))  # after every point
    print(report_table(report))
    print(f"\nJSON: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
