"""Rounds, points, bytes and agreement with R of fed_de.core.disp_path on whole studies.

Not a test: the numbers of docs/dispersion_path.md. Needs every gene's references:
    Rscript tests/data/r_extra/disp_path/make_refs.R /work/shared/data /tmp/disp_full 1000000
    python tests/data/r_extra/disp_path/measure_rounds.py /tmp/disp_full [--no-prefetch]
One site (pooled sums); the objective as fed_de's aggregator forms it (nb.disp_summands,
nb.cox_reid). The trend and prior variance come from fed_de.core.trend on fed_de's own
gene-wise estimates; during the gene-wise rounds a provisional trend from the provisional
estimates chooses the MAP points sent in free slots (disp_path.prefetch_map).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from fed_de.core import disp_path as dp
from fed_de.core import nb, trend


def load(folder: Path) -> dict:
    genes = pd.read_csv(folder / "genes.csv.gz")
    y = pd.read_csv(folder / "counts.csv.gz", index_col=0).to_numpy(float).T
    mu = pd.read_csv(folder / "mu.csv.gz", index_col=0).to_numpy(float).T
    X = pd.read_csv(folder / "design.csv", index_col=0).to_numpy(float)
    sc = pd.read_csv(folder / "scalars.csv.gz").iloc[0]
    return {"genes": genes, "y": y, "mu": mu, "X": X, "max_disp": float(sc.maxDisp)}


def evaluate(s: dict, points: np.ndarray):
    """f, g, h (no prior) where points are finite; sums for those genes only."""
    ok = np.isfinite(points)
    rows = np.flatnonzero(ok.any(axis=1))
    out = [np.full(points.shape, np.nan) for _ in range(3)]
    if rows.size:
        pts = np.where(ok[rows], points[rows], np.nanmax(points[rows], axis=1, keepdims=True))
        tot = nb.disp_summands(s["y"][:, rows], s["mu"][:, rows], s["X"], pts)
        cr, cr1, cr2 = nb.cox_reid(tot["A"], tot["A1"], tot["A2"], s["X"].shape[1])
        for o, v in zip(out, (tot["ll"] + cr, tot["d1"] + cr1, tot["d2"] + cr2), strict=True):
            o[rows] = np.where(ok[rows], v, np.nan)
    return out


def fit_trend(s: dict, disp: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = trend.fit_dispersion_trend(s["genes"].baseMean.to_numpy(), disp, 1e-8,
                                         "parametric", n_samples=s["X"].shape[0],
                                         n_coefs=s["X"].shape[1])
    return fit["disp_fit"], fit["disp_prior_var"]


def run(folder: Path, prefetch: bool = True) -> None:
    s = load(folder)
    g, (n, p) = s["genes"], s["X"].shape
    per_point = (3 + 3 * p * (p + 1) // 2) * 8
    rows, t_agg = [], 0.0

    def log(tag, pts):
        fin = np.isfinite(pts)
        rows.append((tag, fin.any(axis=1).sum(), fin.sum(), fin.sum(axis=1).max(),
                     fin.sum() * per_point))

    st = dp.start(np.log(g.alpha_hat.to_numpy()), n_samples=n, max_disp=s["max_disp"])
    while not dp.done(st):
        pts = dp.propose(st)
        log(f"G{st['round'] + 1}", pts)
        f, gr, h = evaluate(s, pts)
        t = time.time()
        st = dp.update(st, pts, f, gr, h)
        if prefetch and not dp.done(st):
            fit, var = fit_trend(s, dp.result(st)["disp"])
            width = max(st["points"].shape[1], st["k"])
            st["points"] = dp.merge_points(st["points"], dp.prefetch_map(st, fit, var), width)
        t_agg += time.time() - t
    gene = dp.result(st)
    fit, var = fit_trend(s, gene["disp"])
    t = time.time()
    ms = dp.start(np.log(dp.map_start(gene["disp"], fit)), n_samples=n,
                  max_disp=s["max_disp"], prior={"mean": np.log(fit), "var": var},
                  memory=st["memory"], max_rounds=2)
    t_agg += time.time() - t
    while not dp.done(ms):
        pts = dp.propose(ms)
        log(f"M{ms['round'] + 1}", pts)
        f, gr, h = evaluate(s, pts)
        t = time.time()
        ms = dp.update(ms, pts, f, gr, h)
        t_agg += time.time() - t
    mp = dp.result(ms)
    print(f"{folder.name}: {len(g)} genes, {n} samples, {p} coefficients; gene-wise rounds "
          f"{st['round']}, MAP rounds {ms['round']}, uncertain {gene['uncertain'].sum()} + "
          f"{mp['uncertain'].sum()}; aggregator {t_agg:.1f} s")
    print("  round   genes   points  max/gene  bytes/site")
    for r in rows:
        print(f"  {r[0]:<5} {r[1]:7d} {r[2]:8d} {r[3]:8d} {r[4]:11d}")
    total = sum(r[4] for r in rows)
    print(f"  total {total / 1e6:.1f} MB per site, {total / len(g):.0f} B per gene; points "
          f"per gene mean {gene['evaluated'].mean():.1f}, max {gene['evaluated'].max()}")
    bm = g.baseMean.to_numpy()
    final = np.where(g.dispOutlier.to_numpy(), gene["disp"], mp["disp"])
    for label, ours, ref in (("dispGeneEst", gene["disp"], g.dispGeneEst),
                             ("dispMAP", mp["disp"], g.dispMAP),
                             ("dispersion", final, g.dispersion)):
        e = np.abs(ours - ref.to_numpy()) / ref.to_numpy()
        i, j = int(np.argmax(e)), int(np.argmax(np.where(bm >= 1, e, -1)))
        print(f"  {label}: worst {e[i]:.2e} ({g.gene[i]}), baseMean >= 1 {e[j]:.2e} "
              f"({g.gene[j]}); genes > 1e-6: {(e > 1e-6).sum()}, > 1e-3 with baseMean >= 1: "
              f"{((e > 1e-3) & (bm >= 1)).sum()}")


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for folder in sorted(d for d in root.iterdir() if (d / "genes.csv.gz").exists()):
        run(folder, prefetch="--no-prefetch" not in sys.argv)
