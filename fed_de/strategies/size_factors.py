"""A strategy that runs only the size-factor step (foundation, and a building block)."""

from __future__ import annotations

from fed_de.steps.base import FedBase, PlanCursor
from fed_de.steps.size_factors import SizeFactorsMixin


class SizeFactorsStrategy(FedBase, SizeFactorsMixin):
    """Median-of-ratios size factors and baseMean, federated.

    Parameters
    ----------
    study
        ``Study.to_dict()``.
    size_factors
        ``"ratio"`` (DESeq2 default) or ``"poscounts"``.
    min_cell_size
        Disclosure control: smallest non-empty design cell a site accepts (0 = off).
    """

    def __init__(self, study: dict, size_factors: str = "ratio", min_cell_size: int = 3,
                 round_counts: bool = False):
        super().__init__(study, size_factors=size_factors, min_cell_size=min_cell_size,
                         round_counts=round_counts)

    def build_compute_plan(self, train_data_nodes, aggregation_node, evaluation_strategy=None,
                           num_rounds=None, clean_models=True):
        """Round 1 (log sums), round 2 (size factors, baseMean), local rescale."""
        plan = PlanCursor(train_data_nodes, aggregation_node, clean_models)
        plan.round(self.local_log_sums, self.agg_log_means)
        final = plan.round(self.local_size_factors, self.agg_base_mean)
        plan.local(self.local_finalize_size_factors)
        self.final_ref = final
