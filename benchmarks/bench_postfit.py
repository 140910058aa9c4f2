"""What the post-fit phase (shrinkage, VST + PCA) adds to a run: rounds, sequential steps,
bytes per site and wall time, on the demo study (3 hospitals, ``~ batch + condition``).

    python benchmarks/bench_postfit.py [n_samples] [n_genes]

Runs fed_de without the phase, with apeglm, with the normal prior, with PCA, and with apeglm
+ PCA (fastest of ``REPEATS`` runs each, one BLAS thread as the other benchmarks), and prints
one JSON line per variant; results go to ``benchmarks/results/postfit_<n>x<genes>.json``.
Bytes are what the simulation measured (pickled, masked: secure aggregation is on).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import fed_de  # noqa: E402
from fed_de.demo_data import make_demo_study  # noqa: E402

REPEATS = 2
VARIANTS = {"none": {}, "apeglm": {"shrink": "apeglm"}, "normal": {"shrink": "normal"},
            "pca": {"pca": True}, "apeglm+pca": {"shrink": "apeglm", "pca": True}}


def main(n_samples: int = 150, n_genes: int = 5000) -> list[dict]:
    study = make_demo_study(n_samples=n_samples, n_genes=n_genes, seed=0)
    rows, base = [], None
    for name, extra in VARIANTS.items():
        wall = float("inf")
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = fed_de.deseq2(study.sites, study.design, levels=study.levels,
                                    contrasts=[("condition", "B", "A")], **extra)
            wall = min(wall, time.perf_counter() - t0)
        f = res.facts
        site_bytes = max(f["bytes_sent_by_site"].values())
        row = {"variant": name, "sequential_steps": f["sequential_steps"],
               "wall_seconds": round(wall, 2), "bytes_per_site": site_bytes}
        if base is None:
            base = row
        else:
            post = f["postfit"]
            row.update(added_steps=f["sequential_steps"] - base["sequential_steps"],
                       added_rounds=post["rounds"],
                       added_bytes_per_site=site_bytes - base["bytes_per_site"],
                       added_payload_per_site_per_gene=round(
                           post["payload_bytes_per_site_per_gene"]),
                       added_seconds=round(wall - base["wall_seconds"], 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "results" / f"postfit_{n_samples}x{n_genes}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:3]])
