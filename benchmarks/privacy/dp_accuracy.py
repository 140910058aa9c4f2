"""Accuracy cost of differential privacy (``dp_epsilon``) on the demo study.

Runs fed_de on the simulated demo study (150 samples over 3 hospitals, ``~ batch +
condition``; a smaller gene count for speed) without DP, then with ``dp_epsilon`` in
{1, 10, 100, 1000, inf} (``dp_delta=1e-6``, Cook's off in every run), and reports per epsilon:
the median |LFC error| against the non-DP run, the fraction of the non-DP run's padj < 0.05
calls kept, the calls it makes that the non-DP run does not (false calls), calls of truly DE
genes, and the runtime. ``--calibrate`` prints the per-sample row norms of every noised array
(the 95th percentile, rounded up), from which ``fed_de.bulk.dp.BOUNDS`` were set.

    python benchmarks/privacy/dp_accuracy.py                  # results/dp_accuracy_150x500.json
    python benchmarks/privacy/dp_accuracy.py --calibrate      # per-array row-norm quantiles
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

import fed_de
from fed_de.bulk import dp as bulk_dp
from fed_de.demo_data import make_demo_study

CONTRAST = ("condition", "B", "A")
OUT = Path(__file__).resolve().parents[1] / "results"


def round_up(x: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten at or above ``x``."""
    if x <= 0:
        return 1.0
    e = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * 10**e >= x * (1 - 1e-12):
            return float(m * 10**e)
    return float(10 ** (e + 1))


def calibrate(study, kw: dict) -> dict:
    """Per (message, array): quantiles of the per-sample row norms over a whole run."""
    norms: dict[tuple, list] = {}
    original = bulk_dp.released_contributions

    def recording(kind, fn, state, provided, params, kept, invoke):
        parts = original(kind, fn, state, provided, params, kept, invoke)
        for key in parts[0]:
            if (kind, key) not in bulk_dp.BOUNDS:
                continue
            c = np.stack([p[key] for p in parts])
            if c.size == 0:
                continue
            flat = c.reshape(c.shape[0], -1) if c.ndim <= 2 else c.reshape(c.shape[:2] + (-1,))
            n = np.abs(flat) if c.ndim <= 2 else np.sqrt((flat**2).sum(-1))
            n = n[n > 0]  # rows the step computes (others are sent as zeros)
            norms.setdefault((kind, key), []).append(n.ravel())
        return parts

    bulk_dp.released_contributions = recording
    try:
        fed_de.deseq2(study.sites, study.design, dp_epsilon=math.inf, dp_clip=math.inf, **kw)
    finally:
        bulk_dp.released_contributions = original
    out = {}
    for (kind, key), chunks in sorted(norms.items()):
        n = np.concatenate(chunks)
        q = np.quantile(n, [0.5, 0.9, 0.95, 0.99]) if n.size else np.zeros(4)
        out[f"{kind}.{key}"] = {"median": q[0], "q90": q[1], "q95": q[2], "q99": q[3],
                                "max": float(n.max(initial=0)), "suggested": round_up(q[2]),
                                "bound": bulk_dp.BOUNDS[(kind, key)]}
    return out


def noise_only(kinds: list[str]) -> None:
    """From now on, noise only the arrays of these message kinds (``Kind`` or ``Kind.key``),
    at the noise multiplier of the whole run: which releases cost the accuracy."""
    original = bulk_dp.dp.release

    class Shim:
        kind = key = None

        def __getattr__(self, name):
            return getattr(bulk_dp.__dict__["_dp_module"], name)

        @staticmethod
        def release(stacked, bound, z, n_sites, rng):
            keep = Shim.kind in kinds or f"{Shim.kind}.{Shim.key}" in kinds
            return original(stacked, bound, z if keep else 0.0, n_sites, rng)

    rule = bulk_dp.rule

    def spying(kind, key):
        Shim.kind, Shim.key = kind, key
        return rule(kind, key)

    bulk_dp._dp_module = bulk_dp.dp
    bulk_dp.dp = Shim()
    bulk_dp.rule = spying


def compare(ref, res, truth) -> dict:
    """Accuracy of a DP run against the non-DP one (and the truth)."""
    lfc_ref, lfc = ref["log2FoldChange"].to_numpy(), res["log2FoldChange"].to_numpy()
    both = np.isfinite(lfc_ref) & np.isfinite(lfc)
    call_ref = (ref["padj"] < 0.05).to_numpy()
    call = (res["padj"] < 0.05).to_numpy()
    de = truth["is_de"].to_numpy()
    return {"median_abs_lfc_error": float(np.median(np.abs(lfc - lfc_ref)[both]))
            if both.any() else math.nan,
            "genes_with_lfc": int(both.sum()),
            "calls_nondp": int(call_ref.sum()), "calls": int(call.sum()),
            "calls_kept": float((call & call_ref).sum() / max(call_ref.sum(), 1)),
            "false_calls": int((call & ~call_ref).sum()),
            "true_de_called": int((call & de).sum()), "true_de": int(de.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=150)
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="DP runs per epsilon")
    ap.add_argument("--eps", type=float, nargs="*", default=[1, 10, 100, 1000, math.inf])
    ap.add_argument("--clip", type=float, default=1.0, help="dp_clip (scales every bound)")
    ap.add_argument("--no-floor", action="store_true",
                    help="dp_floor=False: dispersions not floored at the trend")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--noise-only", nargs="*", default=None, metavar="KIND[.KEY]",
                    help="noise only these message kinds / arrays (diagnosis)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    study = make_demo_study(n_samples=args.samples, n_genes=args.genes, seed=args.seed)
    kw = dict(levels=study.levels, genes=study.genes, cooks=False, contrasts=[CONTRAST])
    if args.calibrate:
        for key, row in calibrate(study, kw).items():
            print(f"{key:28s} " + " ".join(f"{k}={v:.3g}" for k, v in row.items()))
        return
    if args.noise_only:
        noise_only(args.noise_only)
    t0 = time.perf_counter()
    ref = fed_de.deseq2(study.sites, study.design, **kw)
    t_ref = time.perf_counter() - t0
    ref_res = ref.results(CONTRAST)
    rows = []
    for eps in args.eps:
        for rep in range(args.repeats if math.isfinite(eps) else 1):
            t0 = time.perf_counter()
            run = fed_de.deseq2(study.sites, study.design, dp_epsilon=eps, dp_delta=1e-6,
                                dp_clip=args.clip, dp_floor=not args.no_floor, **kw)
            seconds = time.perf_counter() - t0
            budget = run.facts["privacy"]["differential_privacy"]
            row = {"epsilon": eps, "repeat": rep, "seconds": seconds,
                   "noise_only": args.noise_only, "dp_floor": not args.no_floor,
                   "rho": budget["rho"], "noise_multiplier": budget["noise_multiplier"],
                   **compare(ref_res, run.results(CONTRAST), study.truth)}
            rows.append(row)
            print(json.dumps(row))
    out = args.out or OUT / f"dp_accuracy_{args.samples}x{args.genes}.json"
    payload = {"command": "python benchmarks/privacy/dp_accuracy.py "
                          f"--samples {args.samples} --genes {args.genes} --seed {args.seed} "
                          f"--repeats {args.repeats} --clip {args.clip}"
                          + (" --no-floor" if args.no_floor else "")
                          + (f" --noise-only {' '.join(args.noise_only)}"
                             if args.noise_only else ""),
               "study": {"samples": args.samples, "genes": args.genes, "seed": args.seed,
                         "sites": {k: v.n_obs for k, v in study.sites.items()},
                         "design": study.design},
               "delta": 1e-6, "non_dp_seconds": t_ref, "runs": rows}
    out.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
