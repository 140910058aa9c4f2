"""``ScreenStrategy``: a federated perturbation screen as one substrafl compute plan, in phases.

``method="nb_glm"``:

=================  =================================================  =====================
phase              rounds (a site step at every site, then aggregation) module
=================  =================================================  =====================
setup              checks, library sizes -> their global scale          setup
size_factors       (``poscounts`` only) median-of-ratios factors ->     setup
                   their scale
sums               size factors (kept), per-group sums -> filters,      setup, dispersion,
                   baseMean, dispersion groups, fit starts              fit
genewise           Cox-Reid searches (``genewise_rounds``)              dispersion
trend_prior_map    trend, prior (no round); MAP searches                dispersion
                   (``map_rounds``; none without shrinkage; with
                   ``dispersion="moments"`` all at the aggregator)
fit                control fit and every effect (``fit_rounds``)        fit
tests              Wald tests, BH (no round)                            fit
=================  =================================================  =====================

``method="wilcoxon"`` / ``"t_test"``: setup, size_factors, then ``rank_tests`` (one round:
the sums, then the tests; :mod:`~fed_de.screening.rank_tests`).

Each phase's opening aggregator steps run in the previous phase's last aggregation (see
:class:`fed_de.federation.strategy.Phase`), so "finish A, start B" costs no round. With the
defaults: 28 sequential steps (30 with ``poscounts``), whatever the number of
perturbations.
"""

from __future__ import annotations

import itertools
from dataclasses import fields

import numpy as np

from fed_de.errors import DisclosureError
from fed_de.federation import guard
from fed_de.federation.messages import Message
from fed_de.federation.strategy import FedStrategy, Phase, PlanCursor, run_phases
from fed_de.screening import dispersion, fit, rank_tests, setup
from fed_de.screening.state import ScreenOptions, ScreenSiteState, ScreenSiteView, ScreenState
from fed_de.screening.study import ScreenStudy

METHODS = ("nb_glm", "wilcoxon", "t_test")
OPTIONS = ScreenOptions()


class ScreenStrategy(FedStrategy):
    """Every perturbation of a screen against the shared control, across sites.

    Parameters
    ----------
    study
        ``ScreenStudy.to_dict()``: genes, perturbations, control, design factors.
    method
        ``"nb_glm"``, ``"wilcoxon"`` or ``"t_test"``.
    size_factors
        ``"library"`` (library size over its geometric mean) or ``"poscounts"``.
    dispersion
        ``"cox-reid"`` or ``"moments"``.
    dispersion_cells
        ``"control"`` (default) or ``"all"`` cells for the dispersions.
    shrink
        Shrink dispersions to the trend (MAP).
    fit_type
        Dispersion trend: ``"parametric"`` or ``"mean"``.
    min_mu
        Floor of fitted means (default :data:`fed_de.core.screen_sums.MIN_MU`).
    min_cell_size
        Disclosure control: a site leaves out perturbation groups with fewer cells and
        refuses a design cell with fewer control cells (0 = every disclosure rule off).
    min_pooled_group, min_nonzero
        Study-level disclosure rules (with ``min_cell_size > 0``): a (perturbation, design
        cell) group of fewer than ``min_pooled_group`` cells is left out of every sum (a
        perturbation with no group left is left out), and a
        (perturbation, gene) pair whose pooled group holds 1 .. ``min_nonzero - 1``
        expressing cells is withheld (its sums are sent as zeros; results NaN).
    min_pct_ctrl, min_pct_pert, min_mean_ctrl, min_mean_pert, min_cells_ctrl, min_cells_pert
        Expression filters (see :func:`fed_de.core.screen_testing.expression_filter`).
    genewise_rounds, map_rounds, fit_rounds
        Unrolled iteration counts (the plan is static).
    secure_aggregation, n_sites
        Mask every message so the aggregator sees only cross-site totals (two sites or more),
        for a study of ``n_sites`` declared sites (0: not checked).
    """

    def __init__(self, study: dict, method: str = OPTIONS.method,
                 size_factors: str = OPTIONS.size_factors, dispersion: str = OPTIONS.dispersion,
                 dispersion_cells: str = OPTIONS.dispersion_cells, shrink: bool = OPTIONS.shrink,
                 fit_type: str = OPTIONS.fit_type, min_mu: float = OPTIONS.min_mu,
                 min_cell_size: int = OPTIONS.min_cell_size,
                 min_pooled_group: int = OPTIONS.min_pooled_group,
                 min_nonzero: int = OPTIONS.min_nonzero,
                 min_pct_ctrl: float = OPTIONS.min_pct_ctrl,
                 min_pct_pert: float = OPTIONS.min_pct_pert,
                 min_mean_ctrl: float = OPTIONS.min_mean_ctrl,
                 min_mean_pert: float = OPTIONS.min_mean_pert,
                 min_cells_ctrl: int = OPTIONS.min_cells_ctrl,
                 min_cells_pert: int = OPTIONS.min_cells_pert,
                 genewise_rounds: int = OPTIONS.genewise_rounds,
                 map_rounds: int = OPTIONS.map_rounds, fit_rounds: int = OPTIONS.fit_rounds,
                 secure_aggregation: bool = True, n_sites: int = 0):
        checks = {"method": (method, METHODS), "size_factors": (size_factors,
                  ("library", "poscounts")), "dispersion": (dispersion, ("cox-reid", "moments")),
                  "dispersion_cells": (dispersion_cells, ("control", "all"))}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
        if genewise_rounds < 2 or map_rounds < 1 or fit_rounds < 1:
            raise ValueError("genewise_rounds >= 2, map_rounds >= 1 and fit_rounds >= 1")
        if dispersion_cells == "all" and int(n_sites) > 1 and int(min_cell_size) > 0:
            # its per-(perturbation, design cell) count sums are not ruled per gene: a group
            # with one expressing cell would send that cell's count (docs/privacy.md)
            raise DisclosureError(
                "dispersion_cells='all' sends each (perturbation, design cell) group's count "
                "sums, and a group with a single expressing cell would send that cell's "
                "count: it is refused from two sites under the disclosure rules. Use "
                "dispersion_cells='control' (the default), or min_cell_size=0 for an audited "
                "study")
        options = dict(
            method=method, size_factors=size_factors, dispersion=dispersion,
            dispersion_cells=dispersion_cells, shrink=bool(shrink), fit_type=fit_type,
            min_mu=float(min_mu), min_cell_size=int(min_cell_size),
            min_pooled_group=int(min_pooled_group), min_nonzero=int(min_nonzero),
            min_pct_ctrl=float(min_pct_ctrl), min_pct_pert=float(min_pct_pert),
            min_mean_ctrl=float(min_mean_ctrl), min_mean_pert=float(min_mean_pert),
            min_cells_ctrl=int(min_cells_ctrl), min_cells_pert=int(min_cells_pert),
            genewise_rounds=int(genewise_rounds), map_rounds=int(map_rounds),
            fit_rounds=int(fit_rounds))
        super().__init__(study=study, secure_aggregation=secure_aggregation, n_sites=n_sites,
                         **options)
        self.screen = ScreenStudy.from_dict(study)
        self.options = ScreenOptions(**options)

    # -- what the base asks for ----------------------------------------------------------------
    def initial_state(self) -> ScreenState:
        return ScreenState()

    def new_kept(self) -> ScreenSiteState:
        return ScreenSiteState()

    def site_view(self, data) -> ScreenSiteView:
        """The site with chunks in the study's gene order."""
        return ScreenSiteView(data=data.aligned_to(self.screen.genes), kept=self.kept,
                              study=self.screen, options=self.options)

    def context(self) -> dict:
        return {"study": self.screen, "options": self.options}

    def data_digest(self, data) -> str:
        """SHA-256 of the site's genes, cells, counts (read chunk by chunk, as the steps
        read them) and the study's columns of ``obs`` (the perturbation and the design
        factors): a site refuses when they change between the tasks of one run
        (:func:`fed_de.federation.guard.check_digest`)."""
        obs = data.adata.obs
        columns = [c for c in [self.screen.perturbation_column,
                               *(name for name, _ in self.screen.factors)] if c in obs.columns]
        head = [data.genes, tuple(str(c) for c in obs.index), obs[columns]]
        return guard.digest_arrays(itertools.chain(head, (X for _, X in data.chunks())))

    def withhold(self, message, state):
        """Zero the withheld (perturbation, gene) pairs in every per-pair field of a message,
        and the withheld genes in every field with a gene axis (the study-level rules
        decided at the first aggregation, :func:`scale_step`)."""
        scale = getattr(state, "scale", None)
        if scale is None or scale.withheld is None or not scale.withheld.any():
            return message
        groups = (len(self.screen.perturbations) + 1
                  if self.options.dispersion_cells == "all" else 0)
        return zero_pairs(message, scale.withheld, groups, scale.genes_withheld)

    def dims(self) -> dict[str, int]:
        """Message sizes: genes, perturbations, design cells, coefficients, dispersion groups,
        and the most points per gene a request may name."""
        st = self.screen
        G, P = len(st.genes), len(st.perturbations)
        C = int(np.prod(st.n_levels)) if st.factors else 1
        p = st.fit_design.shape[1]
        all_cells = self.options.dispersion_cells == "all"
        return {"G": G, "P": P, "C": C, "p": p, "T": p * (p + 1) // 2, "PC": P * C,
                "D": C * (P + 1) if all_cells else C,
                "K": dispersion.max_points()}

    def request_dims(self, state: ScreenState) -> dict[str, int]:
        """Points per gene of this round's dispersion request."""
        return {"K": state.disp.points.shape[1]} if state.disp is not None else {}

    # -- the plan ------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        """The plan: every phase, in order."""
        o = self.options
        plan = [setup.setup_phase()]
        if o.size_factors == "poscounts":
            plan.append(setup.size_factors_phase())
        if o.method != "nb_glm":
            return [*plan, rank_tests.phase()]
        plan.append(setup.sums_phase([dispersion.dispersion_groups, fit.fit_starts]))
        if o.dispersion == "cox-reid":
            plan += [dispersion.genewise_phase(o.genewise_rounds),
                     dispersion.map_phase(o.map_rounds, o.shrink)]
        else:
            plan.append(dispersion.moments_phase())
        return [*plan, fit.fit_phase(o.fit_rounds), fit.tests_phase()]

    def build_compute_plan(self, train_data_nodes, aggregation_node, evaluation_strategy=None,
                           num_rounds=None, clean_models=True):
        """Submit the phases; every loop runs its fixed number of rounds."""
        plan = PlanCursor(self, train_data_nodes, aggregation_node, clean_models)
        self.final_ref = run_phases(plan, self.phases())
        self.n_rounds = plan.round_idx


def zero_pairs(message: Message, withheld: np.ndarray, groups: int = 0,
               genes: np.ndarray | None = None) -> Message:
    """The message with the pairs ``withheld`` (perturbations x genes) set to zero in every
    field declared ``(P, G, ...)`` or ``(PC, G)`` (perturbation-major, design cells inside),
    and -- ``groups`` = P + 1 when every cell enters the dispersions -- in the dispersion
    sums ``(G, ..., D)`` of the perturbation groups (``D``: group-major, control first);
    the ``genes`` withheld whole (``(G,)`` bool) are set to zero along the gene axis of every
    field that has one (control sums per design cell, the control fit's sums, dispersion
    sums, rank tests' control sums)."""
    P = withheld.shape[0]
    kwargs = {}
    for f in fields(message):
        value = getattr(message, f.name)
        shape = f.metadata.get("shape")
        if shape is None:
            kwargs[f.name] = (None if value is None
                              else zero_pairs(value, withheld, groups, genes))
            continue
        value = np.asarray(value)
        if shape[:2] == ("P", "G"):
            mask = withheld.reshape(withheld.shape + (1,) * (value.ndim - 2))
            value = np.where(mask, 0.0, value)
        elif shape[:2] == ("PC", "G"):
            mask = np.repeat(withheld, value.shape[0] // P, axis=0)
            value = np.where(mask, 0.0, value)
        elif groups and shape[:1] == ("G",) and shape[-1:] == ("D",):
            cells = value.shape[-1] // groups
            by_group = np.vstack([np.zeros((1, withheld.shape[1]), dtype=bool), withheld])
            mask = np.repeat(by_group, cells, axis=0).T  # G x D
            mask = mask.reshape((mask.shape[0],) + (1,) * (value.ndim - 2) + (mask.shape[1],))
            value = np.where(mask, 0.0, value)
        if genes is not None and genes.any() and "G" in shape:
            axis = shape.index("G")
            mask = genes.reshape((1,) * axis + (-1,) + (1,) * (value.ndim - axis - 1))
            value = np.where(mask, 0.0, value)
        kwargs[f.name] = value
    return type(message)(**kwargs)
