"""Federated trimmed means of normalised counts (R's ``mean(x, trim)``), exact, from sums.

The building block of DESeq2's outlier replacement (``replaceOutliers``: the 0.2-trimmed
mean of each gene's normalised counts over all samples). Protocol (:mod:`fed_de.core.
order_stats`):

Search rounds  local : per gene and bounding rank (the ``lo``-th and ``hi``-th values), the
                       count, sum and sum of squares of the site's values in each of K + 1
                       sub-intervals of the current bracket
               agg   : keep the sub-interval holding the rank; a zero-variance sub-interval
                       gives the value exactly; propose K thresholds inside it
Final round    local : sum of values strictly between the two bounding values and the counts
                       at or below / below them        agg : the exact trimmed mean
With K = 15, 5-6 search rounds isolate the bounding values of 20-300 samples; the plan
unrolls ``search_rounds`` (default 8) and masks finished genes.
"""

from __future__ import annotations

import numpy as np
from substrafl.remote import remote, remote_data

from fed_de.core import order_stats
from fed_de.simulation.opener import SiteData
from fed_de.steps.base import FedBase, PlanCursor, sends, sum_messages
from fed_de.steps.size_factors import SizeFactorsMixin

K_THRESHOLDS = 15
N_TARGETS = 2  # the lo-th and hi-th values


class TrimmedMeanMixin:
    """Exact per-gene trimmed means of normalised counts over all sites."""

    def _normalised(self, site: SiteData) -> np.ndarray:
        return self.counts(site) / self.local["size_factors"][:, None]

    @remote_data
    @sends(count=("G", "NT", "K1"), sum=("G", "NT", "K1"), sumsq=("G", "NT", "K1"))
    def local_order_sums(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """Counts and sums of this site's values in each sub-interval of each bracket."""
        # final size factors (poscounts rescales them by the global factor)
        self.local["size_factors"] = (self.local["size_factors_raw"]
                                      / shared_state.get("sf_scale", 1.0))
        os_state = shared_state["order_search"]
        G, T, K = os_state["thresholds"].shape
        out = {k: np.zeros((G, T, K + 1)) for k in ("count", "sum", "sumsq")}
        idx = np.flatnonzero(~os_state["done"].all(axis=1))
        if idx.size:
            part = order_stats.interval_sums(self._normalised(data_from_opener)[:, idx],
                                             os_state["thresholds"][idx])
            for key, value in part.items():
                out[key][idx] = value
        return out

    @remote
    def agg_order_start(self, shared_states: list[dict], trim: float = 0.2) -> dict:
        """baseMean round done: ranks of the trimmed set and the first thresholds."""
        state = self.agg_base_mean(shared_states, _skip=True)
        n = int(round(state["n_samples"]))
        lo, hi = order_stats.trim_ranks(n, trim)
        G = len(self.study.genes)
        state["trim_ranks"] = (lo, hi)
        state["order_search"] = {
            "thresholds": order_stats.first_thresholds(G, N_TARGETS, K_THRESHOLDS),
            "done": np.zeros((G, N_TARGETS), dtype=bool), "ranks": np.tile([lo, hi], (G, 1)),
            "state": None}
        return state

    @remote
    def agg_order_refine(self, shared_states: list[dict]) -> dict:
        """Keep the sub-interval holding each rank; propose the next thresholds."""
        *messages, prev = shared_states
        tot = sum_messages(messages)
        search = prev["order_search"]
        new = order_stats.refine(search["thresholds"], tot, search["ranks"].astype(float),
                                 search["state"])
        state = dict(prev)
        state["order_search"] = {"thresholds": new["thresholds"], "done": new["done"],
                                 "ranks": search["ranks"], "state": new}
        return state

    @remote_data
    @sends(sum_inside=("G",), n_le_lo=("G",), n_lt_hi=("G",))
    def local_trimmed_parts(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """Sums between the two bounding values, and counts at or below / below them."""
        value = shared_state["order_search"]["state"]["value"]
        return order_stats.trimmed_sum_parts(self._normalised(data_from_opener),
                                             np.nan_to_num(value[:, 0]),
                                             np.nan_to_num(value[:, 1]))

    @remote
    def agg_trimmed_mean(self, shared_states: list[dict]) -> dict:
        """The exact trimmed means (NaN where a bounding value was not isolated in time)."""
        *messages, prev = shared_states
        tot = sum_messages(messages)
        search = prev["order_search"]
        value = search["state"]["value"]
        lo, hi = prev["trim_ranks"]
        tm = order_stats.trimmed_mean(tot, value[:, 0], value[:, 1], lo, hi)
        state = dict(prev)
        state["trimmed_mean"] = np.where(search["done"].all(axis=1), tm, np.nan)
        return state


class TrimmedMeanStrategy(FedBase, SizeFactorsMixin, TrimmedMeanMixin):
    """Size factors, then exact federated trimmed means of the normalised counts."""

    def __init__(self, study: dict, trim: float = 0.2, search_rounds: int = 8,
                 size_factors: str = "ratio", min_cell_size: int = 3):
        super().__init__(study, trim=trim, search_rounds=search_rounds,
                         size_factors=size_factors, min_cell_size=min_cell_size)

    def dims(self) -> dict[str, int]:
        """Message sizes: genes, bounding ranks, sub-intervals."""
        return {**super().dims(), "NT": N_TARGETS, "K1": K_THRESHOLDS + 1}

    def build_compute_plan(self, train_data_nodes, aggregation_node, evaluation_strategy=None,
                           num_rounds=None, clean_models=True):
        """Size factors (2 rounds), search rounds, final sums."""
        plan = PlanCursor(train_data_nodes, aggregation_node, clean_models)
        plan.round(self.local_log_sums, self.agg_log_means)
        plan.round(self.local_size_factors, self.agg_order_start,
                   agg_params={"trim": float(self.options["trim"])})
        for _ in range(int(self.options["search_rounds"])):
            plan.round(self.local_order_sums, self.agg_order_refine, carry=True)
        plan.round(self.local_trimmed_parts, self.agg_trimmed_mean, carry=True)
