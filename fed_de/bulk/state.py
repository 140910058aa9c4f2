"""The typed state of a federated DESeq2 run: what the aggregator sends, what a site keeps.

The aggregator's output is one :class:`RunState`, read by the next round's site steps and by
the next aggregation; each part is written by one step module (named below) and read by the
steps whose signatures name it. A site keeps a :class:`SiteState` between its tasks; site steps
see it through :class:`Site`, together with the site's data, the study and the options.

=================  ==========================================  =======================
part               holds                                       written by
=================  ==========================================  =======================
``totals``         study totals: n, size-factor scale, X'X,    size_factors, moments
                   cell sizes, linear-mu shortcut, maxDisp
``start``          one fit pass's genes and starting values:   moments (pass 1),
                   baseMean, moments, rough dispersions,       refit (Cook's refit)
                   IRLS starts, ``skip`` (genes left out)
``irls_mu``        IRLS of the dispersion-fit means            irls
``disp``           the dispersion searches and their points    dispersions, refit
``dispersions``    gene-wise, trend value, MAP, final          dispersions, refit
``trend``          trend type/coefficients, prior variance     dispersions
``irls_final``     the final IRLS (``irls_reduced``: LRT)      irls
``fallback``       refit of genes IRLS left unconverged        fallback
``genes``          per-gene results: everything results()      closing (refit merges)
                   reads
``cooks``          what the closing round's Cook's counts need cooks (joins side chain)
``refit``          Cook's decisions and the refit's genes      cooks
``rows``           genes the sites' messages carry (refit)     refit
``robust``         side chain: exact trimmed statistics        cooks
``secure``         relayed public keys (secure aggregation)    federation.secure
``shrink``         LFC shrinkage: targets, searches, results   shrink (post-fit phase)
``pca``            VST + PCA: genes, axes, centroids           pca (post-fit phase)
=================  ==========================================  =======================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

from fed_de.core import nb
from fed_de.core.dispersion import Prior, Trend
from fed_de.core.fallback import FallbackFit
from fed_de.core.irls import IRLSFit
from fed_de.core.trimmed import Search as ThresholdSearch
from fed_de.design import Study, cell_index
from fed_de.federation.secure import KeyRelay
from fed_de.site import SiteData
from fed_de.validation import aligned_counts


@dataclass(frozen=True)
class DESeq2Options:
    """The options of a run, shipped to every node (plain scalars)."""

    size_factors: str = "ratio"
    fit_type: str = "parametric"
    min_cell_size: int = 3  # per site (0: every disclosure rule off)
    min_pooled_cell_size: int = 15  # per pooled design cell (from two sites on)
    min_nonzero: int = 2  # genes with a pooled cell of fewer non-zero counts are withheld
    round_counts: bool = False
    test: str = "Wald"
    reduced: str | None = None
    cooks: bool = True
    # DESeq2's minReplicatesForReplace: outliers in pooled cells this large are replaced and
    # the gene refitted; inf (the federated default under the disclosure rules): never
    min_replicates_for_replace: float = 7
    mu_rounds: int = 4
    genewise_rounds: int = 4
    map_rounds: int = 1
    final_rounds: int = 6
    fallback_rounds: int = 1
    robust_rounds: int = 6
    refit_mu_rounds: int = 3
    refit_final_rounds: int = 4
    # post-fit phase (fed_de.bulk.postfit): LFC shrinkage and VST + PCA
    shrink: str | None = None  # "apeglm" or "normal"
    shrink_coef: str = ""  # the shrunk coefficients / contrasts (fed_de.bulk.shrink.Target)
    shrink_rounds: int = 0  # 0: the type's default
    pca: bool = False
    pca_genes: int = 500
    pca_axes: int = 2
    pca_block: int = 64  # b >= n - 1: exact in one round
    pca_rounds: int = 4
    pca_group: str = ""  # factor whose levels the centroids are taken over
    site_names: tuple = ()  # the study's declared sites (centroids per site)
    # differential privacy (fed_de.bulk.dp): off when dp_epsilon is None
    dp_epsilon: float | None = None
    dp_delta: float = 1e-6
    dp_clip: float = 1.0  # multiplies every public clip bound (inf: no clipping)
    dp_floor: bool = True  # final dispersions no lower than the trend (DP only)


# -- what the aggregator sends -----------------------------------------------------------------
@dataclass
class ShrinkTarget:
    """One shrunk coefficient or contrast: how its parametrisation maps to the standard
    coefficients, its prior, its search and (once finished) its per-gene results.

    ``to_standard`` (p x q) maps the target's coefficients to the design's: the sites evaluate
    at ``beta = to_standard @ beta_target`` (apeglm: R's ``relevel``; normal: DESeq2's expanded
    model matrix for contrasts). The LFC is ``beta_target @ contrast``.
    """

    key: str  # what was asked (fed_de.bulk.shrink.Target.key)
    name: str  # DESeq2's name of the shrunk quantity
    to_standard: np.ndarray
    contrast: np.ndarray
    column: int  # apeglm: the target coefficient under the Cauchy prior
    scale: float | None = None  # apeglm: Cauchy scale
    prior_var: np.ndarray | None = None  # normal: betaPriorVar (log2), per target coefficient
    search: dict | None = None  # fed_de.core.apeglm / normal_prior search state
    lfc: np.ndarray | None = None  # log2 shrunken LFC
    lfc_se: np.ndarray | None = None  # DESeq2's lfcSE column (apeglm: posterior SD)
    posterior_sd: np.ndarray | None = None  # SD of the Laplace posterior (log2)
    converged: np.ndarray | None = None


@dataclass
class ShrinkFit:
    """LFC shrinkage of one or more targets, their searches run in the same rounds."""

    type: str
    targets: list
    candidates: np.ndarray  # genes x (3 per target) x p: where the sites evaluate next
    active: np.ndarray  # genes some target still searches (the others are sent as zeros)
    rounds: int = 0


@dataclass
class PCAState:
    """VST at the sites and PCA of the pooled VST values by subspace iteration.

    ``vst`` is how a site transforms its counts (trend type and coefficients, or the local
    trend's spline); ``shift`` the public per-gene centre of the moments (VST of baseMean).
    """

    vst: dict
    shift: np.ndarray
    group: str
    levels: list
    sites: tuple
    n_axes: int
    genes: np.ndarray | None = None  # the top variable genes, largest variance first
    mean: np.ndarray | None = None
    var: np.ndarray | None = None
    total_var: float | None = None
    n_samples: float | None = None
    V: np.ndarray | None = None  # orthonormal block the sites multiply next
    axes: np.ndarray | None = None
    values: np.ndarray | None = None
    residual: np.ndarray | None = None
    change: float | None = None  # largest move of an axis loading in the last round
    change_prev: float | None = None  # ... and in the round before
    rounds: int = 0
    centroids: dict | None = None



@dataclass
class Totals:
    """Study-level totals over every sample of every site."""

    n_samples: float
    log_geo_means: np.ndarray | None = None  # round 1: median-of-ratios reference
    sf_scale: float = 1.0  # poscounts: size factors are divided by it
    xtx: np.ndarray | None = None  # packed X'X
    xim: float | None = None  # mean of 1/size factor
    cell_counts: np.ndarray | None = None  # samples per declared design cell
    linear_mu: bool = False  # cell-means design: DESeq2 uses the linear fit for mu
    max_disp: float | None = None  # DESeq2's maxDisp = max(10, n)
    withheld: np.ndarray | None = None  # genes a disclosure rule keeps out of the analysis


@dataclass
class FitStart:
    """One fit pass's genes and starting values (pass 1, or the Cook's refit)."""

    base_mean: np.ndarray
    skip: np.ndarray  # genes left out of this pass: all zero, or (refit) not refitted
    moments_disp: np.ndarray | None = None
    beta_lin: np.ndarray | None = None  # least squares on normalised counts
    alpha_hat: np.ndarray | None = None  # rough dispersions: start of the gene-wise search
    beta_init: np.ndarray | None = None  # IRLS start: log(normalised counts + 0.1) fit
    beta_alt: np.ndarray | None = None  # second start: log of the linear fit
    beta_init_reduced: np.ndarray | None = None  # LRT: the reduced model's starts
    beta_alt_reduced: np.ndarray | None = None
    mu_rounds: int = 0  # IRLS rounds of the dispersion-fit means (0: linear mu)
    # per design cell, whether its normalised counts sum above zero (results' all-zero
    # groups need no more: the flags travel in every later state, the sums would weigh 8x)
    cell_nonzero: np.ndarray | None = None


@dataclass
class DispSearch:
    """The dispersion searches (:mod:`fed_de.core.disp_path` states, their evaluated points
    packed) and the (gene, log alpha) pairs the sites evaluate next."""

    pair_gene: np.ndarray
    pair_slot: np.ndarray
    pair_point: np.ndarray
    genewise: dict | None = None
    map: dict | None = None
    prior: Prior | None = None


@dataclass
class Dispersions:
    """DESeq2's dispersion columns (dispGeneEst, dispFit, dispMAP, dispersion, dispOutlier)."""

    gene: np.ndarray | None = None
    fit: np.ndarray | None = None
    map: np.ndarray | None = None
    final: np.ndarray | None = None
    outlier: np.ndarray | None = None


@dataclass
class GeneResults:
    """Per-gene results of the fit: everything ``results()`` and the tables read."""

    base_mean: np.ndarray
    all_zero: np.ndarray
    dispersions: Dispersions
    beta: np.ndarray  # natural-log coefficients
    beta_cov: np.ndarray
    deviance: np.ndarray
    beta_converged: np.ndarray
    refitted_optim: np.ndarray
    lrt_stat: np.ndarray | None = None
    lrt_df: int | None = None
    lrt_converged: np.ndarray | None = None
    cooks_outlier: np.ndarray | None = None  # p-values NA (Cook's filtering)
    cell_nonzero: np.ndarray | None = None  # per design cell: counts summing above zero
    withheld: np.ndarray | None = None  # kept out by a disclosure rule: no result


@dataclass
class CooksSetup:
    """What the closing round's Cook's distances need (joined from the side chain)."""

    active: bool
    alpha: np.ndarray  # robust dispersion per gene
    replace_mean: np.ndarray  # 0.2-trimmed mean of normalised counts (replacement)
    unfinished: int
    cutoff: float
    cells_3: np.ndarray  # cells of >= 3 samples: outliers there filter the gene
    cells_replace: np.ndarray  # cells of >= 7 samples: outliers there are replaced


@dataclass
class Refit:
    """Cook's replacement decisions and the refit of the replaced genes."""

    genes: np.ndarray  # refitted
    new_all_zero: np.ndarray  # all zero after replacement (DESeq2's nowZero)
    replace: np.ndarray  # some sample above the cutoff (DESeq2's replace)
    n_refit: int
    start: FitStart | None = None  # the refit's starting values (installed by refit.begin)


@dataclass
class RobustSearch:
    """Side chain: exact trimmed cell means / variances by counts-only threshold searches
    (:mod:`fed_de.core.trimmed`)."""

    groups_active: np.ndarray  # design cells of >= 3 samples, then "all samples"
    ranks: np.ndarray  # groups x (lo, hi): the trimmed set's ranks
    sizes: np.ndarray  # samples per group
    n_cells: int
    scales: np.ndarray
    phase: str  # "A": normalised counts; "B": squared errors
    search: ThresholdSearch | None  # two targets per group, packed (bulk.cooks._carried)
    cell_means: np.ndarray | None = None
    replace_mean: np.ndarray | None = None
    alpha: np.ndarray | None = None
    unfinished: int = 0


@dataclass
class RunState:
    """The aggregator's output: every part a later step reads (see the module table)."""

    totals: Totals | None = None
    start: FitStart | None = None
    irls_mu: IRLSFit | None = None
    disp: DispSearch | None = None
    dispersions: Dispersions | None = None
    trend: Trend | None = None
    irls_final: IRLSFit | None = None
    irls_reduced: IRLSFit | None = None
    fallback: FallbackFit | None = None
    genes: GeneResults | None = None
    cooks: CooksSetup | None = None
    refit: Refit | None = None
    rows: np.ndarray | None = None
    robust: RobustSearch | None = None
    secure: KeyRelay | None = None
    shrink: ShrinkFit | None = None
    pca: PCAState | None = None


# -- what a site keeps ---------------------------------------------------------------------
@dataclass
class SiteState:
    """What a site keeps between its tasks; none of it is ever sent."""

    design: np.ndarray | None = None
    design_reduced: np.ndarray | None = None
    cells: np.ndarray | None = None  # each sample's design cell
    size_factors_raw: np.ndarray | None = None
    size_factors: np.ndarray | None = None
    mu_disp: np.ndarray | None = None  # means of the dispersion fit
    lgamma_y1: np.ndarray | None = None  # per-gene sum of lgamma(y + 1) (a cache)
    lgamma_ratio: tuple | None = None  # (dispersions, nb_lgamma_ratio at them): a cache
    replaced_counts: np.ndarray | None = None  # after Cook's replacement
    pca_coords: np.ndarray | None = None  # this site's samples on the PCA axes


@dataclass
class Site:
    """What a site step works with: the site's data, what it keeps, the study, the options."""

    data: SiteData
    kept: SiteState
    study: Study
    options: DESeq2Options
    reduced: Study | None = None
    one_sample: bool = False  # a one-sample view (fed_de.bulk.dp): never sent on its own

    @property
    def name(self) -> str:
        """The site's name."""
        return self.data.name

    def counts(self) -> np.ndarray:
        """Counts aligned to the study's genes (rounded when the study asks for it); after
        Cook's replacement, the replaced counts."""
        if self.kept.replaced_counts is not None:
            return self.kept.replaced_counts
        counts = aligned_counts(self.study, self.data)
        if self.options.round_counts:
            counts = np.round(counts)
        return counts

    def original_counts(self) -> np.ndarray:
        """Counts as given (rounded when asked), never the Cook's replacements: DESeq2's
        ``lfcShrink`` and ``vst`` read ``counts(dds)``, which ``DESeq()`` restores."""
        counts = aligned_counts(self.study, self.data)
        return np.round(counts) if self.options.round_counts else counts

    def replace_counts(self, new: np.ndarray) -> None:
        """Analyse ``new`` (Cook's replacements) from now on, dropping what was cached from
        the counts before."""
        self.kept.replaced_counts = new
        self.kept.lgamma_y1 = self.kept.lgamma_ratio = None

    def lgamma_y1(self) -> np.ndarray:
        """Per-gene sum of lgamma(y + 1) (a constant of the deviance), cached."""
        if self.kept.lgamma_y1 is None:
            self.kept.lgamma_y1 = gammaln(self.counts() + 1.0).sum(axis=0)
        return self.kept.lgamma_y1

    def lgamma_ratio(self, alpha: np.ndarray) -> np.ndarray:
        """Per-gene :func:`fed_de.core.nb.nb_lgamma_ratio` at the dispersions ``alpha`` (all
        genes; the mean-free part of the deviance), cached for the fit that uses them: an
        IRLS fit reads it at every round. Each gene's value is the one a block of the fit's
        genes gives (the counts' columns taken by index, summed over samples alike)."""
        cached = self.kept.lgamma_ratio
        if cached is None or not np.array_equal(cached[0], alpha):
            self.kept.lgamma_ratio = None  # free the previous fit's first
            counts, genes = self.counts(), np.arange(alpha.size)
            values = np.empty(alpha.size)
            for sl in nb.gene_blocks(alpha.size):
                values[sl] = nb.nb_lgamma_ratio(counts[:, genes[sl]], alpha[sl])
            self.kept.lgamma_ratio = cached = (alpha.copy(), values)
        return cached[1]

    def cells(self) -> np.ndarray:
        """Each sample's declared design cell, cached."""
        if self.kept.cells is None:
            self.kept.cells = cell_index(self.study, self.data.obs, self.data.name)
        return self.kept.cells
