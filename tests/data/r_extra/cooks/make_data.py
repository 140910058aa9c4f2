"""Injected-outlier dataset for Cook's tests (run once; the CSVs are committed).

30 samples, 300 genes, ``~ batch + condition``: cells (b1, A) and (b1, B) hold 10 samples
(replaceable: >= 7), (b2, A) and (b2, B) hold 5 (Cook's counted, not replaceable). Outliers
are injected in both kinds of cells, plus a gene whose only non-zero count is an outlier.
``site`` splits the samples over 3 sites.
"""
import numpy as np
import pandas as pd

rng = np.random.default_rng(2026)
n_genes = 300
batch = ["b1"] * 20 + ["b2"] * 10
cond = (["A"] * 10 + ["B"] * 10) + (["A"] * 5 + ["B"] * 5)
samples = [f"s{i + 1}" for i in range(30)]
meta = pd.DataFrame({"batch": batch, "condition": cond}, index=samples)
meta["site"] = rng.permutation(np.repeat(["h1", "h2", "h3"], 10))
mean = np.exp(rng.uniform(np.log(5), np.log(2000), n_genes))
lfc = np.where(rng.random(n_genes) < 0.2, rng.normal(0, 1.2, n_genes), 0.0)
bfx = rng.normal(0, 0.3, n_genes)
disp = 0.05 + 2.0 / mean
sf = np.exp(rng.normal(0, 0.25, 30))
mu = (sf[:, None] * mean[None, :] * np.exp((meta.condition == "B").to_numpy()[:, None] * lfc
      + (meta.batch == "b2").to_numpy()[:, None] * bfx))
counts = rng.negative_binomial(1.0 / disp, 1.0 / (1.0 + disp * mu)).astype(int)
genes = [f"g{i + 1}" for i in range(n_genes)]
# outliers in replaceable cells (b1): genes 1-6; in non-replaceable cells (b2): genes 7-10
for g, s in [(0, 0), (1, 3), (2, 12), (3, 17), (4, 5), (5, 14), (6, 20), (7, 23), (8, 26),
             (9, 29)]:
    counts[s, g] = int(counts[:, g].max() * 8 + 50)
# a gene whose only non-zero count is an outlier: zero after replacement
counts[:, 10] = 0
counts[2, 10] = 500
pd.DataFrame(counts, index=samples, columns=genes).to_csv("counts.csv")
meta.to_csv("metadata.csv")
