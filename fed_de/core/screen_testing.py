"""The screen's tests: expression filters, BH per perturbation, Wald, Welch t, van Elteren.

Aggregator side, except :func:`van_elteren_site` (a site ranks its own cells, stratum by
stratum, and sends van Elteren's weighted sums). Every function takes per-group sums (or
estimates) and returns ``(P, G)`` arrays: one row per perturbation tested against the
control.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr
from scipy.special import stdtr as _stdtr

from fed_de.core.testing import p_adjust_bh


# -- filters and multiple testing ----------------------------------------------------------
def expression_filter(ctrl_expr, ctrl_mean, n_ctrl, pert_expr, pert_mean, n_pert, *,
                      min_pct_ctrl: float = 0.01, min_pct_pert: float = 0.002,
                      min_mean_ctrl: float = 0.05, min_mean_pert: float = 0.005,
                      min_cells_ctrl: int = 1, min_cells_pert: int = 1) -> np.ndarray:
    """Pairs (perturbation, gene) worth testing: ``(P, G)`` bool.

    A pair is left out when it is low in *both* arms (fraction of expressing cells below
    ``min_pct_*`` and mean normalised count below ``min_mean_*``, per arm), or when an arm
    has fewer than ``min_cells_*`` expressing cells (no finite effect exists), or when the
    perturbation has no cell. crispyx's ``nb_glm_test`` filters with the same rules and
    defaults.
    """
    n_pert = np.asarray(n_pert, dtype=float)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        pct_c = ctrl_expr / n_ctrl
        pct_p = pert_expr / n_pert
    low_c = (pct_c < min_pct_ctrl) & (ctrl_mean < min_mean_ctrl)
    low_p = (pct_p < min_pct_pert) & (pert_mean < min_mean_pert)
    off = low_c[None, :] & low_p
    if min_cells_ctrl > 0:
        off |= (ctrl_expr < min_cells_ctrl)[None, :]
    if min_cells_pert > 0:
        off |= pert_expr < min_cells_pert
    return ~off & (n_pert > 0)


def bh_by_row(pvalue: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg within each row (perturbation); NaN p-values are left out."""
    return np.vstack([p_adjust_bh(row) for row in pvalue]) if len(pvalue) else pvalue.copy()


# -- Wald and Welch t-tests ------------------------------------------------------------------
def wald_pvalues(lfc_nat: np.ndarray, se_nat: np.ndarray):
    """Wald statistic and two-sided normal p-value."""
    with np.errstate(invalid="ignore", divide="ignore"):
        stat = lfc_nat / se_nat
    return stat, 2.0 * ndtr(-np.abs(stat))


def welch_t(n1, s1, ss1, n2, s2, ss2):
    """Welch's t-test from counts, sums and sums of squares (group 1 vs group 2).

    Returns the mean difference, t statistic, degrees of freedom and two-sided p-value;
    NaN where a group has fewer than 2 cells or both variances are 0.
    """
    n1 = np.asarray(n1, dtype=float)
    n2 = np.asarray(n2, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        m1, m2 = s1 / n1, s2 / n2
        v1 = np.maximum(ss1 - n1 * m1 * m1, 0.0) / (n1 - 1.0)
        v2 = np.maximum(ss2 - n2 * m2 * m2, 0.0) / (n2 - 1.0)
        e1, e2 = v1 / n1, v2 / n2
        se2 = e1 + e2
        t = (m1 - m2) / np.sqrt(se2)
        df = se2 * se2 / (e1 * e1 / (n1 - 1.0) + e2 * e2 / (n2 - 1.0))
        t = np.where((n1 > 1) & (n2 > 1) & (se2 > 0), t, np.nan)
        pval = 2.0 * _stdtr(df, -np.abs(t))
    return m1 - m2, t, df, pval


# -- van Elteren (Wilcoxon rank-sum stratified by site) --------------------------------------
def van_elteren_site(values: np.ndarray, cols: np.ndarray, q_of_entry: np.ndarray,
                     s_of_entry: np.ndarray, n_cells: np.ndarray, n_genes: int) -> dict:
    """One site's van Elteren sums for every perturbation against the control.

    Within each stratum ``s`` (a design cell held by this site), perturbation ``p``'s cells are
    ranked with the stratum's control cells, gene by gene (ties get mid-ranks; zeros are one
    tie group). With ``U`` the Mann-Whitney statistic, ``N`` the cells ranked, the site sends
    ``sum_s U / (N + 1)``, ``sum_s E[U] / (N + 1)`` and ``sum_s Var[U] / (N + 1)^2``
    (tie-corrected): van Elteren's weights, summed over strata and then over sites.

    Parameters
    ----------
    values, cols, q_of_entry, s_of_entry
        Every stored (non-zero) entry of the site's control and perturbed cells: normalised
        value (``y / s``; ranks are the same for ``log1p(y / s)``), gene, group (0 control,
        ``p + 1`` perturbation ``p``) and stratum.
    n_cells
        ``(S, Q)`` cells per stratum and group.
    n_genes
        G.

    Returns
    -------
    dict
        ``u, e, v`` ``(P, G)``.
    """
    S, Q = n_cells.shape
    P, G = Q - 1, n_genes
    out = {k: np.zeros((P, G)) for k in ("u", "e", "v")}
    for s in range(S):
        n_c = n_cells[s, 0]
        n_p = n_cells[s, 1:]
        if n_c == 0 or not (n_p > 0).any():
            continue
        sel = s_of_entry == s
        val, col, grp = values[sel], cols[sel], q_of_entry[sel]
        # exact ranks of the stratum's values within each gene (integer codes, gene-major)
        order = np.lexsort((val, col))
        vs, cs = val[order], col[order]
        new = np.ones(vs.size, dtype=bool)
        new[1:] = (vs[1:] != vs[:-1]) | (cs[1:] != cs[:-1])
        code = np.empty(vs.size, dtype=np.int64)
        code[order] = np.cumsum(new) - 1
        is_c = grp == 0
        ctrl_codes = np.sort(code[is_c])
        ctrl_nz = np.bincount(col[is_c], minlength=G).astype(np.float64)
        ctrl_before = np.concatenate([[0], np.cumsum(ctrl_nz)[:-1]])
        # control tie groups among non-zeros: sum (t^3 - t) per gene
        uc, tc = np.unique(ctrl_codes, return_counts=True)
        gene_of_code = np.empty(int(code.max()) + 1 if code.size else 0, dtype=np.int64)
        gene_of_code[code] = col
        tie_c = np.bincount(gene_of_code[uc], weights=tc.astype(float)**3 - tc, minlength=G) \
            if uc.size else np.zeros(G)
        pe = ~is_c
        pc, pcol, pq = code[pe], col[pe], grp[pe] - 1
        lt = np.searchsorted(ctrl_codes, pc, "left")
        le = np.searchsorted(ctrl_codes, pc, "right")
        eq = (le - lt).astype(np.float64)
        less = lt - ctrl_before[pcol]
        z_c = n_c - ctrl_nz  # control zeros per gene
        key = pq * G + pcol
        u_nz = np.bincount(key, weights=z_c[pcol] + less + 0.5 * eq,
                           minlength=P * G).reshape(P, G)
        nz_p = np.bincount(key, minlength=P * G).reshape(P, G).astype(np.float64)
        z_p = n_p[:, None] - nz_p
        u = 0.5 * z_p * z_c[None, :] + u_nz
        # ties of the union: zeros, control ties, and the perturbed values' extra ties
        pk, tp = np.unique(pq.astype(np.int64) * (code.max() + 1) + pc, return_counts=True)
        pk_q = pk // (code.max() + 1)
        pk_code = pk % (code.max() + 1)
        t_c_at = (np.searchsorted(ctrl_codes, pk_code, "right")
                  - np.searchsorted(ctrl_codes, pk_code, "left")).astype(np.float64)
        tot = t_c_at + tp
        extra = (tot**3 - tot) - (t_c_at**3 - t_c_at)
        tie_extra = np.bincount(pk_q * G + gene_of_code[pk_code], weights=extra,
                                minlength=P * G).reshape(P, G)
        t0 = z_c[None, :] + z_p
        ties = t0**3 - t0 + tie_c[None, :] + tie_extra
        N = (n_c + n_p)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            var = n_p[:, None] * n_c / 12.0 * ((N + 1.0) - ties / (N * (N - 1.0)))
        ok = (n_p > 0)[:, None]
        wgt = 1.0 / (N + 1.0)
        out["u"] += np.where(ok, u * wgt, 0.0)
        out["e"] += np.where(ok, 0.5 * n_p[:, None] * n_c * wgt, 0.0)
        out["v"] += np.where(ok, np.nan_to_num(var) * wgt * wgt, 0.0)
    return out


def van_elteren_test(u: np.ndarray, e: np.ndarray, v: np.ndarray):
    """z statistic and two-sided normal p-value from summed van Elteren sums."""
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(v > 0, (u - e) / np.sqrt(v), np.nan)
    return z, 2.0 * ndtr(-np.abs(z))
