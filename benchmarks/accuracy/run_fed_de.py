"""Run fed_de on the real studies and keep its state for the step-by-step comparison with R.

    python benchmarks/accuracy/run_fed_de.py [OUTDIR]     (default /work/scratch/accuracy_data)

Runs (Wald, Cook's on, parametric trend, ``alpha=0.05``):
  pasilla_one     pasilla ``~ type + condition``, one site
  marioni_one     marioni ``~ run + tissue``, one site
  marioni_split   marioni over two sites: the first 5 and the last 5 samples of counts.csv
  pasilla_lrt     pasilla LRT reduced ``~ 1`` (the shared R reference)
  pasilla_lrt_type  pasilla LRT reduced ``~ type`` (tests/data/r_extra/real)
  marioni_nocooks   marioni one site and split with ``cooks=False`` (the Cook's stage restarts
                    the dispersion-search states; these keep them): marioni_nocooks_one_split.pkl
``min_cell_size=0`` everywhere: one-site runs send nothing, and the split is a diagnosis only.
Each run is pickled as {"state", "facts", "genes", "coef_names", "results"} in OUTDIR/<name>.pkl,
and its gene-level table is written to OUTDIR/fed_<name>.csv.gz (what r_internals.R reads), with
OUTDIR/fed_<name>_trend.json; for one-site runs also OUTDIR/fed_<name>_mu.csv.gz, the means of
the dispersion fit (genes x samples, DESeq2's ``minmu`` floor 0.5 applied), rebuilt from the
state's IRLS coefficients and the size factors.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import fed_de

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "r_extra" / "real"
STUDIES = {
    "pasilla": ("~ type + condition", ("condition", "treated", "untreated")),
    "marioni": ("~ run + tissue", ("tissue", "Liver", "Kidney")),
}


def load(study: str) -> ad.AnnData:
    """The study as one AnnData (samples x genes), metadata columns as strings."""
    counts = pd.read_csv(DATA / study / "counts.csv.gz", index_col=0)
    meta = pd.read_csv(DATA / study / "metadata.csv", index_col=0).loc[counts.index]
    return ad.AnnData(X=counts.to_numpy(), obs=meta.astype(str),
                      var=pd.DataFrame(index=counts.columns.astype(str)))


def run(name: str, sites: dict, design: str, contrast, **kw) -> dict:
    res = fed_de.deseq2(sites, design, contrasts=[contrast], alpha=0.05, min_cell_size=0, **kw)
    out = {"state": res.state, "facts": {k: v for k, v in res.facts.items() if k != "messages"},
           "genes": res.genes, "coef_names": list(res.study.coef_names),
           "results": res.results(), "design": design, "kw": kw}
    print(f"{name}: steps {res.facts.get('sequential_steps')}, "
          f"calls {(out['results'].padj < 0.05).sum()}", flush=True)
    return out


def design_matrix(obs: pd.DataFrame, coef_names: list[str]) -> np.ndarray:
    """Treatment-coded design from R-style names ``<var>_<level>_vs_<ref>`` (and Intercept)."""
    cols = []
    for name in coef_names:
        if name == "Intercept":
            cols.append(np.ones(len(obs)))
            continue
        for var in obs.columns:
            if name.startswith(var + "_"):
                level = name[len(var) + 1:].split("_vs_")[0]
                cols.append((obs[var].astype(str) == level).to_numpy(float))
                break
        else:
            raise ValueError(f"cannot rebuild coefficient {name!r}")
    return np.column_stack(cols)


def export(name: str, out: dict, outdir: Path, adata: ad.AnnData | None) -> None:
    """Gene-level CSV, trend JSON and (one site) the dispersion-fit means."""
    s, genes = out["state"], out["genes"]
    table = pd.DataFrame({
        "base_mean": s["base_mean"], "all_zero": s["all_zero"], "alpha_init": s["alpha_init"],
        "disp_gene": s["disp_gene"], "disp_fit": s["disp_fit"], "disp_map": s["disp_map"],
        "dispersion": s["dispersion"], "disp_outlier": s["disp_outlier"],
        "deviance": s["deviance"], "beta_converged": s["beta_converged"],
        "refitted_optim": s["refitted_optim"], "cooks_outlier": s["cooks_outlier"],
            }, index=pd.Index(genes, name="gene"))
    for j, c in enumerate(out["coef_names"]):
        table[f"beta_{c}"] = s["beta"][:, j]
        table[f"se_{c}"] = np.sqrt(s["beta_cov"][:, j, j])
    res = out["results"]
    for c in res.columns:
        table[f"res_{c}"] = res[c].to_numpy()
    table.to_csv(outdir / f"fed_{name}.csv.gz", float_format="%.17g")
    trend = {"trend_type": str(s["trend_type"]),
             "trend_coefficients": np.asarray(s["trend_coefficients"]).tolist(),
             "var_log_disp_ests": float(s["var_log_disp_ests"]),
             "disp_prior_var": float(s["disp_prior_var"]), "linear_mu": bool(s["linear_mu"]),
             "steps": out["facts"].get("sequential_steps")}
    (outdir / f"fed_{name}_trend.json").write_text(json.dumps(trend, indent=1))
    if adata is None:
        return
    sf = fed_de.size_factors({"one": adata}, min_cell_size=0).size_factors["one"]
    X = design_matrix(adata.obs, out["coef_names"])
    # The Cook's refit stage restarts irls_mu, so the final state has lost the dispersion-fit
    # coefficients; the same run without Cook's keeps them (Cook's acts after the dispersions).
    plain = fed_de.deseq2({"one": adata}, out["design"], min_cell_size=0, cooks=False,
                          **out["kw"]).state
    assert np.array_equal(plain["disp_gene"], s["disp_gene"], equal_nan=True)
    beta = np.nan_to_num(plain["irls_mu"]["beta"])
    if s["linear_mu"]:
        raise NotImplementedError("cell-means designs: rebuild mu from beta_lin")
    mu = np.maximum(sf.to_numpy()[:, None] * np.exp(X @ beta.T), 0.5)
    pd.DataFrame(mu.T, index=pd.Index(genes, name="gene"), columns=adata.obs_names).to_csv(
        outdir / f"fed_{name}_mu.csv.gz", float_format="%.17g")
    sf.to_csv(outdir / f"fed_{name}_sf.csv", float_format="%.17g")


def main(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    jobs = {}
    for study, (design, contrast) in STUDIES.items():
        jobs[f"{study}_one"] = ({"one": load(study)}, design, contrast, {})
    mar = load("marioni")
    jobs["marioni_split"] = ({"a": mar[:5].copy(), "b": mar[5:].copy()}, STUDIES["marioni"][0],
                             STUDIES["marioni"][1], {})
    pas = load("pasilla")
    for red, tag in (("~ 1", "pasilla_lrt"), ("~ type", "pasilla_lrt_type")):
        jobs[tag] = ({"one": pas}, STUDIES["pasilla"][0], STUDIES["pasilla"][1],
                     {"test": "LRT", "reduced": red})
    jobs["marioni_nocooks"] = None  # one site and the split, Cook's off: searches kept
    only = sys.argv[2:] or list(jobs)
    for name in only:
        if name == "marioni_nocooks":
            # the Cook's stage restarts the search states; without it they survive
            pair = [fed_de.deseq2(s, STUDIES["marioni"][0], min_cell_size=0, cooks=False).state
                    for s in ({"one": mar}, {"a": mar[:5].copy(), "b": mar[5:].copy()})]
            with open(outdir / "marioni_nocooks_one_split.pkl", "wb") as fh:
                pickle.dump({"one": pair[0], "split": pair[1], "genes": list(mar.var_names)},
                            fh)
            continue
        sites, design, contrast, kw = jobs[name]
        out = run(name, sites, design, contrast, **kw)
        with open(outdir / f"{name}.pkl", "wb") as fh:
            pickle.dump(out, fh)
        export(name, out, outdir, sites["one"] if len(sites) == 1 else None)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/scratch/accuracy_data"))
