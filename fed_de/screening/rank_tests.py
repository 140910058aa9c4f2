"""Perturbation screen: the rank and mean tests scanpy users expect, in one data round.

``wilcoxon``: van Elteren's stratified Wilcoxon rank-sum test. Each site ranks, gene by gene,
every perturbation's cells together with the control cells of the same stratum (its own
cells of one design cell: ranks never leave a site), and sends per (perturbation, gene) the
Mann-Whitney statistic, its null mean and its tie-corrected null variance, weighted by
``1/(N + 1)`` and summed over its strata. The aggregator adds the sites' sums: the z statistic
is the van Elteren statistic over all strata of all sites. With one site and one stratum it is
the (tie-corrected) Wilcoxon rank-sum test.

``t_test``: Welch's t-test on log-normalised values ``x = log1p(y / s)`` from the sums of
``x`` and ``x^2`` over each group's cells (exactly the pooled test).

Both report scanpy's ``logfoldchanges``: ``log2((expm1(mean x_p) + 1e-9) / (expm1(mean x_c)
+ 1e-9))``. Round: local sums -> aggregation (tests, BH per perturbation).
"""

from __future__ import annotations

import numpy as np
from substrafl.remote import remote, remote_data

from fed_de.core import screen as core
from fed_de.screening._old_base import sends, sum_messages
from fed_de.screening.data import ScreenSite
from fed_de.screening.setup import tracked

FILTER_SCHEMA = {"ctrl_y": ("C", "G"), "ctrl_norm": ("C", "G"), "ctrl_expr": ("C", "G"),
                 "ctrl_n": ("C",), "pert_norm": ("P", "G"), "pert_expr": ("P", "G"),
                 "pert_n": ("P", "C"), "ctrl_x": ("G",), "ctrl_x2": ("G",),
                 "pert_x": ("P", "G"), "pert_x2": ("P", "G")}


def scanpy_lfc(mean_x_pert: np.ndarray, mean_x_ctrl: np.ndarray) -> np.ndarray:
    """scanpy's ``logfoldchanges`` from mean log-normalised values."""
    return np.log2((np.expm1(mean_x_pert) + 1e-9) / (np.expm1(mean_x_ctrl) + 1e-9))


class ScreenRankTestsMixin:
    """Wilcoxon (van Elteren) and Welch t-tests of a screen."""

    def _filter_sums(self, s: dict) -> dict:
        return {"ctrl_y": s["y"][0], "ctrl_norm": s["norm"][0], "ctrl_expr": s["expr"][0],
                "ctrl_n": s["n"][0], "pert_norm": s["norm"][1:].sum(axis=1),
                "pert_expr": s["expr"][1:].sum(axis=1), "pert_n": s["n"][1:],
                "ctrl_x": s["x"][0].sum(axis=0), "ctrl_x2": s["x2"][0].sum(axis=0),
                "pert_x": s["x"][1:].sum(axis=1), "pert_x2": s["x2"][1:].sum(axis=1)}

    @remote_data
    @sends(**FILTER_SCHEMA)
    @tracked
    def local_screen_ttest(self, data_from_opener: ScreenSite, shared_state: dict) -> dict:
        """Size factors (kept); sums of log-normalised values and their squares per group."""
        site = self.site_view(data_from_opener)
        self.local["sf"] = self.screen_size_factors(shared_state)
        return self._filter_sums(self.screen_group_sums(site, log_values=True))

    @remote_data
    @sends(u=("P", "G"), e=("P", "G"), v=("P", "G"), **FILTER_SCHEMA)
    @tracked
    def local_screen_wilcoxon(self, data_from_opener: ScreenSite, shared_state: dict) -> dict:
        """Size factors (kept); van Elteren sums over this site's strata; filter sums."""
        site = self.site_view(data_from_opener)
        self.local["sf"] = self.screen_size_factors(shared_state)
        out = self._filter_sums(self.screen_group_sums(site, log_values=True))
        q, c, Q, C = self.cell_groups()
        # rank y / (raw factor): the same order as y / s, without the global scale, so
        # counts whose ratios are equal stay exactly tied whatever the scale's last bits
        raw = self.local["sf_raw"] if "sf_raw" in self.local else self.local["lib"]
        vals, cols, qs, cs = [], [], [], []
        for start, X in site.chunks(np.flatnonzero(q >= 0)):
            rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr)) + start
            keep = q[rows] >= 0
            rows = rows[keep]
            vals.append(X.data[keep] / raw[rows])
            cols.append(X.indices[keep].astype(np.int64))
            qs.append(q[rows])
            cs.append(c[rows])
        used = q >= 0
        n_cells = np.bincount(c[used] * Q + q[used], minlength=C * Q).reshape(C, Q)
        ve = core.van_elteren_site(np.concatenate(vals), np.concatenate(cols),
                                   np.concatenate(qs), np.concatenate(cs), n_cells,
                                   len(self.screen.genes))
        out.update(ve)
        return out

    def _rank_results(self, tot: dict, stat: np.ndarray, pvalue: np.ndarray) -> dict:
        summ = self.screen_summary(tot)
        n_ctrl, n_pert = summ["n_ctrl"], summ["n_pert"]
        with np.errstate(invalid="ignore", divide="ignore"):
            mx_c = tot["ctrl_x"] / n_ctrl
            mx_p = tot["pert_x"] / n_pert[:, None]
        tested = summ["tested"] & np.isfinite(stat)
        pvalue = np.where(tested, pvalue, np.nan)
        lfc = np.where(tested, scanpy_lfc(mx_p, mx_c[None, :]), np.nan)
        return {"results": {
            "baseMean": summ["base_mean"], "log2FoldChange": lfc,
            "lfcSE": np.full(lfc.shape, np.nan), "stat": np.where(tested, stat, np.nan),
            "pvalue": pvalue, "padj": core.bh_by_row(pvalue)},
            "tested": tested, "n_pert": n_pert, "n_ctrl": n_ctrl,
            "ctrl_mean": summ["ctrl_mean"]}

    @remote
    def agg_screen_ttest(self, shared_states: list[dict]) -> dict:
        """Welch's t-test of every perturbation against the control; BH per perturbation."""
        tot = sum_messages(shared_states)
        self.check_control_levels(tot["ctrl_n"])
        n_ctrl = tot["ctrl_n"].sum()
        n_pert = tot["pert_n"].sum(axis=1)[:, None]
        _, t, _, pval = core.welch_t(n_pert, tot["pert_x"], tot["pert_x2"],
                                     n_ctrl, tot["ctrl_x"][None, :], tot["ctrl_x2"][None, :])
        return self._rank_results(tot, t, pval)

    @remote
    def agg_screen_wilcoxon(self, shared_states: list[dict]) -> dict:
        """van Elteren z statistics from the sites' sums; BH per perturbation."""
        tot = sum_messages(shared_states)
        self.check_control_levels(tot["ctrl_n"])
        z, pval = core.van_elteren_test(tot["u"], tot["e"], tot["v"])
        return self._rank_results(tot, z, pval)
