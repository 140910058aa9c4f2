"""Closing round of the fit: sums at the final coefficients, standard errors, Wald tests.

Round W  local : packed X^T W X and deviance at the final betas and dispersions
         agg   : DESeq2's stopping rule for genes still iterating, the Fisher-information
                 covariance with DESeq2's ridge, (X^T W X + L)^-1 X^T W X (X^T W X + L)^-1
Contrasts, Wald statistics, p-values and adjusted p-values are computed from the final shared
state at the aggregator, for any number of contrasts, with no further round
(:func:`contrast_results`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import chi2
from substrafl.remote import remote, remote_data

from fed_de.core import nb
from fed_de.core.testing import adjust_pvalues, wald_test
from fed_de.simulation.opener import SiteData
from fed_de.steps.base import sends, sum_messages
from fed_de.steps.irls import MIN_MU


class WaldMixin:
    """The closing round of the final fit."""

    @remote_data
    @sends(xtwx=("G", "T"), deviance=("G",))
    def local_wald(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """X^T W X and deviance at the final coefficients."""
        beta, refitted = final_beta(shared_state)
        alpha = np.nan_to_num(shared_state["dispersion"], nan=1.0)
        X, sf = self.local["design"], self.local["size_factors"]
        y = self.counts(data_from_opener)
        mu = nb.fitted_mu(X, beta, sf, MIN_MU)  # DESeq2's floored means (fitBeta)
        w = mu / (1.0 + alpha * mu)
        return {"xtwx": nb.gram(X, w), "deviance": nb.nb_deviance(y, mu, alpha)}

    @remote_data
    @sends(xtwx=("G", "T"), deviance=("G",), deviance_r=("G",))
    def local_wald_lrt(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """:meth:`local_wald` plus the reduced model's deviance at its final coefficients."""
        out = self.local_wald(data_from_opener=data_from_opener, shared_state=shared_state,
                              _skip=True)
        beta_r = np.nan_to_num(shared_state["irls_reduced"]["beta"])
        alpha = np.nan_to_num(shared_state["dispersion"], nan=1.0)
        mu = nb.fitted_mu(self.local["design_reduced"], beta_r, self.local["size_factors"],
                          MIN_MU)
        out["deviance_r"] = nb.nb_deviance(self.counts(data_from_opener), mu, alpha,
                                           self.lgamma_y1(data_from_opener))
        return out

    @remote
    def agg_wald(self, shared_states: list[dict]) -> dict:
        """Convergence flags and the coefficient covariance of every gene."""
        *messages, prev = shared_states
        return self.close_fit(prev, sum_messages(messages))

    def close_fit(self, prev: dict, tot: dict) -> dict:
        """:meth:`agg_wald` from the summed messages."""
        state = dict(prev)
        state.update(final_sums(prev, tot, self.study.n_coefs, prev["all_zero"]))
        if "deviance_r" in tot:  # LRT: deviance difference, chi-squared on the df difference
            stat = np.where(prev["all_zero"], np.nan, tot["deviance_r"] - tot["deviance"])
            state["lrt_stat"] = stat
            state["lrt_df"] = self.study.n_coefs - self.reduced.n_coefs
            state["lrt_converged"] = prev["irls_reduced"]["converged"] & ~prev["all_zero"]
        return state


def final_beta(state: dict) -> tuple[np.ndarray, np.ndarray]:
    """Final coefficients: IRLS, or the fallback refit for genes IRLS left unconverged."""
    beta = np.nan_to_num(state["irls_final"]["beta"])
    fb = state.get("fallback")
    if fb is None:
        return beta, np.zeros(beta.shape[0], dtype=bool)
    return np.where(fb["refitted"][:, None], fb["beta"], beta), fb["refitted"]


def final_sums(state: dict, tot: dict, p: int, all_zero: np.ndarray) -> dict:
    """Coefficients, covariance, deviance and convergence flags of the final fit."""
    # the last IRLS round already judged the accepted betas: genes still iterating did not
    # converge within the unrolled rounds (DESeq2's betaConv = FALSE, refitted by the fallback)
    fit = state["irls_final"]
    converged = fit["deseq2_rule"] | fit["converged"]
    beta, refitted = final_beta(state)
    beta = np.where(all_zero[:, None], np.nan, beta)
    cov = nb.wald_covariance(np.where(all_zero[:, None], 1.0, tot["xtwx"]), nb.ridge(p))
    cov[all_zero] = np.nan
    return {"beta": beta, "beta_cov": cov, "deviance": np.where(all_zero, np.nan,
                                                                 tot["deviance"]),
            "beta_converged": converged & ~all_zero, "refitted_optim": refitted & ~all_zero}


def contrast_results(state: dict, contrast: np.ndarray, *, alpha: float = 0.1,
                     lfc_threshold: float = 0.0, alt_hypothesis: str = "greaterAbs",
                     independent_filtering: bool = True, genes=None,
                     test: str = "Wald", cooks_filter: bool = True) -> pd.DataFrame:
    """DESeq2 ``results()`` table for a numeric contrast (natural-log coefficients in)."""
    c = np.asarray(contrast, dtype=float)
    lfc = state["beta"] @ c
    se = np.sqrt(np.einsum("i,gij,j->g", c, state["beta_cov"], c))
    log2fc, lfcse, stat, pvalue = wald_test(lfc, se, lfc_threshold, alt_hypothesis)
    if test == "LRT":
        # DESeq2: LFC and SE from the full model's Wald fit, statistic and p-value from the LRT
        stat = state["lrt_stat"]
        pvalue = chi2.sf(np.maximum(stat, 0.0), state["lrt_df"])
    if "refit" in state:
        # DESeq2: genes all zero after outlier replacement report LFC 0, SE 0, p-value 1
        zero = state["refit"]["new_all_zero"]
        log2fc, lfcse = np.where(zero, 0.0, log2fc), np.where(zero, 0.0, lfcse)
        stat, pvalue = np.where(zero, 0.0, stat), np.where(zero, 1.0, pvalue)
    if cooks_filter and "cooks_outlier" in state:
        # DESeq2: p-values of genes whose largest Cook's distance passes the cutoff are NA
        pvalue = np.where(state["cooks_outlier"], np.nan, pvalue)
    base_mean = state["base_mean"]
    padj, _ = adjust_pvalues(base_mean, pvalue, alpha, independent_filtering)
    frame = pd.DataFrame({"baseMean": base_mean, "log2FoldChange": log2fc, "lfcSE": lfcse,
                          "stat": stat, "pvalue": pvalue, "padj": padj}, index=genes)
    frame.index.name = "gene"
    return frame
