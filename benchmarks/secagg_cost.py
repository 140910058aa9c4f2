"""CPU and bytes of a default federated run with and without secure aggregation.

``python benchmarks/secagg_cost.py [GENES]``: the demo study (150 samples, 3 hospitals,
``~ batch + condition``), best CPU of two in-process runs each way, bytes per gene per site.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import fed_de
from fed_de.demo_data import make_demo_study


def measure(n_genes: int = 2000) -> dict:
    """Best-of-two CPU seconds, steps and bytes per gene, secure and plain."""
    study = make_demo_study(n_samples=150, n_genes=n_genes, seed=0)
    out = {}
    for secure in (True, False):
        best, res = None, None
        for _ in range(2):
            start = time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = fed_de.deseq2(study.sites, study.design, levels=study.levels,
                                    secure_aggregation=secure)
            cpu = time.process_time() - start
            best = cpu if best is None else min(best, cpu)
        f = res.facts
        per_gene = 1e3 * n_genes
        out["secure" if secure else "plain"] = {
            "cpu_s": round(best, 2), "steps": f["sequential_steps"],
            "sent_KB_per_gene_per_site": round(
                next(iter(f["bytes_sent_by_site"].values())) / per_gene, 1),
            "payload_KB_per_gene_per_site": round(
                next(iter(f["payload_bytes_by_site"].values())) / per_gene, 1),
            "aggregator_KB_per_gene": round(f["bytes_sent_by_aggregator"] / per_gene, 1)}
    return out


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 2000), indent=1))
