"""Export the accuracy tests' demo study (120 samples, seed 0, genes with mean normalised
count >= 5 by PyDESeq2's size factors) for make_refs.R; the counts are not kept here: the
tests rebuild them with fed_de.demo_data and check counts_sha256.txt first.

Run from the repository root: PYTHONPATH=. python tests/data/r_extra/demo120/make_data.py
"""

import hashlib
from pathlib import Path

import numpy as np

from tests.test_deseq2_accuracy import demo_counts, expressed_genes, pydeseq2_pooled

HERE = Path(__file__).parent

if __name__ == "__main__":
    _, counts, meta = demo_counts()
    dds, _ = pydeseq2_pooled(counts, meta, "~batch + condition", ("condition", "B", "A"))
    counts = counts[expressed_genes(counts, dds.obs["size_factors"].to_numpy())]
    counts.T.to_csv(HERE / "counts.csv")
    meta.to_csv(HERE / "metadata.csv")
    digest = hashlib.sha256(np.ascontiguousarray(counts.to_numpy(np.int64))).hexdigest()
    (HERE / "counts_sha256.txt").write_text(digest + "\n")
