"""The typed state of a federated screen: what the aggregator sends, what a site keeps.

The aggregator's output is one :class:`ScreenState`, read by the next round's site steps and
by the next aggregation; each part is written by the steps named below and read by the steps
whose signatures name it. A site keeps a :class:`ScreenSiteState` between its tasks; site
steps see it through :class:`ScreenSiteView`, with the site's cells, the study and the options.

===============  ==============================================  ==========================
part             holds                                           written by
===============  ==============================================  ==========================
``scale``        cells used, the size factors' global scale      setup (``poscounts``: the
                 (``poscounts`` round 1: log geometric means)    size_factors round)
``summary``      cells per arm, control means, pair baseMean,    setup (``summarise``), fit
                 the pairs tested                                (``fit_starts``), rank_tests
``groups``       the dispersion groups: Poisson means (dropped   dispersion
                 when the fit starts), baseMean, all-zero
                 genes, moments estimates, maxDisp
``start``        Poisson starts of the control fit and effects   fit (``fit_starts``)
``disp``         the dispersion searches: points, evaluations,   dispersion
                 bracket, prior (dropped when the fit starts)
``dispersions``  gene-wise, trend value, MAP, final, outlier     dispersion
``trend``        trend type, coefficients, prior variance        dispersion
``fit``          control fit, every effect, their dispersions    fit
``results``      per-pair results, tested, converged             fit (``wald_tests``),
                                                                 rank_tests
===============  ==============================================  ==========================
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps

import numpy as np

from fed_de.core import screen_sums
from fed_de.core.dispersion import Prior, Trend
from fed_de.core.optim1d import Bracket, Evaluations
from fed_de.core.screen_fit import ControlFit
from fed_de.federation.secure import KeyRelay
from fed_de.screening.data import ScreenSite
from fed_de.screening.study import ScreenStudy


@dataclass(frozen=True)
class ScreenOptions:
    """The options of a screen, shipped to every node (plain scalars; see
    :class:`fed_de.screening.strategy.ScreenStrategy`)."""

    method: str = "nb_glm"
    size_factors: str = "library"
    dispersion: str = "cox-reid"
    dispersion_cells: str = "control"
    shrink: bool = True
    fit_type: str = "parametric"
    min_mu: float = screen_sums.MIN_MU
    min_cell_size: int = 3
    min_pooled_group: int = 15  # pooled (perturbation, design cell) group (cells over sites)
    min_nonzero: int = 2  # (perturbation, gene) sums of fewer expressing cells are withheld
    min_pct_ctrl: float = 0.01
    min_pct_pert: float = 0.002
    min_mean_ctrl: float = 0.05
    min_mean_pert: float = 0.005
    min_cells_ctrl: int = 1
    min_cells_pert: int = 1
    genewise_rounds: int = 4  # unrolled rounds, measured on synthetic screens (docs/screen.md)
    map_rounds: int = 3
    fit_rounds: int = 5


# -- what the aggregator sends -----------------------------------------------------------------
@dataclass
class Scale:
    """Cells used over all sites and the global scale of the size factors."""

    n_cells: float
    sf_log_scale: float | None = None  # size factors are divided by exp(sf_log_scale)
    log_geo_means: np.ndarray | None = None  # poscounts, round 1: per-gene log geometric means
    dropped: np.ndarray | None = None  # perturbations with no group left (P,)
    withheld: np.ndarray | None = None  # (perturbation, gene) pairs withheld (P, G)
    groups_out: np.ndarray | None = None  # (perturbation, design cell) groups too small (P, C)
    genes_withheld: np.ndarray | None = None  # genes withheld whole (a design cell's controls) (G,)
    n_groups_out: int = 0  # groups left out, by the sites themselves and by the rule


@dataclass
class Summary:
    """Per-arm facts over all sites and the pairs (perturbation, gene) tested."""

    n_ctrl: float
    n_pert: np.ndarray  # (P,) cells of each perturbation
    ctrl_mean: np.ndarray  # (G,) mean normalised count of the control cells
    base_mean: np.ndarray  # (P, G) mean normalised count over control and perturbed cells
    tested: np.ndarray  # (P, G) pairs passing the filters (and, nb_glm, estimable)


@dataclass
class DispersionGroups:
    """The groups of cells the dispersions come from (control cells of each design cell; with
    ``dispersion_cells="all"`` every (perturbation, design cell) group too)."""

    means: np.ndarray | None  # (D, G) Poisson means; dropped once the fit starts
    base_mean: np.ndarray  # (G,) mean normalised count of the groups' cells (NaN: all zero)
    all_zero: np.ndarray  # (G,) no count in any group
    alpha_init: np.ndarray  # (G,) moments estimates within bounds: the search's start
    alpha_moments: np.ndarray  # (G,) raw moments estimates
    max_disp: float  # DESeq2's maxDisp = max(10, cells)
    n_cells: float  # cells of the groups
    n_groups: int  # non-empty groups (the coefficients of the saturated fit)


@dataclass
class FitStart:
    """Poisson starts of the NB fit, from the group sums."""

    b0: np.ndarray  # (G, p) control coefficients
    beta0: np.ndarray  # (P, G) perturbation effects
    live_cells: np.ndarray  # (G, C) design cells with control counts


@dataclass
class DispSearch:
    """The dispersion searches: where the sites evaluate next, and the searches' states."""

    points: np.ndarray  # (G, K) log(alpha)
    active: np.ndarray  # (G,) genes still searching (the others are sent as zeros)
    genewise: Evaluations | None = None
    map: Evaluations | None = None
    best: Bracket | None = None  # the running search's best point and bracket
    start_f: np.ndarray | None = None  # objective at the moments start (DESeq2's noIncrease)
    start_g: np.ndarray | None = None
    start_h: np.ndarray | None = None
    prior: Prior | None = None


@dataclass
class ScreenDispersions:
    """DESeq2's dispersion columns (dispGeneEst, dispFit, dispMAP, dispersion, dispOutlier)."""

    gene: np.ndarray
    fit: np.ndarray | None = None
    map: np.ndarray | None = None
    final: np.ndarray | None = None
    outlier: np.ndarray | None = None


@dataclass
class ScreenFit:
    """The control fit and every perturbation effect, iterated together."""

    control: ControlFit
    beta: np.ndarray  # (P, G) effects (natural log)
    pert_done: np.ndarray  # (P, G) effects that stopped (or are not tested)
    alpha: np.ndarray  # (G,) dispersions of the fit
    live_cells: np.ndarray  # (G, C) design cells with control counts


@dataclass
class ScreenResults:
    """Per-pair results (``baseMean, log2FoldChange, lfcSE, stat, pvalue, padj``: (P, G))."""

    arrays: dict
    tested: np.ndarray
    converged: np.ndarray | None = None  # nb_glm
    control_coefficients: np.ndarray | None = None  # nb_glm: (G, p), natural log


@dataclass
class ScreenState:
    """The aggregator's output: every part a later step reads (see the module table)."""

    scale: Scale | None = None
    summary: Summary | None = None
    groups: DispersionGroups | None = None
    start: FitStart | None = None
    disp: DispSearch | None = None
    dispersions: ScreenDispersions | None = None
    trend: Trend | None = None
    fit: ScreenFit | None = None
    results: ScreenResults | None = None
    secure: KeyRelay | None = None


# -- what a site keeps -------------------------------------------------------------------------
@dataclass
class ScreenSiteState:
    """What a site keeps between its tasks; none of it is ever sent."""

    q: np.ndarray | None = None  # group of every cell: 0 control, p + 1 perturbation p, -1 unused
    c: np.ndarray | None = None  # design cell of every cell
    lib: np.ndarray | None = None  # library sizes
    sf_raw: np.ndarray | None = None  # poscounts: unscaled median-of-ratios factors
    sf: np.ndarray | None = None  # final size factors
    groups_out: np.ndarray | None = None  # (P, C) own groups below min_pooled_group, left out
    peak_bytes: int = 0  # largest traced memory of a task (measure_memory)


@dataclass
class ScreenSiteView:
    """What a site step works with: the site's cells (in the study's gene order), what it
    keeps, the study and the options."""

    data: ScreenSite
    kept: ScreenSiteState
    study: ScreenStudy
    options: ScreenOptions

    @property
    def name(self) -> str:
        """The site's name."""
        return self.data.name

    def cell_groups(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Group, design cell, number of groups Q = P + 1 and of design cells C."""
        C = int(np.prod(self.study.n_levels)) if self.study.factors else 1
        return self.kept.q, self.kept.c, len(self.study.perturbations) + 1, C

    def disp_groups(self) -> np.ndarray:
        """Dispersion group of every cell (``< 0``: not used for dispersions)."""
        q, c, Q, C = self.cell_groups()
        if self.options.dispersion_cells == "all":
            return np.where(q >= 0, q * C + c, -1)
        return np.where(q == 0, c, -1)

    def group_sums(self, log_values: bool = False) -> dict:
        """Sums over the site's cells per (group, design cell): ``(Q, C[, G])`` arrays (see
        :func:`fed_de.core.screen_sums.group_sums`)."""
        q, c, Q, C = self.cell_groups()
        sf = self.kept.sf
        code = np.where(q >= 0, q * C + c, -1)
        tot: dict = {}
        for start, X in self.data.chunks():
            sl = slice(start, start + X.shape[0])
            part = screen_sums.group_sums(X, sf[sl], code[sl], Q * C, log_values)
            for k, v in part.items():
                tot[k] = tot[k] + v if k in tot else v
        return {k: v.reshape((Q, C) + v.shape[1:]) for k, v in tot.items()}


def tracked(fn: Callable) -> Callable:
    """Record a site step's peak traced memory in what the site keeps (when tracemalloc
    runs: ``measure_memory=True``)."""

    @wraps(fn)
    def wrapper(site: ScreenSiteView, *args, **kwargs):
        if not tracemalloc.is_tracing():
            return fn(site, *args, **kwargs)
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = fn(site, *args, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
        site.kept.peak_bytes = max(site.kept.peak_bytes, int(peak - base))
        return out

    return wrapper
