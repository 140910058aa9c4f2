"""The same strategy on substra's subprocess backend: one organisation per hospital plus the
aggregator, real registered functions, datasets and tasks (~1.5 s per task).

    python examples/subprocess_backend.py
"""

import shutil
from pathlib import Path

import fed_de
from fed_de.demo_data import make_demo_study

study = make_demo_study(n_samples=48, n_genes=200, seed=1)
workdir = Path("substra_run")
res = fed_de.deseq2(study.sites, "~ condition", levels={"condition": ["A", "B"]},
                    genes=study.genes, backend="subprocess", workdir=workdir)
print(res.results().sort_values("padj").head())
print(res.facts)
sim = fed_de.deseq2(study.sites, "~ condition", levels={"condition": ["A", "B"]},
                    genes=study.genes)
diff = (res.results() - sim.results()).abs().max()
print("max difference to the simulation:\n", diff)
shutil.rmtree(workdir)  # site folders, wheel, substra's local worker files
