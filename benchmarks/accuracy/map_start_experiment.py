"""Experiment: fed_de with DESeq2's MAP start (dispInit), calls against R (no fed_de change).

    python benchmarks/accuracy/map_start_experiment.py [MAP_ROUNDS ...]

Monkeypatches ``fed_de.steps.dispersions.finish_genewise`` in this process so that the MAP
search starts at log(dispInit), dispInit = disp_gene if disp_gene > 0.1 * disp_fit else
disp_fit (DESeq2's ``estimateDispersionsMAP``) instead of the gene-wise search's last point.
The objective at that start is unknown at the aggregator, so the start is given f = -inf and
no step: the first MAP round evaluates it (three copies), later rounds take Newton steps.
Prints the differing calls against R (every gene, alpha 0.05) for each MAP round count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import fed_de.steps.dispersions as disp
import numpy as np
import pandas as pd

import fed_de

REAL = Path(__file__).resolve().parents[2] / "tests" / "data" / "r_extra" / "real"
STUDIES = {"pasilla": ("~ type + condition", ("condition", "treated", "untreated")),
           "marioni": ("~ run + tissue", ("tissue", "Liver", "Kidney"))}
_original = disp.finish_genewise


def finish_with_dispinit(state: dict, p: int, fit_type: str) -> None:
    _original(state, p, fit_type)
    gene, fit = state["disp_gene"], state["disp_fit"]
    init = np.where(gene > 0.1 * fit, gene, fit)
    init = np.where(np.isnan(init), fit, init)
    x = np.nan_to_num(np.log(init))
    ms = state["map_search"]
    done = state["all_zero"].copy()
    state["map_search"] = {"x": x, "f": np.where(done, ms["f"], -np.inf),
                           "g": np.zeros_like(x), "h": -np.ones_like(x),
                           "radius": np.full(x.shape, 3.0), "done": done}


def load(study: str) -> ad.AnnData:
    counts = pd.read_csv(REAL / study / "counts.csv.gz", index_col=0)
    meta = pd.read_csv(REAL / study / "metadata.csv", index_col=0).loc[counts.index]
    return ad.AnnData(X=counts.to_numpy(), obs=meta.astype(str),
                      var=pd.DataFrame(index=counts.columns))


def main(rounds: list[int]) -> None:
    disp.finish_genewise = finish_with_dispinit
    for study, (design, contrast) in STUDIES.items():
        calls = pd.read_csv(REAL / study / "calls.csv.gz", index_col=0)
        r_call = (calls["default_call"] != 0).to_numpy()
        r_na = (calls["default_padjNA"] == 1).to_numpy()
        for k in rounds:
            res = fed_de.deseq2({"one": load(study)}, design, contrasts=[contrast], alpha=0.05,
                                min_cell_size=0, rounds={"map": k})
            out = res.results().loc[calls.index]
            ours = (out["padj"] < 0.05).to_numpy()
            print(f"{study}: MAP rounds {k} ({res.facts['sequential_steps']} steps): differing "
                  f"calls {(ours != r_call).sum()} of {len(calls)} genes, padj NA pattern "
                  f"differing {(out['padj'].isna().to_numpy() != r_na).sum()}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [3, 4, 5])
