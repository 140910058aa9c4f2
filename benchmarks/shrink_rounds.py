"""Rounds needed by the shrinkage and PCA maths on the demo study (no timing).

    python benchmarks/shrink_rounds.py [n_samples] [n_genes]

Runs fed_de's federated DESeq2 on the 3-hospital demo, then, with the sums taken per site:
apeglm's posterior mode from the MLE (max error to the converged mode after each round),
the normal prior's Newton on DESeq2's ridge-IRLS fixed point (genes still moving after each
round, distance to DESeq2's own IRLS path), and the PCA subspace iteration (error to the pooled
SVD after each round, several block sizes).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

import fed_de
from fed_de.core import apeglm as ap
from fed_de.core import nb, pca
from fed_de.core import normal_prior as npr
from fed_de.core import vst as vs
from fed_de.demo_data import make_demo_study

LN2 = np.log(2.0)


def main(n_samples: int = 150, n_genes: int = 5000) -> None:
    study = make_demo_study(n_samples=n_samples, n_genes=n_genes, seed=0)
    res = fed_de.deseq2(study.sites, study.design, levels=study.levels,
                        contrasts=[("condition", "B", "A")])
    sfr = fed_de.size_factors(study.sites, levels=study.levels)
    names = list(study.sites)
    data = []
    for name in names:
        a = study.sites[name]
        ob = a.obs
        X = np.column_stack([np.ones(len(ob)), ob.batch == "b2", ob.batch == "b3",
                             ob.condition == "B"]).astype(float)
        data.append((np.asarray(a.X, float), X, sfr.size_factors[name].to_numpy()))
    s = res.gene_results
    beta, disp, j = s.beta, s.dispersions.final, 3
    ok = ~s.all_zero & np.isfinite(beta).all(axis=1)
    table = res.results()
    scale = ap.apeglm_prior(LN2 * table.log2FoldChange.to_numpy()[ok],
                            LN2 * table.lfcSE.to_numpy()[ok])
    info = np.full((len(beta), nb.n_packed(4)), np.nan)
    info[ok] = nb.pack(np.linalg.inv(s.beta_cov[ok]))
    st = ap.newton_init(np.where(ok[:, None], beta, np.nan), xtwx=info, shrink=j, scale=scale)
    hist = []
    while st["active"].any() and st["rounds"] < 30:
        parts = [ap.nb_loglik_grad_hess(y, X, np.log(sf), st["candidates"], disp)
                 for y, X, sf in data]
        ll, g, h = (sum(p[i] for p in parts) for i in range(3))
        st = ap.penalised_newton_step(st, ll, g, h, j, scale)
        hist.append(st["beta"].copy())
    err = [np.nanmax(np.abs(b - st["beta"])[st["fitted"]]) for b in hist]
    err_j = [np.nanmax(np.abs(b - st["beta"])[st["fitted"], j]) for b in hist]
    print(f"apeglm ({n_samples} x {n_genes}, scale {scale:.4f}): {st['rounds']} rounds until "
          "every gene stopped; max error after each round, all coefficients:",
          " ".join(f"{e:.1e}" for e in err), "; shrunk coefficient:",
          " ".join(f"{e:.1e}" for e in err_j))

    # normal prior: Newton on the ridge-IRLS fixed point, standard design
    keep = ok
    y_all = np.vstack([d[0] for d in data])[:, keep]
    X_all = np.vstack([d[1] for d in data])
    sf_all = np.concatenate([d[2] for d in data])
    var = npr.normal_prior_var(beta[keep] / LN2, s["base_mean"][keep], s["disp_fit"][keep])
    lam = npr.ridge_lambda(var)
    xtwx = info[keep]
    stn = npr.ridge_newton_init(beta[keep], lam, xtwx=xtwx)
    moving = []
    while stn["active"].any() and stn["rounds"] < 30:
        parts = [npr.ridge_fixed_point_summands(y[:, keep], X, np.log(sf), stn["candidates"],
                                                disp[keep]) for y, X, sf in data]
        stn = npr.ridge_newton_step(stn, {k: sum(p[k] for p in parts) for k in parts[0]}, lam)
        moving.append(int(stn["active"].sum()))
    ylog = np.log(y_all / sf_all[:, None] + 0.1)
    b0 = npr.ridge_irls_start(X_all.T @ X_all, ylog.T @ X_all, np.log(s["base_mean"][keep]))
    ref = npr.ridge_irls_pooled(y_all, X_all, sf_all, disp[keep], lam, b0)
    print(f"normal: {stn['rounds']} rounds (DESeq2's IRLS from its start: {ref['rounds']}); "
          "genes still moving after each round:", moving,
          f"; max |LFC - DESeq2 IRLS| {np.abs(stn['beta'] - ref['beta']).max() / LN2:.1e}")

    # PCA
    c = s["trend_coefficients"]
    xs = [vs.vst(y, sf, "parametric", c) for y, _, sf in data]
    shift = vs.vst_parametric(s["base_mean"], *c)
    tot: dict = {}
    for m in (pca.vst_moments(x, shift) for x in xs):
        for k, v in m.items():
            tot[k] = tot.get(k, 0) + v
    top = pca.top_variable(tot, shift, 500)
    pooled = pca.pca_pooled(np.vstack(xs), 500, 3)
    for k in (2, 3):
        for b in (k, k + 2, 10, 20, 30):
            V = pca.subspace_start(len(top["genes"]), b)
            errs = []
            for _ in range(15):
                CV = sum(pca.cov_product(x[:, top["genes"]], top["mean"], V) for x in xs)
                up = pca.subspace_update(V, CV, k)
                V = up["V"]
                errs.append(max(np.abs(up["axes"] - pooled["axes"][:, :k]).max(),
                                np.abs(up["values"] / pooled["values"][:k] - 1).max()))
            n_ok = next((i + 1 for i, e in enumerate(errs) if e < 1e-6), None)
            print(f"PCA k={k} block={b}: rounds to 1e-6: {n_ok}; "
                  f"{500 * b * 8 / 1024:.0f} KiB per site per round")
    print(pd.Series(pooled["percent_var"], index=["PC1", "PC2", "PC3"]).round(4).to_dict())


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
