"""``DESeq2Strategy``: the DESeq2 Wald pipeline as one substrafl compute plan.

The plan (each line a round: a local task at every site, then an aggregation):

1.  size factors: log-count sums                         -> log geometric means
2.  size factors at the sites; moments, linear-fit sums  -> baseMean, moments, linear fit
3.  rough-dispersion sums, log-linear start              -> alpha_hat, IRLS start
4.  IRLS for the dispersion-fit means (``mu_rounds``)    -> betas (skipped for cell-means designs)
5.  dispersion sums at start points                      -> gene-wise Newton search
6.  gene-wise Newton rounds (``genewise_rounds``)        -> ...; trend, prior, MAP start
7.  MAP Newton rounds (``map_rounds``)                   -> final dispersions
8.  final IRLS (``final_rounds``)                        -> betas
9.  fallback refit of unconverged genes (``fallback_rounds``) -> betas
10. X^T W X and deviance at the final betas              -> covariance, convergence flags
Contrasts, Wald tests and adjusted p-values then come from the last shared state.
"""

from __future__ import annotations

from fed_de.core.optim1d import STEP_FRACTIONS
from fed_de.steps.base import FedBase, PlanCursor
from fed_de.steps.cooks import K_THRESHOLDS, CooksMixin, cooks_applicable
from fed_de.steps.dispersion_init import DispersionInitMixin
from fed_de.steps.dispersions import ANCHORS, START_OFFSETS, DispersionsMixin
from fed_de.steps.fallback import STEPS as FALLBACK_STEPS
from fed_de.steps.fallback import FallbackMixin
from fed_de.steps.irls import N_CANDIDATES, IRLSMixin
from fed_de.steps.refit import RefitMixin
from fed_de.steps.size_factors import SizeFactorsMixin
from fed_de.steps.wald import WaldMixin

# measured: see docs/rounds.md
MU_ROUNDS = 8
GENEWISE_ROUNDS = 4
MAP_ROUNDS = 3
FINAL_ROUNDS = 8
FALLBACK_ROUNDS = 1
ROBUST_ROUNDS = 11  # per order-statistic search of the side chain (off the critical path)
REFIT_MU_ROUNDS = 3
REFIT_DISP_ROUNDS = 4
REFIT_FINAL_ROUNDS = 4


class DESeq2Strategy(FedBase, SizeFactorsMixin, DispersionInitMixin, IRLSMixin,
                     DispersionsMixin, FallbackMixin, WaldMixin, CooksMixin, RefitMixin):
    """Federated DESeq2 (Wald) with DESeq2's defaults.

    Parameters
    ----------
    study
        ``Study.to_dict()``: design, declared levels and genes.
    size_factors
        ``"ratio"`` or ``"poscounts"``.
    fit_type
        Dispersion trend: ``"parametric"`` (falls back to ``"mean"``) or ``"mean"``.
    min_cell_size
        Disclosure control (0 = off).
    round_counts
        Round non-integer counts instead of refusing them.
    mu_rounds, genewise_rounds, map_rounds, final_rounds, fallback_rounds
        Unrolled iteration counts (the plan is static).
    cooks
        Cook's distances, outlier replacement and refit (DESeq2's default); off: the plan of
        the Wald pipeline alone.
    robust_rounds, refit_mu_rounds, refit_disp_rounds, refit_final_rounds
        Rounds of the robust-dispersion searches (side chain) and of the refit.
    """

    def __init__(self, study: dict, size_factors: str = "ratio", fit_type: str = "parametric",
                 min_cell_size: int = 3, round_counts: bool = False,
                 mu_rounds: int = MU_ROUNDS, genewise_rounds: int = GENEWISE_ROUNDS,
                 map_rounds: int = MAP_ROUNDS, final_rounds: int = FINAL_ROUNDS,
                 fallback_rounds: int = FALLBACK_ROUNDS, test: str = "Wald",
                 reduced: str | None = None, cooks: bool = True,
                 robust_rounds: int = ROBUST_ROUNDS, refit_mu_rounds: int = REFIT_MU_ROUNDS,
                 refit_disp_rounds: int = REFIT_DISP_ROUNDS,
                 refit_final_rounds: int = REFIT_FINAL_ROUNDS):
        if test not in ("Wald", "LRT"):
            raise ValueError(f"test must be 'Wald' or 'LRT', not {test!r}")
        if test == "LRT" and not reduced:
            raise ValueError("test='LRT' needs a reduced design, e.g. reduced='~ batch'")
        super().__init__(study, size_factors=size_factors, fit_type=fit_type,
                         min_cell_size=min_cell_size, round_counts=round_counts,
                         mu_rounds=mu_rounds, genewise_rounds=genewise_rounds,
                         map_rounds=map_rounds, final_rounds=final_rounds,
                         fallback_rounds=fallback_rounds, test=test,
                         reduced=reduced if test == "LRT" else None, cooks=bool(cooks),
                         robust_rounds=robust_rounds, refit_mu_rounds=refit_mu_rounds,
                         refit_disp_rounds=refit_disp_rounds,
                         refit_final_rounds=refit_final_rounds)

    def dims(self) -> dict[str, int]:
        """Message sizes: genes, coefficients, and the dispersion search's points per gene."""
        base = super().dims()
        out = {**base, "K0": len(START_OFFSETS) + len(ANCHORS),
               "K": len(STEP_FRACTIONS), "KB": N_CANDIDATES, "KF": len(FALLBACK_STEPS),
               "K1": K_THRESHOLDS + 1, "NG": base["C"] + 1}
        out.setdefault("A", base["G"] * 2 * out["NG"])  # at most: every search target open
        return out

    def with_cooks(self) -> bool:
        """Cook's step in the plan: asked for, and a factor design (see ``cooks_applicable``)."""
        return bool(self.options.get("cooks", True)) and cooks_applicable(self.study)

    def saturated_design(self) -> bool:
        """Cell-means design known from the study alone: DESeq2 then uses the linear fit."""
        dims = self.dims()
        return not self.study.continuous and dims["C"] == dims["p"]

    def build_compute_plan(self, train_data_nodes, aggregation_node, evaluation_strategy=None,
                           num_rounds=None, clean_models=True):
        """Chain the steps; every loop runs its fixed number of rounds."""
        opt = self.options
        plan = PlanCursor(train_data_nodes, aggregation_node, clean_models)
        plan.round(self.local_log_sums, self.agg_log_means)
        plan.round(self.local_moments, self.agg_moments)
        robust = self._robust_side_chain(plan.fork()) if self.with_cooks() else None
        mu_rounds = 0 if self.saturated_design() else int(opt["mu_rounds"])
        lrt = opt["test"] == "LRT"
        plan.round(self.local_rough_lrt if lrt else self.local_rough, self.agg_rough, carry=True,
                   agg_params={"mu_rounds": mu_rounds})
        for _ in range(mu_rounds):
            plan.round(self.local_irls, self.agg_irls, carry=True,
                       local_params={"stage": "mu"}, agg_params={"stage": "mu"})
        plan.round(self.local_disp_start, self.agg_disp_start, carry=True)
        for _ in range(int(opt["genewise_rounds"]) - 1):
            plan.round(self.local_disp_eval, self.agg_disp_step, carry=True,
                       agg_params={"phase": "genewise"})
        plan.round(self.local_disp_eval, self.agg_disp_finish_genewise, carry=True)
        for _ in range(int(opt["map_rounds"]) - 1):
            plan.round(self.local_disp_eval, self.agg_disp_step, carry=True,
                       agg_params={"phase": "map"})
        plan.round(self.local_disp_eval, self.agg_disp_finish_map, carry=True)
        n_final, n_fb = int(opt["final_rounds"]), int(opt["fallback_rounds"])
        local_final = self.local_irls_lrt if lrt else self.local_irls
        for i in range(n_final):
            last = i == n_final - 1
            merge = robust is not None and last and n_fb == 0
            plan.round(local_final,
                       self.agg_merge_robust if merge else
                       self.agg_irls_finish if last else self.agg_irls,
                       carry=True, local_params={"stage": "final"},
                       agg_params={"inner": "agg_irls_finish"} if merge else {"stage": "final"},
                       extra=[robust] if merge else None)
        for i in range(n_fb):
            merge = robust is not None and i == n_fb - 1
            plan.round(self.local_fallback, self.agg_merge_robust if merge else self.agg_fallback,
                       carry=True, extra=[robust] if merge else None)
        if robust is None:
            self.final_ref = plan.round(self.local_wald_lrt if lrt else self.local_wald,
                                        self.agg_wald, carry=True)
        else:
            plan.round(self.local_wald_lrt_cooks if lrt else self.local_wald_cooks,
                       self.agg_wald_cooks, carry=True)
            self.final_ref = self._refit_rounds(plan, mu_rounds > 0, local_final)
        self.n_rounds = plan.round_idx

    def _robust_side_chain(self, side: PlanCursor):
        """Exact trimmed cell means / variances and the replacement means (side chain)."""
        side.aggregate(self.agg_robust_start, [], carry=True)
        for _ in range(2):  # A: normalised counts, then B: squared errors
            for _ in range(int(self.options["robust_rounds"])):
                side.round(self.local_robust_sums, self.agg_robust_refine, carry=True)
            side.round(self.local_robust_parts, self.agg_robust_means, carry=True)
        return side.shared

    def _refit_rounds(self, plan: PlanCursor, with_mu: bool, local_final):
        """DESeq2's refit of the genes whose outliers were replaced (others masked)."""
        opt = self.options
        for _ in range(int(opt["refit_mu_rounds"]) if with_mu else 0):
            plan.round(self.local_irls, self.agg_irls, carry=True,
                       local_params={"stage": "mu"}, agg_params={"stage": "mu"})
        plan.round(self.local_disp_start, self.agg_refit_disp_start, carry=True)
        n_disp = int(opt["refit_disp_rounds"])
        for i in range(n_disp - 1):
            plan.round(self.local_disp_pair, self.agg_refit_disp_step, carry=True,
                       agg_params={"last": i == n_disp - 2})
        n_final = int(opt["refit_final_rounds"])
        for i in range(n_final):
            last = i == n_final - 1
            ref = plan.round(local_final, self.agg_refit_finish if last else self.agg_irls,
                             carry=True, local_params={"stage": "final"},
                             agg_params={} if last else {"stage": "final"})
        return ref
