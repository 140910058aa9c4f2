"""A seeded, realistic bulk RNA-seq study split over three hospitals, for demos and benchmarks.

The generator follows the DESeq2 model: counts are negative binomial (drawn as a gamma-Poisson
mixture) with mean ``mu_ij = s_j * q_i * batch_ij * 2 ** (lfc_i * [condition_j == "B"])`` and a
dispersion that follows the usual trend ``alpha(mu) = a0 + a1 / mu`` with log-normal scatter and a
few high-dispersion outliers.

The samples are spread over three hospitals of unequal size (about 50 %, 33 % and 17 % of the
samples). Every hospital sees both conditions, while ``hospital_c`` never saw batch ``b3``: a site
that lacks a level of the design, which a federated DESeq2 has to handle. Within a hospital every
(batch, condition) cell that exists holds at least three samples. ``n_sites`` spreads the same
genes over another number of hospitals (for benchmarks): sizes decrease linearly, and a hospital
holds as many batches as its size fills (at least one, so small hospitals lack levels).

Examples
--------
>>> study = make_demo_study(n_samples=150, n_genes=2000, seed=1)
>>> sorted(study.sites)
['hospital_a', 'hospital_b', 'hospital_c']
>>> study.pooled().shape
(150, 2000)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from fed_de.design import Study

__all__ = ["DemoStudy", "make_demo_study", "SITE_NAMES", "MIN_CELL_SIZE"]

#: Hospital names, in site order.
SITE_NAMES: tuple[str, ...] = ("hospital_a", "hospital_b", "hospital_c")
#: Fewest samples in any (batch, condition) cell that exists at a hospital.
MIN_CELL_SIZE = 3

_CONDITIONS = ["A", "B"]
_BATCHES = ["b1", "b2", "b3"]
_SITE_BATCHES = {"hospital_a": _BATCHES, "hospital_b": _BATCHES, "hospital_c": _BATCHES[:2]}

# Gene-level parameters.
_MEDIAN_MEAN = 75.0  # median of the reference-level mean (normalised counts)
_LOG_MEAN_SD = 1.8  # sd of the log mean: central 98 % spans about 1 .. 5000
_MEAN_RANGE = (0.5, 1e5)
_LOW_FRACTION = 0.01  # genes barely expressed (mean 0.001 .. 0.1): some are all-zero
_LOW_RANGE = (1e-3, 0.1)
_DISP_A0, _DISP_A1 = 0.05, 2.0  # DESeq2-like trend a0 + a1 / mu
_DISP_LOG_SD = 0.5
_DISP_OUTLIER_FRACTION = 0.01
_DISP_OUTLIER_FACTOR = (5.0, 25.0)  # outliers get their dispersion multiplied by this much
_DISP_MAX = 10.0  # DESeq2's default ceiling on dispersion estimates
_DE_FRACTION = 0.10
_LFC_MIN, _LFC_SCALE, _LFC_MAX = 0.5, 0.7, 5.0  # |lfc| = 0.5 + Exp(0.7), capped
_BATCH_LOG_SD = 0.3
_SIZE_FACTOR_LOG_SD = 0.25


@dataclass
class DemoStudy:
    """A simulated multi-site study, together with the truth it was drawn from.

    Parameters
    ----------
    sites : dict[str, anndata.AnnData]
        Site name to its data: ``X`` dense ``int64`` counts (samples x genes), ``obs`` with the
        string (object dtype) columns ``condition`` and ``batch``, ``var`` indexed by gene id.
    levels : dict[str, list[str]]
        Levels of every factor of the design, reference level first.
    genes : list[str]
        Gene ids, in column order.
    design : str
        The design formula, ``"~ batch + condition"``.
    truth : pandas.DataFrame
        Indexed by gene. ``base_mean`` is the expected mean of the normalised counts over all the
        samples of the study (what DESeq2 reports as ``baseMean``), ``dispersion`` the true NB
        dispersion, ``log2_fold_change`` the true effect of condition B vs A (0 when not DE),
        ``is_de`` whether the gene is differentially expressed. Also ``ref_mean`` (mean in the
        reference cell A / b1 at size factor 1) and ``batch_b2_lfc`` / ``batch_b3_lfc`` (true
        log2 batch effects vs b1).
    size_factors : pandas.Series
        True size factors, indexed by sample id (geometric mean 1 over the study).
    """

    sites: dict[str, ad.AnnData]
    levels: dict[str, list[str]]
    genes: list[str]
    design: str
    truth: pd.DataFrame
    size_factors: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))

    def pooled(self) -> ad.AnnData:
        """All the sites stacked in site order, as one centralised data set.

        Returns
        -------
        anndata.AnnData
            Samples of every site (site order, then the sample order within each site), same
            genes, ``obs`` with the ``condition`` and ``batch`` columns.
        """
        adata = ad.concat(list(self.sites.values()), axis=0, join="inner", merge="same")
        for col in ("condition", "batch"):
            adata.obs[col] = adata.obs[col].astype(object)
        return adata

    def write(self, folder: Path | str) -> dict[str, Path]:
        """Write every site as ``folder/<site>/counts.csv`` and ``folder/<site>/metadata.csv``.

        Parameters
        ----------
        folder : pathlib.Path or str
            Root folder; created if missing. Existing site files are overwritten.

        Returns
        -------
        dict[str, pathlib.Path]
            Site name to the folder holding its two files.

        Notes
        -----
        ``counts.csv`` is samples x genes with header ``sample,<gene ids...>``; ``metadata.csv``
        has header ``sample,condition,batch``. Both have the sample id in the first column.
        """
        folder = Path(folder)
        out: dict[str, Path] = {}
        for name, adata in self.sites.items():
            site_dir = folder / name
            site_dir.mkdir(parents=True, exist_ok=True)
            counts = pd.DataFrame(
                np.asarray(adata.X), index=adata.obs_names, columns=adata.var_names
            )
            counts.to_csv(site_dir / "counts.csv", index_label="sample")
            meta = adata.obs.copy()
            meta.to_csv(site_dir / "metadata.csv", index_label="sample")
            out[name] = site_dir
        return out

    def to_study(self) -> Study:
        """The :class:`fed_de.design.Study` the federation agrees on for this data.

        Returns
        -------
        fed_de.design.Study
            Design formula, factor levels and gene list of this demo study.
        """
        from fed_de.design import Study

        return Study(
            design=self.design,
            levels={k: list(v) for k, v in self.levels.items()},
            genes=list(self.genes),
        )


def _layout(n_samples: int, n_sites: int) -> tuple[dict[str, list[str]], list[int]]:
    """Each hospital's batches and size: the three-hospital study, or ``n_sites`` hospitals."""
    if n_sites == 3:
        return dict(_SITE_BATCHES), _site_sizes(n_samples)
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1, got {n_sites}")
    one_batch = MIN_CELL_SIZE * len(_CONDITIONS)  # smallest hospital: one batch, both conditions
    if n_samples < one_batch * n_sites:
        raise ValueError(
            f"n_samples={n_samples} is too small for {n_sites} sites: at least "
            f"{one_batch * n_sites} samples are needed to give every hospital one batch with "
            f"{MIN_CELL_SIZE} samples of each condition; use fewer sites or more samples"
        )
    # sizes proportional to n_sites, n_sites - 1, ..., 1 (the 3-site split is 3:2:1 too)
    weights = np.arange(n_sites, 0, -1, dtype=float)
    sizes = np.maximum(np.round(n_samples * weights / weights.sum()).astype(int), one_batch)
    while sizes.sum() != n_samples:  # give back (or take) the rounding from the largest
        i = int(np.argmax(sizes)) if sizes.sum() > n_samples else 0
        sizes[i] += 1 if sizes.sum() < n_samples else -1
    names = [f"hospital_{i + 1:02d}" for i in range(n_sites)]
    batches = {}
    for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
        n_batches = min(len(_BATCHES), int(size) // one_batch)
        batches[name] = sorted(_BATCHES[(i + j) % len(_BATCHES)] for j in range(n_batches))
    held = set().union(*batches.values())
    if held != set(_BATCHES):
        raise ValueError(
            f"n_samples={n_samples} over {n_sites} sites leaves batch(es) "
            f"{sorted(set(_BATCHES) - held)} without samples; use more samples or sites"
        )
    return batches, [int(x) for x in sizes]


def _site_sizes(n_samples: int) -> list[int]:
    """Hospital sizes: about 50 %, 33 % and 17 %, each large enough to fill its cells."""
    minima = [MIN_CELL_SIZE * len(_SITE_BATCHES[s]) * len(_CONDITIONS) for s in SITE_NAMES]
    if n_samples < sum(minima):
        raise ValueError(
            f"n_samples={n_samples} is too small: at least {sum(minima)} samples are needed to "
            f"give every (batch, condition) cell of every hospital {MIN_CELL_SIZE} samples"
        )
    size_c = max(minima[2], round(n_samples / 6))
    size_b = max(minima[1], round(n_samples / 3))
    size_a = n_samples - size_b - size_c
    if size_a < minima[0]:  # only near the minimum: shrink b then c back towards their floors
        deficit = minima[0] - size_a
        take_b = min(deficit, size_b - minima[1])
        size_b -= take_b
        size_c -= deficit - take_b
        size_a = minima[0]
    return [size_a, size_b, size_c]


def _assign_cells(
    rng: np.random.Generator, size: int, batches: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Condition and batch of every sample of one hospital, in a shuffled order."""
    cells = [(b, c) for b in batches for c in _CONDITIONS]
    counts = np.full(len(cells), MIN_CELL_SIZE)
    extra = size - counts.sum()
    # Unequal, hospital-specific cell proportions (an unbalanced, partly confounded design).
    weights = rng.dirichlet(np.full(len(cells), 20.0))
    counts += rng.multinomial(extra, weights)
    idx = np.repeat(np.arange(len(cells)), counts)
    rng.shuffle(idx)
    batch = np.array([cells[i][0] for i in idx], dtype=object)
    condition = np.array([cells[i][1] for i in idx], dtype=object)
    return condition, batch


def make_demo_study(
    n_samples: int = 150,
    n_genes: int = 5000,
    seed: int = 0,
    n_de: int | None = None,
    n_sites: int = 3,
) -> DemoStudy:
    """Simulate a seeded bulk RNA-seq study over three hospitals of unequal size.

    Parameters
    ----------
    n_samples : int, default 150
        Total number of samples over the three hospitals (at least 48).
    n_genes : int, default 5000
        Number of genes.
    seed : int, default 0
        Seed of the :func:`numpy.random.default_rng` generator; same seed, same study.
    n_de : int, optional
        Number of truly differentially expressed genes (condition B vs A). Defaults to 10 % of
        ``n_genes``.
    n_sites : int, default 3
        Number of hospitals. 3 gives ``hospital_a``, ``hospital_b``, ``hospital_c`` as
        described above; any other number gives ``hospital_01`` ... with sizes proportional to
        ``n_sites, n_sites - 1, ..., 1`` (each at least 6), each holding as many batches as
        its size fills with three samples per (batch, condition) cell. The genes (truth) of
        a seed are the same whatever ``n_sites``.

    Returns
    -------
    DemoStudy
        The per-hospital data (``hospital_a``, ``hospital_b``, ``hospital_c`` by default), the
        study declaration (levels, genes, design ``"~ batch + condition"``) and the true
        parameters.

    Raises
    ------
    ValueError
        If ``n_samples`` is too small to give every hospital cell three samples, ``n_genes`` is
        not positive, ``n_de`` is outside ``[0, n_genes]``, or a batch would hold no sample.

    Notes
    -----
    Gene model, on the scale of normalised counts:

    - reference-level means ``q_i`` are log-normal (median 75, log-sd 1.8, clipped to
      0.5 .. 1e5), except 1 % of genes that are barely expressed (0.001 .. 0.1);
    - dispersions ``alpha_i = (0.05 + 2 / max(q_i, 0.5)) * exp(N(0, 0.5^2))``, and 1 % of genes
      get theirs multiplied by 5 .. 25 (outliers); all capped at 10;
    - 10 % of genes (``n_de``) are DE with ``|lfc| = 0.5 + Exp(0.7)`` (capped at 5), random sign;
    - batch levels b2 and b3 multiply each gene's mean by ``exp(N(0, 0.3^2))``;
    - size factors are ``exp(N(0, 0.25^2))``, rescaled to geometric mean 1.

    Counts are gamma-Poisson draws, i.e. negative binomial with mean ``mu_ij`` and variance
    ``mu_ij + alpha_i * mu_ij^2``.
    """
    if n_genes < 1:
        raise ValueError(f"n_genes must be positive, got {n_genes}")
    if n_de is None:
        n_de = round(_DE_FRACTION * n_genes)
    if not 0 <= n_de <= n_genes:
        raise ValueError(f"n_de must be in [0, n_genes={n_genes}], got {n_de}")
    site_batches, sizes = _layout(n_samples, n_sites)
    rng = np.random.default_rng(seed)

    # --- genes -----------------------------------------------------------------------------
    q = np.exp(rng.normal(np.log(_MEDIAN_MEAN), _LOG_MEAN_SD, n_genes))
    q = np.clip(q, *_MEAN_RANGE)
    n_low = round(_LOW_FRACTION * n_genes)
    low = rng.choice(n_genes, size=n_low, replace=False)
    q[low] = np.exp(rng.uniform(np.log(_LOW_RANGE[0]), np.log(_LOW_RANGE[1]), n_low))

    trend = _DISP_A0 + _DISP_A1 / np.maximum(q, _MEAN_RANGE[0])
    alpha = trend * np.exp(rng.normal(0.0, _DISP_LOG_SD, n_genes))
    n_out = round(_DISP_OUTLIER_FRACTION * n_genes)
    outliers = rng.choice(n_genes, size=n_out, replace=False)
    alpha[outliers] *= np.exp(rng.uniform(*np.log(_DISP_OUTLIER_FACTOR), n_out))
    alpha = np.minimum(alpha, _DISP_MAX)

    lfc = np.zeros(n_genes)
    de = rng.choice(n_genes, size=n_de, replace=False)
    magnitude = np.minimum(_LFC_MIN + rng.exponential(_LFC_SCALE, n_de), _LFC_MAX)
    lfc[de] = magnitude * rng.choice([-1.0, 1.0], size=n_de)

    # log-scale batch effects; row 0 is the reference b1
    batch_log = np.zeros((len(_BATCHES), n_genes))
    batch_log[1:] = rng.normal(0.0, _BATCH_LOG_SD, (len(_BATCHES) - 1, n_genes))

    # --- samples ---------------------------------------------------------------------------
    conditions, batches, site_of = [], [], []
    for name, size in zip(site_batches, sizes, strict=True):
        cond, batch = _assign_cells(rng, size, site_batches[name])
        conditions.append(cond)
        batches.append(batch)
        site_of.extend([name] * size)
    condition = np.concatenate(conditions)
    batch = np.concatenate(batches)
    site_of = np.array(site_of)

    size_factors = np.exp(rng.normal(0.0, _SIZE_FACTOR_LOG_SD, n_samples))
    size_factors /= np.exp(np.mean(np.log(size_factors)))

    # --- counts ----------------------------------------------------------------------------
    is_b = condition == "B"
    batch_idx = np.searchsorted(np.array(_BATCHES), batch.astype(str))
    # in place, the same values as the plain expressions: at most three samples x genes
    # arrays live at once (2,000 x 60,000 is ~1 GB each)
    norm_mu = np.log(q)[None, :] + batch_log[batch_idx]
    norm_mu += np.log(2.0) * np.outer(is_b, lfc)
    np.exp(norm_mu, out=norm_mu)  # expected normalised counts, samples x genes
    base_mean = norm_mu.mean(axis=0)
    mu = norm_mu
    mu *= size_factors[:, None]
    del norm_mu
    shape = 1.0 / alpha
    mu /= shape[None, :]
    lam = rng.gamma(shape[None, :], mu)
    del mu
    counts = rng.poisson(lam).astype(np.int64, copy=False)
    del lam

    # --- assemble --------------------------------------------------------------------------
    width_s = max(3, len(str(n_samples)))
    width_g = max(5, len(str(n_genes)))
    sample_ids = [f"S{i + 1:0{width_s}d}" for i in range(n_samples)]
    genes = [f"G{i + 1:0{width_g}d}" for i in range(n_genes)]

    sites: dict[str, ad.AnnData] = {}
    for name in site_batches:
        rows = np.flatnonzero(site_of == name)
        obs = pd.DataFrame(
            {
                "condition": pd.Series(condition[rows], dtype=object).to_numpy(),
                "batch": pd.Series(batch[rows], dtype=object).to_numpy(),
            },
            index=pd.Index([sample_ids[r] for r in rows], dtype=object),
        )
        var = pd.DataFrame(index=pd.Index(genes, dtype=object))
        sites[name] = ad.AnnData(X=np.ascontiguousarray(counts[rows]), obs=obs, var=var)

    truth = pd.DataFrame(
        {
            "base_mean": base_mean,
            "dispersion": alpha,
            "log2_fold_change": lfc,
            "is_de": lfc != 0.0,
            "ref_mean": q,
            "batch_b2_lfc": batch_log[1] / np.log(2.0),
            "batch_b3_lfc": batch_log[2] / np.log(2.0),
        },
        index=pd.Index(genes, name="gene", dtype=object),
    )

    return DemoStudy(
        sites=sites,
        levels={"condition": list(_CONDITIONS), "batch": list(_BATCHES)},
        genes=genes,
        design="~ batch + condition",
        truth=truth,
        size_factors=pd.Series(size_factors, index=pd.Index(sample_ids, dtype=object)),
    )
