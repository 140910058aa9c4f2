"""What a site keeps, re-derived from its own data and a run state (a resumed plan).

A resumed plan (:mod:`fed_de.federation.resume`) starts from a run state downloaded from a
failed plan; no site keeps files for the coordinator, so each site rebuilds its
:class:`~fed_de.bulk.state.SiteState` at its first task of the new plan, from its data and
the state it receives:

=================  ===============================================================
kept part          re-derived from
=================  ===============================================================
design, cells      the site's samples and the study (as ``log_sums`` does)
size factors       its counts and the study's log geometric means (the resumed plan's
                   seed carries them: the run state drops them after the first
                   rounds), divided by ``totals.sf_scale`` once the sites have
                   rescaled them (``start.alpha_hat`` known)
``mu_disp``        ``irls_mu`` (or the linear fit) and the size factors, while a
                   dispersion search runs (as the first ``disp_sums`` does)
``pca_coords``     the PCA axes, once the centroids are known
=================  ===============================================================

Cook's side chain (``robust``) keeps the same parts: when it was in flight, the resumed
plan seeds it too (:func:`side_seed`), and its sites re-derive their state at their first
side task as the main chain's do. Cook's replaced counts are the one part that needs the
closing round's inputs again: a plan is not resumed from a state after a replacement
(:func:`refusal`); it resumes from an earlier round instead.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fed_de.bulk.size_factors import compute_size_factors
from fed_de.bulk.state import RunState, Site
from fed_de.core import nb
from fed_de.core.irls import MIN_MU
from fed_de.design import design_matrix
from fed_de.validation import validate_site


def restore(site: Site, state: RunState, n_sites: int = 0) -> None:
    """Rebuild ``site.kept`` in place from the site's data and ``state`` (see the module
    table); a site whose data fail the study's checks refuses as at its first task."""
    kept, data, totals = site.kept, site.data, state.totals
    kept.design = validate_site(site.study, data, min_cell_size=site.options.min_cell_size,
                                round_counts=site.options.round_counts, n_sites=n_sites)
    if site.reduced is not None:
        kept.design_reduced = design_matrix(site.reduced, data.obs, data.name)
    if totals.log_geo_means is None:
        return  # before the size factors: nothing else is kept yet
    compute_size_factors(site, totals.log_geo_means)
    start = state.start
    if start is not None and start.alpha_hat is not None:
        kept.size_factors = kept.size_factors_raw / totals.sf_scale
    if state.disp is not None and start is not None:
        X, sf = kept.design, kept.size_factors
        if totals.linear_mu and start.beta_lin is not None:
            kept.mu_disp = np.maximum(sf[:, None] * (X @ start.beta_lin.T), MIN_MU)
        elif state.irls_mu is not None:
            kept.mu_disp = nb.fitted_mu(X, np.nan_to_num(state.irls_mu.beta), sf, MIN_MU)
    pca = state.pca
    if pca is not None and pca.centroids is not None:
        from fed_de.bulk.pca import site_vst
        from fed_de.core import pca as pcore

        kept.pca_coords = pcore.site_coordinates(site_vst(site, pca, pca.genes), pca.mean,
                                                 pca.axes)


def refusal(state: RunState, with_cooks: bool) -> str | None:
    """Why a resumed plan cannot start from ``state`` (None: it can)."""
    if not isinstance(state, RunState):
        return f"a {type(state).__name__} is not a DESeq2 run state"
    if state.robust is not None:
        return "a state of the Cook's side chain"
    if state.totals is None:
        return "no round of the study finished yet"
    if state.refit is not None and np.any(state.refit.replace):
        return "after Cook's replacement (the sites' replaced counts are not re-derived)"
    return None


def side_seed(state: RunState, round_idx: int, fetch, rounds: list[int]
              ) -> tuple[RunState, int] | None:
    """The Cook's side chain's seed for a plan resumed from the main-chain ``state`` (after
    round ``round_idx``): None when the side chain had not forked yet (``start`` unknown) or
    had joined (``state.cooks`` known); else ``(its last finished state, round)``, or, when
    none of its aggregations finished, ``(the state it forked from, round)`` (the state
    after the size factors: the first with ``start`` known), so that it
    restarts while the main chain keeps its progress; None when that is ``state`` itself
    (it forks anew in the resumed plan). ``rounds``: the failed plan's finished
    aggregations (a resumed plan's installed seeds among them, numbered as the states they
    hold); ``fetch(r)``: the state after round ``r``."""
    if state.cooks is not None or state.start is None:
        return None
    for r in sorted(rounds, reverse=True):
        if isinstance(side := get_state(fetch, r), RunState) and not _is_main(side):
            return side, r
    # the fork state: the first main state with a fit start (the moments round writes it,
    # and ends the size-factor phase, which the side chain forks after)
    fork = next((r for r in sorted(rounds) if _is_main(s := get_state(fetch, r))
                 and s.start is not None), None)
    if fork is None or fork >= round_idx:
        return None
    return fetch(fork), fork


def get_state(fetch, r: int):
    """``fetch(r)``, or None when round ``r``'s state cannot be read."""
    try:
        return fetch(r)
    except Exception:  # noqa: BLE001 - a round that cannot be read is skipped
        return None


def _is_main(state) -> bool:
    return isinstance(state, RunState) and state.robust is None


def with_geo_means(state: RunState, first: RunState) -> RunState:
    """``state`` whose totals carry the log geometric means of ``first`` (the state after
    the study's first round), which the sites' size factors are re-derived from."""
    if state.totals.log_geo_means is not None:
        return state
    return replace(state, totals=replace(state.totals, log_geo_means=first.totals.log_geo_means))
