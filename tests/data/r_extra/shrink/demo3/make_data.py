"""The demo3 input of make_refs.R: fed_de's demo study, 48 samples x 400 genes, pooled."""

from pathlib import Path

import numpy as np
import pandas as pd

from fed_de.demo_data import make_demo_study

out = Path(__file__).parent
adata = make_demo_study(n_samples=48, n_genes=400, seed=3).pooled()
counts = pd.DataFrame(np.asarray(adata.X), index=adata.obs_names, columns=adata.var_names)
counts.to_csv(out / "counts.csv.gz", index_label="sample")
adata.obs[["condition", "batch"]].to_csv(out / "metadata.csv", index_label="sample")
