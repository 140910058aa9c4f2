"""Generated inputs for make_refs.R (run once from the repository root; outputs committed).

    python tests/data/r_extra/real/make_data.py

demo3/: fed_de's demo generator, 60 samples x 1,500 genes, seed 13, ``~ batch + condition``
(batch b1/b2/b3, condition A/B). Genes G00101..G00106 have every count of the b2 and b3
samples set to 0, so the contrast batch b3 vs b2 compares two all-zero groups there (DESeq2
sets LFC 0, stat 0, p-value 1). ``site`` in metadata.csv is the hospital each sample came from.

demo3_age/: the same samples with a numeric covariate ``age`` (integers 25..75) and a true age
effect on 80 genes (G00201..G00280), made by binomial thinning of the demo3 counts: a thinned
negative binomial stays negative binomial with the same dispersion and its mean times the
keep probability, ``2 ** (-|b| * (age - 25))`` for b > 0 (a fall with age) or
``2 ** (-|b| * (75 - age))`` for b < 0 (a rise), |b| in 0.01..0.04 log2 per year.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from fed_de.demo_data import make_demo_study

OUT = Path(__file__).resolve().parent
ZEROED = [f"G{i:05d}" for i in range(101, 107)]
AGE_GENES = [f"G{i:05d}" for i in range(201, 281)]


def write_site(folder: Path, counts: pd.DataFrame, meta: pd.DataFrame) -> None:
    """Site layout, gzipped: counts.csv.gz (samples x genes) and metadata.csv.gz."""
    folder.mkdir(exist_ok=True)
    counts.index.name = "sample"
    meta.index.name = "sample"
    counts.to_csv(folder / "counts.csv.gz")
    meta.to_csv(folder / "metadata.csv.gz")


def main() -> None:
    study = make_demo_study(n_samples=60, n_genes=1500, seed=13)
    pooled = study.pooled()
    counts = pd.DataFrame(np.asarray(pooled.X), index=pooled.obs_names, columns=pooled.var_names)
    meta = pooled.obs[["batch", "condition"]].copy()
    meta["site"] = np.concatenate([[n] * s.n_obs for n, s in study.sites.items()])
    in_b23 = meta["batch"].isin(["b2", "b3"]).to_numpy()
    counts.loc[in_b23, ZEROED] = 0
    write_site(OUT / "demo3", counts, meta)

    rng = np.random.default_rng(1313)
    age = rng.integers(25, 76, size=len(meta))
    slope = rng.uniform(0.01, 0.04, len(AGE_GENES)) * rng.choice([-1.0, 1.0], len(AGE_GENES))
    years = np.where(slope[None, :] > 0, age[:, None] - 25, 75 - age[:, None])
    keep = 2.0 ** (-np.abs(slope)[None, :] * years)
    thinned = counts.copy()
    thinned[AGE_GENES] = rng.binomial(counts[AGE_GENES].to_numpy(), keep)
    meta_age = meta.copy()
    meta_age.insert(0, "age", age)
    write_site(OUT / "demo3_age", thinned, meta_age)
    truth = pd.DataFrame({"age_log2_per_year": -slope}, index=pd.Index(AGE_GENES, name="gene"))
    truth.to_csv(OUT / "demo3_age" / "age_truth.csv")


if __name__ == "__main__":
    main()
