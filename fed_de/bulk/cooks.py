"""Cook's distances, outlier flags and count replacement (DESeq2), federated from sums.

Robust dispersion and replacement values run on a side chain of the plan that starts after
the size factors and rejoins before the closing round, so they add no sequential step. They
need DESeq2's trimmed means (``mean(x, trim)``) of each design cell (and of all samples, for
the replacement); these are computed exactly from counts (:mod:`fed_de.core.trimmed`): no
order statistic, no sum over a sub-interval, no single value ever leaves a site.

Start     agg  : groups: design cells with >= 3 samples (trim and scale by cell size) and
                 "all samples" (trim 0.2, only when some cell has >= 7 samples); per group two
                 targets, thresholds with ``lo - 1`` and ``hi`` values below them
                 (:func:`robust_start`)
Search A  site : per open (gene, group, boundary) target, how many of the site's normalised
                 counts lie below each of its thresholds                  -> RobustSums
          agg  : narrow the brackets, or keep a threshold that separates (:func:`robust_refine`)
A parts   site : the sum of the values between the two thresholds (and of a tied boundary
                 value's bracket)                                        -> RobustParts
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
The run state carries each search field only where a later step reads it (:func:`_carried`).
What the aggregator learns beyond totals: pooled counts below thresholds near the trimming
ranks, and a boundary value shared by tied samples (see docs/privacy.md).
"""

from __future__ import annotations

from dataclasses import fields, replace

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
from fed_de.core import cooks, nb, trimmed
from fed_de.core.irls import MIN_MU
from fed_de.core.moments import start_from_cell_sums
from fed_de.design import cell_design_rows
from fed_de.errors import DisclosureError
from fed_de.federation.calls import aggregator_step, site_step
from fed_de.federation.messages import Message, counts, part, sums
from fed_de.federation.strategy import Phase, Round

K_THRESHOLDS = 15  # thresholds per open target and round (counts only)


def cooks_applicable(study) -> bool:
    """DESeq2 groups samples by identical design rows; fed_de does so for factor designs.

    With a continuous covariate every sample is taken as its own cell (DESeq2 agrees unless
    covariate values repeat exactly), so no Cook's filtering or replacement happens.
    """
    return bool(study.levels) and not study.continuous


class RobustSums(Message):
    """For every open search target, the number of values below each of its thresholds."""

    count_below: np.ndarray = counts("A", "K1")


class RobustParts(Message):
    """Phase A, per gene and group searched (:func:`sent_groups`): the sum of the trimmed set;
    count and sum of the values in a tied boundary bracket (zero where the boundary was
    separated). Sums of normalised counts: far below ``2**53`` (narrow), and a site's sum,
    0 or at least ``1 / size factor``, is encoded exactly in the narrow ring."""

    sum_inside: np.ndarray = sums("G", "NR", narrow=True)
    tie_count_lo: np.ndarray = counts("G", "NR")
    tie_sum_lo: np.ndarray = sums("G", "NR", narrow=True)
    tie_count_hi: np.ndarray = counts("G", "NR")
    tie_sum_hi: np.ndarray = sums("G", "NR", narrow=True)


class RobustSqParts(RobustParts):
    """Phase B: :class:`RobustParts` of squared errors (squares of counts: the default, wide
    fixed point)."""

    sum_inside: np.ndarray = sums("G", "NR")
    tie_count_lo: np.ndarray = counts("G", "NR")
    tie_sum_lo: np.ndarray = sums("G", "NR")
    tie_count_hi: np.ndarray = counts("G", "NR")
    tie_sum_hi: np.ndarray = sums("G", "NR")


class CooksStart(Message):
    """The replaced counts' per-cell sums: the refit's start (sent only when some design cell
    can be replaced: otherwise nothing is refitted)."""

    cell_sum: np.ndarray = sums("G", "C")
    cell_sumsq: np.ndarray = sums("G", "C")
    cell_logsum: np.ndarray = sums("G", "C")


class CooksCounts(Message):
    """Closing round: counts of samples above the cutoff, and the replaced counts' cell sums."""

    n_out: np.ndarray = counts("G")
    n_out_kept: np.ndarray = counts("G")
    n_any: np.ndarray = counts("G")
    n_replaced: np.ndarray = counts("G")
    start: CooksStart | None = part()


# -- side chain: exact trimmed statistics --------------------------------------------------
def sent_groups(robust: RobustSearch) -> np.ndarray:
    """The groups whose trimmed parts a site sends: the active ones (phase B: cells only, the
    "all samples" group's mean is phase A's); the size of a :class:`RobustParts` (announced
    as ``NR``)."""
    sent = np.array(robust.groups_active, dtype=bool)
    if robust.phase == "B":
        sent[-1] = False
    return sent


def open_targets(robust: RobustSearch) -> int:
    """Search targets still open: the size of the next :class:`RobustSums` (announced)."""
    return int((~robust.search.done).sum())


def _carried(search: trimmed.Search) -> trimmed.Search:
    """A search as the run state carries it: each field only where someone reads it (most
    targets close within a few rounds, and the sites receive the whole state).

    - ``k``: per target (every gene has the same ranks to reach);
    - ``thresholds``: the open targets' next thresholds (open targets x K);
    - ``lo``, ``hi``, ``n_lo``, ``n_hi``: the brackets of open and of tied targets (the
      aggregator narrows the first; the sites sum the second and check their counts);
    - ``tau``: the threshold of every other closed target;
    - ``done``, ``tie``: genes x targets, to place the others.

    Packed fields list their (gene, target) pairs gene by gene, targets in order.
    """
    bracket = ~search.done | search.tie
    return replace(search, k=search.k[:1].ravel(),  # the first gene's row: every gene's
                   lo=search.lo[bracket], hi=search.hi[bracket], n_lo=search.n_lo[bracket],
                   n_hi=search.n_hi[bracket], tau=search.tau[~bracket],
                   thresholds=search.thresholds[~search.done])


def carried_sizes_match(search: trimmed.Search, n_targets: int) -> bool:
    """Whether a carried search's fields have the sizes its ``done`` and ``tie`` give (its
    thresholds are checked where they are read, :func:`robust_sums`)."""
    done, tie = np.asarray(search.done), np.asarray(search.tie)
    if done.ndim != 2 or tie.shape != done.shape or done.shape[1] != n_targets:
        return False
    bracket = int((~done | tie).sum())
    return (np.shape(search.k) == (n_targets,)
            and all(np.shape(getattr(search, f)) == (bracket,)
                    for f in ("lo", "hi", "n_lo", "n_hi"))
            and np.shape(search.tau) == (done.size - bracket,))


def _dense(search: trimmed.Search, thresholds: bool = True) -> trimmed.Search:
    """The working form of a carried search: every field genes x targets, thresholds genes x
    targets x K (NaN where :func:`_carried` left a value out: nobody reads it); without
    ``thresholds``, genes x targets x 0 (for a reader of the closed searches only)."""
    shape = search.done.shape
    bracket = ~search.done | search.tie

    def spread(values: np.ndarray, where: np.ndarray) -> np.ndarray:
        out = np.full(shape, np.nan)
        out[where] = values
        return out

    thr = np.full(shape + (search.thresholds.shape[1:] if thresholds else (0,)), np.nan)
    if thresholds:
        thr[~search.done] = search.thresholds
    return replace(search, k=np.broadcast_to(search.k, shape).copy(),
                   lo=spread(search.lo, bracket), hi=spread(search.hi, bracket),
                   n_lo=spread(search.n_lo, bracket), n_hi=spread(search.n_hi, bracket),
                   tau=spread(search.tau, ~bracket), thresholds=thr)


def _start_search(center: np.ndarray, robust: RobustSearch, active: np.ndarray,
                  decades: tuple, known: np.ndarray | None = None) -> trimmed.Search:
    """Two targets per group (values below the trimmed set: ``lo - 1``; below its end: ``hi``);
    groups not searched start done; ``known`` (genes x groups) a value shared by many."""
    G = center.size
    k = np.tile(np.column_stack([robust.ranks[:, 0] - 1, robust.ranks[:, 1]]).ravel(), (G, 1))
    sizes = np.repeat(robust.sizes, 2)
    search = trimmed.start(center, k, sizes, K_THRESHOLDS, decades,
                           None if known is None else np.repeat(known, 2, axis=1))
    search.done |= ~np.repeat(active, 2)[None, :]
    return search


def replace_minimum(option: float | None, min_cell_size: int, n_sites: int) -> float:
    """DESeq2's ``minReplicatesForReplace`` for a run: as given, else 7 (DESeq2's default) for
    one site or with the disclosure rules off, and ``inf`` (no replacement, no refit: outliers
    keep p-value NA, as DESeq2 with ``minReplicatesForReplace = Inf``) from two sites on. A
    refit's sums differ from the first fit's by the replaced samples alone: the aggregator
    would read a single outlier's value from the difference (docs/privacy.md)."""
    if option is not None:
        if not option >= 1:
            raise ValueError(f"min_replicates_for_replace must be >= 1 (or inf), got {option!r}")
        return float(option)
    rules = min_cell_size > 0 and n_sites > 1
    return np.inf if rules else float(cooks.MIN_REPLICATES_REPLACE)


def robust_groups(n_cells: np.ndarray, n: int, p: int, min_replace: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trimmed-statistics groups of a study: every design cell, then all samples.

    Parameters
    ----------
    n_cells
        Pooled samples per declared design cell.
    n, p
        Pooled samples and coefficients.
    min_replace
        DESeq2's ``minReplicatesForReplace`` of the run (:func:`replace_minimum`).

    Returns
    -------
    sizes, ranks, active
        Samples per group (int), the trimmed set's 1-based ranks (groups x 2, float) and
        the groups searched (cells of >= 3 samples; all samples when some cell can be
        replaced).
    """
    use_cells = (n_cells >= cooks.MIN_REPLICATES_COOKS) & (n > p)
    repl = bool((n_cells >= min_replace).any()) and n > p
    sizes = np.append(n_cells, n).astype(int)
    trims = [cooks.cell_trim(int(s))[0] for s in n_cells] + [cooks.REPLACE_TRIM]
    ranks = np.array([trimmed.trim_ranks(int(s), t) if s > 0 else (1, 1)
                      for s, t in zip(sizes, trims, strict=True)], dtype=float)
    return sizes, ranks, np.append(use_cells, repl)


def check_robust_request(site: Site, robust: RobustSearch, totals: Totals, step: str,
                         n_sites: int = 0) -> None:
    """A site's check of a trimmed-statistics request against the protocol: the groups,
    their sizes and trimming ranks are those the study totals give (so the summed interval
    spans ``hi - lo + 1`` pooled samples, never fewer than ``min_cell_size`` while the
    disclosure rule applies: ``min_cell_size > 0`` and ``n_sites != 1``), no group claims
    fewer samples than this site holds, and every search targets its group's trimming ranks.

    Raises
    ------
    DisclosureError
        The request differs from the protocol's (nothing is sent).
    """
    from fed_de.federation.guard import check_finite

    check_finite(totals, ("n_samples", "cell_counts"), site=site.name, step=step,
                 where="totals.")
    n_cells = np.asarray(totals.cell_counts, dtype=float)
    sizes, ranks, active = robust_groups(n_cells, int(round(totals.n_samples)),
                                         site.study.n_coefs,
                                         site.options.min_replicates_for_replace)
    cells = site.cells()
    own = np.append(np.bincount(cells[cells >= 0], minlength=n_cells.size)[:n_cells.size],
                    cells.size)
    G = len(site.study.genes)
    search = robust.search
    k = np.column_stack([ranks[:, 0] - 1, ranks[:, 1]]).ravel()  # every gene's targets
    same = (np.shape(robust.sizes) == sizes.shape and np.array_equal(robust.sizes, sizes)
            and np.shape(robust.ranks) == ranks.shape and np.array_equal(robust.ranks, ranks)
            and np.array_equal(np.asarray(robust.groups_active, dtype=bool), active)
            and search is not None and np.shape(search.k) == k.shape
            and np.array_equal(search.k, k))
    problem = None
    if not same:
        problem = ("its groups, sizes or trimming ranks are not those the study's totals give "
                   "(a trimmed sum could be narrowed to a few samples)")
    elif np.shape(search.done)[:1] != (G,) or not carried_sizes_match(search, k.size):
        problem = ("its search's brackets and thresholds do not match its open and tied "
                   "targets")
    elif np.any(own > sizes):
        problem = (f"it says a group holds {int(sizes[own > sizes][0])} samples, fewer than "
                   f"this site's {int(own[own > sizes][0])}")
    rule = site.options.min_cell_size
    width = ranks[:, 1] - ranks[:, 0] + 1
    if problem is None and rule > 0 and n_sites != 1 and np.any(active & (width < rule)):
        problem = f"a trimmed set would span fewer than min_cell_size={rule} samples"
    if problem is not None:
        raise DisclosureError(f"site {site.name!r}, step {step}: refused the Cook's trimmed-"
                              f"statistics request, {problem}; nothing sent (the aggregator "
                              "is faulty, tampered with, or runs another fed_de version)")


def _check_interval(site: Site, x: np.ndarray, search: trimmed.Search, t_lo: int, t_up: int,
                    step: str) -> None:
    """Refuse when the site holds more of its values in a summed interval or a tied bracket
    than the request's own counts allow (the aggregator narrowed it around a few values)."""
    a, b = trimmed._bounds(search, search, t_lo, t_up)
    ended = search.done[:, t_lo] & search.done[:, t_up]
    below_a = np.where(search.tie[:, t_lo], search.n_hi[:, t_lo], search.k[:, t_lo])
    below_b = np.where(search.tie[:, t_up], search.n_lo[:, t_up], search.k[:, t_up])
    inside = ((x >= a[None]) & (x < b[None])).sum(axis=0)
    bad = ended & (inside > np.maximum(below_b - below_a, 0))
    for t in (t_lo, t_up):
        tied = search.tie[:, t] & ended
        in_tie = ((x >= search.lo[:, t][None]) & (x < search.hi[:, t][None])).sum(axis=0)
        claim = search.n_hi[:, t] - search.n_lo[:, t]
        bad |= tied & ((claim < 2) | (in_tie > claim))
    if bad.any():
        gene = site.study.genes[int(np.flatnonzero(bad)[0])]
        raise DisclosureError(
            f"site {site.name!r}, step {step}: refused the Cook's trimmed-sum request for gene "
            f"{gene!r} (and {int(bad.sum()) - 1} more): its interval holds more of this site's "
            "samples than the request's counts say, or a tied bracket of fewer than two "
            "samples (a sum narrowed to single values); nothing sent")


@aggregator_step(writes=("robust",))
def robust_start(totals: Totals, start: FitStart, study, options) -> dict:
    """Groups (design cells of >= 3 samples; all samples when some cell can be replaced), their
    trims and ranks; the first thresholds."""
    n_cells = np.asarray(totals.cell_counts, dtype=float)
    sizes, ranks, active = robust_groups(n_cells, int(round(totals.n_samples)), study.n_coefs,
                                         options.min_replicates_for_replace)
    rob = RobustSearch(groups_active=active, ranks=ranks, sizes=sizes.astype(float),
                       n_cells=n_cells.size, phase="A", search=None,
                       scales=np.array([cooks.cell_trim(int(s))[1] for s in n_cells]))
    search = _start_search(start.base_mean, rob, active, (-2.0, 2.0))
    search.done |= start.skip[:, None]  # all-zero or withheld genes: nothing to search
    rob.search = _carried(search)
    return {"robust": rob}


def _normalised(site: Site, totals: Totals) -> np.ndarray:
    """The site's normalised counts (samples x genes)."""
    sf = site.kept.size_factors_raw / totals.sf_scale
    return site.counts() / sf[:, None]


def _robust_values(norm: np.ndarray, robust: RobustSearch, g: int,
                   members: np.ndarray) -> np.ndarray:
    """Group ``g``'s values searched, its members' rows only: normalised counts, or in phase
    B squared errors from the cell mean (the last group: normalised counts). One group at a
    time, so a step holds one samples x genes table beside ``norm``, not one per group."""
    x = norm[members]
    if robust.phase == "A" or g == robust.groups_active.size - 1:
        return x
    x -= np.nan_to_num(robust.cell_means[:, g])[None, :]
    return np.square(x, out=x)


def _members(site: Site, g: int, n_groups: int) -> np.ndarray:
    groups = site.cells()
    return groups == g if g < n_groups - 1 else np.ones(groups.size, dtype=bool)


@site_step
def robust_sums(site: Site, robust: RobustSearch, totals: Totals, n_sites: int = 0
                ) -> RobustSums:
    """Per open (gene, group, boundary) target: the number of the site's values below each
    of the target's thresholds."""
    check_robust_request(site, robust, totals, "robust_sums", n_sites)
    norm = _normalised(site, totals)
    search = robust.search
    open_ = ~search.done
    if search.thresholds.shape != (int(open_.sum()), K_THRESHOLDS):
        raise DisclosureError(
            f"site {site.name!r}, step robust_sums: the request's thresholds "
            f"{search.thresholds.shape} are not {K_THRESHOLDS} per open target "
            f"({int(open_.sum())}); nothing sent")
    row = np.cumsum(open_.ravel()).reshape(open_.shape) - 1  # an open target's thresholds
    out = np.zeros(search.thresholds.shape)
    T = open_.shape[1]
    for g in range(T // 2):
        members = _members(site, g, T // 2)
        x = None
        for t in (2 * g, 2 * g + 1):
            genes = np.flatnonzero(open_[:, t])
            if genes.size and members.any():
                if x is None:
                    x = _robust_values(norm, robust, g, members)
                rows = row[genes, t]
                out[rows] = trimmed.count_below(x, search.thresholds[rows], genes)
    return RobustSums(count_below=out)


@aggregator_step(writes=("robust",))
def robust_refine(sums: RobustSums, robust: RobustSearch) -> dict:
    """Scatter the open targets' counts back and narrow their brackets."""
    search = _dense(robust.search)
    counts = np.zeros(search.thresholds.shape)
    counts[~search.done] = sums.count_below
    return {"robust": replace(robust, search=_carried(trimmed.refine(search, counts)))}


def _parts(site: Site, robust: RobustSearch, totals: Totals, n_sites: int, phase: str,
           step: str) -> dict:
    """Per gene and sent group: the sum of the values between the two thresholds, and count
    and sum of the values in a tied boundary bracket."""
    check_robust_request(site, robust, totals, step, n_sites)
    if robust.phase != phase:
        raise DisclosureError(f"site {site.name!r}, step {step}: asked in phase "
                              f"{robust.phase!r} (expected {phase!r}); nothing sent")
    norm = _normalised(site, totals)
    n_groups = robust.groups_active.size
    search = _dense(robust.search, thresholds=False)
    G = search.done.shape[0]
    sent = np.flatnonzero(sent_groups(robust))
    out = {f.name: np.zeros((G, sent.size)) for f in fields(RobustParts)}
    for j, g in enumerate(sent):
        members = _members(site, g, n_groups)
        if not members.any():
            continue
        x = _robust_values(norm, robust, g, members)
        _check_interval(site, x, search, 2 * g, 2 * g + 1, step)
        part = trimmed.trimmed_parts(x, search, search, 2 * g, 2 * g + 1)
        for key, v in part.items():
            out[key][:, j] = v
    return out


@site_step
def robust_parts(site: Site, robust: RobustSearch, totals: Totals, n_sites: int = 0
                 ) -> RobustParts:
    """Phase A's trimmed parts of the normalised counts (:func:`_parts`)."""
    return RobustParts(**_parts(site, robust, totals, n_sites, "A", "robust_parts"))


@site_step
def robust_sq_parts(site: Site, robust: RobustSearch, totals: Totals, n_sites: int = 0
                    ) -> RobustSqParts:
    """Phase B's trimmed parts of the squared errors (:func:`_parts`)."""
    return RobustSqParts(**_parts(site, robust, totals, n_sites, "B", "robust_sq_parts"))


@aggregator_step(writes=("robust",))
def robust_means(sums: RobustParts, robust: RobustSearch, start: FitStart) -> dict:
    """Trimmed means of every group: phase A gives the cell means q and the replacement
    mean, phase B the trimmed variances and the robust dispersion."""
    search = _dense(robust.search, thresholds=False)
    n_groups = robust.groups_active.size
    G = search.done.shape[0]
    tm = np.full((G, n_groups), np.nan)
    for j, g in enumerate(np.flatnonzero(sent_groups(robust))):
        lo, hi = (int(r) for r in robust.ranks[g])
        parts = {f.name: getattr(sums, f.name)[:, j] for f in fields(RobustParts)}
        tm[:, g] = trimmed.trimmed_mean(parts, search, search, 2 * g, 2 * g + 1, lo, hi)
    if robust.phase == "A":
        active_b = robust.groups_active.copy()
        active_b[-1] = False  # B: cells only
        # squared errors scale with the variance (moments: mean + alpha mean^2)
        m = start.base_mean
        var = np.maximum(np.nan_to_num(start.moments_disp), 0.0) * m * m + m
        rob = replace(robust, phase="B", cell_means=tm[:, :n_groups - 1],
                      replace_mean=tm[:, n_groups - 1])
        # a zero count's squared error is q**2: often shared by many samples of a cell
        known = np.column_stack([tm[:, :n_groups - 1] ** 2, np.zeros(G)])
        nxt = _start_search(var, rob, active_b, (-3.0, 2.0), known)
        nxt.done |= start.skip[:, None]
        return {"robust": replace(rob, search=_carried(nxt))}
    counted = robust.groups_active[:n_groups - 1]
    cell_var = (robust.scales[None, :] * tm[:, :n_groups - 1])[:, counted]
    return {"robust": replace(robust, alpha=cooks.robust_dispersion(cell_var, start.base_mean),
                              unfinished=int((~search.done).any(axis=1).sum()))}


@aggregator_step(writes=("cooks",))
def join(side, totals: Totals, study, options) -> dict:
    """The side chain's result joins the main chain: what the closing round needs."""
    rob = side.robust
    n = int(round(totals.n_samples))
    p = study.n_coefs
    n_cells = np.asarray(totals.cell_counts, dtype=float)
    cells_3 = n_cells >= cooks.MIN_REPLICATES_COOKS
    return {"cooks": CooksSetup(
        active=bool(n > p and cells_3.any()), alpha=rob.alpha, replace_mean=rob.replace_mean,
        unfinished=rob.unfinished, cutoff=cooks.cooks_cutoff(p, n) if n > p else np.inf,
        cells_3=cells_3, cells_replace=n_cells >= options.min_replicates_for_replace)}


# -- closing round ---------------------------------------------------------------------------
def _outliers(site: Site, ck: CooksSetup, genes: slice, y: np.ndarray, beta: np.ndarray,
              alpha: np.ndarray, xtwx_acc: np.ndarray, skip: np.ndarray) -> dict:
    """Cook's counts of the block ``genes`` (``y``: its counts), and the samples whose count
    is replaced."""
    X, sf, cells = site.kept.design, site.kept.size_factors, site.cells()
    beta, alpha, xtwx_acc, skip = beta[genes], alpha[genes], xtwx_acc[genes], skip[genes]
    p = X.shape[1]
    with np.errstate(over="ignore"):
        mu = sf[:, None] * np.exp(X @ beta.T)  # DESeq2's assay mu: not floored
    mu_w = np.maximum(mu, MIN_MU)
    h = cooks.hat_diagonals(X, mu_w / (1.0 + alpha * mu_w), xtwx_acc)
    d = cooks.cooks_distance(y, mu, np.nan_to_num(ck.alpha[genes], nan=np.inf), h, p)
    above = (d > ck.cutoff) & ~skip[None, :]
    in3 = np.asarray(ck.cells_3)[cells]
    repl = np.asarray(ck.cells_replace)[cells]
    swap = above & repl[:, None] & np.isfinite(ck.replace_mean[genes])[None, :]
    return {"n_out": (above & in3[:, None]).sum(axis=0).astype(float),
            "n_out_kept": (above & (in3 & ~repl)[:, None]).sum(axis=0).astype(float),
            "n_any": above.sum(axis=0).astype(float),
            "n_replaced": swap.sum(axis=0).astype(float), "swap": swap}


def cooks_counts(site: Site, ck: CooksSetup, beta: np.ndarray, alpha: np.ndarray,
                 xtwx_acc: np.ndarray, skip: np.ndarray) -> CooksCounts:
    """Cook's counts of this site's samples, and its replaced counts' per-cell sums.

    ``beta``, ``alpha``: the final fit's coefficients and dispersions; ``xtwx_acc`` the
    global X'WX at the accepted coefficients. The site's own outliers in replaceable cells
    are replaced here (kept for the refit). Computed in blocks of genes
    (:func:`fed_de.core.nb.gene_blocks`): samples x genes temporaries stay small.
    """
    sf, y = site.kept.size_factors, site.counts()
    C = int(np.prod([len(v) for v in site.study.levels.values()]))
    G = y.shape[1]
    out = {k: np.zeros(G) for k in ("n_out", "n_out_kept", "n_any", "n_replaced")}
    new = y
    for sl in nb.gene_blocks(G) if ck.active else []:
        part = _outliers(site, ck, sl, y[:, sl], beta, alpha, xtwx_acc, skip)
        swap = part.pop("swap")
        for key, value in part.items():
            out[key][sl] = value
        if swap.any():
            if new is y:
                new = np.array(y)  # the replaced counts: a copy, the site's data stays
            new[:, sl] = np.where(swap, cooks.replacement_counts(
                np.nan_to_num(ck.replace_mean[sl]), sf), y[:, sl])
    if new is not y:
        site.replace_counts(new)
    if not np.asarray(ck.cells_replace).any():  # no replacement: no refit start to send
        return CooksCounts(**out)
    onehot = (site.cells()[:, None] == np.arange(C)[None, :]).astype(float)  # n x C
    norm_new = new / sf[:, None]
    return CooksCounts(**out, start=CooksStart(
        cell_sum=norm_new.T @ onehot, cell_sumsq=(norm_new * norm_new).T @ onehot,
        cell_logsum=np.log(norm_new + 0.1).T @ onehot))


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
    if not sufficient:  # nothing replaced: outliers keep p-value NA, nothing is refitted
        none = np.zeros_like(all_zero)
        return {"genes": replace(genes, cooks_outlier=outlier),
                "refit": Refit(genes=none, new_all_zero=none, replace=none, n_refit=0,
                               start=replace(start, skip=~none))}
    Xrc = cell_design_rows(study, reduced) if reduced is not None else None
    new = start_from_cell_sums(tot.start.cell_sum, tot.start.cell_sumsq,
                               tot.start.cell_logsum, n_cells,
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
    return Phase("robust", fork_after=fork_after, opening=[robust_start],
                 rounds=[*search, Round(robust_parts, [robust_means]), *search,
                         Round(robust_sq_parts, [robust_means])])
