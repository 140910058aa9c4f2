"""Cook's distances, outlier flags and count replacement (DESeq2), federated from sums.

Robust dispersion and replacement values run on a side chain of the plan that starts after
the size factors and rejoins before the closing round, so they add no sequential step:

Start     agg  : groups: design cells with >= 3 samples (trim and scale by cell size) and
                 "all samples" (trim 0.2, only when some cell has >= 7 samples); ranks
                 (:func:`robust_start`)
Search A  site : per open (gene, group, bounding rank), counts / sums / sums of squares of
                 the site's normalised counts in each sub-interval (order-statistic search,
                 :mod:`fed_de.core.order_stats`)                          -> RobustSums
          agg  : refine the brackets (:func:`robust_refine`)
A parts   site : sums between the bounding values, counts below them      -> RobustParts
          agg  : trimmed cell means q, and the 0.2-trimmed mean (replacement)
Search B  as A, on the squared errors (x - q_cell)^2   -> trimmed cell variances
B parts   ...                                          -> robust dispersion per gene
Join      agg  : the main chain's last fit aggregation reads the side chain's result
                 (:func:`join`)
Closing round (:func:`cooks_counts`, part of :mod:`fed_de.bulk.closing`'s message): each site
computes its samples' Cook's distances with the global X'WX of the final fit and sends per-gene
*counts* of its samples above the cutoff (in cells of >= 3, non-replaceable among them, any
sample, replaced), and per-design-cell sums of its counts after replacing its own outliers (the
refit's starting sums). DESeq2's decisions follow at the aggregator (:func:`decide`).
A Cook's value, a maximum or a single sample's count never leaves a site.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fed_de.bulk.state import (
    CooksSetup,
    FitStart,
    GeneResults,
    Refit,
    RobustSearch,
    Site,
    Totals,
)
from fed_de.core import cooks, order_stats
from fed_de.core.irls import MIN_MU
from fed_de.core.moments import start_from_cell_sums
from fed_de.design import cell_design_rows
from fed_de.federation.calls import aggregator_step, site_step
from fed_de.federation.messages import Message, sums
from fed_de.federation.strategy import Phase, Round

K_THRESHOLDS = 7


def cooks_applicable(study) -> bool:
    """DESeq2 groups samples by identical design rows; fed_de does so for factor designs.

    With a continuous covariate every sample is taken as its own cell (DESeq2 agrees unless
    covariate values repeat exactly), so no Cook's filtering or replacement happens.
    """
    return bool(study.levels) and not study.continuous


class RobustSums(Message):
    """Sub-interval counts, sums and sums of squares for every open search target."""

    count: np.ndarray = sums("A", "K1")
    sum: np.ndarray = sums("A", "K1")
    sumsq: np.ndarray = sums("A", "K1")


class RobustParts(Message):
    """Per gene and group: sums between the two bounding values, counts below them."""

    sum_inside: np.ndarray = sums("G", "NG")
    n_le_lo: np.ndarray = sums("G", "NG")
    n_lt_hi: np.ndarray = sums("G", "NG")


class CooksCounts(Message):
    """Closing round: counts of samples above the cutoff, and the replaced counts' cell sums."""

    n_out: np.ndarray = sums("G")
    n_out_kept: np.ndarray = sums("G")
    n_any: np.ndarray = sums("G")
    n_replaced: np.ndarray = sums("G")
    cell_sum: np.ndarray = sums("G", "C")
    cell_sumsq: np.ndarray = sums("G", "C")
    cell_logsum: np.ndarray = sums("G", "C")


def open_targets(robust: RobustSearch) -> int:
    """Search targets still open: the size of the next :class:`RobustSums` (announced)."""
    return int((~robust.search["done"]).sum())


# -- side chain: exact trimmed statistics --------------------------------------------------
def _start_search(center: np.ndarray, groups_active: np.ndarray, decades: tuple) -> dict:
    G, T = center.size, 2 * groups_active.size
    done = np.broadcast_to(~np.repeat(groups_active, 2), (G, T)).copy()
    return {"thresholds": order_stats.scaled_thresholds(center, T, K_THRESHOLDS, *decades),
            "done": done, "state": None}


def _values(search: dict) -> np.ndarray:
    st = search["state"]
    G, T = search["done"].shape
    return st["value"] if st is not None else np.full((G, T), np.nan)


@aggregator_step(writes=("robust",))
def robust_start(totals: Totals, start: FitStart, study) -> dict:
    """Groups, their trims and bounding ranks; first thresholds."""
    n_cells = np.asarray(totals.cell_counts, dtype=float)
    n = int(round(totals.n_samples))
    p = study.n_coefs
    use_cells = (n_cells >= cooks.MIN_REPLICATES_COOKS) & (n > p)
    repl = bool((n_cells >= cooks.MIN_REPLICATES_REPLACE).any()) and n > p
    sizes = np.append(n_cells, n).astype(int)
    trims = [cooks.cell_trim(int(s))[0] for s in n_cells] + [cooks.REPLACE_TRIM]
    ranks = np.array([order_stats.trim_ranks(int(s), t) if s > 0 else (1, 1)
                      for s, t in zip(sizes, trims, strict=True)], dtype=float)
    active = np.append(use_cells, repl)
    return {"robust": RobustSearch(
        groups_active=active, ranks=ranks, n_cells=n_cells.size,
        scales=np.array([cooks.cell_trim(int(s))[1] for s in n_cells]), phase="A",
        search=_start_search(start.base_mean, active, (-2.0, 2.0)))}


def _robust_values(site: Site, robust: RobustSearch, totals: Totals) -> list[np.ndarray]:
    """Per group: the values searched (normalised counts, or squared errors in phase B)."""
    groups = site.cells()
    sf = site.kept.size_factors_raw / totals.sf_scale
    norm = site.counts() / sf[:, None]
    n_groups = robust.groups_active.size
    if robust.phase == "A":
        return [norm] * n_groups
    q = np.nan_to_num(robust.cell_means)
    out = [(norm - q[:, g][None, :]) ** 2 if (groups == g).any() else norm
           for g in range(n_groups - 1)]
    return [*out, norm]


@site_step
def robust_sums(site: Site, robust: RobustSearch, totals: Totals) -> RobustSums:
    """Sub-interval counts and sums for every open (gene, group, bounding rank)."""
    x = _robust_values(site, robust, totals)
    search = robust.search
    groups = site.cells()
    G, T, K = search["thresholds"].shape
    open_ = ~search["done"]
    full = {k: np.zeros((G, T, K + 1)) for k in ("count", "sum", "sumsq")}
    for g in range(T // 2):
        genes = np.flatnonzero(open_[:, 2 * g:2 * g + 2].any(axis=1))
        members = groups == g if g < T // 2 - 1 else np.ones(groups.size, dtype=bool)
        if genes.size == 0 or not members.any():
            continue
        part = order_stats.interval_sums(x[g][members][:, genes],
                                         search["thresholds"][genes, 2 * g:2 * g + 2])
        for key, value in part.items():
            full[key][genes, 2 * g:2 * g + 2] = value
    return RobustSums(**{k: v[open_] for k, v in full.items()})


@aggregator_step(writes=("robust",))
def robust_refine(sums: RobustSums, robust: RobustSearch) -> dict:
    """Scatter the open targets' sums back and refine their brackets."""
    search = robust.search
    G, T, K = search["thresholds"].shape
    open_ = ~search["done"]
    full = {}
    for key in ("count", "sum", "sumsq"):
        full[key] = np.zeros((G, T, K + 1))
        full[key][open_] = getattr(sums, key)
    ranks = np.broadcast_to(robust.ranks.reshape(1, T), (G, T))
    new = order_stats.refine(search["thresholds"], full, ranks, search["state"])
    return {"robust": replace(robust, search={"thresholds": new["thresholds"],
                                              "done": search["done"] | new["done"],
                                              "state": new})}


@site_step
def robust_parts(site: Site, robust: RobustSearch, totals: Totals) -> RobustParts:
    """Per gene and group: sums between the two bounding values, counts below them."""
    x = _robust_values(site, robust, totals)
    value = _values(robust.search)
    groups = site.cells()
    n_groups = value.shape[1] // 2
    G = value.shape[0]
    out = {k: np.zeros((G, n_groups)) for k in ("sum_inside", "n_le_lo", "n_lt_hi")}
    for g in range(n_groups):
        members = groups == g if g < n_groups - 1 else np.ones(groups.size, dtype=bool)
        if not robust.groups_active[g] or not members.any():
            continue
        part = order_stats.trimmed_sum_parts(x[g][members], np.nan_to_num(value[:, 2 * g]),
                                             np.nan_to_num(value[:, 2 * g + 1]))
        for key, v in part.items():
            out[key][:, g] = v
    return RobustParts(**out)


@aggregator_step(writes=("robust",))
def robust_means(sums: RobustParts, robust: RobustSearch, start: FitStart) -> dict:
    """Trimmed means of every group: phase A gives the cell means q and the replacement
    mean, phase B the trimmed variances and the robust dispersion."""
    search = robust.search
    value = _values(search)
    G, T = search["done"].shape
    n_groups = T // 2
    tm = np.full((G, n_groups), np.nan)
    tot = {"sum_inside": sums.sum_inside, "n_le_lo": sums.n_le_lo, "n_lt_hi": sums.n_lt_hi}
    for g in range(n_groups):
        if not robust.groups_active[g]:
            continue
        lo, hi = (int(r) for r in robust.ranks[g])
        parts = {k: v[:, g] for k, v in tot.items()}
        ok = search["done"][:, 2 * g] & search["done"][:, 2 * g + 1]
        tm[:, g] = np.where(ok, order_stats.trimmed_mean(parts, value[:, 2 * g],
                                                         value[:, 2 * g + 1], lo, hi),
                            np.nan)
    if robust.phase == "A":
        active_b = robust.groups_active.copy()
        active_b[-1] = False  # B: cells only
        # squared errors scale with the variance (moments: mean + alpha mean^2)
        m = start.base_mean
        var = np.maximum(np.nan_to_num(start.moments_disp), 0.0) * m * m + m
        return {"robust": replace(robust, phase="B", cell_means=tm[:, :n_groups - 1],
                                  replace_mean=tm[:, n_groups - 1],
                                  search=_start_search(var, active_b, (-3.0, 2.0)))}
    counted = robust.groups_active[:n_groups - 1]
    cell_var = (robust.scales[None, :] * tm[:, :n_groups - 1])[:, counted]
    return {"robust": replace(robust, alpha=cooks.robust_dispersion(cell_var, start.base_mean),
                              unfinished=int((~search["done"]).any(axis=1).sum()))}


@aggregator_step(writes=("cooks",))
def join(side, totals: Totals, study) -> dict:
    """The side chain's result joins the main chain: what the closing round needs."""
    rob = side.robust
    n = int(round(totals.n_samples))
    p = study.n_coefs
    n_cells = np.asarray(totals.cell_counts, dtype=float)
    cells_3 = n_cells >= cooks.MIN_REPLICATES_COOKS
    return {"cooks": CooksSetup(
        active=bool(n > p and cells_3.any()), alpha=rob.alpha, replace_mean=rob.replace_mean,
        unfinished=rob.unfinished, cutoff=cooks.cooks_cutoff(p, n) if n > p else np.inf,
        cells_3=cells_3, cells_replace=n_cells >= cooks.MIN_REPLICATES_REPLACE)}


# -- closing round ---------------------------------------------------------------------------
def cooks_counts(site: Site, ck: CooksSetup, beta: np.ndarray, alpha: np.ndarray,
                 xtwx_acc: np.ndarray, skip: np.ndarray) -> CooksCounts:
    """Cook's counts of this site's samples, and its replaced counts' per-cell sums.

    ``beta``, ``alpha``: the final fit's coefficients and dispersions; ``xtwx_acc`` the
    global X'WX at the accepted coefficients. The site's own outliers in replaceable cells
    are replaced here (kept for the refit).
    """
    X, sf = site.kept.design, site.kept.size_factors
    y = site.counts()
    p, C = X.shape[1], int(np.prod([len(v) for v in site.study.levels.values()]))
    G = y.shape[1]
    out = {k: np.zeros(G) for k in ("n_out", "n_out_kept", "n_any", "n_replaced")}
    cells = site.cells()
    norm_new = y / sf[:, None]
    if ck.active:
        with np.errstate(over="ignore"):
            mu = sf[:, None] * np.exp(X @ beta.T)  # DESeq2's assay mu: not floored
        mu_w = np.maximum(mu, MIN_MU)
        h = cooks.hat_diagonals(X, mu_w / (1.0 + alpha * mu_w), xtwx_acc)
        d = cooks.cooks_distance(y, mu, np.nan_to_num(ck.alpha, nan=np.inf), h, p)
        above = (d > ck.cutoff) & ~skip[None, :]
        in3 = np.asarray(ck.cells_3)[cells]
        repl = np.asarray(ck.cells_replace)[cells]
        out["n_out"] = (above & in3[:, None]).sum(axis=0).astype(float)
        out["n_out_kept"] = (above & (in3 & ~repl)[:, None]).sum(axis=0).astype(float)
        out["n_any"] = above.sum(axis=0).astype(float)
        swap = above & repl[:, None] & np.isfinite(ck.replace_mean)[None, :]
        out["n_replaced"] = swap.sum(axis=0).astype(float)
        if swap.any():
            new = np.where(swap, cooks.replacement_counts(np.nan_to_num(ck.replace_mean), sf),
                           y)
            site.kept.replaced_counts = new
            site.kept.lgamma_y1 = None
            norm_new = new / sf[:, None]
    onehot = (cells[:, None] == np.arange(C)[None, :]).astype(float)  # n x C
    out["cell_sum"] = norm_new.T @ onehot
    out["cell_sumsq"] = (norm_new * norm_new).T @ onehot
    out["cell_logsum"] = np.log(norm_new + 0.1).T @ onehot
    return CooksCounts(**out)


@aggregator_step(writes=("genes", "refit"))
def decide(sums, genes: GeneResults, cooks: CooksSetup, totals: Totals, start: FitStart,
           study, reduced) -> dict:
    """DESeq2's rules from the summed Cook's counts: filtering (``maxCooks > cutoff``),
    replacement (any sample above the cutoff), genes that become all zero, and -- when some
    gene is refitted -- ``maxCooks`` recomputed with the replaceable samples left out (NA when
    every sample is replaceable). The refit's start comes from the per-cell sums of the
    replaced counts at once."""
    tot = sums.cooks
    ck = cooks
    all_zero = genes.all_zero
    n, p = int(round(totals.n_samples)), study.n_coefs
    outlier = (tot.n_out > 0) & ~all_zero if ck.active else np.zeros_like(all_zero)
    n_cells = np.asarray(totals.cell_counts, dtype=float)
    sufficient = bool(ck.cells_replace.any()) and n > p
    repl = (tot.n_any > 0) & ~all_zero & sufficient
    Xrc = cell_design_rows(study, reduced) if reduced is not None else None
    new = start_from_cell_sums(tot.cell_sum, tot.cell_sumsq, tot.cell_logsum, n_cells,
                               totals.xim, totals.max_disp, cell_design_rows(study), Xrc)
    new_all_zero = repl & (new["base_mean"] == 0)
    nrefit = int(repl.sum())
    block = nrefit > 0 and nrefit > int(new_all_zero.sum())
    if block:  # DESeq2 recomputes maxCooks with the replaceable samples set to 0
        every = bool((n_cells[n_cells > 0] >= 7).all())
        outlier = (np.zeros_like(outlier) if every
                   else (tot.n_out_kept > 0) & ~all_zero & ck.active)
    refit = (tot.n_replaced > 0) & ~new_all_zero & block
    refit_start = FitStart(skip=~refit, mu_rounds=start.mu_rounds, **new)
    return {"genes": replace(genes, cooks_outlier=outlier),
            "refit": Refit(genes=refit, new_all_zero=new_all_zero, replace=repl,
                           n_refit=int(refit.sum()), start=refit_start)}


def robust_phase(rounds: int, fork_after: str) -> Phase:
    """The side chain: two order-statistic searches of ``rounds`` rounds, each closed by a
    round of trimmed sums (A: normalised counts; B: squared errors)."""
    search = [Round(robust_sums, [robust_refine]) for _ in range(rounds)]
    parts = Round(robust_parts, [robust_means])
    return Phase("robust", fork_after=fork_after, opening=[robust_start],
                 rounds=[*search, parts, *search, parts])
