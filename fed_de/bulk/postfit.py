"""The post-fit phase: LFC shrinkage (:mod:`.shrink`) and VST + PCA (:mod:`.pca`) in the same
rounds, after the fit (and the Cook's refit) has given every gene's final coefficients.

Each round is one site task whose message carries a part per computation still running
(:class:`PostFitSums`), then one aggregation that runs each computation's step. The phase
has ``max(shrink rounds, PCA rounds)`` rounds; its opening steps (priors, first candidates,
the VST the sites apply) run in the fit's last aggregation, so the phase adds exactly two
sequential steps per round:

=======  ================================  =====================================
round    shrinkage (``shrink_rounds``)     PCA (``pca_rounds`` + 2)
=======  ================================  =====================================
1        sums at the candidates            VST moments -> top genes
2..m+1   sums at the candidates            ``Y^T Y V`` -> subspace update
m+2      (last shrink round: posterior)    coordinates (kept), centroid sums
=======  ================================  =====================================
"""

from __future__ import annotations

import numpy as np

from fed_de.bulk import pca as pca_steps
from fed_de.bulk import shrink as shrink_steps
from fed_de.bulk.pca import CentroidSums, CovProduct, VSTMoments
from fed_de.bulk.shrink import ApeglmSums, RidgeSums
from fed_de.bulk.state import DESeq2Options, GeneResults, PCAState, RunState, ShrinkFit, Site
from fed_de.core import apeglm
from fed_de.design import Study
from fed_de.federation.calls import call, site_step
from fed_de.federation.messages import Message, declared_shapes, part, zero_rows
from fed_de.federation.strategy import Phase, Round

#: PCA stages per round: its site computation and the aggregator step that reads it.
PCA_STEPS = {"moments": (pca_steps.site_moments, pca_steps.pca_select),
             "product": (pca_steps.site_product, pca_steps.pca_iterate),
             "coords": (pca_steps.site_centroids, pca_steps.pca_centroids)}


class PostFitSums(Message):
    """One post-fit round: a part per computation still running."""

    apeglm: ApeglmSums | None = part()
    normal: RidgeSums | None = part()
    moments: VSTMoments | None = part()
    product: CovProduct | None = part()
    centroids: CentroidSums | None = part()


@site_step
def postfit_sums(site: Site, shrink: ShrinkFit | None, pca: PCAState | None,
                 genes: GeneResults, with_shrink: bool = False,
                 pca_stage: str = "") -> PostFitSums:
    """The shrinkage sums (``with_shrink``) and the PCA stage's sums (``pca_stage``)."""
    out = PostFitSums()
    if with_shrink:
        s = shrink_steps.site_sums(site, shrink, genes)
        if shrink.type == "apeglm":
            out.apeglm = s
        else:
            out.normal = s
    if pca_stage:
        setattr(out, "centroids" if pca_stage == "coords" else pca_stage,
                PCA_STEPS[pca_stage][0](site, pca))
    if genes.withheld is not None:  # genes a disclosure rule withheld send nothing
        out = zero_rows(out, genes.withheld)
    return out


def shrink_rounds(options: DESeq2Options) -> int:
    """Rounds of the shrinkage search (0 without shrinkage)."""
    if not options.shrink:
        return 0
    return int(options.shrink_rounds) or shrink_steps.DEFAULT_ROUNDS[options.shrink]


def pca_stages(options: DESeq2Options) -> list[str]:
    """The PCA's stage in each round (none without PCA)."""
    if not options.pca:
        return []
    return ["moments", *["product"] * int(options.pca_rounds), "coords"]


def n_rounds(options: DESeq2Options) -> int:
    """Rounds of the post-fit phase."""
    return max(shrink_rounds(options), len(pca_stages(options)))


def phase(options: DESeq2Options) -> Phase | None:
    """The post-fit phase, or None when neither shrinkage nor PCA is asked for."""
    n_shrink, stages = shrink_rounds(options), pca_stages(options)
    if not n_shrink and not stages:
        return None
    opening = ([shrink_steps.shrink_begin] if n_shrink else []) + (
        [pca_steps.pca_begin] if stages else [])
    rounds = []
    for r in range(n_rounds(options)):
        stage = stages[r] if r < len(stages) else ""
        steps = []
        if r < n_shrink:
            steps.append(shrink_steps.shrink_step)
            if r == n_shrink - 1:
                steps.append(shrink_steps.shrink_finish)
        if stage:
            steps.append(PCA_STEPS[stage][1])
        rounds.append(Round(call(postfit_sums, with_shrink=r < n_shrink, pca_stage=stage),
                            steps))
    return Phase("postfit", opening=opening, rounds=rounds)


# -- message sizes ------------------------------------------------------------------------------
def dims(options: DESeq2Options, study: Study) -> dict[str, int]:
    """Upper bounds of the post-fit messages' sizes (requests announce the actual ones)."""
    n_targets = len(shrink_steps.decode_targets(options.shrink_coef)) or 1
    # candidates per gene of a search (apeglm's first round: 3, then its NEWTON_STEPS)
    per_target = max(3, len(apeglm.NEWTON_STEPS)) if options.shrink == "apeglm" else 3
    n_sel = min(int(options.pca_genes), len(study.genes))
    group = options.pca_group
    return {"KS": per_target * n_targets, "NS": n_sel, "PB": max(min(int(options.pca_block), n_sel),
                                                        int(options.pca_axes)),
            "PK": int(options.pca_axes), "L": len(study.levels[group]) if group else 1,
            "S": max(len(options.site_names), 1)}


def request_dims(state: RunState) -> dict[str, int]:
    """Sizes this round's request names: candidates per gene, selected genes, block, axes."""
    out = {}
    if state.shrink is not None:
        out["KS"] = state.shrink.candidates.shape[1]
    p = state.pca
    if p is not None:
        out["L"], out["S"] = len(p.levels), max(len(p.sites), 1)
        if p.V is not None:
            out["NS"], out["PB"] = p.V.shape
        if p.axes is not None:
            out["PK"] = p.axes.shape[1]
    return out


def payload_bytes(options: DESeq2Options, study: Study, n_samples: int | None = None) -> list:
    """Float64 payload each site sends per post-fit round (schema sizes; with secure
    aggregation each value travels as three 64-bit words). ``n_samples`` sets the PCA block
    as the run does (``min(pca_block, n - 1)``)."""
    d = dims(options, study)
    d.update(G=len(study.genes), p=study.n_coefs, T=study.n_coefs * (study.n_coefs + 1) // 2)
    if n_samples is not None:
        d["PB"] = max(d["PK"], min(d["PB"], int(n_samples) - 1))
    if not options.site_names:
        d["S"] = 0
    n_shrink, stages = shrink_rounds(options), pca_stages(options)
    sizes = {name: sum(int(np.prod(s)) for s in declared_shapes(cls, d).values()) * 8
             for name, cls in (("apeglm", ApeglmSums), ("normal", RidgeSums),
                               ("moments", VSTMoments), ("product", CovProduct),
                               ("coords", CentroidSums))}
    out = []
    for r in range(n_rounds(options)):
        b = sizes[options.shrink] if r < n_shrink else 0
        if r < len(stages):
            b += sizes[stages[r]]
        out.append(b)
    return out
