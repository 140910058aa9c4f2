"""DESeq2's ``results()`` from the per-gene results at the aggregator, and the fit object.

Contrasts, Wald statistics, p-values, Cook's filtering, independent filtering and adjusted
p-values need no round: :func:`contrast_results` computes them from
:class:`~fed_de.bulk.state.GeneResults` for any number of contrasts. :class:`DESeq2Result` is
what :func:`fed_de.deseq2` returns: tables per contrast (with R's ``metadata(res)`` and
``mcols(res)`` in ``DataFrame.attrs``), R's ``summary(res)``, the gene-level table with R's
column names, the warnings of the fit, a bulk AnnData, and the files ``fed-de run`` writes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fed_de import files
from fed_de.bulk.state import GeneResults, Refit, RunState
from fed_de.core.contrast_zero import (
    apply_contrast_all_zero,
    character_contrast_all_zero,
    numeric_contrast_all_zero,
)
from fed_de.core.lrt import lrt_pvalue
from fed_de.core.testing import ALT_HYPOTHESES, adjust_pvalues, contrast_vector, wald_test
from fed_de.design import Study, cell_design_rows, design_cells, factor_contrast_levels
from fed_de.provenance import json_default

Contrast = tuple | list | np.ndarray | str | None

#: Per-gene columns of the fit with DESeq2's names (``mcols(dds)``), what dispersions.csv holds.
GENE_COLUMNS = ("baseMean", "dispGeneEst", "dispFit", "dispMAP", "dispersion", "dispOutlier",
                "allZero", "betaConv", "withheld")
#: Columns of a results table.
RESULT_COLUMNS = ("baseMean", "log2FoldChange", "lfcSE", "stat", "pvalue", "padj")


# -- contrasts: checked against the study alone, so a run can refuse them before round 1 ------
def _is_numeric(values) -> bool:
    return all(isinstance(v, int | float | np.integer | np.floating)
               and not isinstance(v, bool) for v in values)


def is_single_contrast(study: Study, contrast: Contrast) -> bool:
    """Whether ``contrast`` is one contrast (not a list of them).

    One contrast is ``None``, a coefficient name, ``(factor, level, reference)``, or a
    numeric vector; a list of three strings that are all coefficient names is a list of
    names, any other three strings are ``(factor, level, reference)``.
    """
    if contrast is None or isinstance(contrast, str | np.ndarray):
        return True
    if isinstance(contrast, tuple | list):
        if len(contrast) == 3 and all(isinstance(c, str) for c in contrast):
            return not all(c in study.coef_names for c in contrast)
        return len(contrast) > 0 and _is_numeric(contrast)
    return True


def contrast_list(study: Study, contrast: Contrast) -> list:
    """``contrast`` as a list of single contrasts (one, or the list given)."""
    if is_single_contrast(study, contrast):
        return [contrast]
    items = list(contrast)
    for item in items:
        if not is_single_contrast(study, item):
            raise ValueError(f"{item!r} is not a contrast: give a coefficient name, "
                             "(factor, level, reference) or a numeric vector")
    return items


def study_contrast_vector(study: Study, contrast: Contrast = None) -> np.ndarray:
    """Numeric contrast over the study's coefficients: ``None`` (the last coefficient, as
    DESeq2), a coefficient name, ``(factor, level, reference)`` or a numeric vector.

    Raises
    ------
    ValueError
        Unknown coefficient, factor or level, or a vector of the wrong length; the message
        lists what exists.
    """
    names = study.coef_names
    if contrast is None:
        contrast = names[-1]
    if isinstance(contrast, str):
        if contrast not in names:
            raise ValueError(f"coefficient {contrast!r} unknown; coefficients are {names}")
        return np.eye(len(names))[names.index(contrast)]
    if isinstance(contrast, tuple | list) and len(contrast) == 3 and all(
            isinstance(c, str) for c in contrast):
        factor, level, ref = contrast
        lv = factor_contrast_levels(study, factor, level, ref)
        return contrast_vector(names, factor, level, ref, lv[0])
    vec = np.asarray(contrast, dtype=float)
    if vec.shape != (len(names),):
        raise ValueError(f"a numeric contrast needs {len(names)} values, one per "
                         f"coefficient {names}; got shape {vec.shape}")
    if not np.isfinite(vec).all() or not vec.any():
        raise ValueError(f"a numeric contrast needs finite values, not all zero; got {vec}")
    return vec


def contrast_label(study: Study, contrast: Contrast = None) -> str:
    """A short name for a contrast (file names, AnnData obs): ``condition_B_vs_A``, the
    coefficient name, or ``contrast_0_0_1`` for a numeric vector."""
    if contrast is None:
        return study.coef_names[-1]
    if isinstance(contrast, str):
        return contrast
    if isinstance(contrast, tuple | list) and len(contrast) == 3 and all(
            isinstance(c, str) for c in contrast):
        return "{}_{}_vs_{}".format(*contrast)
    return "contrast_" + "_".join(f"{v:g}" for v in np.asarray(contrast, dtype=float))


def contrast_text(study: Study, contrast: Contrast = None) -> str:
    """How R names a contrast in ``mcols(res)``: ``condition B vs A``, a coefficient name,
    or the weights (``0,+1,-1``)."""
    name = contrast if contrast is not None else study.coef_names[-1]
    if isinstance(name, str):
        for factor, levels in study.levels.items():
            for level in levels[1:]:
                if name == f"{factor}_{level}_vs_{levels[0]}":
                    return f"{factor} {level} vs {levels[0]}"
        return name
    if isinstance(name, tuple | list) and len(name) == 3 and all(isinstance(c, str)
                                                                 for c in name):
        return "{} {} vs {}".format(*name)
    return ",".join(f"{v:+g}" if v else "0" for v in np.asarray(name, dtype=float))


def check_results_options(alpha: float = 0.1, lfc_threshold: float = 0.0,
                          alt_hypothesis: str = "greaterAbs") -> None:
    """Refuse ``results()`` options that cannot work, naming the valid ones."""
    if not 0 < float(alpha) < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if alt_hypothesis not in ALT_HYPOTHESES:
        raise ValueError(f"alt_hypothesis {alt_hypothesis!r} unknown; use one of "
                         f"{', '.join(ALT_HYPOTHESES)}")
    if not float(lfc_threshold) >= 0:
        raise ValueError(f"lfc_threshold must be >= 0 (log2 scale), got {lfc_threshold!r}")
    if alt_hypothesis == "lessAbs" and float(lfc_threshold) == 0:
        raise ValueError("alt_hypothesis='lessAbs' needs a positive lfc_threshold")


def _no_negative_zero(x: np.ndarray) -> np.ndarray:
    # R prints -0 as 0; a CSV would keep "-0.0" (e.g. stat of genes below an lfcThreshold)
    return np.asarray(x, dtype=float) + 0.0


def contrast_results(genes: GeneResults, contrast: np.ndarray, *, refit: Refit | None = None,
                     alpha: float = 0.1, lfc_threshold: float = 0.0,
                     alt_hypothesis: str = "greaterAbs", independent_filtering: bool = True,
                     names=None, test: str = "Wald", cooks_filter: bool = True,
                     all_zero_groups: np.ndarray | None = None) -> pd.DataFrame:
    """DESeq2 ``results()`` table for a numeric contrast (natural-log coefficients in).

    ``all_zero_groups``: genes whose compared groups hold only zero counts (DESeq2 then gives
    LFC 0, stat 0, p-value 1: :mod:`fed_de.core.contrast_zero`). ``attrs`` holds what R keeps
    in ``metadata(res)``: ``alpha``, ``lfcThreshold``, ``altHypothesis``,
    ``independentFiltering``, ``cooksCutoff`` and, with independent filtering,
    ``filterThreshold`` (the baseMean cutoff), ``filterThresholdName`` (its quantile) and
    ``filterTheta``.
    """
    c = np.asarray(contrast, dtype=float)
    lfc = genes.beta @ c
    se = np.sqrt(np.einsum("i,gij,j->g", c, genes.beta_cov, c))
    log2fc, lfcse, stat, pvalue = wald_test(lfc, se, lfc_threshold, alt_hypothesis)
    if test == "LRT":
        # DESeq2: LFC and SE from the full model's Wald fit, statistic and p-value from the LRT
        stat = genes.lrt_stat
        pvalue = lrt_pvalue(stat, genes.lrt_df)
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
    kept = np.ones(base_mean.shape, dtype=bool)
    if genes.withheld is not None and genes.withheld.any():
        # kept out by a disclosure rule (a pooled cell with a single non-zero count): no
        # result, and not among the genes independent filtering and BH see (as if absent)
        w = genes.withheld
        kept = ~w
        base_mean, log2fc, lfcse = (np.where(w, np.nan, v) for v in (base_mean, log2fc, lfcse))
        stat, pvalue = np.where(w, np.nan, stat), np.where(w, np.nan, pvalue)
    padj = np.full(base_mean.shape, np.nan)
    padj[kept], info = adjust_pvalues(base_mean[kept], pvalue[kept], alpha,
                                      independent_filtering)
    frame = pd.DataFrame({"baseMean": base_mean, "log2FoldChange": _no_negative_zero(log2fc),
                          "lfcSE": _no_negative_zero(lfcse), "stat": _no_negative_zero(stat),
                          "pvalue": pvalue, "padj": padj}, index=names)
    frame.index.name = "gene"
    frame.attrs.update(alpha=float(alpha), lfcThreshold=float(lfc_threshold),
                       altHypothesis=alt_hypothesis,
                       independentFiltering=bool(independent_filtering),
                       cooksCutoff=bool(cooks_filter and genes.cooks_outlier is not None))
    if info:
        frame.attrs.update(filterThreshold=float(info["filterThreshold"]),
                           filterThresholdName=str(info.get("filterThresholdName", "")),
                           filterTheta=float(info["filterTheta"]))
    return frame


# -- R's summary(res) ------------------------------------------------------------------------
def _r_digits2(x: float) -> str:
    """R's ``format(x, digits=2)`` for one non-negative number."""
    if x == 0 or not np.isfinite(x):
        return "0" if x == 0 else str(x)
    return np.format_float_positional(x, precision=2, unique=False, fractional=False,
                                      trim="-")


@dataclass(frozen=True)
class ResultsSummary:
    """R's ``summary(res)``: genes up, down, with an outlier, filtered for low counts.

    ``str()`` (and the REPL) print R's text; the fields are the numbers.
    """

    contrast: str
    n_nonzero: int
    alpha: float
    lfc_threshold: float
    up: int
    down: int
    outliers: int
    low_counts: int
    filter_threshold: float

    def to_dict(self) -> dict:
        """The numbers, JSON-ready."""
        return {"contrast": self.contrast, "n_nonzero": self.n_nonzero, "alpha": self.alpha,
                "lfcThreshold": self.lfc_threshold, "up": self.up, "down": self.down,
                "outliers": self.outliers, "low_counts": self.low_counts,
                "mean_count_below": round(self.filter_threshold)}

    def __str__(self) -> str:
        t = self.lfc_threshold
        up, down = ("LFC > 0 (up)", "LFC < 0 (down)") if t == 0 else (
            f"LFC > {t:.2f} (up)", f"LFC < -{t:.2f} (down)")
        n = max(self.n_nonzero, 1)

        def row(label: str, k: int) -> str:
            return f"{label.ljust(19)}: {k}, {_r_digits2(k / n * 100)}%"

        return "\n".join([
            f"out of {self.n_nonzero} with nonzero total read count",
            f"adjusted p-value < {self.alpha:g}",
            row(up, self.up), row(down, self.down),
            row("outliers [1]", self.outliers), row("low counts [2]", self.low_counts),
            f"(mean count < {round(self.filter_threshold)})",
            "[1] see 'cooksCutoff' argument of ?results",
            "[2] see 'independentFiltering' argument of ?results",
        ])

    __repr__ = __str__


def summarize(table: pd.DataFrame, alpha: float | None = None) -> ResultsSummary:
    """R's ``summary(res)`` of a results table (its ``attrs`` give alpha, the LFC threshold
    and the independent-filtering threshold, as R's ``metadata(res)``)."""
    meta = table.attrs
    alpha = float(meta.get("alpha", 0.1) if alpha is None else alpha)
    t = float(meta.get("lfcThreshold", 0.0))
    base, lfc = table["baseMean"].to_numpy(), table["log2FoldChange"].to_numpy()
    pvalue, padj = table["pvalue"].to_numpy(), table["padj"].to_numpy()
    with np.errstate(invalid="ignore"):
        sig = padj < alpha
        return ResultsSummary(
            contrast=str(meta.get("contrast", "")), n_nonzero=int((base > 0).sum()),
            alpha=alpha, lfc_threshold=t, up=int((sig & (lfc > t)).sum()),
            down=int((sig & (lfc < -t)).sum()),
            outliers=int(((base > 0) & np.isnan(pvalue)).sum()),
            low_counts=int((~np.isnan(pvalue) & np.isnan(padj)).sum()),
            filter_threshold=float(meta.get("filterThreshold", 0.0)))


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", label)


@dataclass(repr=False)
class DESeq2Result:
    """A federated DESeq2 fit: per-gene results at the aggregator, contrasts on demand.

    Attributes
    ----------
    study
        The declared study.
    state
        The final run state (per-gene arrays only; nothing sample-level).
    facts
        Run facts: sequential steps, tasks, bytes per site and aggregator, wall time; the
        options, levels and versions of the run; its warnings.
    contrasts
        Contrasts requested at fit time (``results()`` accepts any other).
    alpha
        Default significance level for independent filtering.
    test
        ``"Wald"`` or ``"LRT"``.
    reduced
        The LRT's reduced design.
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
    reduced: str | None = None

    def __repr__(self) -> str:
        f = self.facts
        test = f"LRT vs {self.reduced!r}" if self.test == "LRT" and self.reduced else self.test
        levels = "; ".join(f"{k}: {', '.join(v)}" for k, v in self.study.levels.items())
        contrasts = [contrast_label(self.study, c) for c in self.contrasts] or [
            contrast_label(self.study, None)]
        lines = [
            f"DESeq2Result: {self.study.design!r}, {len(self.study.genes)} genes, "
            f"{f.get('n_sites', '?')} site(s), {test} test",
            f"  coefficients: {', '.join(self.study.coef_names)}",
            f"  levels: {levels or '(none)'}",
            f"  contrasts: {', '.join(contrasts)}",
            f"  run: {f.get('sequential_steps', '?')} sequential steps, "
            f"{f.get('tasks', '?')} tasks",
        ]
        if f.get("warnings"):
            lines.append(f"  warnings: {len(f['warnings'])} (see .facts['warnings'])")
        return "\n".join(lines)

    @property
    def genes(self) -> list[str]:
        """The study's genes, in order."""
        return list(self.study.genes)

    @property
    def gene_results(self) -> GeneResults:
        """Per-gene results (coefficients, covariance, dispersions, flags)."""
        return self.state.genes

    @property
    def coef_names(self) -> list[str]:
        """DESeq2's ``resultsNames(dds)``: the coefficients ``name=`` accepts."""
        return list(self.study.coef_names)

    def contrast_vector(self, contrast: Contrast = None) -> np.ndarray:
        """Numeric contrast for ``None`` (last coefficient, as DESeq2), a coefficient name,
        ``(factor, level, reference)``, or a numeric vector over the coefficients."""
        return study_contrast_vector(self.study, contrast)

    def results(self, contrast: Contrast = None, *, name: str | None = None,
                alpha: float | None = None, lfc_threshold: float = 0.0,
                alt_hypothesis: str = "greaterAbs", independent_filtering: bool = True,
                cooks_filter: bool = True) -> pd.DataFrame | dict[str, pd.DataFrame]:
        """DESeq2 ``results()``: baseMean, log2FoldChange, lfcSE, stat, pvalue, padj.

        Parameters
        ----------
        contrast
            ``(factor, level, reference)``, a coefficient name, a numeric vector over
            :attr:`coef_names`, or a list of these (then a dict of tables keyed by
            :func:`contrast_label`). Default: the first contrast given at fit time, else the
            last coefficient (as DESeq2).
        name
            A coefficient (DESeq2's ``name=``); not with ``contrast``.
        alpha, lfc_threshold, alt_hypothesis, independent_filtering
            As DESeq2's ``results()``.
        cooks_filter
            ``False`` is DESeq2's ``cooksCutoff = FALSE`` (outlier genes keep their
            p-values; replacement and refit, done in the fit, stay).

        Returns
        -------
        DataFrame, or dict of them
            ``attrs``: R's ``metadata(res)`` (alpha, lfcThreshold, altHypothesis,
            filterThreshold, filterTheta, ...), ``contrast``, ``test`` and ``description``
            (R's ``mcols(res)$description`` per column).
        """
        if name is not None:
            if contrast is not None:
                raise ValueError("give contrast= or name=, not both")
            contrast = name
        elif contrast is None and self.contrasts:
            contrast = self.contrasts[0]
        alpha = self.alpha if alpha is None else alpha
        check_results_options(alpha, lfc_threshold, alt_hypothesis)
        kw = dict(alpha=alpha, lfc_threshold=lfc_threshold, alt_hypothesis=alt_hypothesis,
                  independent_filtering=independent_filtering, cooks_filter=cooks_filter)
        if not is_single_contrast(self.study, contrast):
            items = contrast_list(self.study, contrast)
            return {contrast_label(self.study, c): self._one(c, **kw) for c in items}
        return self._one(contrast, **kw)

    def _one(self, contrast: Contrast, **kw) -> pd.DataFrame:
        frame = contrast_results(self.state.genes, self.contrast_vector(contrast),
                                 refit=self.state.refit, names=self.genes, test=self.test,
                                 all_zero_groups=self.all_zero_groups(contrast), **kw)
        text = contrast_text(self.study, contrast)
        if self.test == "LRT":
            lrt = f"'{self.study.design}' vs '{self.reduced}'"
            stat, pval = f"LRT statistic: {lrt}", f"LRT p-value: {lrt}"
        else:
            stat, pval = f"Wald statistic: {text}", f"Wald test p-value: {text}"
        frame.attrs.update(
            contrast=contrast_label(self.study, contrast), test=self.test,
            description={"baseMean": "mean of normalized counts for all samples",
                         "log2FoldChange": f"log2 fold change (MLE): {text}",
                         "lfcSE": f"standard error: {text}", "stat": stat, "pvalue": pval,
                         "padj": "BH adjusted p-values"})
        return frame

    def summary(self, contrast: Contrast = None, *, name: str | None = None,
                alpha: float | None = None, **kw) -> ResultsSummary:
        """R's ``summary(results(...))``: genes up and down at ``padj < alpha``, with an
        outlier (p-value NA), and filtered for low counts (with the filter's threshold)."""
        table = self.results(contrast, name=name, alpha=alpha, **kw)
        if isinstance(table, dict):
            raise ValueError("summary() takes one contrast; call it once per contrast")
        return summarize(table)

    def all_zero_groups(self, contrast: Contrast) -> np.ndarray | None:
        """Genes whose compared groups hold only zero counts, as DESeq2's ``results()`` finds
        them for a ``contrast=`` (none for a coefficient name or the default)."""
        g, study = self.state.genes, self.study
        if g.cell_nonzero is None or contrast is None or isinstance(contrast, str) \
                or study.continuous or not study.levels:
            return None
        cells = design_cells(study)
        totals = g.cell_nonzero.astype(float)  # 0 exactly where a cell's counts are all 0
        if isinstance(contrast, (tuple, list)) and len(contrast) == 3 and all(
                isinstance(c, str) for c in contrast):
            factor, num, den = contrast
            lv = study.levels[factor]
            col = list(study.levels).index(factor)
            level_totals = np.column_stack([
                totals[:, [i for i, c in enumerate(cells) if c[col] == level]].sum(axis=1)
                for level in lv])
            return character_contrast_all_zero(level_totals, lv, num, den)
        return numeric_contrast_all_zero(totals, cell_design_rows(study),
                                         self.contrast_vector(contrast))

    @property
    def dispersions(self) -> pd.DataFrame:
        """Gene-level dispersion table: gene-wise, trend, MAP, final, outlier flag, and the
        genes a disclosure rule withheld (no fit: their ``betaConv`` is False)."""
        g = self.state.genes
        d = g.dispersions
        frame = pd.DataFrame({
            "baseMean": g.base_mean, "genewise": d.gene, "trend": d.fit, "MAP": d.map,
            "final": d.final, "outlier": d.outlier, "allZero": g.all_zero,
            "betaConv": g.beta_converged, "withheld": self._withheld(),
        }, index=self.genes)
        frame.index.name = "gene"
        return frame

    @property
    def gene_table(self) -> pd.DataFrame:
        """Per-gene columns with DESeq2's names (``mcols(dds)``): baseMean, dispGeneEst,
        dispFit, dispMAP, dispersion, dispOutlier, allZero, betaConv; and fed_de's
        ``withheld``: genes a disclosure rule kept out of the analysis (no fit, no result)."""
        d = self.dispersions
        frame = pd.DataFrame({
            "baseMean": d["baseMean"], "dispGeneEst": d["genewise"], "dispFit": d["trend"],
            "dispMAP": d["MAP"], "dispersion": d["final"],
            "dispOutlier": d["outlier"].astype(bool), "allZero": d["allZero"].astype(bool),
            "betaConv": d["betaConv"].astype(bool), "withheld": d["withheld"]}, index=d.index)
        return frame[list(GENE_COLUMNS)]

    def _withheld(self) -> np.ndarray:
        """Genes a disclosure rule withheld (all False when none were)."""
        w = self.state.genes.withheld
        return np.zeros(len(self.genes), bool) if w is None else np.asarray(w, dtype=bool)

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

    def fit_warnings(self) -> list[str]:
        """What the fit warns about, in DESeq2's words where it has them: the dispersion
        trend's fallback, genes whose coefficients (or the LRT's reduced fit) did not
        converge, genes filtered, replaced and refitted by Cook's step."""
        out = [f"dispersion trend: {w}" for w in (self.state.trend.warnings or [])]
        g = self.state.genes
        # withheld genes have no fit (their sums are zeros): not "did not converge"
        fitted = ~np.asarray(g.all_zero, dtype=bool) & ~self._withheld()
        n = int((~np.asarray(g.beta_converged, dtype=bool) & fitted).sum())
        if n:
            out.append(f"{n} rows did not converge in beta, labelled betaConv=False in "
                       "dispersions.csv (res.gene_table); their results are less reliable "
                       "(DESeq2: use larger maxit; fed_de: rounds={'final': ...})")
        if g.lrt_converged is not None:
            n = int((~np.asarray(g.lrt_converged, dtype=bool) & fitted).sum())
            if n:
                out.append(f"{n} rows did not converge in beta for the LRT's reduced model")
        cooks = self.cooks
        if cooks:
            refitted = int(np.sum(cooks["refitted"]))
            if refitted:
                out.append(f"Cook's distances: outliers replaced and {refitted} gene(s) "
                           "refitted (samples in design cells of >= 7)")
            zero = int(np.sum(cooks["new_all_zero"]))
            if zero:
                out.append(f"Cook's distances: {zero} gene(s) all zero after replacement "
                           "(LFC 0, p-value 1)")
            flagged = int(np.sum(cooks["outlier"])) if cooks["outlier"] is not None else 0
            if flagged:
                out.append(f"Cook's distances: {flagged} gene(s) with an outlier have p-value "
                           "NA (cooks_filter=False / R's cooksCutoff=FALSE keeps them)")
        return out

    # -- outputs -------------------------------------------------------------------------
    def to_anndata(self, contrasts: Contrast | list = None, **kw):
        """A bulk AnnData of the results: contrasts x genes.

        ``var``: :attr:`gene_table`; ``varm['coefficients']``: :attr:`coefficients` (names in
        ``uns['coefficient_names']``); ``layers``: log2FoldChange, lfcSE, stat, pvalue, padj
        (``X``: log2FoldChange, NaN as 0); ``obs``: each contrast's description, test,
        alpha, lfcThreshold, altHypothesis, independent-filtering threshold and summary
        counts; ``uns['fed_de']``: the design, levels and run facts (JSON).
        ``contrasts``: one or a list (default: those given at fit time); ``kw`` as
        :meth:`results`.
        """
        if contrasts is None:
            contrasts = self.contrasts or [None]
        return self._anndata(self._tables(contrasts, **kw))

    def _anndata(self, tables: dict[str, pd.DataFrame]):
        """:meth:`to_anndata` of tables already made (one per contrast)."""
        import anndata as ad

        labels = list(tables)
        layers = {c: np.vstack([t[c].to_numpy(float) for t in tables.values()])
                  for c in RESULT_COLUMNS[1:]}
        obs = pd.DataFrame(
            [self._obs_row(t) for t in tables.values()],
            index=pd.Index(labels, name="contrast"))
        var = self.gene_table.copy()
        out = ad.AnnData(X=np.nan_to_num(layers["log2FoldChange"]), obs=obs, var=var,
                         layers=layers)
        out.varm["coefficients"] = self.coefficients.to_numpy()
        out.uns["coefficient_names"] = list(self.study.coef_names)
        out.uns["fed_de"] = {"design": self.study.design, "test": self.test,
                             "levels": json.dumps(self.study.levels),
                             "facts": json.dumps(self.facts, default=json_default)}
        return out

    def _tables(self, contrasts, **kw) -> dict[str, pd.DataFrame]:
        items = contrast_list(self.study, contrasts) if contrasts is not None else [None]
        return {contrast_label(self.study, c): self._one(
            c, **{"alpha": self.alpha, **kw}) for c in items}

    @staticmethod
    def _obs_row(table: pd.DataFrame) -> dict:
        meta, s = table.attrs, summarize(table)
        return {"log2FoldChange": meta["description"]["log2FoldChange"],
                "pvalue": meta["description"]["pvalue"], "test": meta["test"],
                "alpha": meta["alpha"], "lfcThreshold": meta["lfcThreshold"],
                "altHypothesis": meta["altHypothesis"],
                "filterThreshold": meta.get("filterThreshold", np.nan),
                "n_up": s.up, "n_down": s.down, "n_outliers": s.outliers,
                "n_low_counts": s.low_counts}

    def write(self, out: str | Path, contrasts: Contrast | list = None, *,
              posterior: tuple[float, float] | None = None, **kw) -> dict[str, Path]:
        """Write what ``fed-de run`` writes into ``out``.

        ``results.csv`` for one contrast, or ``results_<label>.csv`` per contrast (with
        ``posterior=(threshold, level)``, the shrinkage columns of :meth:`shrunk_results`
        beside them for every contrast the run shrank);
        ``dispersions.csv`` (R's column names, see :attr:`gene_table`);
        ``coefficients.csv`` (log2); ``results.h5ad`` (:meth:`to_anndata`); ``run.json``
        (:attr:`facts` with each contrast's test description, independent-filtering
        threshold and summary; ``status: "ok"``). ``kw`` as :meth:`results`. Each file is
        written to a temporary file and renamed (:mod:`fed_de.files`): never half a file.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if contrasts is None:
            contrasts = self.contrasts or [None]
        tables = self._tables(contrasts, **kw)
        paths: dict[str, Path] = {}
        items = contrast_list(self.study, contrasts) if contrasts is not None else [None]
        for c, (label, table) in zip(items, tables.items(), strict=True):
            name = "results.csv" if len(tables) == 1 else f"results_{_file_label(label)}.csv"
            paths[f"results:{label}"] = out / name
            if posterior is not None:
                table = self._with_shrinkage(table, c, *posterior)
            files.write_csv(table.reset_index(), paths[f"results:{label}"], index=False)
        paths["dispersions"] = out / "dispersions.csv"
        files.write_csv(self.gene_table.reset_index(), paths["dispersions"], index=False)
        paths["coefficients"] = out / "coefficients.csv"
        files.write_csv(self.coefficients.reset_index(), paths["coefficients"], index=False)
        paths["h5ad"] = out / "results.h5ad"
        files.write_h5ad(self._anndata(tables), paths["h5ad"])
        facts = {"status": "ok", **self.facts}
        facts["contrasts"] = {
            label: {**{k: v for k, v in t.attrs.items() if k != "contrast"},
                    "file": paths[f"results:{label}"].name,
                    "summary": summarize(t).to_dict()}
            for label, t in tables.items()}
        paths["run"] = out / "run.json"
        files.write_json(paths["run"], facts, default=json_default)
        return paths

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
        return self._shrinkage_beside(table, contrast, threshold, level)

    def _shrinkage_beside(self, table: pd.DataFrame, contrast: Contrast, threshold: float,
                          level: float) -> pd.DataFrame:
        """``table`` with the shrunken LFC, its SE and the posterior columns added (raises
        :class:`fed_de.bulk.shrink.ShrinkNotComputedError` for a contrast not shrunk)."""
        post = self.posterior(contrast, threshold=threshold, level=level)
        shrunk = self.lfc_shrink(contrast)
        table["log2FoldChangeShrunk"] = shrunk["log2FoldChange"]
        table["lfcSEShrunk"] = shrunk["lfcSE"]
        for col in post.columns.drop(["baseMean", "posteriorMean"]):
            table[col] = post[col]
        return table

    def _with_shrinkage(self, table: pd.DataFrame, contrast: Contrast, threshold: float,
                        level: float) -> pd.DataFrame:
        """A copy of ``table`` with the shrinkage columns when the run shrank ``contrast``;
        ``table`` itself otherwise (the results files of ``fed-de run --shrink``)."""
        from fed_de.bulk.shrink import ShrinkNotComputedError

        if self.state.shrink is None:
            return table
        try:
            return self._shrinkage_beside(table.copy(), contrast, threshold, level)
        except ShrinkNotComputedError:
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
