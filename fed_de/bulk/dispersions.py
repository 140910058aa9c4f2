"""Gene-wise, trend and MAP dispersions (DESeq2's ``estimateDispersions``), federated.

DESeq2's dispersions are where its own procedure stops -- ``fitDisp``'s line search from the
rough estimate, ``noIncrease``, the grid refit of genes that did not converge, the MAP search
from ``dispInit`` -- not the optimum of the objective. fed_de follows that procedure
(:mod:`fed_de.core.disp_path`): the aggregator replays R's loop on a surrogate of each gene's
objective built from the evaluations the sites returned, and asks for the points that decide
it. The objective (Cox-Reid adjusted log likelihood in log alpha) needs the *global* X'WX, so
the sites send sums at the points asked for (:func:`disp_sums`) and the aggregator forms it
(:func:`fed_de.core.dispersion.objective`).

Round G1  site : means of the dispersion fit (kept at the site); sums at the start and points
                 around it                                 agg : follow R's path
Round Gk  site : sums at the (gene, point) pairs asked     agg : follow R's path; ask for the
                 points that decide the next steps, and, in free slots, the points the MAP
                 search will want (prefetched from a provisional trend)
After the last gene-wise round: dispGeneEst (:func:`genewise_estimate`), the trend and the
prior variance (:func:`trend_and_prior`), the MAP search from DESeq2's start (:func:`map_begin`)
-- aggregator work, no round.
Round Mk  site : sums at the pairs asked                   agg : follow R's MAP path
After the last MAP round: dispMAP, bounds, and dispersion outliers keep their gene-wise value
(:func:`map_finish`). The Cook's refit runs the same rounds with the first fit's trend.

The aggregator follows the searches in blocks of genes (:func:`_by_genes`); between steps the
run state keeps their evaluated points packed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fed_de.bulk.state import Dispersions, DispSearch, FitStart, Site, Totals
from fed_de.core import disp_path, nb
from fed_de.core import dispersion as dcore
from fed_de.core.disp_surrogate import memory_pack, memory_unpack
from fed_de.core.irls import MIN_MU, IRLSFit
from fed_de.federation.calls import aggregator_step, call, site_step
from fed_de.federation.messages import Message, sums
from fed_de.federation.strategy import Phase, Round

SEARCH_BLOCK = 4096  # genes per block of the aggregator's search (bounds its dense tables)


class DispSums(Message):
    """Likelihood sums and packed X'WX with its two derivatives at each (gene, point) pair
    the aggregator asked for."""

    ll: np.ndarray = sums("P", narrow=True)
    d1: np.ndarray = sums("P", narrow=True)
    d2: np.ndarray = sums("P", narrow=True)
    A: np.ndarray = sums("P", "T", narrow=True)
    A1: np.ndarray = sums("P", "T", narrow=True)
    A2: np.ndarray = sums("P", "T", narrow=True)


@site_step
def disp_sums(site: Site, disp: DispSearch, start: FitStart, totals: Totals,
              irls_mu: IRLSFit | None, first: bool = False) -> DispSums:
    """Sums at this round's (gene, log alpha) pairs; the first round also fixes (and keeps)
    the means of the dispersion fit."""
    if first:
        X, sf = site.kept.design, site.kept.size_factors
        if totals.linear_mu:
            mu = np.maximum(sf[:, None] * (X @ start.beta_lin.T), MIN_MU)
        else:
            mu = nb.fitted_mu(X, np.nan_to_num(irls_mu.beta), sf, MIN_MU)
        site.kept.mu_disp = mu
    part = nb.disp_summands_at(site.counts(), site.kept.mu_disp, site.kept.design,
                               disp.pair_gene, disp.pair_point)
    return DispSums(**part)


# -- the aggregator's side -------------------------------------------------------------------
def _request(search: dict) -> dict:
    """The (gene, slot, point) pairs of a search's next points (NaN: nothing to evaluate)."""
    points = disp_path.propose(search)
    gene, slot = np.nonzero(np.isfinite(points))
    return {"pair_gene": gene, "pair_slot": slot, "pair_point": points[gene, slot]}


def _dense(disp: DispSearch, values: np.ndarray, G: int) -> np.ndarray:
    """Pair values back to genes x slots (NaN where nothing was asked)."""
    width = int(disp.pair_slot.max(initial=-1)) + 1
    out = np.full((G,) + (width,) + values.shape[1:], np.nan)
    out[disp.pair_gene, disp.pair_slot] = values
    return out


def _unpacked(search: dict) -> dict:
    return {**search, "memory": memory_unpack(search["memory"])}


def _packed(search: dict) -> dict:
    """What the run state keeps: the evaluated points as flat arrays (~32 bytes a point)."""
    return {**search, "memory": memory_pack(search["memory"])}


def _gene_rows(search: dict, lo: int, hi: int, G: int) -> dict:
    """A packed search restricted to genes ``lo:hi`` (its per-gene arrays, the prior's mean
    and the evaluated points of those genes)."""
    out = {}
    for key, val in search.items():
        if key == "memory":
            ends = np.cumsum(val["count"])
            a, b = (int(ends[lo - 1]) if lo else 0), int(ends[hi - 1])
            out[key] = {k: (v[lo:hi] if k == "count" else v[a:b]) for k, v in val.items()}
        elif isinstance(val, dict):
            out[key] = _gene_rows(val, lo, hi, G)
        elif isinstance(val, np.ndarray) and val.ndim and val.shape[0] == G:
            out[key] = val[lo:hi]
        else:
            out[key] = val
    return out


def _join(parts: list, sizes: list[int]) -> dict:
    """Packed searches of consecutive gene blocks (of ``sizes`` genes) as one: per-gene
    tables NaN-padded to the widest block, as one search over every gene pads them."""
    first, out = parts[0], {}
    for key, val in first.items():
        vals = [part[key] for part in parts]
        if key == "memory":
            out[key] = {k: np.concatenate([v[k] for v in vals]) for k in val}
        elif isinstance(val, dict):
            out[key] = _join(vals, sizes)
        elif isinstance(val, np.ndarray) and val.ndim and all(
                v.shape[0] == n for v, n in zip(vals, sizes, strict=True)):
            width = max(v.shape[1:] for v in vals)
            out[key] = np.concatenate([_pad_to(v, width) for v in vals])
        else:
            out[key] = val
    return out


def _pad_to(v: np.ndarray, width: tuple) -> np.ndarray:
    if v.shape[1:] == width:
        return v
    out = np.full((v.shape[0],) + width, np.nan)
    out[:, :v.shape[1]] = v
    return out


def _by_genes(fn, search: dict, *per_gene: np.ndarray) -> dict:
    """``fn(search, *per_gene)`` on blocks of :data:`SEARCH_BLOCK` genes, the packed results
    joined. Genes are independent in the search, so the numbers are those of one call on
    every gene; the dense tables of evaluated points (each gene's padded to the block's
    widest) then stay the size of a block (at 60,000 genes, one call held ~1.5 GB)."""
    G = search["a0"].shape[0]
    if G <= SEARCH_BLOCK:
        return _packed(fn(_unpacked(search), *per_gene))
    parts, sizes = [], []
    for lo in range(0, G, SEARCH_BLOCK):
        hi = min(G, lo + SEARCH_BLOCK)
        sub = _unpacked(_gene_rows(search, lo, hi, G))
        parts.append(_packed(fn(sub, *(a[lo:hi] for a in per_gene))))
        sizes.append(hi - lo)
        sub = None
    return _join(parts, sizes)


def _advance(search: dict, sums: DispSums, disp: DispSearch, p: int) -> dict:
    """Add a round's evaluations (prior-free objective) to a (packed) search and follow R's
    path."""
    G = search["a0"].shape[0]
    P, T = disp.pair_gene.size, nb.n_packed(p)
    f, g, h = dcore.objective(sums.ll.reshape(P, 1), sums.d1.reshape(P, 1),
                              sums.d2.reshape(P, 1), sums.A.reshape(P, 1, T),
                              sums.A1.reshape(P, 1, T), sums.A2.reshape(P, 1, T),
                              disp.pair_point.reshape(P, 1), p)
    dense = [_dense(disp, v[:, 0], G) for v in (disp.pair_point.reshape(P, 1), f, g, h)]
    return _by_genes(disp_path.update, search, *dense)


@aggregator_step(writes=("disp",))
def first_points(start: FitStart, totals: Totals, options) -> dict:
    """The gene-wise search from DESeq2's start, log(alpha_hat) (rough / moments estimate)."""
    alpha_hat = np.where(start.skip, 1.0, start.alpha_hat)
    gw = disp_path.start(np.log(alpha_hat), n_samples=int(totals.n_samples),
                         max_disp=totals.max_disp, alpha_init=alpha_hat, active=~start.skip,
                         max_rounds=options.genewise_rounds)
    return {"disp": DispSearch(**_request(gw), genewise=_packed(gw))}


@aggregator_step(writes=("disp",))
def genewise_step(sums: DispSums, disp: DispSearch, dispersions: Dispersions | None,
                  trend, start: FitStart, totals: Totals, study, options) -> dict:
    """Follow R's gene-wise path through the new evaluations; ask for the deciding points,
    and, while gene-wise rounds remain, prefetch the MAP search's first points."""
    gw = _advance(disp.genewise, sums, disp, study.n_coefs)
    if gw["round"] < gw["max_rounds"] and not disp_path.done(gw):
        if dispersions is not None and dispersions.fit is not None:  # the refit: trend known
            fit, prior_var = dispersions.fit, trend.prior_var
        else:  # a provisional trend from the provisional gene-wise estimates
            prov = disp_path.result(gw)["disp"]
            fit, t = dcore.fit_trend(start.base_mean, prov, start.skip, options.fit_type,
                                     int(totals.n_samples), study.n_coefs)
            prior_var = t.prior_var
        ok = np.isfinite(fit) & (fit > 0)
        width = disp_path.propose(gw).shape[1]

        def prefetch(sub: dict, fit: np.ndarray, ok: np.ndarray) -> dict:
            extra = disp_path.prefetch_map(sub, np.where(ok, fit, 1.0), prior_var)
            sub["points"] = disp_path.merge_points(
                disp_path.propose(sub), np.where(ok[:, None], extra, np.nan), width)
            return sub

        gw = _by_genes(prefetch, gw, fit, ok)
    return {"disp": replace(disp, **_request(gw), genewise=gw)}


@aggregator_step(writes=("dispersions",))
def genewise_estimate(disp: DispSearch, dispersions: Dispersions | None) -> dict:
    """dispGeneEst: where R's line search (or its grid refit) ends, noIncrease, bounds."""
    gene = disp_path.result(disp.genewise)["disp"]  # the memory is not read
    if dispersions is None:
        return {"dispersions": Dispersions(gene=gene)}
    return {"dispersions": replace(dispersions, gene=gene)}


@aggregator_step(writes=("dispersions", "trend", "disp"))
def trend_and_prior(dispersions: Dispersions, disp: DispSearch, start: FitStart,
                    totals: Totals, study, options) -> dict:
    """The trend (parametric, DESeq2's filter of genes above 100 * minDisp; or its fallback)
    and the prior variance of the MAP."""
    fit, trend = dcore.fit_trend(start.base_mean, dispersions.gene, start.skip,
                                 options.fit_type, int(totals.n_samples), study.n_coefs)
    prior = dcore.Prior(mean=np.log(fit), var=trend.prior_var)
    return {"dispersions": replace(dispersions, fit=fit), "trend": trend,
            "disp": replace(disp, prior=prior)}


@aggregator_step(writes=("disp",))
def map_begin(disp: DispSearch, dispersions: Dispersions, trend, start: FitStart,
              totals: Totals, options) -> dict:
    """The MAP search from DESeq2's ``dispInit`` (the gene-wise estimate, or the trend when
    that is an order of magnitude below it), on the evaluations made so far."""
    fit = np.where(start.skip, 1.0, dispersions.fit)
    prior = dcore.Prior(mean=np.log(fit), var=trend.prior_var)
    gene = np.where(start.skip, 1.0, dispersions.gene)
    n_samples = disp.genewise["n_samples"]

    def begin(gw: dict, a0: np.ndarray, mean: np.ndarray, active: np.ndarray) -> dict:
        return disp_path.start(a0, n_samples=n_samples, max_disp=totals.max_disp,
                               prior={"mean": mean, "var": prior.var}, memory=gw["memory"],
                               active=active, max_rounds=options.map_rounds)

    mp = _by_genes(begin, disp.genewise, np.log(disp_path.map_start(gene, fit)), prior.mean,
                   ~start.skip)
    return {"disp": replace(disp, **_request(mp), map=mp, prior=prior)}


@aggregator_step(writes=("disp",))
def map_step(sums: DispSums, disp: DispSearch, study) -> dict:
    """Follow R's MAP path through the new evaluations."""
    mp = _advance(disp.map, sums, disp, study.n_coefs)
    return {"disp": replace(disp, **_request(mp), map=mp)}


@aggregator_step(writes=("dispersions",))
def map_finish(disp: DispSearch, dispersions: Dispersions, trend, start: FitStart,
               totals: Totals) -> dict:
    """dispMAP within bounds; dispersion outliers keep their gene-wise value."""
    disp_map = disp_path.result(disp.map)["disp"]  # the memory is not read
    disp_map, outlier, final = dcore.final_dispersions(
        disp_map, dispersions.gene, dispersions.fit, trend.var_log_disp_ests, start.skip,
        totals.max_disp)
    return {"dispersions": replace(dispersions, map=disp_map, outlier=outlier, final=final)}


def genewise_phase(rounds: int) -> Phase:
    """The gene-wise search: ``rounds`` rounds, the first fused with the means' computation."""
    return Phase("genewise", opening=[first_points], closing=[genewise_estimate], rounds=[
        Round(call(disp_sums, first=True), [genewise_step]),
        *[Round(disp_sums, [genewise_step]) for _ in range(rounds - 1)]])


def map_phase(rounds: int, fit_trend: bool = True) -> Phase:
    """Trend and prior (no round; the refit keeps the first fit's), then the MAP search."""
    opening = [trend_and_prior, map_begin] if fit_trend else [map_begin]
    return Phase("trend_prior_map", opening=opening, closing=[map_finish],
                 rounds=[Round(disp_sums, [map_step]) for _ in range(rounds)])
