"""A screen's first rounds: checks, size factors, and the per-group sums every method needs.

Round 1 (``setup``)  site : check counts, codes and disclosure (on the non-empty cells);
                            library sizes (kept); sum of log library sizes and cells; cells
                            per (perturbation, design cell) group and per design cell's
                            controls, and per group and gene, expressing cells; with the site
                            as a design factor, groups of fewer than ``min_pooled_group``
                            cells are left out here, and genes whose controls in one of the
                            site's design cells hold 1 .. ``min_nonzero - 1`` expressing
                            cells are flagged here: only how many were is sent
                            (``poscounts``: per-gene sums of log positive counts)
                                                                          -> SetupSums
                     agg  : the global geometric-mean scale (``poscounts``: log geometric
                            means); the study-level disclosure rules: control cells per
                            design cell, (perturbation, design cell) groups and
                            perturbations left out, (perturbation, gene) pairs and genes
                            withheld                                     (:func:`scale_step`)
Round 1b (``size_factors``, ``poscounts`` only)
                     site : median-of-ratios factors (kept), sum of their logs -> FactorSums
                     agg  : their geometric-mean scale              (:func:`posfactor_scale`)
Round 2 (``sums``, NB GLM) site : size factors (kept); per design cell: control sums of
                            counts, normalised counts and their squares, expressing cells; per
                            perturbation: the same sums, and per (perturbation, design cell)
                            cells and size-factor sums                    -> GroupSums
                     agg  : expression filters, cells per arm, baseMean (:func:`summarise`);
                            the dispersion groups and the fit's starts follow in the same
                            aggregation (:mod:`~fed_de.screening.dispersion`,
                            :mod:`~fed_de.screening.fit`)
Size factors, codes and every per-cell quantity stay at the site.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fed_de.core import screen_sums as cs
from fed_de.core.screen_testing import expression_filter
from fed_de.errors import DesignError, DisclosureError, SiteDataError
from fed_de.federation.calls import aggregator_step, site_step
from fed_de.federation.messages import Message, part, sums
from fed_de.federation.strategy import Phase, Round
from fed_de.screening.state import (
    Scale,
    ScreenOptions,
    ScreenSiteView,
    Summary,
    tracked,
)
from fed_de.screening.study import ScreenStudy


class LogCountSums(Message):
    """``poscounts``, round 1: per-gene sums of log positive counts."""

    sum_log: np.ndarray = sums("G")


class SetupSums(Message):
    """Round 1: sum of log library sizes and the cells used; cells per (perturbation, design
    cell) group and, per group and gene, how many express it; per perturbation, how many of
    the site's groups it left out itself; control cells per design cell and, per design cell
    and gene, how many express it; per gene, whether the site withholds it itself (the
    study-level disclosure rules, decided before any sum of values over a group is sent)."""

    sum_log_lib: float = sums()
    n_cells: float = sums()
    group_n: np.ndarray = sums("P", "C")
    group_expr: np.ndarray = sums("P", "C", "G")
    groups_out: np.ndarray = sums("P")
    ctrl_n: np.ndarray = sums("C")
    ctrl_expr: np.ndarray = sums("C", "G")
    genes_out: np.ndarray = sums("G")
    log_counts: LogCountSums | None = part()


class FactorSums(Message):
    """``poscounts``, round 1b: sum of the log median-of-ratios factors and the cells used."""

    sum_log_sf: float = sums()
    n_cells: float = sums()


class AllCellSums(Message):
    """``dispersion_cells="all"``: sums of every (perturbation, design cell) group."""

    y: np.ndarray = sums("PC", "G")
    norm: np.ndarray = sums("PC", "G")
    norm2: np.ndarray = sums("PC", "G")
    inv_sf: np.ndarray = sums("PC")


class GroupSums(Message):
    """Round 2: sums of every group of cells (control per design cell, perturbations)."""

    ctrl_y: np.ndarray = sums("C", "G")
    ctrl_norm: np.ndarray = sums("C", "G")
    ctrl_norm2: np.ndarray = sums("C", "G")
    ctrl_expr: np.ndarray = sums("C", "G")
    ctrl_n: np.ndarray = sums("C")
    ctrl_sf: np.ndarray = sums("C")
    ctrl_inv_sf: np.ndarray = sums("C")
    pert_y: np.ndarray = sums("P", "G")
    pert_norm: np.ndarray = sums("P", "G")
    pert_expr: np.ndarray = sums("P", "G")
    pert_n: np.ndarray = sums("P", "C")
    pert_sf: np.ndarray = sums("P", "C")
    all_cells: AllCellSums | None = part()


# -- site side ---------------------------------------------------------------------------------
def _codes(site: ScreenSiteView) -> tuple[np.ndarray, np.ndarray]:
    """Group (0 control, p + 1, -1 unused) and design cell of every cell of the site."""
    st = site.study
    labels = site.data.obs_column(st.perturbation_column)
    q = pd.Categorical(labels, categories=[st.control, *st.perturbations]).codes
    q = q.astype(np.int64)  # -1: a label the study does not test (left out)
    levels = np.zeros((site.data.n_samples, len(st.factors)), dtype=np.int64)
    for f, (name, lv) in enumerate(st.factors):
        if f == 0 and st.site_factor:
            if site.name not in lv:
                raise DesignError(f"site {site.name!r} is not a declared level of the site "
                                  f"factor {lv}")
            levels[:, f] = lv.index(site.name)
            continue
        values = site.data.obs_column(name)
        codes = pd.Categorical(values, categories=lv).codes
        if (codes < 0).any():
            bad = sorted(set(values[codes < 0]))[:5]
            raise DesignError(f"site {site.name!r}: covariate {name!r} holds undeclared "
                              f"level(s) {bad}; declared: {lv}")
        levels[:, f] = codes
    return q, cs.cell_codes(levels, st.n_levels)


def _check_disclosure(site: ScreenSiteView, q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Apply the minimum group sizes to the cells that enter sums (``q`` is already -1 for
    empty cells, so a group's size is what its sums cover): small perturbation groups are
    left out at this site; a design cell with perturbed cells but too few controls
    (:func:`min_control_cells`) stops the site."""
    k = site.options.min_cell_size
    study = site.study
    C = int(np.prod(study.n_levels)) if study.factors else 1
    Q = len(study.perturbations) + 1
    used = q >= 0
    n = np.bincount(q[used] * C + c[used], minlength=Q * C).reshape(Q, C)
    if k > 0:
        small = (n > 0) & (n < k)
        small[0] = False
        if small.any():
            drop = small[np.maximum(q, 0), c] & (q > 0)
            q = np.where(drop, -1, q)
            n = np.where(small, 0, n)
        k_ctrl, name = min_control_cells(site.options, study)
        few_ctrl = (n[0] > 0) & (n[0] < k_ctrl)
        if few_ctrl.any():
            cell = study.cell_names[int(np.flatnonzero(few_ctrl)[0])]
            raise DisclosureError(
                f"site {site.name!r}: design cell {cell} holds {int(n[0][few_ctrl][0])} "
                f"control cell(s) with counts, fewer than {name}={k_ctrl}; their sums could "
                "reveal single cells. Merge the covariate levels, or lower " + name)
    if not (n[0] > 0).any():
        raise SiteDataError(f"site {site.name!r} holds no control cell labelled "
                            f"{study.control!r} in column {study.perturbation_column!r}")
    return q


def min_control_cells(options: ScreenOptions, study: ScreenStudy) -> tuple[int, str]:
    """The fewest control cells (with counts) a site's design cell may hold, and the option
    that sets it: ``min_cell_size``, or with the site as a design factor
    ``min_pooled_group`` -- the design cell is then one site's, and its control sums
    (``GroupSums.ctrl_*``, the control fit's score, information and Fisher weights per
    design cell) are sums over the site's cells alone, like a perturbation group's."""
    if study.site_factor and options.min_pooled_group > options.min_cell_size:
        return options.min_pooled_group, "min_pooled_group"
    return options.min_cell_size, "min_cell_size"


@site_step
@tracked
def setup_sums(site: ScreenSiteView) -> SetupSums:
    """Check the site; library sizes (kept); the sums of the size-factor scale; cells and
    expressing cells per (perturbation, design cell) group and per design cell's controls
    (empty cells left out first), the groups (:func:`own_groups_out`) and genes
    (:func:`own_genes_out`) this site leaves out itself sent as zeros."""
    q, c = _codes(site)
    poscounts = site.options.size_factors == "poscounts"
    lib = np.zeros(site.data.n_samples)
    G, P = len(site.study.genes), len(site.study.perturbations)
    C = int(np.prod(site.study.n_levels)) if site.study.factors else 1
    expr = np.zeros(((P + 1) * C, G))
    for start, X in site.data.chunks():
        sl = slice(start, start + X.shape[0])
        bad = cs.check_counts(X)
        if bad:
            raise SiteDataError(f"site {site.name!r}: {bad} in cells {start}.."
                                f"{start + X.shape[0] - 1}; fed_de models raw UMI counts")
        lib[sl] = cs.library_sizes(X)
        expr += _expressing(X, q[sl], c[sl], lib[sl], (P + 1) * C, C)
    q = np.where(lib > 0, q, -1)  # empty cells carry no information and count in no group
    q = _check_disclosure(site, q, c)
    used = q >= 0
    sum_log = np.zeros(G)
    if poscounts:  # over the cells left once the groups are known (a second pass)
        for start, X in site.data.chunks(np.flatnonzero(used)):
            sum_log += cs.log_positive_sums(X[np.flatnonzero(used[start:start + X.shape[0]])])
    group_n = np.bincount(q[used] * C + c[used], minlength=(P + 1) * C).reshape(P + 1, C)
    expr = np.where(group_n[:, :, None] > 0, expr.reshape(P + 1, C, G), 0.0)
    out = own_groups_out(site, group_n[1:])
    genes_out = own_genes_out(site, expr[0])
    site.kept.q, site.kept.c, site.kept.lib, site.kept.groups_out = q, c, lib, out
    pert_expr = np.where(out[:, :, None] | genes_out[None, None, :], 0.0, expr[1:])
    return SetupSums(sum_log_lib=float(np.log(lib[used]).sum()), n_cells=float(used.sum()),
                     group_n=np.where(out, 0, group_n[1:]).astype(float),
                     group_expr=pert_expr, groups_out=out.sum(axis=1).astype(float),
                     ctrl_n=group_n[0].astype(float),
                     ctrl_expr=np.where(genes_out[None, :], 0.0, expr[0]),
                     genes_out=genes_out.astype(float),
                     log_counts=LogCountSums(sum_log=sum_log) if poscounts else None)


def own_groups_out(site: ScreenSiteView, group_n: np.ndarray) -> np.ndarray:
    """(perturbation, design cell) groups this site leaves out itself: with the site as a
    design factor a design cell is one site's, so its pooled group is the site's own and the
    study-level minimum ``min_pooled_group`` is checked here; the count of a group left out
    never leaves the site. ``(P, C)`` bool (none when the rules are off, or when design cells
    pool sites: the aggregator checks those on the masked totals)."""
    o = site.options
    if o.min_cell_size <= 0 or not site.study.site_factor:
        return np.zeros(group_n.shape, dtype=bool)
    return (group_n > 0) & (group_n < o.min_pooled_group)


def own_genes_out(site: ScreenSiteView, ctrl_expr: np.ndarray) -> np.ndarray:
    """Genes this site withholds itself: with the site as a design factor, a design cell's
    control sums (counts, normalised counts, the control fit's score and information per
    design cell) are sums over this site's control cells alone, so a design cell whose
    controls hold 1 .. ``min_nonzero - 1`` expressing cells of a gene would send that cell's
    count (and, with ``ctrl_y / ctrl_norm``, its size factor). The gene is withheld from
    every later message at every site; only the flag leaves the site, never the count.
    ``(G,)`` bool (none when the rules are off, or when design cells pool sites: the
    aggregator checks those on the masked totals, :func:`pooled_rules`)."""
    o = site.options
    if o.min_cell_size <= 0 or not site.study.site_factor:
        return np.zeros(ctrl_expr.shape[1], dtype=bool)
    return ((ctrl_expr > 0) & (ctrl_expr < o.min_nonzero)).any(axis=0)


def _expressing(X, q: np.ndarray, c: np.ndarray, lib: np.ndarray, rows: int, C: int
                ) -> np.ndarray:
    """Per group (``q * C + c``: control first, then each perturbation's design cells) and
    gene, the chunk's non-empty cells with a positive count: ``(rows, G)``."""
    cells = np.flatnonzero((q >= 0) & (lib > 0))
    if cells.size == 0:
        return np.zeros((rows, X.shape[1]))
    onehot = sp.csr_matrix((np.ones(cells.size), (q[cells] * C + c[cells], cells)),
                           shape=(rows, X.shape[0]))
    positive = X > 0
    out = onehot @ (positive.astype(np.float64) if sp.issparse(positive)
                    else np.asarray(positive, dtype=np.float64))
    return np.asarray(out.toarray() if sp.issparse(out) else out)


@site_step
@tracked
def posfactor_sums(site: ScreenSiteView, scale: Scale) -> FactorSums:
    """``poscounts`` median-of-ratios factors (kept), and the sum of their logs."""
    raw = np.full(site.data.n_samples, np.nan)
    for start, X in site.data.chunks():
        raw[start:start + X.shape[0]] = cs.poscounts_factors(X, scale.log_geo_means)
    q = np.where(np.isfinite(raw) & (raw > 0), site.kept.q, -1)
    used = q >= 0
    site.kept.q, site.kept.sf_raw = q, raw
    return FactorSums(sum_log_sf=float(np.log(raw[used]).sum()), n_cells=float(used.sum()))


def _groups_left_out(scale: Scale, kept) -> np.ndarray:
    """(perturbation, design cell) groups whose cells leave every later sum: those this site
    left out itself, those the aggregator's rule left out, and every group of a perturbation
    left out. ``(P, C)`` bool."""
    out = kept.groups_out.copy()
    if scale.groups_out is not None:
        out |= scale.groups_out
    if scale.dropped is not None:
        out |= scale.dropped[:, None]
    return out


def keep_size_factors(site: ScreenSiteView, scale: Scale) -> None:
    """This site's final size factors (kept here, never sent); the cells of the
    (perturbation, design cell) groups and of the perturbations the disclosure rules left out
    leave every later sum (they stay in the size factors' global scale)."""
    kept = site.kept
    out = _groups_left_out(scale, kept)
    if out.any():
        q, c = kept.q, kept.c
        kept.q = np.where((q > 0) & out[np.maximum(q, 1) - 1, c], -1, q)
    raw = kept.sf_raw if kept.sf_raw is not None else kept.lib
    sf = raw / np.exp(scale.sf_log_scale)
    kept.sf = np.where(kept.q >= 0, sf, 1.0)


@site_step
@tracked
def group_sums(site: ScreenSiteView, scale: Scale) -> GroupSums:
    """Size factors (kept) and the sums of every group of cells."""
    keep_size_factors(site, scale)
    s = site.group_sums()
    all_cells = None
    if site.options.dispersion_cells == "all":
        G = len(site.study.genes)
        all_cells = AllCellSums(y=s["y"][1:].reshape(-1, G), norm=s["norm"][1:].reshape(-1, G),
                                norm2=s["norm2"][1:].reshape(-1, G),
                                inv_sf=s["inv_sf"][1:].reshape(-1))
    return GroupSums(
        ctrl_y=s["y"][0], ctrl_norm=s["norm"][0], ctrl_norm2=s["norm2"][0],
        ctrl_expr=s["expr"][0], ctrl_n=s["n"][0], ctrl_sf=s["sf"][0],
        ctrl_inv_sf=s["inv_sf"][0], pert_y=s["y"][1:].sum(axis=1),
        pert_norm=s["norm"][1:].sum(axis=1), pert_expr=s["expr"][1:].sum(axis=1),
        pert_n=s["n"][1:], pert_sf=s["sf"][1:], all_cells=all_cells)


# -- aggregator side ---------------------------------------------------------------------------
@aggregator_step(writes=("scale",))
def scale_step(sums: SetupSums, options: ScreenOptions, study: ScreenStudy) -> dict:
    """The global scale of library-size factors (or the poscounts geometric means), and the
    study-level disclosure rules (:func:`check_pooled_controls`, :func:`pooled_rules`)."""
    n = float(sums.n_cells)
    check_pooled_controls(sums.ctrl_n, study, options)
    rules = pooled_rules(sums.group_n, sums.group_expr, sums.groups_out, options,
                         sums.ctrl_expr, sums.genes_out)
    if options.size_factors == "poscounts":
        s = sums.log_counts.sum_log
        return {"scale": Scale(n_cells=n, log_geo_means=np.where(s > 0, s / n, -np.inf),
                               **rules)}
    return {"scale": Scale(n_cells=n, sf_log_scale=float(sums.sum_log_lib) / n, **rules)}


def check_pooled_controls(ctrl_n: np.ndarray, study: ScreenStudy,
                          options: ScreenOptions) -> None:
    """Stop the run (before any sum over a design cell is asked for) when a design cell's
    controls, over all sites, hold 1 .. ``min_pooled_group - 1`` cells: its control sums
    would be sums over those few cells. With the site as a design factor the sites have
    checked this themselves (:func:`min_control_cells`); here it covers design cells that
    pool sites."""
    k = options.min_pooled_group
    if options.min_cell_size <= 0:
        return
    few = np.flatnonzero((ctrl_n > 0) & (ctrl_n < k))
    if few.size:
        cells = [study.cell_names[i] for i in few[:5]]
        raise DisclosureError(
            f"design cell(s) {cells} hold fewer than min_pooled_group={k} control cells over "
            "all sites; their control sums could reveal single cells. Merge the covariate "
            "levels, or lower min_pooled_group")


def pooled_rules(group_n: np.ndarray, group_expr: np.ndarray, groups_out: np.ndarray,
                 options: ScreenOptions, ctrl_expr: np.ndarray | None = None,
                 genes_out: np.ndarray | None = None) -> dict:
    """The study-level disclosure rules of a screen (with ``min_cell_size > 0``, whatever the
    number of sites, so a federated run and its pooled twin agree).

    A (perturbation, design cell) group of fewer than ``min_pooled_group`` cells is left out
    (``groups_out``): every per-design-cell sum of the fit (Newton, Wald and dispersion sums)
    would be a sum over those cells alone, and with the site as a design factor that is one
    site's few cells (the sites check their own groups, :func:`own_groups_out`, and send
    only ``groups_out`` counts). A perturbation with no group left is left out (``dropped``).
    A (perturbation, gene) pair whose remaining groups hold 1 .. ``min_nonzero - 1``
    expressing cells is withheld: a sum with a single non-zero contributor is that cell's
    value, and ``sum y / sum y/s`` its size factor (the screen analogue of bulk's withheld
    genes, docs/privacy.md). A gene whose controls in some design cell hold 1 ..
    ``min_nonzero - 1`` expressing cells is withheld whole (``genes_withheld``; every pair of
    it too): the control sums are per design cell (the sites flag their own design cells,
    :func:`own_genes_out`, and send only the flag).

    Parameters
    ----------
    group_n, group_expr
        ``(P, C)`` cells and ``(P, C, G)`` expressing cells per (perturbation, design cell)
        group, summed over the sites.
    groups_out
        ``(P,)`` groups the sites left out themselves.
    options
        The screen's options.
    ctrl_expr, genes_out
        ``(C, G)`` expressing control cells per design cell and ``(G,)`` how many sites
        withheld each gene themselves, summed over the sites (``None``: none).

    Returns
    -------
    dict
        ``dropped`` ``(P,)``, ``groups_out`` ``(P, C)``, ``withheld`` ``(P, G)`` and
        ``genes_withheld`` ``(G,)`` (bool), the fields of
        :class:`~fed_de.screening.state.Scale`.
    """
    P, C, G = group_expr.shape
    if options.min_cell_size <= 0:
        return {"dropped": np.zeros(P, dtype=bool), "groups_out": np.zeros((P, C), dtype=bool),
                "withheld": np.zeros((P, G), dtype=bool),
                "genes_withheld": np.zeros(G, dtype=bool)}
    k = options.min_nonzero
    out = (group_n > 0) & (group_n < options.min_pooled_group)
    left = np.where(out, 0.0, group_n).sum(axis=1)
    dropped = (left == 0) & ((group_n.sum(axis=1) > 0) | (groups_out > 0))
    expr = np.where(out[:, :, None], 0.0, group_expr).sum(axis=1)
    withheld = (expr > 0) & (expr < k)
    genes = np.zeros(G, dtype=bool)
    if ctrl_expr is not None:
        genes |= ((ctrl_expr > 0) & (ctrl_expr < k)).any(axis=0)
    if genes_out is not None:
        genes |= genes_out > 0
    return {"dropped": dropped, "groups_out": out,
            "withheld": withheld | dropped[:, None] | genes[None, :], "genes_withheld": genes,
            "n_groups_out": int(out.sum() + groups_out.sum())}


@aggregator_step(writes=("scale",))
def posfactor_scale(sums: FactorSums, scale: Scale) -> dict:
    """``poscounts`` factors are divided by their geometric mean over all cells."""
    n = float(sums.n_cells)
    return {"scale": replace(scale, n_cells=n, sf_log_scale=float(sums.sum_log_sf) / n,
                             log_geo_means=None)}


def check_control_levels(study: ScreenStudy, ctrl_n: np.ndarray) -> None:
    """Every level of every factor needs control cells somewhere (else its effect is not
    identifiable from the controls); the error names the level."""
    table = cs.cell_table(study.n_levels)
    for f, (name, levels) in enumerate(study.factors):
        for i, lv in enumerate(levels):
            if ctrl_n[table[:, f] == i].sum() > 0:
                continue
            fix = ("every site needs control cells when sites have their own effect "
                   "(or pass site_effects=False)" if f == 0 and study.site_factor
                   else "drop the level or the covariate")
            raise DesignError(f"no control cell has {name}={lv!r}, so the control fit "
                              f"cannot estimate its effect: {fix}")


def summary_of(s, study: ScreenStudy, options: ScreenOptions, scale: Scale | None = None
               ) -> Summary:
    """Cells per arm, control means, pair baseMean and the expression filters, from summed
    group sums (:class:`GroupSums` or the rank tests' sums: the same control and
    perturbation fields); refuses a factor level without control cells. Pairs the
    disclosure rules withheld (``scale.withheld``) are not tested and have no baseMean."""
    check_control_levels(study, s.ctrl_n)
    n_ctrl = float(s.ctrl_n.sum())
    n_pert = s.pert_n.sum(axis=1)
    ctrl_norm = s.ctrl_norm.sum(axis=0)
    ctrl_expr = s.ctrl_expr.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ctrl_mean = ctrl_norm / n_ctrl
        pert_mean = s.pert_norm / n_pert[:, None]
        base_mean = (ctrl_norm[None, :] + s.pert_norm) / (n_ctrl + n_pert)[:, None]
    o = options
    tested = expression_filter(
        ctrl_expr, ctrl_mean, n_ctrl, s.pert_expr, pert_mean, n_pert,
        min_pct_ctrl=o.min_pct_ctrl, min_pct_pert=o.min_pct_pert,
        min_mean_ctrl=o.min_mean_ctrl, min_mean_pert=o.min_mean_pert,
        min_cells_ctrl=o.min_cells_ctrl, min_cells_pert=o.min_cells_pert)
    if scale is not None and scale.withheld is not None:
        tested = tested & ~scale.withheld
        base_mean = np.where(scale.withheld, np.nan, base_mean)
    if scale is not None and scale.genes_withheld is not None:
        ctrl_mean = np.where(scale.genes_withheld, np.nan, ctrl_mean)
    return Summary(n_ctrl=n_ctrl, n_pert=n_pert, ctrl_mean=ctrl_mean, base_mean=base_mean,
                   tested=tested)


@aggregator_step(writes=("summary",))
def summarise(sums: GroupSums, study: ScreenStudy, options: ScreenOptions,
              scale: Scale) -> dict:
    """Expression filters, cells per arm and baseMean from the round-2 sums."""
    return {"summary": summary_of(sums, study, options, scale)}


# -- phases ------------------------------------------------------------------------------------
def setup_phase() -> Phase:
    """Checks and library sizes: one round."""
    return Phase("setup", rounds=[Round(setup_sums, [scale_step])])


def size_factors_phase() -> Phase:
    """``poscounts``: the median-of-ratios factors and their scale, one round."""
    return Phase("size_factors", rounds=[Round(posfactor_sums, [posfactor_scale])])


def sums_phase(steps: list) -> Phase:
    """The per-group sums, then ``steps`` at the aggregator (the summary, the dispersion
    groups, the fit's starts)."""
    return Phase("sums", rounds=[Round(group_sums, [summarise, *steps])])
