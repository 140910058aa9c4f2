"""DESeq2's ``results()`` from the per-gene results at the aggregator, and the fit object.

Contrasts, Wald statistics, p-values, Cook's filtering, independent filtering and adjusted
p-values need no round: :func:`contrast_results` computes them from
:class:`~fed_de.bulk.state.GeneResults` for any number of contrasts. :class:`DESeq2Result` is
what :func:`fed_de.deseq2` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import chi2

from fed_de.bulk.state import GeneResults, Refit, RunState
from fed_de.core.contrast_zero import (
    apply_contrast_all_zero,
    character_contrast_all_zero,
    numeric_contrast_all_zero,
)
from fed_de.core.testing import adjust_pvalues, contrast_vector, wald_test
from fed_de.design import Study, cell_design_rows, design_cells

Contrast = tuple | list | np.ndarray | str | None


def contrast_results(genes: GeneResults, contrast: np.ndarray, *, refit: Refit | None = None,
                     alpha: float = 0.1, lfc_threshold: float = 0.0,
                     alt_hypothesis: str = "greaterAbs", independent_filtering: bool = True,
                     names=None, test: str = "Wald", cooks_filter: bool = True,
                     all_zero_groups: np.ndarray | None = None) -> pd.DataFrame:
    """DESeq2 ``results()`` table for a numeric contrast (natural-log coefficients in).

    ``all_zero_groups``: genes whose compared groups hold only zero counts (DESeq2 then gives
    LFC 0, stat 0, p-value 1: :mod:`fed_de.core.contrast_zero`).
    """
    c = np.asarray(contrast, dtype=float)
    lfc = genes.beta @ c
    se = np.sqrt(np.einsum("i,gij,j->g", c, genes.beta_cov, c))
    log2fc, lfcse, stat, pvalue = wald_test(lfc, se, lfc_threshold, alt_hypothesis)
    if test == "LRT":
        # DESeq2: LFC and SE from the full model's Wald fit, statistic and p-value from the LRT
        stat = genes.lrt_stat
        pvalue = chi2.sf(np.maximum(stat, 0.0), genes.lrt_df)
    if all_zero_groups is not None:
        log2fc, stat, pvalue = apply_contrast_all_zero(
            log2fc, lfcse, stat, pvalue, all_zero_groups, test=test,
            lfc_threshold=lfc_threshold, alt_hypothesis=alt_hypothesis)
    if refit is not None:
        # DESeq2: genes all zero after outlier replacement report LFC 0, SE 0, p-value 1
        zero = refit.new_all_zero
        log2fc, lfcse = np.where(zero, 0.0, log2fc), np.where(zero, 0.0, lfcse)
        stat, pvalue = np.where(zero, 0.0, stat), np.where(zero, 1.0, pvalue)
    if cooks_filter and genes.cooks_outlier is not None:
        # DESeq2: p-values of genes whose largest Cook's distance passes the cutoff are NA
        pvalue = np.where(genes.cooks_outlier, np.nan, pvalue)
    base_mean = genes.base_mean
    if genes.withheld is not None and genes.withheld.any():
        # kept out by a disclosure rule (a pooled cell with a single non-zero count): no result
        w = genes.withheld
        base_mean, log2fc, lfcse = (np.where(w, np.nan, v) for v in (base_mean, log2fc, lfcse))
        stat, pvalue = np.where(w, np.nan, stat), np.where(w, np.nan, pvalue)
    padj, _ = adjust_pvalues(np.nan_to_num(base_mean), pvalue, alpha, independent_filtering)
    frame = pd.DataFrame({"baseMean": base_mean, "log2FoldChange": log2fc,
                          "lfcSE": lfcse, "stat": stat, "pvalue": pvalue, "padj": padj},
                         index=names)
    frame.index.name = "gene"
    return frame


@dataclass
class DESeq2Result:
    """A federated DESeq2 fit: per-gene results at the aggregator, contrasts on demand.

    Attributes
    ----------
    study
        The declared study.
    state
        The final run state (per-gene arrays only; nothing sample-level).
    facts
        Run facts: sequential steps, tasks, bytes per site and aggregator, wall time.
    contrasts
        Contrasts requested at fit time (``results()`` accepts any other).
    alpha
        Default significance level for independent filtering.
    test
        ``"Wald"`` or ``"LRT"``.
    site_pca
        Simulation only: each site's samples on the PCA axes, as the site keeps them (on a
        Substra network they stay at the site; empty without ``pca=True``).
    """

    study: Study
    state: RunState
    facts: dict
    contrasts: list = field(default_factory=list)
    alpha: float = 0.1
    test: str = "Wald"
    site_pca: dict = field(default_factory=dict)

    @property
    def genes(self) -> list[str]:
        """The study's genes, in order."""
        return list(self.study.genes)

    @property
    def gene_results(self) -> GeneResults:
        """Per-gene results (coefficients, covariance, dispersions, flags)."""
        return self.state.genes

    def contrast_vector(self, contrast: Contrast = None) -> np.ndarray:
        """Numeric contrast for ``None`` (last coefficient, as DESeq2), a coefficient name,
        ``(factor, level, reference)``, or a numeric vector over the coefficients."""
        names = self.study.coef_names
        if contrast is None:
            contrast = names[-1]
        if isinstance(contrast, str):
            if contrast not in names:
                raise ValueError(f"coefficient {contrast!r} unknown; coefficients are {names}")
            return np.eye(len(names))[names.index(contrast)]
        if isinstance(contrast, (tuple, list)) and len(contrast) == 3 and all(
                isinstance(c, str) for c in contrast):
            factor, level, ref = contrast
            if factor not in self.study.levels:
                raise ValueError(f"contrast factor {factor!r} is not a factor of the design "
                                 f"(factors: {list(self.study.levels)})")
            lv = self.study.levels[factor]
            for x in (level, ref):
                if x not in lv:
                    raise ValueError(f"contrast level {x!r} is not a level of {factor!r} "
                                     f"(levels: {lv})")
            return contrast_vector(names, factor, level, ref, lv[0])
        vec = np.asarray(contrast, dtype=float)
        if vec.shape != (len(names),):
            raise ValueError(f"a numeric contrast needs {len(names)} values, one per "
                             f"coefficient {names}; got shape {vec.shape}")
        return vec

    def results(self, contrast: Contrast = None, *, alpha: float | None = None,
                lfc_threshold: float = 0.0, alt_hypothesis: str = "greaterAbs",
                independent_filtering: bool = True, cooks_filter: bool = True
                ) -> pd.DataFrame:
        """DESeq2 ``results()``: baseMean, log2FoldChange, lfcSE, stat, pvalue, padj.

        ``cooks_filter=False`` is DESeq2's ``cooksCutoff = FALSE`` (outlier genes keep their
        p-values; replacement and refit, done in the fit, stay).
        """
        if contrast is None and self.contrasts:
            contrast = self.contrasts[0]
        return contrast_results(
            self.state.genes, self.contrast_vector(contrast), refit=self.state.refit,
            alpha=self.alpha if alpha is None else alpha, lfc_threshold=lfc_threshold,
            alt_hypothesis=alt_hypothesis, independent_filtering=independent_filtering,
            names=self.genes, test=self.test, cooks_filter=cooks_filter,
            all_zero_groups=self.all_zero_groups(contrast),
        )

    def all_zero_groups(self, contrast: Contrast) -> np.ndarray | None:
        """Genes whose compared groups hold only zero counts, as DESeq2's ``results()`` finds
        them for a ``contrast=`` (none for a coefficient name or the default)."""
        g, study = self.state.genes, self.study
        if g.cell_totals is None or contrast is None or isinstance(contrast, str) \
                or study.continuous or not study.levels:
            return None
        cells = design_cells(study)
        if isinstance(contrast, (tuple, list)) and len(contrast) == 3 and all(
                isinstance(c, str) for c in contrast):
            factor, num, den = contrast
            lv = study.levels[factor]
            col = list(study.levels).index(factor)
            level_totals = np.column_stack([
                g.cell_totals[:, [i for i, c in enumerate(cells) if c[col] == level]].sum(axis=1)
                for level in lv])
            return character_contrast_all_zero(level_totals, lv, num, den)
        return numeric_contrast_all_zero(g.cell_totals, cell_design_rows(study),
                                         self.contrast_vector(contrast))

    @property
    def dispersions(self) -> pd.DataFrame:
        """Gene-level dispersion table: gene-wise, trend, MAP, final, outlier flag."""
        g = self.state.genes
        d = g.dispersions
        frame = pd.DataFrame({
            "baseMean": g.base_mean, "genewise": d.gene, "trend": d.fit, "MAP": d.map,
            "final": d.final, "outlier": d.outlier, "allZero": g.all_zero,
            "betaConv": g.beta_converged,
        }, index=self.genes)
        frame.index.name = "gene"
        return frame

    @property
    def coefficients(self) -> pd.DataFrame:
        """log2-scale coefficients (DESeq2's ``coef(dds)``)."""
        frame = pd.DataFrame(self.state.genes.beta / np.log(2), index=self.genes,
                             columns=self.study.coef_names)
        frame.index.name = "gene"
        return frame

    @property
    def trend(self) -> dict:
        """Dispersion trend type, coefficients, and prior variance."""
        t = self.state.trend
        return {"fit_type": t.fit_type, "coefficients": t.coefficients.tolist(),
                "var_log_disp_ests": t.var_log_disp_ests, "disp_prior_var": t.prior_var}

    @property
    def cooks(self) -> dict:
        """Cook's decisions: genes filtered, replaced, refitted, all zero after replacement
        (empty without Cook's)."""
        genes, refit = self.state.genes, self.state.refit
        if refit is None:
            return {}
        return {"outlier": genes.cooks_outlier, "replace": refit.replace,
                "refitted": refit.genes, "new_all_zero": refit.new_all_zero}

    # -- after the fit: shrinkage, posterior summaries, PCA, plots (fed_de.bulk.postfit) ------
    def lfc_shrink(self, contrast: Contrast = None, *, type: str | None = None,
                   svalue: bool = False) -> pd.DataFrame:
        """DESeq2's ``lfcShrink`` table of a coefficient or contrast the run shrank.

        apeglm: baseMean, log2FoldChange (posterior mode), lfcSE (posterior SD), pvalue and
        padj of the unshrunken test (``svalue=True``: svalue instead of the p-values, as
        DESeq2); normal: ``results()``'s columns with log2FoldChange and lfcSE shrunken.
        Shrinkage needs rounds over the sites' data: a coefficient or type the run did not
        shrink raises :class:`fed_de.bulk.shrink.ShrinkNotComputedError`, saying what the run
        shrank and how to ask for more (``fed_de.deseq2(..., shrink=, shrink_coef=)``).
        """
        from fed_de.bulk import shrink

        return shrink.lfc_shrink(self, contrast, type, svalue)

    def posterior(self, contrast: Contrast = None, *, type: str | None = None,
                  threshold: float = 0.0, level: float = 0.9) -> pd.DataFrame:
        """Laplace posterior of a shrunken LFC per gene (log2): posteriorMean, posteriorSD,
        lfsr, svalue, probAbsLFCgt (P(|LFC| > ``threshold``)), credLower/credUpper (central
        ``level`` interval)."""
        from fed_de.bulk import shrink

        return shrink.posterior(self, contrast, type, threshold, level)

    def shrunk_results(self, contrast: Contrast = None, *, threshold: float = 0.0,
                       level: float = 0.9, **kwargs) -> pd.DataFrame:
        """``results()`` with the run's shrinkage beside it (the results file of
        ``fed-de run --shrink``): log2FoldChangeShrunk, lfcSEShrunk and the posterior
        columns of :meth:`posterior`."""
        table = self.results(contrast, **kwargs)
        if self.state.shrink is None:
            return table
        post = self.posterior(contrast, threshold=threshold, level=level)
        shrunk = self.lfc_shrink(contrast)
        table["log2FoldChangeShrunk"] = shrunk["log2FoldChange"]
        table["lfcSEShrunk"] = shrunk["lfcSE"]
        for col in post.columns.drop(["baseMean", "posteriorMean"]):
            table[col] = post[col]
        return table

    @property
    def pca(self) -> dict:
        """The run's PCA (``pca=True``): genes, axes (genes x k), percent_var, centroids
        (level x PC frames, pooled and per site), residual; empty without PCA."""
        from fed_de.bulk import pca

        return pca.summary(self)

    def plot_ma(self, contrast: Contrast = None, *, shrunk: bool | None = None,
                alpha: float | None = None, **kwargs):
        """MA plot (``plotMA``) of a contrast; shrunken LFCs when the run shrank it (or
        ``shrunk=False``: the MLEs)."""
        from fed_de import plots
        from fed_de.bulk.shrink import ShrinkNotComputedError

        table = None
        if shrunk is None or shrunk:
            try:
                table = self.lfc_shrink(contrast)
                shrunk = True
            except ShrinkNotComputedError:
                if shrunk:
                    raise
                shrunk = False
        if table is None:
            table = self.results(contrast)
        return plots.plot_ma(table, alpha=self.alpha if alpha is None else alpha,
                             shrunk=shrunk, **kwargs)

    def plot_volcano(self, contrast: Contrast = None, *, alpha: float | None = None,
                     **kwargs):
        """Volcano plot of a contrast (unshrunken LFC and p-values)."""
        from fed_de import plots

        return plots.plot_volcano(self.results(contrast),
                                  alpha=self.alpha if alpha is None else alpha, **kwargs)

    def plot_dispersions(self, **kwargs):
        """Dispersion estimates (``plotDispEsts``): gene-wise, trend, final."""
        from fed_de import plots

        return plots.plot_dispersions(self.dispersions, **kwargs)

    def plot_pvalue_histogram(self, contrast: Contrast = None, **kwargs):
        """Histogram of a contrast's p-values."""
        from fed_de import plots

        return plots.plot_pvalue_histogram(self.results(contrast), **kwargs)

    def plot_pca(self, site: str | None = None, **kwargs):
        """PCA (``pca=True``): centroids per site x level (``site=None``), or one site's own
        samples (simulation only: on a network each site draws its own)."""
        from fed_de.bulk import pca

        return pca.plot(self, site, **kwargs)
