"""A study on a remote Substra network (hospitals hold their data; see docker/README.md).

    python examples/remote/run_remote.py credentials.yaml keys.yaml genes.txt
"""

import sys
from pathlib import Path

import fed_de

credentials, keys, genes = sys.argv[1], sys.argv[2], Path(sys.argv[3]).read_text().split()
res = fed_de.deseq2(
    None,                                        # the data stays at the hospitals
    design="~ batch + condition",
    levels={"condition": ["A", "B"], "batch": ["b1", "b2", "b3"]},
    genes=genes,
    contrasts=[("condition", "B", "A")],
    backend="remote", credentials=credentials, keys=keys, timeout=4 * 3600,
    workdir="remote_run",
)
res.results().to_csv("results.csv")
print(res.facts)
