"""``ScreenStrategy``: a federated perturbation screen as one substrafl compute plan.

``method="nb_glm"`` (each line a round: a local task at every site, then an aggregation):

1.  library sizes (kept)                                  -> geometric-mean scale
1b. (``poscounts``) median-of-ratios factors (kept)        -> their scale
2.  size factors (kept); per-group sums                   -> filters, baseMean, moments,
                                                             dispersion and fit starts
3.  gene-wise Cox-Reid search (``genewise_rounds``)        -> trend, prior
4.  MAP search (``map_rounds``)                            -> final dispersions
5.  control fit + every perturbation effect (``fit_rounds``) -> Wald tests, BH
``dispersion="moments"`` skips 3-4. With the defaults: 30 sequential steps (28 with
``fit_rounds=5``), whatever the number of perturbations.

``method="wilcoxon"`` / ``"t_test"``: rounds 1 (1b) and one round of sums -> tests.
"""

from __future__ import annotations

import numpy as np

from fed_de.core.optim1d import STEP_FRACTIONS
from fed_de.screening._old_base import FedBase, PlanCursor
from fed_de.screening.dispersion import ANCHORS, START_OFFSETS, ScreenDispersionMixin
from fed_de.screening.fit import ScreenFitMixin
from fed_de.screening.rank_tests import ScreenRankTestsMixin
from fed_de.screening.setup import ScreenSetupMixin, ScreenStudy

METHODS = ("nb_glm", "wilcoxon", "t_test")
# measured on synthetic screens: see docs/screen.md
GENEWISE_ROUNDS = 4
MAP_ROUNDS = 3
FIT_ROUNDS = 5


class ScreenStrategy(FedBase, ScreenSetupMixin, ScreenDispersionMixin, ScreenFitMixin,
                     ScreenRankTestsMixin):
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
        Floor of fitted means (default :data:`fed_de.core.screen.MIN_MU`).
    min_cell_size
        Disclosure control: a site leaves out perturbation groups with fewer cells and
        refuses a design cell with fewer control cells (0 = off).
    min_pct_ctrl, min_pct_pert, min_mean_ctrl, min_mean_pert, min_cells_ctrl, min_cells_pert
        Expression filters (see :func:`fed_de.core.screen.expression_filter`).
    genewise_rounds, map_rounds, fit_rounds
        Unrolled iteration counts (the plan is static).
    """

    def __init__(self, study: dict, method: str = "nb_glm", size_factors: str = "library",
                 dispersion: str = "cox-reid", dispersion_cells: str = "control",
                 shrink: bool = True, fit_type: str = "parametric", min_mu: float = 1e-8,
                 min_cell_size: int = 3, min_pct_ctrl: float = 0.01, min_pct_pert: float = 0.002,
                 min_mean_ctrl: float = 0.05, min_mean_pert: float = 0.005,
                 min_cells_ctrl: int = 1, min_cells_pert: int = 1,
                 genewise_rounds: int = GENEWISE_ROUNDS, map_rounds: int = MAP_ROUNDS,
                 fit_rounds: int = FIT_ROUNDS):
        checks = {"method": (method, METHODS), "size_factors": (size_factors,
                  ("library", "poscounts")), "dispersion": (dispersion, ("cox-reid", "moments")),
                  "dispersion_cells": (dispersion_cells, ("control", "all"))}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
        if genewise_rounds < 2 or map_rounds < 1 or fit_rounds < 1:
            raise ValueError("genewise_rounds >= 2, map_rounds >= 1 and fit_rounds >= 1")
        super().__init__(study, method=method, size_factors=size_factors, dispersion=dispersion,
                         dispersion_cells=dispersion_cells, shrink=bool(shrink),
                         fit_type=fit_type, min_mu=float(min_mu), min_cell_size=int(min_cell_size),
                         min_pct_ctrl=float(min_pct_ctrl), min_pct_pert=float(min_pct_pert),
                         min_mean_ctrl=float(min_mean_ctrl), min_mean_pert=float(min_mean_pert),
                         min_cells_ctrl=int(min_cells_ctrl), min_cells_pert=int(min_cells_pert),
                         genewise_rounds=int(genewise_rounds), map_rounds=int(map_rounds),
                         fit_rounds=int(fit_rounds))
        self.screen = ScreenStudy.from_dict(study)

    def dims(self) -> dict[str, int]:
        """Message sizes: genes, perturbations, design cells, coefficients, points per gene."""
        st = self.screen
        G, P = len(st.genes), len(st.perturbations)
        C = int(np.prod(st.n_levels)) if st.factors else 1
        p = st.fit_design.shape[1]
        all_cells = self.options["dispersion_cells"] == "all"
        return {"G": G, "P": P, "C": C, "p": p, "T": p * (p + 1) // 2,
                "K0": len(START_OFFSETS) + len(ANCHORS), "K": len(STEP_FRACTIONS),
                "D": C * (P + 1) if all_cells else C, "PCa": P * C if all_cells else 0,
                "Gp": G if self.options["size_factors"] == "poscounts" else 0}

    def build_compute_plan(self, train_data_nodes, aggregation_node, evaluation_strategy=None,
                           num_rounds=None, clean_models=True):
        """Chain the rounds; every loop runs its fixed number of rounds."""
        opt = self.options
        plan = PlanCursor(train_data_nodes, aggregation_node, clean_models)
        plan.round(self.local_screen_setup, self.agg_screen_setup)
        if opt["size_factors"] == "poscounts":
            plan.round(self.local_screen_posfactors, self.agg_screen_posscale)
        if opt["method"] == "t_test":
            plan.round(self.local_screen_ttest, self.agg_screen_ttest)
        elif opt["method"] == "wilcoxon":
            plan.round(self.local_screen_wilcoxon, self.agg_screen_wilcoxon)
        else:
            self._nb_glm_rounds(plan)
        self.n_rounds = plan.round_idx

    def _nb_glm_rounds(self, plan: PlanCursor) -> None:
        opt = self.options
        plan.round(self.local_screen_sums, self.agg_screen_sums)
        if opt["dispersion"] == "cox-reid":
            plan.round(self.local_screen_disp_start, self.agg_screen_disp_start, carry=True)
            for _ in range(opt["genewise_rounds"] - 2):
                plan.round(self.local_screen_disp_eval, self.agg_screen_disp_step, carry=True,
                           agg_params={"phase": "genewise"})
            plan.round(self.local_screen_disp_eval, self.agg_screen_disp_finish_genewise,
                       carry=True)
            if opt["shrink"]:
                for _ in range(opt["map_rounds"] - 1):
                    plan.round(self.local_screen_disp_eval, self.agg_screen_disp_step,
                               carry=True, agg_params={"phase": "map"})
                plan.round(self.local_screen_disp_eval, self.agg_screen_disp_finish_map,
                           carry=True)
        for _ in range(opt["fit_rounds"] - 1):
            plan.round(self.local_screen_fit, self.agg_screen_fit, carry=True)
        self.final_ref = plan.round(self.local_screen_fit_final, self.agg_screen_fit_final,
                                    carry=True)
