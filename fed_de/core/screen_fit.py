"""The screen's NB GLM: every perturbation's effect fitted against frozen control statistics.

The model, per gene ``g``. A cell ``i`` lies in a design cell ``c(i)`` (its site when sites
have their own effect, crossed with declared categorical covariates) and is either a control
cell or carries perturbation ``p(i)``::

    log mu_ig = log s_i + x_c(i)' b_g  (+ beta_p(i)g for perturbed cells),   y ~ NB(mu, alpha_g)

``x_c`` codes the design cell additively (intercept, treatment-coded dummies); ``b_g`` is the
control fit and ``beta_pg`` the effect of perturbation ``p`` (natural log). Dispersions
``alpha`` with variance ``mu + alpha mu^2``; a ridge of DESeq2's size (``1e-6`` on the log2
scale) on every coefficient; fitted means floored at
:data:`fed_de.core.screen_sums.MIN_MU`.

Site side: the Newton sums per group of cells (:func:`fit_summands`, and
:func:`fit_series_summands` for the no-count part of most genes). Aggregator side: Poisson
starts (:func:`control_start`, :func:`pert_start`), the safeguarded Newton update of the
control fit (:func:`control_update`), the coupled update of every effect
(:func:`pert_update`), and the standard error against the frozen control fit
(:func:`frozen_wald_se`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fed_de.core import nb
from fed_de.core.screen_sums import (
    MIN_MU,
    chunk_entries,
    group_indicator,
    row_blocks,
    series_sums,
)

LN2 = nb.LN2
#: Ridge on every coefficient, natural-log scale (DESeq2's 1e-6 on the log2 scale).
RIDGE = nb.RIDGE_LOG2 / LN2**2
#: |coefficient| beyond which a fit is diverged (natural log).
LARGE = 30.0
#: Log mean given to a design cell whose control cells hold no count of a gene.
LOG_ZERO = -25.0
#: Largest Newton step per round: control coefficients, perturbation effects (natural log).
MAX_STEP_CONTROL = 5.0
MAX_STEP_PERT = 2.0
#: Convergence: a Newton step below this (natural log) is the last one taken; Newton's
#: quadratic convergence leaves an error of order DONE_STEP^2.
DONE_STEP = 1e-5
#: Relative rounding noise of summed log likelihoods (decisions below it are ties).
NOISE = 1e-11


@dataclass
class ControlFit:
    """The control fit's Newton iteration, per gene: ``b`` the point the sites evaluate next,
    ``b_acc`` / ``ll_acc`` the last accepted point and its penalised log likelihood, ``step``
    the last step (halved on a rejected point), ``iteration``, and the genes ``done``."""

    b: np.ndarray
    b_acc: np.ndarray
    ll_acc: np.ndarray
    step: np.ndarray
    iteration: int
    done: np.ndarray


def control_start(ctrl_y: np.ndarray, ctrl_sf: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Start of the control fit: weighted least squares of the log Poisson means of the design
    cells (exact for a cell-means design). Cells without control counts get :data:`LOG_ZERO`.

    ``ctrl_y`` ``(C, G)`` and ``ctrl_sf`` ``(C,)``: sums of counts and size factors over the
    control cells of each design cell. Returns ``(G, p)``.
    """
    C, G = ctrl_y.shape
    has = ctrl_sf > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        logm = np.where(ctrl_y > 0, np.log(ctrl_y / np.where(has, ctrl_sf, 1.0)[:, None]),
                        LOG_ZERO)
    wt = np.where(ctrl_y > 0, ctrl_sf[:, None], 1e-6 * ctrl_sf[:, None]) * has[:, None]
    p = X.shape[1]
    XtWX = np.einsum("cg,ci,cj->gij", wt, X, X) + 1e-9 * np.eye(p)
    XtWz = np.einsum("cg,ci,cg->gi", wt, X, logm)
    return np.linalg.solve(XtWX, XtWz[..., None])[..., 0]


def pert_start(pert_y: np.ndarray, pert_cell_sf: np.ndarray, X: np.ndarray,
               b: np.ndarray) -> np.ndarray:
    """Poisson start of every perturbation effect (exact for alpha = 0):
    ``log(sum y / sum_c (sum s) exp(x_c' b))``; ``(P, G)``."""
    m = np.exp(np.clip(b @ X.T, -2 * LARGE, 2 * LARGE))  # (G, C)
    denom = pert_cell_sf @ m.T  # (P, G)
    ok = (pert_y > 0) & (denom > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = np.where(ok, np.log(np.where(ok, pert_y, 1.0) / np.where(ok, denom, 1.0)),
                        -LARGE / 3)
    return np.clip(beta, -LARGE, LARGE)


def fit_summands(X: sp.csr_matrix, sf: np.ndarray, q: np.ndarray, c: np.ndarray,
                 mean_table: np.ndarray, alpha: np.ndarray, *, with_uh: bool = True,
                 with_w: bool = False, min_mu: float = MIN_MU,
                 dense: np.ndarray | None = None) -> dict:
    """Newton sums of the NB fit, per group ``(q, c)`` of the chunk's cells.

    Parameters
    ----------
    X
        Counts of a chunk of cells, CSR ``(rows, G)``.
    sf, q, c
        Size factors, group (0 = control, ``p + 1`` = perturbation ``p``, ``< 0``: left out)
        and design cell of the chunk's cells.
    mean_table
        ``(Q, C, G)``: ``exp(x_c' b + beta_q)`` (``beta_0 = 0``).
    alpha
        ``(G,)`` dispersions.
    with_uh
        Return the Newton sums (score, observed information, control log likelihood).
    with_w
        Return the sums of the Fisher weights (for the Wald test).
    min_mu
        Floor of fitted means.
    dense
        ``(G,)`` genes whose no-count part is summed cell by cell here; the caller adds the
        others' from power sums (:func:`fit_series_summands`). Default: every gene.

    Returns
    -------
    dict
        ``u``, ``h`` ``(Q, C, G)``: sums of the score ``(y - mu) / (1 + alpha mu)`` and of the
        observed information ``mu (1 + alpha y) / (1 + alpha mu)^2``; ``ll`` ``(C, G)``: log
        likelihood of the control cells (terms constant in the coefficients dropped);
        ``w`` ``(Q, C, G)``: sums of ``mu / (1 + alpha mu)``.
    """
    Q, C, G = mean_table.shape
    flat = mean_table.reshape(Q * C, G)
    code = np.where(q >= 0, q * C + c, -1)
    used = np.flatnonzero(code >= 0)
    cols_d = np.arange(G) if dense is None else np.flatnonzero(dense)
    Gd = cols_d.size
    w_d = np.zeros((Q * C, Gd))
    h_d = np.zeros((Q * C, Gd))
    l_d = np.zeros((C, Gd))
    floor = used.size > 0 and float(flat.min()) * float(sf[used].min()) < min_mu
    if Gd:
        flat_d = flat[:, cols_d] if Gd < G else flat
        alpha_d = alpha[cols_d]
        for blk in row_blocks(used.size, Gd):
            r = used[blk]
            mu = flat_d[code[r]]
            mu *= sf[r, None]
            if floor:
                np.maximum(mu, min_mu, out=mu)
            inv = mu * alpha_d  # t = alpha mu
            ctrl = np.flatnonzero(q[r] == 0)
            if with_uh and ctrl.size:
                l_d += group_indicator(c[r[ctrl]], C) @ np.log1p(inv[ctrl])
            inv += 1.0
            np.reciprocal(inv, out=inv)
            mu *= inv  # w = mu / (1 + t)
            ind = group_indicator(code[r], Q * C)
            w_d += ind @ mu
            if with_uh:
                mu *= inv  # mu / (1 + t)^2
                h_d += ind @ mu
    w_sum = np.zeros((Q * C, G))
    w_sum[:, cols_d] = w_d
    out: dict = {}
    if with_w:
        out["w"] = w_sum.reshape(Q, C, G)
    if not with_uh:
        return out
    h = np.zeros((Q * C, G))
    h[:, cols_d] = h_d
    ll = np.zeros((C, G))
    ll[:, cols_d] = -l_d / alpha[cols_d]
    rows, cols, y = chunk_entries(X)
    keep_e = code[rows] >= 0
    rows, cols, y = rows[keep_e], cols[keep_e], y[keep_e]
    key = code[rows] * G + cols
    mu_e = sf[rows] * flat.ravel()[key]  # fitted means at the stored entries
    if floor:
        np.maximum(mu_e, min_mu, out=mu_e)
    t_e = alpha[cols] * mu_e
    inv_e = 1.0 / (1.0 + t_e)
    size = Q * C * G
    u = np.bincount(key, weights=y * inv_e, minlength=size).reshape(Q * C, G) - w_sum
    h += np.bincount(key, weights=y * t_e * inv_e * inv_e, minlength=size).reshape(Q * C, G)
    ctrl_e = q[rows] == 0
    if ctrl_e.any():
        ly = y[ctrl_e] * (np.log(mu_e[ctrl_e]) - np.log1p(t_e[ctrl_e]))
        ll += np.bincount(c[rows[ctrl_e]] * G + cols[ctrl_e], weights=ly,
                          minlength=C * G).reshape(C, G)
    out.update(u=u.reshape(Q, C, G), h=h.reshape(Q, C, G), ll=ll)
    return out


def fit_series_summands(moments: dict, mean_table: np.ndarray, alpha: np.ndarray,
                        genes: np.ndarray, *, with_uh: bool = True,
                        with_w: bool = False) -> dict:
    """The no-count part of :func:`fit_summands` for ``genes`` (``(G,)`` bool), from the
    groups' power sums of size factors (``moments`` over the ``Q * C`` groups); zeros for
    the other genes. ``w = T1 / alpha``, ``h = (T1 - T2) / alpha``, ``ll = -L / alpha``."""
    Q, C, G = mean_table.shape
    idx = np.flatnonzero(genes)
    w = np.zeros((Q * C, G))
    h = np.zeros((Q * C, G))
    ll = np.zeros((C, G))
    if idx.size:
        live = np.flatnonzero(moments["S"][:, 0] > 0)
        z = mean_table.reshape(Q * C, G)[np.ix_(live, idx)] * alpha[idx]
        sub = {k: v[live] for k, v in moments.items()}
        kinds = ("T1", "T2") if with_uh else ("T1",)
        ser = series_sums(sub, z, kinds)
        a = alpha[idx]
        w[np.ix_(live, idx)] = ser["T1"] / a
        if with_uh:
            h[np.ix_(live, idx)] = (ser["T1"] - ser["T2"]) / a
            ctrl = live[live < C]  # groups q = 0: control cells of each design cell
            if ctrl.size:
                zc = mean_table[0][np.ix_(ctrl, idx)] * a
                lser = series_sums({k: v[ctrl] for k, v in moments.items()}, zc, ("L",))
                ll[np.ix_(ctrl, idx)] = -lser["L"] / a
    out: dict = {}
    if with_w:
        out["w"] = w.reshape(Q, C, G)
    if with_uh:
        out.update(u=-w.reshape(Q, C, G), h=h.reshape(Q, C, G), ll=ll)
    return out


def mean_table(X: np.ndarray, b: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``exp(x_c' b_g + beta_qg)`` for every group ``q`` (control first) and cell: ``(Q, C, G)``."""
    eta_c = np.clip(b @ X.T, -2 * LARGE, 2 * LARGE).T  # (C, G)
    full = np.concatenate([np.zeros((1,) + beta.shape[1:]), beta], axis=0)  # (Q, G)
    return np.exp(np.clip(eta_c[None] + full[:, None, :], -3 * LARGE, 3 * LARGE))


def start_control_fit(b0: np.ndarray, done: np.ndarray) -> ControlFit:
    """The control fit at its start ``b0`` ``(G, p)``; genes ``done`` are never moved."""
    G, p = b0.shape
    return ControlFit(b=b0, b_acc=b0, ll_acc=np.full(G, -np.inf), step=np.zeros((G, p)),
                      iteration=0, done=done.copy())


def control_update(fit: ControlFit, ll: np.ndarray, U: np.ndarray, H: np.ndarray,
                   X: np.ndarray, live: np.ndarray) -> ControlFit:
    """One safeguarded Newton update of the control coefficients (per gene).

    ``fit.b`` is the point the sites evaluated. ``ll`` ``(G,)``, ``U`` ``(G, p)``, ``H``
    ``(G, T)``: log likelihood, score and packed observed information at ``b``. ``live``
    ``(G, C)``: design cells whose control mean is estimable (convergence is judged on them).
    A point whose penalised log likelihood falls (beyond rounding noise) is rejected and the
    step halved.
    """
    G, p = fit.b.shape
    first = fit.iteration == 0
    ll_acc = fit.ll_acc
    ll = ll - 0.5 * RIDGE * (fit.b ** 2).sum(axis=1)  # the ridge-penalised objective
    slack = NOISE * (np.abs(np.nan_to_num(ll_acc)) + 1.0)
    accept = first | ~(ll < ll_acc - slack)
    accept &= ~fit.done
    Hm = nb.unpack(H, p) + RIDGE * np.eye(p)
    rhs = U - RIDGE * fit.b
    with np.errstate(invalid="ignore", over="ignore"):
        newton = np.linalg.solve(Hm, rhs[..., None])[..., 0]
    # clipped coefficient by coefficient: a cell without control counts (its mean heads to 0)
    # must not slow the others down
    newton = np.clip(np.nan_to_num(newton), -MAX_STEP_CONTROL, MAX_STEP_CONTROL)
    step = np.where(accept[:, None], newton, 0.5 * fit.step)
    base = np.where(accept[:, None], fit.b, fit.b_acc)
    cell_step = np.abs(step @ X.T)
    small = (np.where(live, cell_step, 0.0).max(axis=1) < DONE_STEP) & accept
    done = fit.done | small
    # a gene whose Newton step is below DONE_STEP takes that last step (Newton converges
    # quadratically: what remains is ~DONE_STEP^2) and stops
    new_b = np.where(fit.done[:, None], fit.b, np.clip(base + step, -LARGE, LARGE))
    return ControlFit(b=new_b, b_acc=base, ll_acc=np.where(accept, ll, ll_acc),
                      step=np.where(done[:, None], 0.0, step), iteration=fit.iteration + 1,
                      done=done)


def unit_coefficients(X: np.ndarray) -> np.ndarray:
    """``v`` with ``X v = 1``: recovers ``sum h`` from ``sum h x`` (``e_0`` when the design
    has an intercept column, ``1`` for cell-means coding)."""
    v = np.linalg.lstsq(X, np.ones(X.shape[0]), rcond=None)[0]
    if not np.allclose(X @ v, 1.0):
        raise ValueError("the design rows do not span the intercept")
    return v


def pert_update(beta: np.ndarray, u: np.ndarray, hx: np.ndarray, db: np.ndarray,
                unit: np.ndarray):
    """Newton update of every perturbation effect, the control coefficients having moved by
    ``db`` ``(G, p)`` since the sums ``u`` ``(P, G)`` and ``hx`` ``(P, G, p)`` (observed
    information times the cells' design rows) were taken; ``unit``: see
    :func:`unit_coefficients`. Returns the new effects and the step (``(P, G)`` each)."""
    h = hx @ unit + RIDGE
    coupling = np.einsum("pgj,gj->pg", hx, db)
    with np.errstate(invalid="ignore", divide="ignore"):
        step = (u - RIDGE * beta - coupling) / h
    step = np.clip(np.nan_to_num(step), -MAX_STEP_PERT, MAX_STEP_PERT)
    return np.clip(beta + step, -LARGE, LARGE), step


def frozen_wald_se(wx: np.ndarray, ctrl_info: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Standard error (natural log) of the perturbation effects fitted against frozen control
    coefficients.

    The effect is fitted with ``b`` fixed at the control fit ``b_hat``; its sampling variance
    adds the perturbed cells' Fisher information ``d = sum w`` and the control fit's
    uncertainty carried through ``a = sum w x / d``::

        var(beta_p) = 1 / d + a' (X'WX_control)^-1 a

    With an intercept-only control this is ``1/d + 1/W_control``, the (beta_p, beta_p) entry
    of the inverse 2 x 2 information of (intercept, beta_p) over control and perturbed cells.
    ``wx`` ``(P, G, p)``; ``ctrl_info`` packed ``(G, T)``; ``unit``: see
    :func:`unit_coefficients`. The value does not depend on how the design cells are coded.
    """
    p = wx.shape[-1]
    d = wx @ unit + RIDGE
    with np.errstate(invalid="ignore", divide="ignore"):
        cinv = np.linalg.inv(nb.unpack(ctrl_info, p) + RIDGE * np.eye(p))
        a = wx / d[..., None]
        var = 1.0 / d + np.einsum("pgi,gij,pgj->pg", a, cinv, a)
    return np.sqrt(var)
