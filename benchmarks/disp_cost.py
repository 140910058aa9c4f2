"""CPU of the dispersion site step and of secure-aggregation masking, per element.

``python benchmarks/disp_cost.py [SAMPLES] [GENES] [POINTS]`` (defaults 333, 5000, 12: one
site of a 1,000-sample, 3-site study, the gene-wise search's first round). Times
``nb.disp_summands_at`` on the demo study's counts at ``POINTS`` log-dispersions per gene, and
``secagg.mask`` / ``FixedPoint.decode`` of a message of that size (3 sites), single-threaded
BLAS; prints CPU nanoseconds per (sample, gene, point) and per masked value.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import sys  # noqa: E402

import numpy as np  # noqa: E402
from cpu_clock import best_cpu  # noqa: E402 (benchmarks/ is sys.path[0])

from fed_de import secagg  # noqa: E402
from fed_de.core import nb  # noqa: E402
from fed_de.demo_data import make_demo_study  # noqa: E402


def main(n: int = 333, genes: int = 5000, points: int = 12) -> None:
    study = make_demo_study(n_samples=max(48, 3 * n), n_genes=genes, seed=0)
    site = max(study.sites.values(), key=lambda a: a.n_obs)[:n]
    y = np.asarray(site.X, dtype=np.float64)
    cond = (site.obs["condition"].to_numpy() != site.obs["condition"].iloc[0]).astype(float)
    X = np.column_stack([np.ones(y.shape[0]), cond])
    sf = y.sum(axis=1) / np.exp(np.log(y.sum(axis=1)).mean())
    mean = np.maximum((y / sf[:, None]).mean(axis=0), 0.1)
    mu = np.maximum(sf[:, None] * mean[None, :], 0.5)
    rough = np.log(np.clip(((y / sf[:, None]).var(axis=0) - mean) / mean**2, 1e-4, 10))
    g = np.repeat(np.arange(genes), points)
    pts = rough[g] + np.tile(np.linspace(-2, 2, points), genes)
    elements = y.shape[0] * g.size
    cpu = best_cpu(lambda: nb.disp_summands_at(y, mu, X, g, pts))
    print(f"disp_summands_at: {y.shape[0]} samples x {genes} genes x {points} points: "
          f"{cpu:.2f} s CPU, {1e9 * cpu / elements:.1f} ns per (sample, gene, point)")
    part = nb.disp_summands_at(y, mu, X, g, pts)
    session = secagg.SecAggSession(me="b", run_id=b"bench", seeds={"a": b"1" * 32, "c": b"2" * 32},
                                   all_sites=("a", "b", "c"))
    tags = iter(range(10**6))
    values = sum(v.size for v in part.values())
    cpu = best_cpu(lambda: secagg.mask(part, session, next(tags)))
    masked = secagg.mask(part, session, next(tags))
    fmt = secagg.FixedPoint()
    dec = best_cpu(lambda: [fmt.decode(masked[k]) for k in part])
    print(f"secagg: {values} values: mask {cpu:.3f} s ({1e9 * cpu / values:.0f} ns per value, "
          f"2 peers), decode {dec:.3f} s ({1e9 * dec / values:.0f} ns per value)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
