"""Bytes a site uploads per gene over a whole Cook's-on run, per step (issue 15's 6 KB goal),
and what it receives.

    python benchmarks/bytes_per_gene.py                      # ~ condition, 150 x 2,000
    python benchmarks/bytes_per_gene.py "~ batch + condition"

Prints the sequential steps, the largest site's bytes sent per gene (pickled masked messages,
as run.json's ``bytes_sent_by_site``), and each step's bytes per gene per site
(``bytes_by_step[...]["sent"]`` is already per site), and the bytes per gene the site that
received most read from the aggregator (``bytes_received_by_site``).
"""

from __future__ import annotations

import argparse
import warnings

import fed_de
from fed_de.demo_data import make_demo_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("design", nargs="?", default="~ condition")
    parser.add_argument("--samples", type=int, default=150)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    study = make_demo_study(n_samples=args.samples, n_genes=args.genes, seed=args.seed)
    used = [name for name in study.levels if name in args.design]
    res = fed_de.deseq2(study.sites, args.design,
                        levels={k: study.levels[k] for k in used})
    facts = res.facts
    per_gene = max(facts["bytes_sent_by_site"].values()) / args.genes
    received = max(facts["bytes_received_by_site"].values()) / args.genes
    print(f"{args.design}: {facts['sequential_steps']} steps, {per_gene:.1f} bytes/gene/site "
          f"sent, {received:.1f} received")
    for step, v in facts["bytes_by_step"].items():
        print(f"  {step:40s} {v['sent'] / args.genes:9.1f}")


if __name__ == "__main__":
    main()
