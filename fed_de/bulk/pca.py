"""VST at the sites and a PCA of the pooled VST values, federated (DESeq2's ``plotPCA``).

Each site transforms its own counts with DESeq2's ``varianceStabilizingTransformation
(blind=FALSE)``: the global dispersion trend and the site's own size factors; the values never
leave the site. The PCA is that of the pooled, gene-centred VST matrix over the ``pca_genes``
most variable genes (500, as ``plotPCA``), found by subspace iteration on sums:

Opening (no round)  agg : how sites transform (the trend's closed form, or the local trend's
                          spline) and a public per-gene centre, the VST of baseMean
                          (:func:`pca_begin`)
Round 1             site: per-gene sums of centred VST values and their squares
                                                                    -> :class:`VSTMoments`
                    agg : gene variances, the top genes, a seeded start block (:func:`pca_select`)
Rounds 2..m+1       site: ``Y_s^T (Y_s V)`` for the current block ``V`` (genes x b, whatever
                          the site's sample count)              -> :class:`CovProduct`
                    agg : subspace update; axes and variances (:func:`pca_iterate`)
Round m+2           site: its samples' coordinates on the axes (kept at the site); per-level
                          sums of coordinates over groups of >= ``min_cell_size`` samples,
                          pooled and in the site's own row   -> :class:`CentroidSums`
                    agg : centroids per level and per site x level (:func:`pca_centroids`)

The block ``b`` is ``min(pca_block, n - 1, genes)`` (default 64): a block that wide spans the
covariance and one round is exact; otherwise the default 4 rounds reach the pooled axes to
~1e-8 on the simulated studies measured (docs/shrinkage.md). The math is in
:mod:`fed_de.core.vst` and :mod:`fed_de.core.pca`; the rounds run beside the shrinkage in
:mod:`fed_de.bulk.postfit`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fed_de.bulk.state import GeneResults, PCAState, Site, Totals
from fed_de.core import pca as pcore
from fed_de.core import vst as vcore
from fed_de.core.trend import trend_values
from fed_de.errors import SiteDataError
from fed_de.federation.calls import aggregator_step
from fed_de.federation.messages import Message, part, sums

SEED = 0  # the public start block's seed


class VSTMoments(Message):
    """Per-gene sums of ``x - shift`` and of its square over the site's samples."""

    s1: np.ndarray = sums("G")
    s2: np.ndarray = sums("G")


class CovProduct(Message):
    """``Y_s^T (Y_s V)`` over the selected genes: genes x block."""

    cv: np.ndarray = sums("NS", "PB")


class SiteCentroidSums(Message):
    """The site's own row of the per-site x level sums (zeros in the other sites' rows)."""

    n: np.ndarray = sums("S", "L")
    total: np.ndarray = sums("S", "L", "PK")


class CentroidSums(Message):
    """Per-level coordinate sums and sample counts, groups of >= ``min_cell_size`` only."""

    n: np.ndarray = sums("L")
    total: np.ndarray = sums("L", "PK")
    by_site: SiteCentroidSums | None = part()


# -- how a site transforms its counts -----------------------------------------------------------
def vst_spec(trend, base_mean: np.ndarray, totals: Totals) -> dict:
    """What a site needs to compute its VST values: the trend's closed form (parametric,
    mean), or for the local trend DESeq2's spline of the integral.

    The local trend's integration grid runs to the largest normalised count of the study,
    a single sample's value; here it runs to ``n * max(baseMean)``, a public upper bound
    (the largest per-gene sum), so values differ from R's slightly (docs/deviations.md).
    """
    if trend.fit_type in ("parametric", "mean"):
        return {"type": trend.fit_type, "coefficients": np.asarray(trend.coefficients, float)}
    bm = np.nan_to_num(np.asarray(base_mean, dtype=float))
    grid = vcore.local_grid(float(totals.n_samples) * float(bm.max()))
    on_grid = trend_values(trend.coefficients, grid, trend.fit_type)
    return {"type": "local", "local": vcore.local_vst_spline(on_grid, grid, totals.xim, bm)}


def transform(spec: dict, counts: np.ndarray, size_factors: np.ndarray) -> np.ndarray:
    """VST values (samples x genes) of ``counts`` under ``spec`` (:func:`vst_spec`)."""
    if spec["type"] == "local":
        return vcore.vst_local(counts, size_factors, spec["local"])
    return vcore.vst(counts, size_factors, spec["type"], spec["coefficients"])


def site_vst(site: Site, pca: PCAState, genes: np.ndarray | None = None) -> np.ndarray:
    """The site's VST values (original counts, own size factors); never sent."""
    counts = site.original_counts()
    if genes is not None:
        counts = counts[:, genes]
    return transform(pca.vst, counts, site.kept.size_factors)


@aggregator_step(writes=("pca",))
def pca_begin(trend, genes: GeneResults, totals: Totals, study, options) -> dict:
    """The VST the sites apply and the public centre of the moments (no round)."""
    spec = vst_spec(trend, genes.base_mean, totals)
    bm = np.nan_to_num(np.asarray(genes.base_mean, dtype=float))
    shift = transform(spec, bm[None, :], np.ones(1))[0]
    group = options.pca_group
    levels = list(study.levels[group]) if group else ["all"]
    return {"pca": PCAState(vst=spec, shift=shift, group=group, levels=levels,
                            sites=tuple(options.site_names), n_axes=int(options.pca_axes))}


# -- rounds -------------------------------------------------------------------------------------
def site_moments(site: Site, pca: PCAState) -> VSTMoments:
    """Round 1 at a site: moments of its VST values."""
    m = pcore.vst_moments(site_vst(site, pca), pca.shift)
    return VSTMoments(s1=m["s1"], s2=m["s2"])


@aggregator_step(writes=("pca",))
def pca_select(sums, pca: PCAState, totals: Totals, options) -> dict:
    """Gene variances, the top ``pca_genes`` genes and the start block."""
    m = sums.moments
    # genes a disclosure rule withheld send no VST values: never among the PCA's genes
    top = pcore.top_variable({"n": totals.n_samples, "s1": m.s1, "s2": m.s2}, pca.shift,
                             int(options.pca_genes), exclude=totals.withheld)
    n_sel = len(top["genes"])
    block = max(pca.n_axes, min(int(options.pca_block), int(totals.n_samples) - 1, n_sel))
    return {"pca": replace(pca, genes=top["genes"], mean=top["mean"], var=top["var"],
                           total_var=top["total_var"], n_samples=float(top["n"]),
                           V=pcore.subspace_start(n_sel, block, SEED))}


def site_product(site: Site, pca: PCAState) -> CovProduct:
    """A subspace round at a site: ``Y_s^T (Y_s V)``."""
    x = site_vst(site, pca, pca.genes)
    return CovProduct(cv=pcore.cov_product(x, pca.mean, pca.V))


@aggregator_step(writes=("pca",))
def pca_iterate(sums, pca: PCAState) -> dict:
    """Axes and eigenvalues from this round's products; the next block."""
    up = pcore.subspace_update(pca.V, sums.product.cv, pca.n_axes)
    change = None if pca.axes is None else float(np.abs(up["axes"] - pca.axes).max())
    return {"pca": replace(pca, V=up["V"], axes=up["axes"], values=up["values"],
                           residual=up["residual"], change=change, change_prev=pca.change,
                           rounds=pca.rounds + 1)}


def _codes(site: Site, pca: PCAState) -> np.ndarray:
    if not pca.group:
        return np.zeros(site.data.n_samples, dtype=int)
    values = site.data.obs[pca.group].astype(str)
    return np.array([pca.levels.index(v) if v in pca.levels else -1 for v in values])


def site_centroids(site: Site, pca: PCAState) -> CentroidSums:
    """Last round at a site: its coordinates (kept) and the per-level sums it may send."""
    x = site_vst(site, pca, pca.genes)
    coords = pcore.site_coordinates(x, pca.mean, pca.axes)
    site.kept.pca_coords = coords
    L = len(pca.levels)
    part_sums = pcore.level_sums(coords, _codes(site, pca), L, site.options.min_cell_size)
    out = CentroidSums(n=part_sums["n"], total=part_sums["sum"])
    if pca.sites:
        if site.name not in pca.sites:
            raise SiteDataError(f"site {site.name!r} is not among the study's declared sites "
                                f"{list(pca.sites)}; nothing sent (declare it, or register the "
                                "site under its study name)")
        row = pca.sites.index(site.name)
        n = np.zeros((len(pca.sites), L))
        total = np.zeros((len(pca.sites), L, coords.shape[1]))
        n[row], total[row] = part_sums["n"], part_sums["sum"]
        out.by_site = SiteCentroidSums(n=n, total=total)
    return out


@aggregator_step(writes=("pca",))
def pca_centroids(sums, pca: PCAState) -> dict:
    """Centroids per level (pooled over sites) and per site x level (NaN where a group was
    under ``min_cell_size`` samples)."""
    c = sums.centroids
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = c.total / c.n[:, None]
        out = {"pooled": pooled, "pooled_n": c.n}
        if c.by_site is not None:
            out["by_site"] = c.by_site.total / c.by_site.n[..., None]
            out["by_site_n"] = c.by_site.n
    return {"pca": replace(pca, centroids=out)}


def error_estimate(pca: PCAState) -> float | None:
    """Estimated largest error of an axis loading: the last move, extrapolated with the rate
    of the last two (subspace iteration converges geometrically); None when unknown."""
    if pca.change is None or pca.change_prev is None or pca.change_prev <= 0:
        return pca.change
    rate = pca.change / pca.change_prev
    return float(pca.change * rate / (1.0 - rate)) if rate < 1.0 else float("inf")


def percent_var(pca: PCAState) -> np.ndarray:
    """DESeq2's ``percentVar``: each axis' eigenvalue over the selected genes' total variance."""
    return pca.values / ((pca.n_samples - 1.0) * pca.total_var)


# -- reading the result (DESeq2Result.pca / plot_pca) -------------------------------------------
def summary(res) -> dict:
    """The run's PCA as tables: selected genes, axes, percent_var, centroids, residual."""
    import pandas as pd

    p: PCAState | None = res.state.pca
    if p is None or p.axes is None:
        return {}
    pcs = [f"PC{i + 1}" for i in range(p.axes.shape[1])]
    genes = [res.genes[i] for i in p.genes]
    out = {"genes": genes, "axes": pd.DataFrame(p.axes, index=genes, columns=pcs),
           "percent_var": percent_var(p), "residual": p.residual, "group": p.group,
           "rounds": p.rounds}
    c = p.centroids or {}
    if "pooled" in c:
        out["centroids"] = pd.DataFrame(c["pooled"], index=p.levels, columns=pcs)
    if "by_site" in c:
        out["centroids_by_site"] = {
            s: pd.DataFrame(c["by_site"][i], index=p.levels, columns=pcs)
            for i, s in enumerate(p.sites)}
    return out


def plot(res, site: str | None = None, **kwargs):
    """``plot_pca``: one site's own samples, or the centroids per site x level."""
    from fed_de import plots

    p: PCAState | None = res.state.pca
    if p is None or p.axes is None:
        raise ValueError("this run computed no PCA: run fed_de.deseq2(..., pca=True) "
                         "(fed-de run --pca)")
    pv = percent_var(p)
    if site is not None:
        if site not in res.site_pca:
            raise ValueError(f"site {site!r}: its PCA coordinates stay at the site "
                             f"(available here: {sorted(res.site_pca)}, simulation only); "
                             "on a network each site draws its own with fed_de.plots.plot_pca")
        frame = res.site_pca[site]
        coords = frame[[c for c in frame.columns if c.startswith("PC")]].to_numpy()
        kwargs.setdefault("title", f"{site}: its own samples")
        return plots.plot_pca(coords, frame["group"].to_numpy(), percent_var=pv, **kwargs)
    c = p.centroids or {}
    if "by_site" in c:
        by_site, sites = c["by_site"], list(p.sites)
    else:
        by_site, sites = c["pooled"][None], ["all sites"]
    kwargs.setdefault("title", f"centroids per site x {p.group or 'samples'}")
    return plots.plot_pca_centroids(by_site, sites, p.levels, percent_var=pv, **kwargs)
