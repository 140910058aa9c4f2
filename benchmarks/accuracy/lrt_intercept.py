"""How much DESeq2's closed-form intercept-only fit moves the LRT against ``~ 1`` (pasilla).

    python benchmarks/accuracy/lrt_intercept.py [FULLDIR]

DESeq2's ``fitNbinomGLMs`` does not fit an intercept-only model: it sets the intercept to
``log2(mean of normalised counts)`` (``justIntercept``), so the reduced deviance of
``nbinomLRT(reduced = ~ 1)`` is taken at ``mu = s * baseMean``, not at the NB maximum. This
script recomputes, with R's own dispersions, the reduced deviance both ways and the LRT calls
(chi-square with 2 df, fed_de's independent filtering and BH, alpha 0.05): the shift each gene
gets from R's rule and how many calls the rule alone changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import gammaln
from scipy.stats import chi2

from fed_de.core.testing import independent_filtering

REAL = Path(__file__).resolve().parents[2] / "tests" / "data" / "r_extra" / "real" / "pasilla"
SHARED = Path("/work/shared/data/real_pasilla/ref_deseq2_1.38.3")


def nb_dev(y, mu, alpha):
    """-2 log-likelihood per gene (rows), as DESeq2 (dnbinom, mu parametrisation)."""
    r = 1.0 / alpha[:, None]
    ll = (gammaln(y + r) - gammaln(r) - gammaln(y + 1) + r * np.log(r / (r + mu))
          + y * np.log(mu / (r + mu)))
    return -2 * ll.sum(axis=1)


def intercept_mle(y, sf, alpha, start, iters=50):
    """NB maximum-likelihood intercept (log scale) with offsets log(sf), by Newton."""
    b = np.log(start)
    for _ in range(iters):
        mu = sf[None, :] * np.exp(b)[:, None]
        w = mu / (1 + alpha[:, None] * mu)
        score = ((y - mu) / (1 + alpha[:, None] * mu)).sum(axis=1)
        b = b + score / w.sum(axis=1)
    return b


def main(full: Path) -> None:
    counts = pd.read_csv(REAL / "counts.csv.gz", index_col=0)
    sf = pd.read_csv(SHARED / "size_factors.csv.gz", index_col=0)["size_factor"]
    sf = sf.loc[counts.index].to_numpy()
    res = pd.read_csv(SHARED / "results_lrt.csv.gz", index_col=0)
    disp = pd.read_csv(full / "pasilla" / "default.csv.gz", index_col=0)["dispersion"]
    genes = disp.index
    y = counts[genes].to_numpy(float).T
    alpha = disp.to_numpy()
    bm = res.loc[genes, "baseMean"].to_numpy()
    dev_r = nb_dev(y, sf[None, :] * bm[:, None], alpha)
    b = intercept_mle(y, sf, alpha, bm)
    dev_mle = nb_dev(y, sf[None, :] * np.exp(b)[:, None], alpha)
    shift = dev_r - dev_mle  # >= 0: R's reduced deviance is above the maximum's
    stat_r = res.loc[genes, "stat"].to_numpy()
    stat_mle = stat_r - shift
    p_mle = pd.Series(chi2.sf(np.maximum(stat_mle, 0), 2), index=genes)
    pv = res["pvalue"].copy()
    pv.loc[genes] = np.where(np.isnan(pv.loc[genes]), np.nan, p_mle)
    padj_mle, info = independent_filtering(res["baseMean"].to_numpy(), pv.to_numpy(), 0.05)
    padj_r = res["padj"].to_numpy()
    call_r = np.nan_to_num(padj_r, nan=1) < 0.05
    call_mle = np.nan_to_num(padj_mle, nan=1) < 0.05
    g = "FBgn0000078"
    i = list(genes).index(g)
    print(f"reduced-deviance shift from R's closed-form intercept: median {np.median(shift):.3g},"
          f" max {shift.max():.3g}; genes with shift > 1e-3: {(shift > 1e-3).sum()} of "
          f"{len(genes)}")
    print(f"{g}: R stat {stat_r[i]:.6g}, with the NB maximum {stat_mle[i]:.6g}")
    print(f"calls (padj < 0.05): R {call_r.sum()}, with the NB maximum {call_mle.sum()}, "
          f"differing {(call_r != call_mle).sum()}; filter threshold R "
          f"{res.loc[res.padj.notna(), 'baseMean'].min():.6g}, with the maximum "
          f"{info['filterThreshold']:.6g}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/scratch/rrefs_full"))
