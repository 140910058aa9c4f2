"""``DESeq2Strategy``: the DESeq2 pipeline as one substrafl compute plan, written as phases.

=================  ===================================================  ======================
phase              rounds (a site step at every site, then aggregation)  module
=================  ===================================================  ======================
size_factors       log-count sums -> geometric means; size factors,     size_factors, moments
                   moments, linear fit
mu_fit             rough dispersions, IRLS start; IRLS of the           moments, irls
                   dispersion-fit means (``mu_rounds``; none for
                   cell-means designs)
genewise           Cox-Reid searches (``genewise_rounds``)              dispersions
trend_prior_map    trend, prior (no round); MAP searches                dispersions
                   (``map_rounds``)
final_fit          IRLS (``final_rounds``; LRT: the reduced model in    irls, fallback
                   the same rounds); fallback of unconverged genes
                   (``fallback_rounds``)
robust (side)      exact trimmed statistics for Cook's, in parallel     cooks
                   from after size_factors
closing            X'WX and deviance at the final fit; with Cook's,     closing, cooks
                   the Cook's counts and decisions
refit              Cook's refit of replaced genes                       refit
postfit            when asked: LFC shrinkage (apeglm / normal prior)    postfit, shrink, pca
                   and VST + PCA, in the same rounds (``shrink_rounds``,
                   ``pca_rounds`` + 2)
tests              contrasts, Wald/LRT, Cook's filter, independent      results
                   filtering, BH: at the aggregator, no round
=================  ===================================================  ======================

Each phase's opening aggregator steps run in the previous phase's last aggregation (see
:class:`fed_de.federation.strategy.Phase`), so "finish A, start B" costs no round.
"""

from __future__ import annotations

import numpy as np

from fed_de.bulk import closing, cooks, dispersions, irls, postfit, refit
from fed_de.bulk import dp as bulk_dp
from fed_de.bulk import size_factors as sfs
from fed_de.bulk.cooks import replace_minimum
from fed_de.bulk.state import DESeq2Options, RunState, Site, SiteState
from fed_de.core import disp_path
from fed_de.core.fallback import STEPS as FALLBACK_STEPS
from fed_de.core.irls import N_CANDIDATES
from fed_de.design import Study, cell_design_rows, n_distinct_rows, reduced_study
from fed_de.federation import guard, secure
from fed_de.federation.calls import invoke
from fed_de.federation.messages import fold_columns
from fed_de.federation.strategy import FedStrategy, Phase, PlanCursor, Round, run_phases

OPTIONS = DESeq2Options()
#: Parts of the run state that always hold finite numbers (others may hold NaN for genes
#: out of a pass, or infinite search bounds): a site refuses a request where they do not.
FINITE = ("totals.n_samples", "totals.sf_scale", "totals.xtx", "totals.xim",
          "totals.cell_counts", "totals.max_disp", "robust.ranks", "robust.sizes",
          "robust.scales", "robust.search.k", "robust.search.lo", "robust.search.thresholds",
          "robust.search.n_lo", "robust.search.n_hi", "pca.V", "pca.shift",
          "shrink.candidates")
TESTS = ("Wald", "LRT")
#: messages whose ``T`` / ``Tr`` columns are sums of ``w x_i x_j`` (packed X'WX, its
#: derivatives, X'X): folded under secure aggregation (:meth:`_BulkStrategy.column_folds`)
FOLDED = ("IRLSSums", "DispSums", "FallbackSums", "ClosingSums", "ClosingFitSums",
          "MomentSums")


def _products(rows: np.ndarray) -> np.ndarray:
    """``x_i x_j`` (i <= j, packed order) of design rows: cells x T."""
    iu = np.triu_indices(rows.shape[1])
    return np.asarray(rows, dtype=float)[:, iu[0]] * np.asarray(rows, dtype=float)[:, iu[1]]


class _BulkStrategy(FedStrategy):
    """What the bulk strategies share: the study, typed options, the site's view."""

    def __init__(self, study: dict, secure_aggregation: bool = True, n_sites: int = 0,
                 **options):
        super().__init__(study=study, secure_aggregation=secure_aggregation, n_sites=n_sites,
                         **options)
        self.study = Study.from_dict(study)
        self.options = DESeq2Options(**options)
        reduced = self.options.reduced
        self.reduced = reduced_study(self.study, reduced) if reduced else None

    def initial_state(self) -> RunState:
        return RunState()

    def new_kept(self) -> SiteState:
        return SiteState()

    def site_view(self, data) -> Site:
        return Site(data=data, kept=self.kept, study=self.study, options=self.options,
                    reduced=self.reduced)

    def context(self) -> dict:
        return {"study": self.study, "options": self.options, "reduced": self.reduced,
                "n_sites": self.n_sites}

    def data_digest(self, data) -> str:
        """SHA-256 of the site's genes, samples, counts and the design's sample columns."""
        obs = data._obs
        columns = [c for c in [*self.study.levels, *self.study.continuous] if c in obs.columns]
        return guard.digest_arrays([data.genes, data.samples, data.counts,
                                    *(obs[c] for c in columns)])

    def kept_parts(self) -> tuple[str, ...]:
        """Parts every aggregation sends (and a resume seed keeps) besides those later steps
        read: what the results read from the final state (:mod:`fed_de.bulk.results`),
        ``totals`` / ``start`` (which the sites' re-derived state reads,
        :func:`fed_de.bulk.rebuild.restore`), the masking relay and a gene selection; the
        others stop travelling once no later step reads them (the dispersion search's
        evaluated points after the MAP round, the first fit after the final one)."""
        return ("totals", "start", "dispersions", "genes", "cooks", "refit", "trend", "shrink",
                "pca", "secure", "rows")

    def restore(self, data, state) -> None:
        """A resumed plan's first task at this site: re-derive what it keeps from its data
        and the seeded state (:func:`fed_de.bulk.rebuild.restore`)."""
        if self.kept.design is None and isinstance(state, RunState) and state.totals is not None:
            from fed_de.bulk import rebuild

            rebuild.restore(self.site_view(data), state, n_sites=self.n_sites)

    def resume_refusal(self, state) -> str | None:
        """Why a resumed plan cannot start from ``state`` (:func:`fed_de.bulk.rebuild.refusal`)."""
        from fed_de.bulk import rebuild

        cooks_on = getattr(self, "with_cooks", lambda: False)()
        return rebuild.refusal(state, cooks_on)

    def resume_side(self, state, round_idx: int, fetch, rounds: list[int]
                    ) -> tuple[RunState, int] | None:
        """Cook's side chain in flight at ``state``: its last finished state, or the state it
        forked from (:func:`fed_de.bulk.rebuild.side_seed`), with the sites' geometric
        means."""
        from fed_de.bulk import rebuild

        if not getattr(self, "with_cooks", lambda: False)():
            return None
        found = rebuild.side_seed(state, round_idx, fetch, rounds)
        if found is None:
            return None
        side, r = found
        return self.resume_seed(side, fetch, rounds), r

    def resume_seed(self, state, fetch, rounds=(1, 3)) -> RunState:
        """``state`` with the study's log geometric means (the sites' size factors), read from
        the earliest finished aggregation that carries them (the study's first, or a resumed
        plan's installed seed)."""
        from fed_de.bulk import rebuild

        if state.totals.log_geo_means is not None:
            return state
        for r in sorted(rounds):
            first = rebuild.get_state(fetch, r)
            if isinstance(first, RunState) and first.totals is not None \
                    and first.totals.log_geo_means is not None:
                return rebuild.with_geo_means(state, first)
        raise ValueError("no finished aggregation carries the study's geometric means")

    def check_request(self, state, site: str, step: str) -> None:
        """The run state is a :class:`RunState` of typed parts, the numbers a site computes
        with are finite (:data:`FINITE`), a gene selection names genes of the study; the
        Cook's trimmed sums are checked in their steps (:func:`cooks.check_robust_request`)."""
        guard.check_parts(state, RunState, site=site, step=step)
        guard.check_finite(state, FINITE, site=site, step=step)
        guard.check_rows(state.rows, len(self.study.genes), site=site, step=step)

    def dims(self) -> dict[str, int]:
        """Message sizes: study sizes, and the most points per gene a request may name."""
        p = self.study.n_coefs
        levels = self.study.levels.values()
        n_cells = int(np.prod([len(v) for v in levels])) if self.study.levels else 1
        pr = self.reduced.n_coefs if self.reduced is not None else 1
        G = len(self.study.genes)
        n_points = disp_path.LATE_POINTS
        return {"G": G, "p": p, "T": p * (p + 1) // 2, "C": n_cells, "pr": pr,
                "Tr": pr * (pr + 1) // 2, "P": G * n_points, "KB": N_CANDIDATES,
                "KF": len(FALLBACK_STEPS), "K1": cooks.K_THRESHOLDS, "NG": n_cells + 1,
                "NR": n_cells + 1,
                "A": G * 2 * (n_cells + 1)}

    def request_dims(self, state: RunState) -> dict[str, int]:
        """Sizes the aggregator's request names: points, candidates, open search targets."""
        out = {}
        if state.disp is not None:
            out["P"] = state.disp.pair_gene.size
        fit = state.irls_final if state.irls_final is not None else state.irls_mu
        if fit is not None:
            out["KB"] = fit.candidates.shape[1]
        if state.fallback is not None:
            out["KF"] = state.fallback.candidates.shape[1]
        if state.robust is not None:
            out["A"] = cooks.open_targets(state.robust)
            out["NR"] = int(cooks.sent_groups(state.robust).sum())
        return out


class DESeq2Strategy(_BulkStrategy):
    """Federated DESeq2 (Wald or LRT) with DESeq2's defaults.

    Parameters
    ----------
    study
        ``Study.to_dict()``: design, declared levels and genes.
    size_factors
        ``"ratio"`` or ``"poscounts"``.
    fit_type
        Dispersion trend: ``"parametric"`` (falls back to ``"mean"``) or ``"mean"``.
    min_cell_size, min_pooled_cell_size, min_nonzero
        Disclosure control: a site refuses a design cell of fewer samples; from two sites on,
        the study refuses a pooled design cell of fewer samples, and withholds genes whose
        pooled cell holds fewer non-zero counts (but some). ``min_cell_size=0``: all off.
    round_counts
        Round non-integer counts instead of refusing them.
    test, reduced
        ``"Wald"``, or ``"LRT"`` against the nested ``reduced`` design.
    cooks
        Cook's distances, outlier replacement and refit (DESeq2's default); off: the plan of
        the Wald pipeline alone.
    min_replicates_for_replace
        DESeq2's ``minReplicatesForReplace`` (:func:`fed_de.bulk.cooks.replace_minimum`:
        ``None`` gives 7 for one site, ``inf`` from two sites under the disclosure rules);
        with ``inf`` the plan has no refit phase.
    mu_rounds, genewise_rounds, map_rounds, final_rounds, fallback_rounds, robust_rounds,
    refit_mu_rounds, refit_final_rounds
        Unrolled iteration counts (the plan is static; defaults measured, see
        ``benchmarks/bench_rounds.py``).
    secure_aggregation, n_sites
        Mask every message so the aggregator sees only cross-site totals (two sites or more;
        :mod:`fed_de.federation.secure`), for a study of ``n_sites`` declared sites (a relay
        with another number of keys is refused; 0: not checked).
    shrink, shrink_coef, shrink_rounds
        LFC shrinkage after the fit (:mod:`fed_de.bulk.shrink`): ``"apeglm"`` or ``"normal"``,
        the targets (:func:`fed_de.bulk.shrink.encode_targets`), rounds (0: the default).
    pca, pca_genes, pca_axes, pca_block, pca_rounds, pca_group, site_names
        VST and PCA after the fit (:mod:`fed_de.bulk.pca`): top genes, axes, block size,
        subspace rounds, the factor of the centroids, the study's sites (centroids per site).
    dp_epsilon, dp_delta, dp_clip
        Differential privacy (:mod:`fed_de.bulk.dp`): ``(dp_epsilon, dp_delta)``-DP of
        everything the aggregator sees, for one sample's counts; ``None``: off. ``dp_clip``
        scales the public clip bounds; ``dp_floor``: final dispersions no lower than the
        trend (:func:`fed_de.bulk.dp.floor_at_trend`). Refuses LRT, Cook's, shrinkage, PCA.
    """

    def __init__(self, study: dict, size_factors: str = OPTIONS.size_factors,
                 fit_type: str = OPTIONS.fit_type, min_cell_size: int = OPTIONS.min_cell_size,
                 min_pooled_cell_size: int = OPTIONS.min_pooled_cell_size,
                 min_nonzero: int = OPTIONS.min_nonzero,
                 round_counts: bool = OPTIONS.round_counts,
                 mu_rounds: int = OPTIONS.mu_rounds,
                 genewise_rounds: int = OPTIONS.genewise_rounds,
                 map_rounds: int = OPTIONS.map_rounds, final_rounds: int = OPTIONS.final_rounds,
                 fallback_rounds: int = OPTIONS.fallback_rounds, test: str = OPTIONS.test,
                 reduced: str | None = None, cooks: bool = OPTIONS.cooks,
                 min_replicates_for_replace: float | None = None,
                 robust_rounds: int = OPTIONS.robust_rounds,
                 refit_mu_rounds: int = OPTIONS.refit_mu_rounds,
                 refit_final_rounds: int = OPTIONS.refit_final_rounds,
                 secure_aggregation: bool = True, n_sites: int = 0,
                 shrink: str | None = None, shrink_coef: str = "", shrink_rounds: int = 0,
                 pca: bool = False, pca_genes: int = OPTIONS.pca_genes,
                 pca_axes: int = OPTIONS.pca_axes, pca_block: int = OPTIONS.pca_block,
                 pca_rounds: int = OPTIONS.pca_rounds, pca_group: str = "",
                 site_names: tuple = (), dp_epsilon: float | None = None,
                 dp_delta: float = OPTIONS.dp_delta, dp_clip: float = OPTIONS.dp_clip,
                 dp_floor: bool = OPTIONS.dp_floor):
        if test not in TESTS:
            raise ValueError(f"test must be 'Wald' or 'LRT', not {test!r}")
        if test == "LRT" and not reduced:
            raise ValueError("test='LRT' needs a reduced design, e.g. reduced='~ batch'")
        super().__init__(study, size_factors=size_factors, fit_type=fit_type,
                         min_cell_size=min_cell_size, round_counts=round_counts,
                         min_pooled_cell_size=min_pooled_cell_size, min_nonzero=min_nonzero,
                         mu_rounds=mu_rounds, genewise_rounds=genewise_rounds,
                         map_rounds=map_rounds, final_rounds=final_rounds,
                         fallback_rounds=fallback_rounds, test=test,
                         reduced=reduced if test == "LRT" else None, cooks=bool(cooks),
                         min_replicates_for_replace=replace_minimum(
                             min_replicates_for_replace, min_cell_size, n_sites),
                         robust_rounds=robust_rounds, refit_mu_rounds=refit_mu_rounds,
                         refit_final_rounds=refit_final_rounds,
                         secure_aggregation=secure_aggregation, n_sites=n_sites,
                         shrink=shrink, shrink_coef=shrink_coef, shrink_rounds=shrink_rounds,
                         pca=bool(pca), pca_genes=pca_genes, pca_axes=pca_axes,
                         pca_block=pca_block, pca_rounds=pca_rounds, pca_group=pca_group,
                         site_names=tuple(site_names), dp_epsilon=dp_epsilon,
                         dp_delta=dp_delta, dp_clip=dp_clip, dp_floor=bool(dp_floor))
        self.dp_budget = self._dp_budget() if dp_epsilon is not None else None

    # -- differential privacy (fed_de.bulk.dp) ---------------------------------------------
    def _dp_budget(self) -> dict:
        """Refuse what DP does not cover; the plan's releases and the noise multiplier."""
        o = self.options
        refused = [name for name, on in (
            ("test='LRT'", o.test == "LRT"), ("cooks=True", self.with_cooks()),
            ("shrink", o.shrink is not None), ("pca=True", o.pca)) if on]
        if refused:
            raise ValueError(f"dp_epsilon does not cover {', '.join(refused)}: their rounds' "
                             "per-sample contributions are not clipped and noised; turn them "
                             "off for a differentially private run (docs/privacy.md)")
        if self.n_sites < 1:
            raise ValueError("dp_epsilon needs the study's number of sites (n_sites): each "
                             "site adds 1/n_sites of the noise variance")
        if self.n_sites > 1 and not self.secure_aggregation:
            raise ValueError("dp_epsilon with several sites needs secure aggregation: each "
                             "site's message carries only its share of the noise")
        per_phase = bulk_dp.phase_releases(self.phases(), self.dims())
        return bulk_dp.budget(o.dp_epsilon, o.dp_delta, per_phase, self.n_sites, o.dp_clip)

    def site_message(self, fn, state, provided: dict, params: dict):
        """Under DP, the step's message released with clipped contributions and noise."""
        if self.dp_budget is None or fn is secure.offer_key:
            return super().site_message(fn, state, provided, params)
        return bulk_dp.private_message(fn, state, provided, params, invoke,
                                       self.dp_budget["noise_multiplier"], self.n_sites)

    def compact_fields(self) -> bool:
        """Under DP every field is noised: all travel in the default fixed point."""
        return self.dp_budget is None

    def column_folds(self, message) -> dict:
        """Packed ``X'WX``-type sums (:data:`FOLDED`) of a factor design: each column is a sum
        of ``w x_i x_j``, and over the declared cells' design rows some product columns are
        equal (``x_j x_j = x_j``) or zero (two levels of one factor): only the distinct,
        non-zero ones travel under secure aggregation. Continuous covariates: none."""
        kind = message if isinstance(message, type) else type(message)
        if kind.__name__ not in FOLDED or self.study.continuous or not self.study.levels:
            return {}
        folds = {"T": fold_columns(_products(cell_design_rows(self.study)))}
        if self.reduced is not None:
            folds["Tr"] = fold_columns(_products(cell_design_rows(self.study, self.reduced)))
        return folds

    def count_bounds(self, state, data) -> tuple[int | None, int | None]:
        """Once the size-factor round has pooled the sample count (``totals.n_samples``),
        every count a site sends is of its own samples: ``(N, the site's n)``."""
        totals = getattr(state, "totals", None)
        n = getattr(totals, "n_samples", None)
        if n is None or not np.isfinite(n) or n != int(n):
            return None, None
        return int(n), int(data.n_samples)

    def postprocess(self, sums):
        """Under DP, the noisy totals made usable (:func:`fed_de.bulk.dp.postprocess`)."""
        if self.dp_budget is None:
            return sums
        return bulk_dp.postprocess(sums, self.study.n_coefs)

    def dims(self) -> dict[str, int]:
        """The fit's message sizes and the post-fit phase's (:mod:`fed_de.bulk.postfit`)."""
        return {**super().dims(), **postfit.dims(self.options, self.study)}

    def request_dims(self, state: RunState) -> dict[str, int]:
        """The fit's request sizes and the post-fit phase's."""
        return {**super().request_dims(state), **postfit.request_dims(state)}

    def with_cooks(self) -> bool:
        """Cook's step in the plan: asked for, and a factor design (see ``cooks_applicable``)."""
        return self.options.cooks and cooks.cooks_applicable(self.study)

    def saturated_design(self) -> bool:
        """Cell-means design known from the study alone: DESeq2 then uses the linear fit."""
        return not self.study.continuous and n_distinct_rows(self.study) == self.study.n_coefs

    def phases(self) -> list[Phase]:
        """The plan: every phase, in order."""
        o = self.options
        mu_rounds = 0 if self.saturated_design() else o.mu_rounds
        # without Cook's, the last IRLS round also runs the one fallback round and closes the
        # fit (closing.closing_round)
        last = (closing.closing_round() if not self.with_cooks() and o.fallback_rounds == 1
                else None)
        # factor designs, ratio size factors: the rough round's sums per cell, in round 2
        cells = not self.study.continuous and o.size_factors == "ratio"
        plan = [sfs.phase(cells), irls.mu_fit_phase(mu_rounds, from_cells=cells),
                dispersions.genewise_phase(o.genewise_rounds),
                dispersions.map_phase(o.map_rounds),
                irls.final_fit_phase(o.final_rounds, o.fallback_rounds, last)]
        if not self.with_cooks():
            plan = plan if last is not None else [*plan, closing.phase(with_cooks=False)]
        else:
            plan = [*plan, cooks.robust_phase(o.robust_rounds, fork_after="size_factors"),
                    closing.phase(with_cooks=True)]
            if np.isfinite(o.min_replicates_for_replace):  # outliers replaced: the refit
                plan += refit.phases(o.refit_mu_rounds if mu_rounds else 0, o.genewise_rounds,
                                     o.map_rounds, o.refit_final_rounds, o.test == "LRT")
        if o.dp_epsilon is not None and o.dp_floor:  # DP: dispersions floored at the trend
            next(p for p in plan if p.name == "trend_prior_map").closing.append(
                bulk_dp.floor_at_trend)
        after = postfit.phase(o)  # shrinkage, VST + PCA: when asked for
        return plan if after is None else [*plan, after]

    def build_compute_plan(self, train_data_nodes, aggregation_node, evaluation_strategy=None,
                           num_rounds=None, clean_models=True):
        """Submit the phases; every loop runs its fixed number of rounds."""
        plan = PlanCursor(self, train_data_nodes, aggregation_node, clean_models)
        self.final_ref = run_phases(plan, self.phases())
        self.n_rounds = plan.round_idx


class SizeFactorsStrategy(_BulkStrategy):
    """Median-of-ratios size factors and baseMean alone (``fed_de.size_factors``).

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
                 round_counts: bool = False, secure_aggregation: bool = True,
                 n_sites: int = 0):
        super().__init__(study, size_factors=size_factors, min_cell_size=min_cell_size,
                         round_counts=round_counts, secure_aggregation=secure_aggregation,
                         n_sites=n_sites)

    def build_compute_plan(self, train_data_nodes, aggregation_node, evaluation_strategy=None,
                           num_rounds=None, clean_models=True):
        """Log sums, then size factors and baseMean; the sites then rescale theirs."""
        plan = PlanCursor(self, train_data_nodes, aggregation_node, clean_models)
        self.final_ref = run_phases(plan, [Phase("size_factors", rounds=[
            Round(sfs.log_sums, [sfs.log_means]),
            Round(sfs.normalised_sums, [sfs.base_means])])])
        plan.local(sfs.rescale_size_factors)

