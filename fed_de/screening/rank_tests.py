"""A screen's rank and mean tests (scanpy's ``wilcoxon`` / ``t-test``), in one data round.

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
+ 1e-9))``.

Round (``rank_tests``)  site : size factors (kept); filter sums, sums of ``x`` and ``x^2``
                               per group (``wilcoxon``: van Elteren's sums)   -> RankSums
                        agg  : filters, the tests, BH per perturbation (:func:`rank_tests`)
"""

from __future__ import annotations

import numpy as np

from fed_de.core import screen_testing as ct
from fed_de.federation.calls import aggregator_step, site_step
from fed_de.federation.messages import Message, part, sums
from fed_de.federation.strategy import Phase, Round
from fed_de.screening.setup import keep_size_factors, summary_of
from fed_de.screening.state import (
    Scale,
    ScreenOptions,
    ScreenResults,
    ScreenSiteView,
    tracked,
)
from fed_de.screening.study import ScreenStudy


class VanElterenSums(Message):
    """``wilcoxon``: van Elteren's weighted sums over this site's strata."""

    u: np.ndarray = sums("P", "G")
    e: np.ndarray = sums("P", "G")
    v: np.ndarray = sums("P", "G")


class RankSums(Message):
    """The filters' sums, and sums of log-normalised values and their squares per arm."""

    ctrl_y: np.ndarray = sums("C", "G")
    ctrl_norm: np.ndarray = sums("C", "G")
    ctrl_expr: np.ndarray = sums("C", "G")
    ctrl_n: np.ndarray = sums("C")
    pert_norm: np.ndarray = sums("P", "G")
    pert_expr: np.ndarray = sums("P", "G")
    pert_n: np.ndarray = sums("P", "C")
    ctrl_x: np.ndarray = sums("G")
    ctrl_x2: np.ndarray = sums("G")
    pert_x: np.ndarray = sums("P", "G")
    pert_x2: np.ndarray = sums("P", "G")
    van_elteren: VanElterenSums | None = part()


def scanpy_lfc(mean_x_pert: np.ndarray, mean_x_ctrl: np.ndarray) -> np.ndarray:
    """scanpy's ``logfoldchanges`` from mean log-normalised values."""
    return np.log2((np.expm1(mean_x_pert) + 1e-9) / (np.expm1(mean_x_ctrl) + 1e-9))


# -- site side ---------------------------------------------------------------------------------
def _van_elteren(site: ScreenSiteView) -> VanElterenSums:
    """van Elteren's sums over this site's strata (its design cells)."""
    q, c, Q, C = site.cell_groups()
    # rank y / (raw factor): the same order as y / s, without the global scale, so
    # counts whose ratios are equal stay exactly tied whatever the scale's last bits
    kept = site.kept
    raw = kept.sf_raw if kept.sf_raw is not None else kept.lib
    vals, cols, qs, cs = [], [], [], []
    for start, X in site.data.chunks(np.flatnonzero(q >= 0)):
        rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr)) + start
        keep = q[rows] >= 0
        rows = rows[keep]
        vals.append(X.data[keep] / raw[rows])
        cols.append(X.indices[keep].astype(np.int64))
        qs.append(q[rows])
        cs.append(c[rows])
    used = q >= 0
    n_cells = np.bincount(c[used] * Q + q[used], minlength=C * Q).reshape(C, Q)
    ve = ct.van_elteren_site(np.concatenate(vals), np.concatenate(cols), np.concatenate(qs),
                             np.concatenate(cs), n_cells, len(site.study.genes))
    return VanElterenSums(**ve)


@site_step
@tracked
def rank_sums(site: ScreenSiteView, scale: Scale) -> RankSums:
    """Size factors (kept); sums of log-normalised values and their squares per group;
    ``wilcoxon``: van Elteren's sums over this site's strata."""
    keep_size_factors(site, scale)
    s = site.group_sums(log_values=True)
    ve = _van_elteren(site) if site.options.method == "wilcoxon" else None
    return RankSums(
        ctrl_y=s["y"][0], ctrl_norm=s["norm"][0], ctrl_expr=s["expr"][0], ctrl_n=s["n"][0],
        pert_norm=s["norm"][1:].sum(axis=1), pert_expr=s["expr"][1:].sum(axis=1),
        pert_n=s["n"][1:], ctrl_x=s["x"][0].sum(axis=0), ctrl_x2=s["x2"][0].sum(axis=0),
        pert_x=s["x"][1:].sum(axis=1), pert_x2=s["x2"][1:].sum(axis=1), van_elteren=ve)


# -- aggregator side ---------------------------------------------------------------------------
def _statistics(sums: RankSums, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Statistic and p-value of every pair: van Elteren's z or Welch's t."""
    if method == "wilcoxon":
        ve = sums.van_elteren
        return ct.van_elteren_test(ve.u, ve.e, ve.v)
    n_ctrl = sums.ctrl_n.sum()
    n_pert = sums.pert_n.sum(axis=1)[:, None]
    _, t, _, pval = ct.welch_t(n_pert, sums.pert_x, sums.pert_x2, n_ctrl,
                               sums.ctrl_x[None, :], sums.ctrl_x2[None, :])
    return t, pval


@aggregator_step(writes=("summary", "results"))
def rank_tests(sums: RankSums, study: ScreenStudy, options: ScreenOptions,
               scale: Scale) -> dict:
    """The filters, every perturbation's test against the control, BH per perturbation."""
    summary = summary_of(sums, study, options, scale)
    stat, pvalue = _statistics(sums, options.method)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx_c = sums.ctrl_x / summary.n_ctrl
        mx_p = sums.pert_x / summary.n_pert[:, None]
    tested = summary.tested & np.isfinite(stat)
    pvalue = np.where(tested, pvalue, np.nan)
    lfc = np.where(tested, scanpy_lfc(mx_p, mx_c[None, :]), np.nan)
    arrays = {"baseMean": summary.base_mean, "log2FoldChange": lfc,
              "lfcSE": np.full(lfc.shape, np.nan), "stat": np.where(tested, stat, np.nan),
              "pvalue": pvalue, "padj": ct.bh_by_row(pvalue)}
    return {"summary": summary, "results": ScreenResults(arrays=arrays, tested=tested)}


def phase() -> Phase:
    """One round: the sums, then the tests."""
    return Phase("rank_tests", rounds=[Round(rank_sums, [rank_tests])])
