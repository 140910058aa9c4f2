"""Studies the attack tests and the privacy report run on (simulated, seeded).

Counts come from :func:`fed_de.demo_data.make_demo_study` (DESeq2's model: NB counts with a
realistic mean / dispersion spread); samples are dealt to sites per condition so that the
sites and design cells have exactly the sizes asked for.
"""

from __future__ import annotations

import numpy as np

from fed_de.demo_data import make_demo_study


def bulk_sites(cells: list[tuple[int, int]], n_genes: int = 300, seed: int = 3,
               outliers: int = 0) -> tuple[dict, dict, list]:
    """Sites with ``cells[k] = (n_A, n_B)`` samples of conditions A and B, ``~ condition``.

    Parameters
    ----------
    cells
        Per site, samples of condition A and of condition B.
    n_genes, seed
        Passed to :func:`fed_de.demo_data.make_demo_study`.
    outliers
        That many counts (distinct genes, random samples) are multiplied by 30 and raised
        by 50 (Cook's outliers).

    Returns
    -------
    tuple
        ``(sites, levels, genes)``.
    """
    n_a = sum(a for a, _ in cells)
    n_b = sum(b for _, b in cells)
    study = make_demo_study(n_samples=max(2 * max(n_a, n_b) + 12, 48), n_genes=n_genes,
                            seed=seed)
    pooled = study.pooled()
    cond = pooled.obs["condition"].to_numpy()
    rng = np.random.default_rng(seed)
    pick = {lv: list(rng.permutation(np.flatnonzero(cond == lv))) for lv in ("A", "B")}
    if len(pick["A"]) < n_a or len(pick["B"]) < n_b:
        raise ValueError("not enough samples of a condition")
    sites = {}
    for k, (a, b) in enumerate(cells):
        idx = [pick["A"].pop() for _ in range(a)] + [pick["B"].pop() for _ in range(b)]
        site = pooled[np.sort(idx)].copy()
        site.X = np.asarray(site.X, dtype=np.float64)
        site.obs = site.obs[["condition"]].copy()
        sites[f"site{k}"] = site
    if outliers:
        names = list(sites)
        for g in rng.choice(n_genes, size=outliers, replace=False):
            site = sites[names[rng.integers(len(names))]]
            i = rng.integers(site.n_obs)
            site.X[i, g] = np.round(site.X[i, g] * 30 + 50)
    return sites, {"condition": ["A", "B"]}, list(study.genes)


def demo_study(n_samples: int = 150, n_genes: int = 300, seed: int = 1
               ) -> tuple[dict, dict, list, str]:
    """The demo's three hospitals (``~ batch + condition``, pooled cells of >= 15 at 150)."""
    study = make_demo_study(n_samples=n_samples, n_genes=n_genes, seed=seed)
    sites = {}
    for name, site in study.sites.items():
        site = site.copy()
        site.X = np.asarray(site.X, dtype=np.float64)
        sites[name] = site
    return sites, study.levels, list(study.genes), study.design


def truth_of(sites: dict, geo, kind: str = "ratio") -> dict:
    """Each site's true counts, design cells and size factors, and the pooled ``"total"``
    (for scoring only)."""
    from attacker import Truth

    from fed_de.core import size_factors as sfc

    pooled = np.vstack([np.asarray(s.X, dtype=float) for s in sites.values()])
    sl, nz = sfc.log_count_sums(pooled)
    lgm = sfc.log_geometric_means(sl, nz, pooled.shape[0], kind)
    cell_of = {tuple(map(str, c)): i for i, c in enumerate(geo.cells)}
    out = {}
    for name, site in sites.items():
        X = np.asarray(site.X, dtype=float)
        keys = [tuple(str(site.obs[f].iloc[j]) for f in geo.levels) for j in range(site.n_obs)]
        cells = np.array([cell_of[k] for k in keys])
        out[name] = Truth(X, cells, sfc.median_ratio_factors(X, lgm, kind))
    out["total"] = Truth.concat(list(out.values()))
    return out


def pooled_cells(k: int, max_sites: int = 3, site_min: int = 3) -> list[tuple[int, int]]:
    """Per-site ``(n_A, n_B)`` for pooled design cells of ``k`` samples each, over as many
    sites (at most ``max_sites``, at least two) as give every site ``site_min`` samples per
    cell (a site's minimum)."""
    n_sites = max(2, min(max_sites, k // max(site_min, 1)))
    a = [k // n_sites + (1 if i < k % n_sites else 0) for i in range(n_sites)]
    return list(zip(a, a[::-1], strict=True))


def screen_sites(n_cells: int = 600, n_perturbations: int = 40, n_genes: int = 200,
                 seed: int = 0) -> dict:
    """A synthetic perturbation screen over three sites
    (:func:`fed_de.screening.data.make_screen`)."""
    from fed_de.screening.data import make_screen

    return make_screen(n_cells=n_cells, n_genes=n_genes, n_perturbations=n_perturbations,
                       seed=seed).sites


def screen_truth(sites: dict, view: str, perturbations: list[str], genes: list[str],
                 column: str = "perturbation", min_cell_size: int = 3) -> dict:
    """Per perturbation index: (counts cells x genes, library sizes) of the view's cells that
    enter the sums (a site leaves out its groups of fewer than ``min_cell_size`` cells and
    its empty cells)."""
    import scipy.sparse as sp

    names = list(sites) if view == "total" else [view]
    out = {}
    for p, label in enumerate(perturbations):
        parts = []
        for name in names:
            a = sites[name]
            X = a[:, genes].X
            X = X.toarray() if sp.issparse(X) else np.asarray(X)
            lib = np.asarray(a.X.sum(axis=1)).ravel()
            X = X[(a.obs[column].to_numpy() == label) & (lib > 0)]
            parts.append(X if X.shape[0] >= min_cell_size else X[:0])
        X = np.vstack(parts).astype(float)
        out[p] = (X, X.sum(axis=1))
    return out
