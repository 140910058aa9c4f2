"""Federated DESeq2 in the strict in-process simulation (the default backend).

    python examples/simulation.py
"""

import fed_de
from fed_de.demo_data import make_demo_study

study = make_demo_study(n_samples=150, n_genes=2000, seed=0)  # three hospitals
res = fed_de.deseq2(
    study.sites,                     # {"hospital_a": AnnData, ...}; paths work too
    design=study.design,             # "~ batch + condition"
    levels=study.levels,             # declared by the study, reference level first
    genes=study.genes,
    contrasts=[("condition", "B", "A")],
)
table = res.results()
print(table.sort_values("padj").head(10))
print(res.results(("batch", "b3", "b2")).head())          # another contrast, no new round
print(res.dispersions.head())
print({k: res.facts[k] for k in ("sequential_steps", "tasks", "bytes_per_gene_by_site")})

lrt = fed_de.deseq2(study.sites, study.design, levels=study.levels, genes=study.genes,
                    test="LRT", reduced="~ batch")
print(lrt.results().head())
