"""An honest-but-curious aggregator: it keeps every message and solves for the sites' data.

This is the attacker the test suite keeps (``tests/test_attacks.py``) and the privacy report
runs (``benchmarks/privacy/attack_report.py``), written against the current protocol (typed
messages of ``fed_de/bulk`` and ``fed_de/screening``, secure aggregation of
``fed_de/federation/secure.py``). It uses only what the aggregator holds:

- every input of every aggregation (:func:`record_run`): the sites' messages as sent -- plain
  when secure aggregation is off, masked otherwise -- and the run state the sites received;
- its own outputs (the run states: IRLS candidates, dispersions, replacement means, ...);
- the public study (design, declared levels, genes) and the public protocol (this code knows
  what each message field means).

Two views (:func:`view`): ``"site"`` -- one site's messages as sent (meaningful only with
``secure_aggregation=False``: masked payloads are uniform in the ring), and ``"totals"`` --
the cross-site total of every message, what secure aggregation leaves the aggregator.

The true data is used only by the ``score_*`` functions. Every attack claims a value only when
the recording leaves one possibility (within a rounding tolerance): a wrong claim is a bug of
the attacker, and the tests assert there is none.

Attacks on the current protocol:

``attack_sizes``
    a view's sample count and samples per design cell (``LogSums.n_samples`` /
    ``cell_counts``, ``MomentSums.n_samples`` / ``xtx``, ``NormalisedSums.n_samples``).
``attack_size_factors``
    per design cell, a least-squares fit of the cell's size factors to every per-cell weight
    sum (``IRLSSums.full.xtwx`` at the candidates the aggregator sent, with the dispersions
    it sent; ``DispSums.A`` / ``A1`` / ``A2`` at the (gene, log alpha) pairs it asked for);
    claimed when the fit is exact and its curvature pins every value.
``attack_counts``
    with the size factors: ``MomentSums.cell_norm`` (sum of normalised counts per gene and
    cell) and ``IRLSSums.full.xtwz`` at every candidate are linear equations in the cell's
    integer counts; the complete set of integer solutions is enumerated (LLL + enumeration
    with ``fpylll``, else Fincke-Pohst) and checked against ``LogSums.cell_nonzero``,
    ``RoughSums.xt_logy`` and the closing round's ``cell_sumsq`` / ``cell_logsum``; a count
    is claimed when every solution agrees on it.
``attack_cooks``
    the closing round's per-cell sums of the *replaced* normalised counts (``CooksCounts``
    ``cell_sum`` / ``cell_sumsq``) minus round 2's sums of the original ones
    (``MomentSums.cell_norm``, and the round-2 ``sum_norm_sq`` for one-cell designs): where a
    gene had one replaced sample, ``r - x`` and ``r^2 - x^2`` give the outlier's normalised
    count ``x`` and its replacement ``r`` exactly.
``attack_screen``
    a screen's per-group sums (``GroupSums.pert_y`` / ``pert_norm`` / ``pert_expr``): a gene
    with one expressing cell in a perturbation group gives that cell's count and size factor;
    with every size factor of the group, genes with more expressing cells are solved over
    every subset of cells.

Attacks of the old protocol that no longer apply (their messages are gone): the order-statistic
search of Cook's (``local_robust_sums``: counts / sums / sums of squares per sub-interval, now
counts below thresholds only, :class:`fed_de.bulk.cooks.RobustSums`) and the interval
differencing built on it; the round-2 ``xty`` identity of the old ``local_moments`` is
replaced by ``MomentSums.cell_norm`` (one equation per gene and cell, any design).
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import least_squares

MIN_MU = 0.5  # DESeq2's floor of fitted means in the IRLS (fed_de.core.irls.MIN_MU)


# =========================================================================================
# Recording
# =========================================================================================
@dataclass
class Round:
    """One aggregation that read site messages, as the aggregator holds it.

    ``kind``: the message class; ``steps``: the aggregator chain it ran; ``received``: the run
    state the sites answered (``None`` at the first round); ``output``: the aggregator's new
    state; ``sites``: per-site arrays by dotted field name (plain messages; ``None`` when
    masked); ``masked``: the masked payloads (secure aggregation); ``total``: the cross-site
    total (genes scattered back to the full gene list when the round asked for some rows).
    """

    kind: str
    steps: str
    received: Any
    output: Any
    sites: list | None
    masked: list | None
    total: dict
    order: int


def _flat_total(msgs: list, rows, n_genes) -> dict:
    from fed_de.federation.messages import arrays, total

    return arrays(total(msgs, rows, n_genes))


def record_run(sites, design: str | None = None, *, screen: bool = False, **kwargs) -> dict:
    """Run fed_de in the simulator and record every aggregation's inputs and output.

    Parameters
    ----------
    sites
        As :func:`fed_de.deseq2` (or :func:`fed_de.screen` with ``screen=True``).
    design
        The design formula (``None`` for screens).
    screen
        Run :func:`fed_de.screen` (``kwargs`` name the perturbation column, control, ...).
    **kwargs
        Passed to ``fed_de.deseq2`` / ``fed_de.screen``.

    Returns
    -------
    dict
        ``rounds``: :class:`Round` list in order; ``sites``: the site names (message order);
        ``study``: the public study; ``result``: what the run returned.
    """
    import fed_de
    from fed_de.backends import simulation as sim
    from fed_de.federation import secure
    from fed_de.federation.messages import Message

    rounds: list[Round] = []
    meta: dict = {}
    orig = sim._call

    def spy(method, org, step, ledger, what, **kw):
        kept = None
        if "shared_states" in kw:  # read twice here: a list, not the simulation's stream;
            # the aggregation sums into the first masked message: it gets a copy
            kept = list(kw["shared_states"])
            kw["shared_states"] = [copy.deepcopy(s) if isinstance(s, secure.MaskedMessage)
                                   else s for s in kept]
        out = orig(method, org, step, ledger, what, **kw)
        if kept is not None:
            kw["shared_states"] = kept
        if not what.startswith("aggregation"):
            return out
        strategy = getattr(method, "__self__", None)
        if "study" not in meta and strategy is not None:
            meta["study"] = strategy.context().get("study")
        inputs = kw.get("shared_states") or []
        sent = (Message, secure.MaskedMessage)
        msgs = [s for s in inputs if isinstance(s, sent)
                and not isinstance(s, secure.KeyOffer)]
        states = [s for s in inputs if not isinstance(s, sent)]
        if not msgs:
            return out
        received = states[-1] if states else None
        rows = getattr(received, "rows", None)
        G = strategy.dims()["G"] if rows is not None else None
        masked = [m for m in msgs if isinstance(m, secure.MaskedMessage)]
        if masked:
            plain_total = secure.unmask_total(masked)
            kind = masked[0].kind.rpartition(":")[2]
            tot, per_site = _flat_total([plain_total], rows, G), None
            payloads = [m.payload for m in masked]
        else:
            kind = type(msgs[0]).__name__
            tot = _flat_total(msgs, rows, G)
            per_site = [_flat_total([m], rows, G) for m in msgs]
            payloads = None
        rounds.append(Round(kind, str(kw.get("steps", "")), received, out, per_site,
                            payloads, tot, len(rounds)))
        return out

    sim._call = spy
    try:
        if screen:
            result = fed_de.screen(sites, backend="simulation", **kwargs)
        else:
            result = fed_de.deseq2(sites, design, backend="simulation", **kwargs)
    finally:
        sim._call = orig
    return {"rounds": rounds, "sites": list(sites), "study": meta.get("study"),
            "result": result}


@dataclass
class Task:
    """One round as the attacker reads it in a view: the message (by dotted name), the state
    the sites received, the aggregator's own output, the chain of steps."""

    kind: str
    steps: str
    message: dict
    state: Any
    output: Any
    order: int


def view(recording: dict, which: str = "totals") -> list[Task]:
    """The recording as one view: ``"totals"`` (cross-site totals: secure aggregation's
    view) or a site's name (its messages as sent; plain messages only)."""
    out = []
    names = recording["sites"]
    for r in recording["rounds"]:
        if which == "totals":
            msg = r.total
        else:
            if r.sites is None:
                raise ValueError("the messages were masked (secure aggregation): a site's "
                                 "own sums are not in the recording")
            msg = r.sites[names.index(which)]
        for kind, part in _parts(r.kind, msg):
            out.append(Task(kind, r.steps, part, r.received, r.output, r.order))
    return out


# a fused round's message: its parts, read as the messages of their own rounds
_FUSED = {"ClosingFitSums": (("fit.", "IRLSSums"), ("closing.", "BoxedSums"))}


def _parts(kind: str, msg: dict):
    if kind not in _FUSED:
        yield kind, msg
        return
    for prefix, part in _FUSED[kind]:
        sub = {k[len(prefix):]: v for k, v in msg.items() if k.startswith(prefix)}
        if sub:
            yield part, sub


def masked_view_values(recording: dict, which: str) -> np.ndarray:
    """Every masked word a site sent, as the aggregator received it (secure aggregation)."""
    names = recording["sites"]
    vals = []
    for r in recording["rounds"]:
        if r.masked is None:
            continue
        for arr in _leaves(r.masked[names.index(which)]):
            vals.append(np.asarray(arr).ravel())
    return np.concatenate(vals) if vals else np.zeros(0)


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _leaves(v)
    elif isinstance(obj, np.ndarray):
        yield obj


# =========================================================================================
# The study's geometry
# =========================================================================================
class Geometry:
    """Design cells of a factor design and the maps from per-cell sums to message entries.

    ``X'WX`` (packed, ``T`` entries) and ``X'v`` (``p`` entries) are linear in the per-cell
    sums of ``w`` / ``v``; where the map is injective the per-cell sums are read back.
    """

    def __init__(self, study):
        from fed_de.design import cell_design_rows, design_cells

        self.levels = dict(study.levels)
        self.cells = design_cells(study)
        self.Xc = cell_design_rows(study)  # C x p
        self.C, self.p = self.Xc.shape
        iu = np.triu_indices(self.p)
        self.packed = (self.Xc[:, iu[0]] * self.Xc[:, iu[1]]).T  # T x C
        self.packed_ok = np.linalg.matrix_rank(self.packed) == self.C
        self.linear_ok = np.linalg.matrix_rank(self.Xc.T) == self.C
        self._pk_inv = np.linalg.pinv(self.packed)
        self._lin_inv = np.linalg.pinv(self.Xc.T)

    def cells_from_packed(self, v) -> np.ndarray:
        """Per-cell sums from packed X'WX-type entries (``[..., T] -> [..., C]``)."""
        if not self.packed_ok:
            raise NotImplementedError("X'WX does not identify the design cells")
        return np.asarray(v) @ self._pk_inv.T

    def cells_from_linear(self, v) -> np.ndarray:
        """Per-cell sums from X'v-type entries (``[..., p] -> [..., C]``), saturated designs."""
        if not self.linear_ok:
            raise NotImplementedError("X'v does not identify the design cells")
        return np.asarray(v) @ self._lin_inv.T

    def cell_means(self, beta) -> np.ndarray:
        """``exp(x_c' beta)`` for every gene (rows of ``beta``) and cell: ``[..., C]``."""
        with np.errstate(over="ignore"):
            return np.exp(np.clip(np.asarray(beta) @ self.Xc.T, -700, 700))


# =========================================================================================
# Sample counts
# =========================================================================================
def attack_sizes(tasks: list[Task], geo: Geometry) -> dict:
    """A view's sample count and per-cell counts, from every message field that reveals them.

    Returns
    -------
    dict
        ``n`` (int or None), ``cells`` (int array or None), ``sources`` (field names that
        gave a value; all must agree, else nothing is claimed).
    """
    ns, cells, sources = [], [], []
    for t in tasks:
        msg = t.message
        if "n_samples" in msg:
            ns.append(float(msg["n_samples"]))
            sources.append(f"{t.kind}.n_samples")
        if t.kind == "LogSums":
            cells.append(np.asarray(msg["cell_counts"], dtype=float))
            sources.append("LogSums.cell_counts")
        if t.kind == "MomentSums" and geo.packed_ok:
            cells.append(geo.cells_from_packed(msg["xtx"]))
            sources.append("MomentSums.xtx")
    n = _agree(ns)
    c = _agree(cells)
    if n is None and c is not None:
        n = float(np.sum(c))
    return {"n": None if n is None else int(round(float(n))),
            "cells": None if c is None else np.round(c).astype(int), "sources": sources}


def _agree(values: list):
    vals = [np.asarray(v, float) for v in values if np.isfinite(v).all()]
    if not vals:
        return None
    if any(np.abs(v - vals[0]).max() > 1e-6 for v in vals[1:]):
        return None
    return vals[0]


# =========================================================================================
# Size factors from sums of IRLS weights
@dataclass
class WeightSums:
    """Per-cell sums of ``w = mu / (1 + alpha mu)`` (kind 1), ``-alpha w^2`` (kind 2, A1) and
    ``-alpha w^2 + 2 alpha^2 w^3`` (kind 3, A2), with ``mu = max(s m, 0.5)``."""

    m: list = field(default_factory=list)
    alpha: list = field(default_factory=list)
    kind: list = field(default_factory=list)
    value: list = field(default_factory=list)

    def add(self, m, alpha, kind: int, value) -> None:
        m, alpha, value = np.broadcast_arrays(np.asarray(m, float), np.asarray(alpha, float),
                                              np.asarray(value, float))
        ok = np.isfinite(m) & np.isfinite(alpha) & np.isfinite(value) & (value != 0)
        self.m.append(m[ok])
        self.alpha.append(alpha[ok])
        self.kind.append(np.full(int(ok.sum()), kind))
        self.value.append(value[ok])

    def arrays(self):
        cat = lambda a: np.concatenate(a) if a else np.zeros(0)  # noqa: E731
        return cat(self.m), cat(self.alpha), cat(self.kind).astype(int), cat(self.value)




def _term_scale(theta: np.ndarray, m, alpha, kind) -> np.ndarray:
    """Sum of the absolute values of a weight sum's terms: the scale of its rounding error
    (the A2 sums cancel: their value can be far smaller than their terms)."""
    s = np.exp(theta)
    mu = m[:, None] * s[None, :]
    a = alpha[:, None]
    w = mu / (1.0 + a * mu)
    aw = a * w
    k2, k3 = (kind == 2)[:, None], (kind == 3)[:, None]
    fac = np.where(k2, aw, np.where(k3, aw + 2 * aw * aw, 1.0))
    return (w * fac).sum(axis=1)


def _weight_model(theta: np.ndarray, m, alpha, kind, need_jac: bool = True):
    """Model sums and their derivatives in log size factors (floor not active)."""
    s = np.exp(theta)
    mu = m[:, None] * s[None, :]
    a = alpha[:, None]
    den = 1.0 + a * mu
    w = mu / den
    k2, k3 = (kind == 2)[:, None], (kind == 3)[:, None]
    aw = a * w
    # kind 1: w; kind 2: -a w^2; kind 3: -a w^2 + 2 a^2 w^3 (as factors of w)
    fac = np.where(k2, -aw, np.where(k3, -aw + 2 * aw * aw, 1.0))
    model = (w * fac).sum(axis=1)
    if not need_jac:
        return model, None
    dw = w / den  # d w / d log s
    dfac = np.where(k2, -2 * aw, np.where(k3, -2 * aw + 6 * aw * aw, 1.0))
    return model, dfac * dw


@dataclass
class SizeFactorClaim:
    """Size factors of one cell: estimates (sorted), whether claimed, fit diagnostics."""

    values: np.ndarray
    claimed: bool
    max_resid: float
    rel_sd: float
    n_obs: int


NOISE_REL = 1e-14  # relative rounding noise assumed on every received sum
MAX_REL_SF = 1e-3  # size factors this uncertain (relative) still seed the count decoder


def _flat(J: np.ndarray) -> bool:
    sv = np.linalg.svd(J, compute_uv=False)
    return bool(sv.min() <= 0 or NOISE_REL / sv.min() > 1e-3)


def _prony_start(m, alpha, kind, value, n) -> np.ndarray | None:
    """Size factors from a linear fit of the weight sums' rational form.

    ``F(u) = sum_i s_i / (1 + u s_i) = P'(u) / P(u)`` with ``P(u) = prod (1 + s_i u)`` and
    ``u = alpha m``: ``F P - P' = 0`` is linear in P's coefficients (the elementary
    symmetric functions of the ``s_i``), and so is its derivative (A1 sums give ``F'``).
    The roots of ``P`` are ``-1 / s_i``.
    """
    u = alpha * m
    k1, k2 = kind == 1, kind == 2
    if k1.sum() < 2 * n:
        return None
    rows, rhs = [], []
    powers = np.arange(n + 1)
    # F(u) P(u) - P'(u) = 0 with P = sum_k e_k u^k, e_0 = 1
    uu, F = u[k1], value[k1] / m[k1]
    keep = (uu > 1e-3) & (uu < 1e3)
    uu, F = uu[keep], F[keep]
    if uu.size < 2 * n:
        return None
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        Up = uu[:, None] ** powers[None, :]
        Um = np.where(powers[None, :] > 0, powers[None, :] * uu[:, None] ** (powers - 1), 0.0)
        A = F[:, None] * Up - Um
        norm = np.abs(A).max(axis=1)
        A = A / norm[:, None]
        rows.append(A[:, 1:])
        rhs.append(-A[:, 0])
        # derivative: F' P + F P' - P'' = 0, F' = -(sum s^2/(1+us)^2) = A1 / (alpha m^2)
        if k2.any():
            u2 = u[k2]
            ok2 = (u2 > 1e-3) & (u2 < 1e3)
            u2 = u2[ok2]
            Fp = value[k2][ok2] / (alpha[k2][ok2] * m[k2][ok2] ** 2)
            # F at the same points is unknown here; skip the derivative rows
            del u2, Fp
    M = np.vstack(rows)
    b = np.concatenate(rhs)
    if not (np.isfinite(M).all() and np.isfinite(b).all()):
        return None
    col = np.abs(M).max(axis=0)
    col = np.where(col > 0, col, 1.0)
    e, *_ = np.linalg.lstsq(M / col, b, rcond=None)
    e = e / col
    coeffs = np.concatenate([[1.0], e])  # e_0 .. e_n, ascending
    roots = np.roots(coeffs[::-1])
    if np.abs(roots.imag).max() > 1e-3 * np.abs(roots).max() or (roots.real >= 0).any():
        return None
    sfs = -1.0 / roots.real
    return np.sort(np.log(sfs))


def fit_size_factors(ws: WeightSums, n: int, *, s_floor: float = 0.05, max_obs: int = 2000,
                     starts: int = 8, seed: int = 0, effort: int = 50,
                     min_mu: float = MIN_MU) -> SizeFactorClaim:
    """Least-squares fit of a cell's ``n`` size factors to its weight sums.

    Claimed when the fit reproduces every sum to rounding (relative residual < 1e-9), the
    curvature pins every size factor (predicted relative error < 1e-8, with the sums'
    noise taken as ten times the fit's rms residual), and every start that reaches that
    residual agrees.
    """
    m, alpha, kind, value = ws.arrays()
    if n == 0 or m.size == 0:
        return SizeFactorClaim(np.full(n, np.nan), False, np.inf, np.inf, 0)
    ok = (m * s_floor > min_mu * 1.0001) & (value != 0)  # the floor cannot bind
    m, alpha, kind, value = m[ok], alpha[ok], kind[ok], value[ok]
    if m.size < 2 * n:
        return SizeFactorClaim(np.full(n, np.nan), False, np.inf, np.inf, int(m.size))
    rng = np.random.default_rng(seed)
    if m.size > max_obs:  # keep a spread of alpha * m
        order = np.argsort(alpha * m)
        keep = order[np.linspace(0, m.size - 1, max_obs).astype(int)]
        m, alpha, kind, value = m[keep], alpha[keep], kind[keep], value[keep]
    scale = np.abs(value)

    def resid(theta):
        return (_weight_model(theta, m, alpha, kind, False)[0] - value) / scale

    def jac(theta):
        return _weight_model(theta, m, alpha, kind)[1] / scale[:, None]

    # start: mean and spread of s from the smallest alpha * m sums (w ~ s m there)
    u = alpha * m
    small = (kind == 1) & (u < 1e-3)
    s1 = np.median(value[small] / m[small]) if small.any() else n
    small2 = (kind == 2) & (u < 1e-3)
    s2 = (np.median(-value[small2] / (alpha[small2] * m[small2] ** 2)) if small2.any()
          else s1**2 / n)
    mean = s1 / n
    var = max(s2 / n - mean * mean, (0.05 * mean) ** 2)
    sd_log = np.sqrt(np.log1p(var / mean**2))
    from scipy.stats import norm as _norm

    base = np.log(mean) - sd_log**2 / 2 + sd_log * _norm.ppf((np.arange(n) + 0.5) / n)
    scale[:] = np.maximum(np.abs(value), _term_scale(base, m, alpha, kind))
    prony = _prony_start(m, alpha, kind, value, n)
    best, sols = None, []
    for k in range(starts):
        if k == 0 and prony is not None:
            x0 = prony
        elif k <= 1:
            x0 = base
        else:
            x0 = base + rng.normal(0, 0.3 * (k % 4 + 1) * max(sd_log, .05), n)
        fit = least_squares(resid, np.sort(x0), jac=jac, method="lm", xtol=1e-15, ftol=1e-15,
                            gtol=1e-15, max_nfev=100 + effort * n)
        r = float(np.abs(fit.fun).max())
        x = np.sort(fit.x)
        sols.append((r, x))
        if best is None or r < best[0]:
            best = (r, x)
        good = [x for rr, x in sols if rr < 1e-11]
        if len(good) >= 2:
            break
        if k >= 1 and _flat(jac(best[1])):
            break  # the sums cannot pin these size factors at the best point: no claim
    r, theta = best
    sv = np.linalg.svd(jac(theta), compute_uv=False)
    # noise of the sums: ten times the fit's own residual (rms), at least 1e-16
    noise = 10 * max(float(np.sqrt(np.mean(resid(theta) ** 2))), 1e-16)
    rel_sd = float(noise / sv.min()) if sv.min() > 0 else np.inf
    agree = all(np.abs(x - theta).max() < 1e-7 for rr, x in sols if rr < 1e-9)
    claimed = bool(r < 1e-9 and rel_sd < 1e-8 and agree)
    return SizeFactorClaim(np.exp(theta), claimed, r, rel_sd, int(m.size))




def _stage(steps: str) -> str:
    return "mu" if "stage='mu'" in steps else "final"


def weight_sums(tasks: list[Task], geo: Geometry) -> list[WeightSums]:
    """Every per-cell weight sum of the view, with its known multiplier and dispersion.

    ``IRLSSums.full.xtwx`` of a gene still iterating is, per design cell, the sum over the
    cell's samples of ``w(s_i m)`` with ``m = exp(x_c' b)`` at the candidate ``b`` the
    aggregator sent, and the dispersion it sent (rough dispersions for ``stage='mu'``).
    ``DispSums.A`` / ``A1`` / ``A2`` at each (gene, log alpha) pair the aggregator asked for
    are ``w``, ``-alpha w^2`` and ``-alpha w^2 + 2 alpha^2 w^3`` summed per cell, with the
    dispersion fit's means (``s`` times the linear fit for cell-means designs, else
    ``s exp(x_c' b)`` at the mu-IRLS coefficients).
    """
    out = [WeightSums() for _ in range(geo.C)]
    if not geo.packed_ok:
        return out
    for t in tasks:
        if t.kind == "DispSums" and t.state is not None and t.state.rows is None:
            _disp_weight_sums(t, geo, out)
            continue
        if t.kind == "PostFitSums" and "normal.xtwx" in t.message and t.state is not None:
            _ridge_weight_sums(t, geo, out)
            continue
        if t.kind != "IRLSSums" or t.state is None:
            continue
        stage = _stage(t.steps)
        fit = t.state.irls_mu if stage == "mu" else t.state.irls_final
        if fit is None:
            continue
        alpha = t.state.start.alpha_hat if stage == "mu" else t.state.dispersions.final
        live = ~np.asarray(fit.stopped)
        cand = np.asarray(fit.candidates)[live]  # g x K x p
        a = np.nan_to_num(np.asarray(alpha)[live], nan=1.0)
        m = geo.cell_means(cand)  # g x K x C
        v = geo.cells_from_packed(np.asarray(t.message["full.xtwx"])[live])
        for c in range(geo.C):
            out[c].add(m[..., c], a[:, None], 1, v[..., c])
    return out


def _ridge_weight_sums(t: Task, geo: Geometry, out: list[WeightSums]) -> None:
    """The normal prior's ``X'WX`` at its candidates (``RidgeSums.xtwx``): weight sums at the
    final dispersions, means floored as the IRLS's."""
    sh = t.state.shrink
    live = np.asarray(sh.active, dtype=bool)
    if not live.any():
        return
    a = np.nan_to_num(np.asarray(t.state.genes.dispersions.final)[live], nan=1.0)
    m = geo.cell_means(np.asarray(sh.candidates)[live])  # g x K x C
    v = geo.cells_from_packed(np.asarray(t.message["normal.xtwx"])[live])
    for c in range(geo.C):
        out[c].add(m[..., c], a[:, None], 1, v[..., c])


def _disp_weight_sums(t: Task, geo: Geometry, out: list[WeightSums]) -> None:
    st = t.state
    disp = st.disp
    pairs = int(np.asarray(disp.pair_gene).size)
    if pairs == 0:
        return
    gene = np.asarray(disp.pair_gene)
    alpha = np.exp(np.asarray(disp.pair_point, dtype=float))
    if st.totals.linear_mu:
        lin = np.asarray(st.start.beta_lin) @ geo.Xc.T  # G x C
        m = np.where(lin > 0, lin, np.nan)[gene]
    else:
        m = geo.cell_means(np.nan_to_num(np.asarray(st.irls_mu.beta)))[gene]
    for key, kind in (("A", 1), ("A1", 2), ("A2", 3)):
        v = geo.cells_from_packed(np.asarray(t.message[key])[:pairs])
        for c in range(geo.C):
            out[c].add(m[:, c], alpha, kind, v[:, c])


def attack_size_factors(tasks: list[Task], geo: Geometry, cell_counts, **kwargs
                        ) -> list[SizeFactorClaim]:
    """Size factors of every cell of the view (``cell_counts`` from :func:`attack_sizes`)."""
    ws = weight_sums(tasks, geo)
    return [fit_size_factors(ws[c], int(cell_counts[c]), **kwargs) for c in range(geo.C)]


def size_factor_bound(ws: WeightSums, s_true: np.ndarray, s_floor: float = 0.05,
                      min_mu: float = MIN_MU) -> float:
    """How well the weight sums can pin a cell's size factors at all: the predicted relative
    error (rounding noise 1e-14 on every sum) of a fit at the *true* size factors. Above
    ~1e-6 no decoder of these sums recovers them (a scoring aid: uses the truth).
    ``min_mu``: the means' floor (bulk 0.5; screens 1e-8)."""
    m, alpha, kind, value = ws.arrays()
    ok = (m * s_floor > min_mu * 1.0001) & (value != 0)
    m, alpha, kind, value = m[ok], alpha[ok], kind[ok], value[ok]
    if m.size == 0:
        return np.inf
    theta = np.log(np.sort(s_true))
    scale = np.maximum(np.abs(value), _term_scale(theta, m, alpha, kind))
    J = _weight_model(theta, m, alpha, kind)[1] / scale[:, None]
    sv = np.linalg.svd(J, compute_uv=False)
    return float(NOISE_REL / sv.min()) if sv.min() > 0 else np.inf


# =========================================================================================
# Counts per (gene, design cell): linear equations, integer decoding
# =========================================================================================
@dataclass
class CellSystem:
    """Everything the view says about one design cell's counts, per gene.

    ``rows[g]``: ``(coef (n,), rhs, tol)`` equations ``coef . y = rhs`` the true integer
    counts satisfy within ``tol``; ``checks[g]``: non-linear per-cell sums
    ``(kind, value, tol)``; ``upper[g]``: an upper bound of each count.
    """

    s: np.ndarray
    rows: dict = field(default_factory=lambda: defaultdict(list))
    checks: dict = field(default_factory=lambda: defaultdict(list))
    upper: dict = field(default_factory=dict)


def _sf_scale(tasks: list[Task]) -> float:
    for t in tasks:
        if t.kind == "MomentSums" and t.output is not None and t.output.totals is not None:
            return float(t.output.totals.sf_scale)
    return 1.0


def _replaced_genes(tasks: list[Task]) -> np.ndarray | None:
    for t in tasks:
        if t.kind == "ClosingSums" and "cooks.n_replaced" in t.message:
            return np.asarray(t.message["cooks.n_replaced"]) > 0
    return None


def cell_system(tasks: list[Task], geo: Geometry, c: int, s: np.ndarray,
                rel_err: float = 1e-12) -> CellSystem:
    """Linear equations and non-linear checks of cell ``c``'s counts, given its size factors
    ``s`` (sorted, as :func:`attack_size_factors` gives them); ``rel_err``: their relative
    error (every tolerance allows for it)."""
    sy = CellSystem(np.asarray(s, float))
    eps = 1e-13 + 30 * rel_err
    scale = _sf_scale(tasks)
    replaced = _replaced_genes(tasks)
    closed = False
    slack = 10 * eps * (sy.s.size + 1)
    for t in tasks:
        msg, st = t.message, t.state
        if t.kind == "LogSums":
            nz = np.asarray(msg["cell_nonzero"])[:, c]
            for g in range(nz.shape[0]):
                sy.checks[g].append(("nonzero", nz[g], 0.5))
        elif t.kind == "MomentSums":
            E = np.asarray(msg["cell_norm"])[:, c]  # sum of y / s_raw, s_raw = s * scale
            coef = 1.0 / (sy.s * scale)
            for g in range(E.shape[0]):
                if E[g] == 0:
                    sy.upper[g] = np.zeros(sy.s.size)
                    continue
                sy.rows[g].append((coef, E[g], eps * abs(E[g]) + 1e-12))
                sy.upper[g] = np.floor(E[g] * sy.s * scale * (1 + eps) + 1e-6)
            if "cells.sumsq" in msg:  # the rough round's sums, sent with the moments
                v2 = np.asarray(msg["cells.sumsq"])[:, c] * scale**2  # sum (y / s)^2
                vl = np.asarray(msg["cells.logsum"])[:, c]  # sum log(y / s + 0.1): scale 1
                for g in range(v2.shape[0]):
                    sy.checks[g].append(("sumsq", v2[g], (1e-9 + slack) * (abs(v2[g]) + 1)))
                    sy.checks[g].append(("logsum", vl[g], 1e-9 * (abs(vl[g]) + 1)
                                         + slack * (1 + abs(vl[g]))))
        elif t.kind == "RoughSums" and geo.linear_ok:
            E = geo.cells_from_linear(msg["xt_logy"])[:, c]  # sum log(y / s + 0.1)
            for g in range(E.shape[0]):
                sy.checks[g].append(("logsum", E[g], 1e-9 * (abs(E[g]) + 1)
                                     + slack * (1 + abs(E[g]))))
        elif t.kind == "IRLSSums" and geo.linear_ok and st is not None:
            stage = _stage(t.steps)
            fit = st.irls_mu if stage == "mu" else st.irls_final
            if fit is None:
                continue
            alpha = st.start.alpha_hat if stage == "mu" else st.dispersions.final
            rows = getattr(st, "rows", None)
            if rows is not None:
                continue  # the refit runs on replaced counts: not this cell's originals
            live = np.flatnonzero(~np.asarray(fit.stopped))
            E = geo.cells_from_linear(np.asarray(msg["full.xtwz"])[live])[..., c]  # g x K
            for j, g in enumerate(live):
                if closed and replaced is not None and replaced[g]:
                    continue
                a = float(np.nan_to_num(alpha[g], nan=1.0))
                m = geo.cell_means(np.asarray(fit.candidates)[g])[:, c]  # K
                for k in range(m.shape[0]):
                    mu = np.maximum(sy.s * m[k], MIN_MU)
                    w = mu / (1 + a * mu)
                    known = w * np.log(mu / sy.s)
                    rhs = E[j, k] - known.sum() + w.sum()
                    tol = eps * (abs(E[j, k]) + 2 * np.abs(known).sum() + 2 * w.sum())
                    sy.rows[g].append((w / mu, rhs, tol))
        elif t.kind == "ClosingSums":
            closed = True
            if "cooks.start.cell_sumsq" not in msg:
                continue
            v2 = np.asarray(msg["cooks.start.cell_sumsq"])[:, c]
            vl = np.asarray(msg["cooks.start.cell_logsum"])[:, c]
            for g in range(v2.shape[0]):
                if replaced is not None and replaced[g]:
                    continue
                sy.checks[g].append(("sumsq", v2[g], (1e-9 + slack) * (abs(v2[g]) + 1)))
                sy.checks[g].append(("logsum", vl[g], 1e-9 * (abs(vl[g]) + 1)
                                     + slack * (1 + abs(vl[g]))))
    return sy


def _apply_checks(Y: np.ndarray, s: np.ndarray, checks: list) -> np.ndarray:
    """Candidates (rows of Y) that agree with every non-linear per-cell sum."""
    x = Y / s[None, :]
    ok = np.ones(Y.shape[0], dtype=bool)
    for kind, value, tol in checks:
        if kind == "sumsq":
            got = (x * x).sum(axis=1)
        elif kind == "logsum":
            got = np.log(x + 0.1).sum(axis=1)
        elif kind == "nonzero":
            got = (Y > 0).sum(axis=1)
        else:
            continue
        ok &= np.abs(got - value) <= tol
    return ok


@dataclass
class Decoded:
    """A cell's decoding for one gene: every integer solution found (complete when
    ``complete``), and the counts claimed (NaN where the solutions disagree)."""

    solutions: np.ndarray
    complete: bool

    @property
    def claims(self) -> np.ndarray:
        sol = self.solutions
        n = sol.shape[1]
        if not self.complete or sol.shape[0] == 0:
            return np.full(n, np.nan)
        same = (sol == sol[0]).all(axis=0)
        return np.where(same, sol[0].astype(float), np.nan)


def decode_cell(rows: list, upper: np.ndarray, s: np.ndarray, checks: list = (),
                extra_check=None, budget: int = 2000) -> Decoded:
    """All non-negative integer count vectors satisfying every equation within its
    tolerance (and the checks), or ``complete=False`` when that set cannot be enumerated
    within ``budget`` candidates.

    With each row scaled by its tolerance, the true counts ``y`` satisfy ``|A y - b| <= 1``
    row-wise and ``0 <= y <= upper``, so they lie in the ellipsoid ``||A y - b||^2 +
    ||(y - c) / h||^2 <= m + n`` (``c``, ``h``: centre and half-width of the box). Every
    integer point of that ellipsoid is enumerated (LLL-reduced basis, Schnorr-Euchner
    enumeration), then checked row by row: the list is complete, so one survivor is certain.
    """
    n = s.size
    A = np.array([r[0] for r in rows], dtype=float)
    b = np.array([r[1] for r in rows], dtype=float)
    tol = np.array([r[2] for r in rows], dtype=float)
    empty = np.zeros((0, n))
    if A.size == 0 or not (np.isfinite(A).all() and np.isfinite(b).all()):
        return Decoded(empty, False)
    As, bs = A / tol[:, None], b / tol
    upper = np.floor(np.maximum(np.asarray(upper, float), 0) + 1e-9)
    m = As.shape[0]
    # fast path: the equations alone pin every coordinate to less than 1/2
    sv = np.linalg.svd(As, compute_uv=False)
    if sv.size == n and sv.min() > 4 * np.sqrt(m):
        y, *_ = np.linalg.lstsq(As, bs, rcond=None)
        Y = np.rint(y)[None, :]
    else:
        c, h = upper / 2, upper / 2 + 0.5
        M = np.vstack([As, np.diag(1.0 / h)])
        # recentre on a nearby integer point: the target's residual is then small, and
        # no distance is a difference of huge squares
        y0 = np.rint(np.linalg.lstsq(M, np.concatenate([bs, c / h]), rcond=None)[0])
        t = np.concatenate([bs - As @ y0, (c - y0) / h])
        D = lattice_points(M, t, float(m + n), budget, float(upper.max() + 1))
        if D is None:
            return Decoded(empty, False)
        Y = y0[None, :] + D
    ok = (np.abs(Y @ As.T - bs[None, :]) <= 1.0 + 1e-9).all(axis=1)
    ok &= (Y >= 0).all(axis=1) & (Y <= upper[None, :]).all(axis=1)
    Y = Y[ok]
    if Y.shape[0] and checks:
        Y = Y[_apply_checks(Y, s, checks)]
    if Y.shape[0] and extra_check is not None:
        Y = Y[extra_check(Y)]
    return Decoded(np.unique(Y, axis=0), True)


def lattice_points(M: np.ndarray, t: np.ndarray, radius2: float, budget: int,
                   ybound: float = 1e7) -> np.ndarray | None:
    """A superset of the integer ``y`` with ``||M y - t||^2 <= radius2`` (``M`` real, full
    column rank), or ``None`` when there may be more than ``budget`` of them or the
    enumeration would be too long.

    With ``fpylll`` (LLL-reduced integer embedding, Schnorr-Euchner enumeration) when it is
    installed; otherwise a plain Fincke-Pohst enumeration on the QR factor (correct, slower:
    the node budget is reached sooner).
    """
    try:
        import fpylll  # noqa: F401
    except ImportError:
        return _fincke_pohst(M, t, radius2, budget)
    return _fpylll_points(M, t, radius2, budget, ybound)


def _perp2(M: np.ndarray, t: np.ndarray) -> float:
    """Squared distance from ``t`` to the span of ``M``'s columns (computed directly)."""
    Q, _ = np.linalg.qr(M)
    res = t - Q @ (Q.T @ t)
    return float(res @ res)


def _fpylll_points(M, t, radius2, budget, ybound):
    from fpylll import GSO, LLL, Enumeration, EnumerationError, IntegerMatrix

    rows, n = M.shape
    # integer embedding: scale so that rounding M and t moves ||M y - t|| by < 1e-6 of
    # the radius for every |y| <= ybound
    ymax = ybound * n
    S = 2.0 ** np.ceil(np.log2(1e6 * 0.5 * np.sqrt(rows) * (ymax + 1) / np.sqrt(radius2)))
    Mi = [[int(round(float(x))) for x in row] for row in (S * M).T]  # basis = rows
    ti = [int(round(float(x))) for x in S * t]
    pad = 0.5 * np.sqrt(rows) * (ymax + 1)
    R_int = S * np.sqrt(radius2) + pad
    # the part of t outside the lattice's span adds a constant to every distance
    perp2 = max(_perp2(S * M, np.asarray(ti, dtype=float)) - 2 * pad * R_int, 0.0)
    max_dist = R_int**2 - perp2 + 1e-6 * R_int**2
    if max_dist < 0:
        return np.zeros((0, n))
    B = IntegerMatrix.from_matrix(Mi)
    U = IntegerMatrix.identity(n)
    G = GSO.Mat(B, U=U)
    G.update_gso()
    LLL.Reduction(G)()
    # Gaussian-heuristic estimate of the enumeration tree: refuse what cannot finish
    r = np.array([G.get_r(i, i) for i in range(n)], dtype=float)  # |b*_i|^2
    est = 0.0
    from scipy.special import gammaln as _lg

    for k in range(1, n + 1):
        logv = (k / 2) * np.log(np.pi) - _lg(k / 2 + 1) + (k / 2) * np.log(max_dist)
        est += np.exp(min(logv - 0.5 * np.log(r[n - k:]).sum(), 700))
    if est > 50 * budget:
        return None
    E = Enumeration(G, nr_solutions=budget + 1)
    try:
        sols = E.enumerate(0, n, max_dist, 0, target=G.from_canonical(tuple(map(float, ti))))
    except EnumerationError:
        return np.zeros((0, n))
    if len(sols) > budget:
        return None
    Unp = np.array([[U[i, j] for j in range(n)] for i in range(n)], dtype=object)
    out = [np.array([int(round(c)) for c in coef], dtype=object) @ Unp for _, coef in sols]
    return np.array(out, dtype=float).reshape(-1, n)


def _fincke_pohst(M, t, radius2, budget):
    n = M.shape[1]
    Q0, R = np.linalg.qr(M)
    tt = Q0.T @ t
    r2 = radius2 - _perp2(M, t)
    r2 = r2 * (1 + 1e-9) + 1e-9
    if r2 < 0:
        return np.zeros((0, n))
    diag = np.diag(R)
    z = np.zeros(n)
    partial = np.zeros(n + 1)
    centre = np.zeros(n)
    lim: list = [None] * n
    out, nodes = [], 0

    def bounds(k):
        centre[k] = (tt[k] - R[k, k + 1:] @ z[k + 1:]) / diag[k]
        room = r2 - partial[k + 1]
        if room < 0:
            return None
        w = np.sqrt(room) / abs(diag[k]) + 1e-9 * (1 + abs(centre[k]))
        return int(np.ceil(centre[k] - w)), int(np.floor(centre[k] + w))

    k = n - 1
    lim[k] = bounds(k)
    if lim[k] is None:
        return np.zeros((0, n))
    z[k] = lim[k][0] - 1
    while k < n:
        z[k] += 1
        nodes += 1
        if nodes > 20 * budget:
            return None
        if z[k] > lim[k][1]:
            k += 1
            continue
        d = diag[k] * (z[k] - centre[k])
        partial[k] = partial[k + 1] + d * d
        if k == 0:
            out.append(z.copy())
            if len(out) > budget:
                return None
            continue
        k -= 1
        lim[k] = bounds(k)
        if lim[k] is None or lim[k][0] > lim[k][1]:
            k += 1
            continue
        z[k] = lim[k][0] - 1
    return np.array(out).reshape(-1, n)



@dataclass
class CountClaims:
    """Counts the attacker claims for one view: per cell, its size factors (sorted), whether
    they are claimed, and a genes x samples array of claimed counts (NaN: not claimed)."""

    s: list
    s_claimed: list
    counts: list
    n_solutions: np.ndarray  # genes x cells: solutions found (-1: not enumerable)


MAX_REL_SF = 1e-3  # size factors this uncertain (relative) still seed the count decoder


def attack_counts(tasks: list[Task], geo: Geometry, sizes: dict | None = None,
                  budget: int = 2000, genes=None, sf_kwargs: dict | None = None,
                  later: bool = True, oracle_s: list | None = None,
                  oracle_rel: float = 0.0, only: tuple | None = None) -> CountClaims:
    """Size factors per cell (weight-sum fit, ``sf_kwargs`` to :func:`fit_size_factors`),
    then every (gene, cell) solved for its integer counts; a count is claimed only when every
    integer solution agrees on it.

    ``later``: add the equations of later rounds (:func:`add_affine_rows`). ``oracle_s``:
    per cell, the true size factors (sorted), handed to the attacker instead of its fit -- an
    attacker stronger than any aggregator, to measure what the count equations alone would
    give (``oracle_rel``: their relative error, for a perturbed oracle). ``only``: message
    kinds whose equations are used (the others' rows dropped; the cell sums' bounds kept),
    to show what one round kind gives by itself.
    """
    sizes = sizes or attack_sizes(tasks, geo)
    if sizes["cells"] is None:
        raise ValueError("cell sizes unknown: nothing to solve for")
    if oracle_s is not None:
        sf = [SizeFactorClaim(np.sort(np.asarray(s, float)), False, 0.0, oracle_rel, 0)
              for s in oracle_s]
    else:
        sf = attack_size_factors(tasks, geo, sizes["cells"], **(sf_kwargs or {}))
    G = _n_genes(tasks)
    genes = range(G) if genes is None else genes
    s_cells, claimed, counts = [], [], []
    nsol = np.full((G, geo.C), -1)
    for c, fit in enumerate(sf):
        usable = fit.rel_sd < MAX_REL_SF and fit.max_resid < 1e-9
        s_c = fit.values if usable else np.full(fit.values.size, np.nan)
        s_cells.append(s_c)
        claimed.append(bool(fit.claimed))
        cl = np.full((G, s_c.size), np.nan)
        counts.append(cl)
        if not usable or s_c.size == 0:
            continue
        sy = cell_system(tasks, geo, c, s_c, rel_err=fit.rel_sd)
        if only is not None:
            sy.rows = defaultdict(list)
        if later:
            add_affine_rows(sy, tasks, geo, c, fit.rel_sd, kinds=only)
        for g in genes:
            if not sy.rows.get(g):
                if g in sy.upper and not sy.upper[g].any():
                    cl[g] = 0.0  # a zero cell sum: every count is zero
                continue
            dec = decode_cell(sy.rows[g], sy.upper.get(g, np.full(s_c.size, 1e9)), s_c,
                              sy.checks.get(g, []), None, budget)
            nsol[g, c] = dec.solutions.shape[0] if dec.complete else -1
            cl[g] = dec.claims
    return CountClaims(s_cells, claimed, counts, nsol)


def _n_genes(tasks: list[Task]) -> int:
    for t in tasks:
        if "sum_log" in t.message:
            return int(np.asarray(t.message["sum_log"]).shape[0])
    raise ValueError("no per-gene message in the view")


# =========================================================================================
# Sums affine in each count, read by running the site's own code (issue 12, item 6)
# =========================================================================================
def _irls_eval(y, X, s, alpha, cands):
    from fed_de.core import nb

    out = []
    for k in range(cands.shape[1]):
        out.append(nb.irls_summands(y, X, s, cands[:, k], alpha, MIN_MU)["xtwx_obs"])
    return {"full.xtwx_obs": np.stack(out, axis=1)}


def _fallback_eval(y, X, s, alpha, cands):
    from fed_de.core.fallback import fallback_sums

    out = fallback_sums(y, X, s, alpha, cands)
    return {"grad": out["grad"], "info": out["info"]}


def _apeglm_eval(y, X, s, alpha, cands):
    from fed_de.core.apeglm import nb_loglik_grad_hess

    _, grad, hess = nb_loglik_grad_hess(y, X, np.log(s), cands, alpha)
    return {"apeglm.grad": grad, "apeglm.hess": hess}


def _ridge_eval(y, X, s, alpha, cands):
    from fed_de.core.normal_prior import ridge_fixed_point_summands

    out = ridge_fixed_point_summands(y, X, np.log(s), cands, alpha)
    return {"normal.score": out["score"], "normal.jac": out["jac"]}


def affine_sources(t: Task) -> tuple | None:
    """The per-sample sums of a later round that are affine in each count, as the protocol
    defines them: ``(evaluate, alpha, candidates, active, refit)``, or None.

    ``evaluate(y, X, s, alpha, candidates)`` is the site's own code (``fed_de.core``); the
    attacker runs it on one sample at a time to read each sum's coefficient of that
    sample's count. Covered: the IRLS observed information ``IRLSSums.full.xtwx_obs`` (the
    ``xtwz`` rows are :func:`cell_system`'s), the fallback's gradient and observed
    information (``FallbackSums.grad`` / ``info``, and ``BoxedSums``' at the last IRLS
    round's candidates in the box), the shrinkage's likelihood gradient and
    Hessian (``apeglm``) or ridge score and Jacobian (``normal``).
    """
    st = t.state
    if st is None:
        return None
    if t.kind == "IRLSSums":
        from fed_de.bulk.irls import fit_alpha

        stage = _stage(t.steps)
        fit = st.irls_mu if stage == "mu" else st.irls_final
        if fit is None:
            return None
        alpha = np.nan_to_num(fit_alpha(stage, st.start, st.dispersions), nan=1.0)
        return (_irls_eval, alpha, np.asarray(fit.candidates), ~np.asarray(fit.stopped),
                getattr(st, "rows", None) is not None)
    if t.kind == "BoxedSums" and st.irls_final is not None:  # the closing IRLS round's part
        from fed_de.core.fallback import BOX

        alpha = np.nan_to_num(st.dispersions.final, nan=1.0)
        cands = np.clip(np.nan_to_num(np.asarray(st.irls_final.candidates)), -BOX, BOX)
        return (_fallback_eval, alpha, cands, ~np.asarray(st.start.skip, dtype=bool), False)
    if t.kind == "FallbackSums" and st.fallback is not None:
        alpha = np.nan_to_num(st.dispersions.final, nan=1.0)
        return (_fallback_eval, alpha, np.asarray(st.fallback.candidates),
                np.asarray(st.fallback.active, dtype=bool), False)
    if t.kind == "PostFitSums" and st.shrink is not None and (
            "apeglm.grad" in t.message or "normal.score" in t.message):
        ev = _apeglm_eval if st.shrink.type == "apeglm" else _ridge_eval
        alpha = np.nan_to_num(st.genes.dispersions.final, nan=1.0)
        return (ev, alpha, np.asarray(st.shrink.candidates),
                np.asarray(st.shrink.active, dtype=bool), False)
    return None


def _to_cells(geo: Geometry, v: np.ndarray) -> np.ndarray:
    """Per-cell sums from an X'v-type (last axis p) or packed X'WX-type (last axis T) array."""
    if v.shape[-1] == geo.p and geo.linear_ok:
        return geo.cells_from_linear(v)
    return geo.cells_from_packed(v)


def add_affine_rows(sy: CellSystem, tasks: list[Task], geo: Geometry, c: int,
                    rel_err: float = 1e-12, kinds: tuple | None = None) -> int:
    """Add to ``sy`` every later round's equation in cell ``c``'s counts (see
    :func:`affine_sources`); returns how many rows were added.

    For a sum ``F = sum_i f(y_i, s_i)`` with ``f`` affine in ``y_i``, the site's code run on
    sample ``i`` alone at ``y = 0`` and ``y = 1`` gives ``f(0, s_i)`` and the coefficient
    ``f(1, s_i) - f(0, s_i)``: ``F - sum_i f(0, s_i) = sum_i coef_i y_i`` (checked affine at
    ``y = 2``). Rounds of the refit (on replaced counts) are left out; so are rows the site
    sent as zeros (withheld, stopped or failed genes).
    """
    if not (geo.linear_ok and geo.packed_ok):
        return 0
    s = sy.s
    eps = 1e-12 + 30 * rel_err
    Xc = geo.Xc[c][None, :]
    added = 0
    for t in tasks:
        if kinds is not None and t.kind not in kinds:
            continue
        src = affine_sources(t)
        if src is None or src[4]:
            continue
        ev, alpha, cands, active = src[:4]
        genes = np.flatnonzero(active)
        if genes.size == 0 or s.size == 0:
            continue
        a, cd = alpha[genes], cands[genes]
        zero = np.zeros((1, genes.size))
        f0, coef = {}, {}
        with np.errstate(all="ignore"):
            for sj in s:
                o0 = ev(zero, Xc, np.array([sj]), a, cd)
                o1 = ev(zero + 1, Xc, np.array([sj]), a, cd)
                o2 = ev(zero + 2, Xc, np.array([sj]), a, cd)
                for key in o0:
                    if key not in t.message:
                        continue
                    d1, d2 = o1[key] - o0[key], o2[key] - o1[key]
                    lin = np.abs(d2 - d1) <= 1e-9 * (np.abs(d1) + np.abs(o0[key]) + 1e-300)
                    d1 = np.where(lin, d1, np.nan)
                    f0.setdefault(key, []).append(_to_cells(geo, o0[key])[..., c])
                    coef.setdefault(key, []).append(_to_cells(geo, d1)[..., c])
        for key in f0:
            msg = np.asarray(t.message[key])[genes]
            sent = np.abs(msg).sum(axis=-1) > 0  # g x K
            E = _to_cells(geo, msg)[..., c]  # g x K
            F0 = np.stack(f0[key], axis=-1)  # g x K x n
            Cf = np.stack(coef[key], axis=-1)
            for j, g in enumerate(genes):
                up = sy.upper.get(int(g))
                if up is None:
                    continue
                for k in range(E.shape[1]):
                    cf, fz = Cf[j, k], F0[j, k]
                    if not sent[j, k] or not (np.isfinite(cf).all() and np.isfinite(fz).all()):
                        continue
                    if not np.any(np.abs(cf) > 0):
                        continue
                    rhs = E[j, k] - fz.sum()
                    tol = eps * (abs(E[j, k]) + np.abs(fz).sum() + np.abs(cf) @ up) + 1e-12
                    sy.rows[int(g)].append((cf, rhs, tol))
                    added += 1
    return added


def affine_rank(sy: CellSystem, g: int, rel: float = 1e-6) -> int:
    """Numerical rank of gene ``g``'s equations (rows scaled by their tolerance): how many
    independent directions of the cell's counts the sums pin to better than one count
    (singular values above 2: a move of one count changes some row by more than its
    tolerance)."""
    rows = sy.rows.get(g) or []
    if not rows:
        return 0
    A = np.array([r[0] / r[2] for r in rows])
    sv = np.linalg.svd(A, compute_uv=False)
    return int((sv > 2.0).sum())


# =========================================================================================
# Cook's replacement differencing
# =========================================================================================
def attack_cooks(tasks: list[Task], geo: Geometry, s_cells: list | None = None
                 ) -> list[dict]:
    """Replaced outliers' normalised counts from the closing round's per-cell sums of the
    replaced counts minus round 2's sums of the original ones.

    For a gene whose view replaced one count (``n_replaced == 1``), exactly one cell's sum
    moved: ``d1 = r - x``; the closing round's ``cell_sumsq`` summed over cells minus round
    2's ``sum_norm_sq`` is ``d2 = r^2 - x^2``; then ``x = (d2 / d1 - d1) / 2`` is the
    outlier's normalised count, exactly. Where the cell's size factors are known
    (``s_cells``), ``r = trunc(m s_i) / s_i`` (``m``: the replacement mean the aggregator
    sent) names the sample: the one whose ``y = (r - d1) s_i`` is a non-negative integer,
    claimed when one sample fits.

    Returns
    -------
    list of dict
        ``{"gene", "cell", "norm"}`` (normalised count) and, when the size factors pin it,
        ``"sample"`` (rank of its size factor in the cell) and ``"count"``.
    """
    mom = next((t for t in tasks if t.kind == "MomentSums"), None)
    close = next((t for t in tasks if t.kind == "ClosingSums"
                  and "cooks.start.cell_sum" in t.message), None)
    if mom is None or close is None or close.state is None or close.state.cooks is None:
        return []
    scale = _sf_scale(tasks)
    before = np.asarray(mom.message["cell_norm"]) * scale
    before_sq = np.asarray(mom.message["sum_norm_sq"]) * scale**2
    after = np.asarray(close.message["cooks.start.cell_sum"])
    after_sq = np.asarray(close.message["cooks.start.cell_sumsq"]).sum(axis=1)
    rm = np.asarray(close.state.cooks.replace_mean)
    n_rep = np.asarray(close.message["cooks.n_replaced"])
    out = []
    for g in np.flatnonzero(np.abs(n_rep - 1) < 1e-9):
        d = after[g] - before[g]
        moved = np.flatnonzero(np.abs(d) > 1e-9 * (np.abs(before[g]) + 1))
        if moved.size != 1:
            continue
        c = int(moved[0])
        d1 = float(d[c])
        claim = {"gene": int(g), "cell": c}
        d2 = float(after_sq[g] - before_sq[g])  # one sample moved: r^2 - x^2
        claim["norm"] = (d2 / d1 - d1) / 2  # x; r = x + d1
        s = s_cells[c] if s_cells is not None else None
        if s is not None and np.isfinite(s).all() and s.size:
            r = np.trunc(rm[g] * s)
            y = r - d1 * s
            ok = (np.abs(y - np.rint(y)) <= 1e-6 * np.maximum(np.abs(y), 1)) & (y > -0.5)
            if ok.sum() == 1:
                i = int(np.flatnonzero(ok)[0])
                claim.update(sample=i, count=float(np.rint(y[i])))
                claim.setdefault("norm", float(np.rint(y[i])) / s[i])
        if "norm" in claim:
            out.append(claim)
    return out


# =========================================================================================
# Everything at once, and the score
# =========================================================================================
def attack_view(tasks: list[Task], geo: Geometry, *, budget: int = 2000,
                genes=None, sf_kwargs: dict | None = None) -> dict:
    """Run every bulk attack on one view (a site's messages, or the cross-site totals)."""
    sizes = attack_sizes(tasks, geo)
    counts = None
    if sizes["cells"] is not None:
        counts = attack_counts(tasks, geo, sizes, budget=budget, genes=genes,
                               sf_kwargs=sf_kwargs)
    cooks = attack_cooks(tasks, geo, counts.s if counts is not None else None)
    return {"sizes": sizes, "counts": counts, "cooks": cooks}


@dataclass
class Truth:
    """A view's true data: counts (samples x genes), design cell and size factor of each
    sample (for scoring only)."""

    counts: np.ndarray
    cells: np.ndarray
    size_factors: np.ndarray

    @staticmethod
    def concat(parts: list) -> Truth:
        """The pooled truth of several views."""
        return Truth(np.vstack([p.counts for p in parts]),
                     np.concatenate([p.cells for p in parts]),
                     np.concatenate([p.size_factors for p in parts]))


def score_view(result: dict, truth: Truth) -> dict:
    """Grade :func:`attack_view`'s claims: counts recovered exactly, size factors to 1e-6,
    Cook's outliers' normalised counts (1e-9), wrong claims of each.

    Samples are matched to the attacker's labels by rank of size factor within their cell.
    """
    n, G = truth.counts.shape
    sizes = result["sizes"]
    C = int(truth.cells.max()) + 1 if truth.cells.size else 0
    true_cells = np.bincount(truth.cells, minlength=C)
    out = {"n_samples": n, "n_claimed": sizes["n"], "n_right": sizes["n"] == n,
           "cells_right": sizes["cells"] is not None
           and np.array_equal(sizes["cells"][:C], true_cells),
           "counts_total": n * G, "counts_right": 0, "counts_wrong": 0,
           "sf_total": n, "sf_right": 0, "sf_wrong": 0}
    claims = result["counts"]
    if claims is not None:
        for c, (s_hat, cl) in enumerate(zip(claims.s, claims.counts, strict=True)):
            idx = np.flatnonzero(truth.cells == c)
            idx = idx[np.argsort(truth.size_factors[idx], kind="stable")]
            if s_hat.size != idx.size:
                out["counts_wrong"] += int(np.isfinite(cl).sum())
                continue
            if claims.s_claimed[c]:
                good = np.abs(s_hat / truth.size_factors[idx] - 1) <= 1e-6
                out["sf_right"] += int(good.sum())
                out["sf_wrong"] += int((~good).sum())
            tr = truth.counts[idx].T  # genes x samples
            has = np.isfinite(cl)
            out["counts_right"] += int((has & (cl == tr)).sum())
            out["counts_wrong"] += int((has & (cl != tr)).sum())
    right = wrong = 0
    for cl in result["cooks"]:
        idx = np.flatnonzero(truth.cells == cl["cell"])
        norm = truth.counts[idx, cl["gene"]] / truth.size_factors[idx]
        hit = np.abs(norm - cl["norm"]) <= 1e-9 * np.maximum(norm, 1)
        if "count" in cl:
            order = idx[np.argsort(truth.size_factors[idx], kind="stable")]
            hit = np.array([truth.counts[order[cl["sample"]], cl["gene"]] == cl["count"]])
        right += int(hit.any())
        wrong += int(not hit.any())
    out.update(cooks_right=right, cooks_wrong=wrong,
               counts_frac=out["counts_right"] / max(n * G, 1))
    return out


# =========================================================================================
# Perturbation screens: per-group sums of counts, normalised counts and expressing cells
# =========================================================================================
@dataclass
class GroupClaims:
    """What the attacker claims about one perturbation group of a view: its cells' size
    factors (sorted; library sizes are ``s * scale``), whether all were found, and a genes x
    cells array of claimed counts (NaN: not claimed)."""

    perturbation: int
    n_cells: int
    s: np.ndarray
    s_complete: bool
    counts: np.ndarray
    singles: int  # (gene) sums with one expressing cell: a count read off directly


def attack_screen(tasks: list[Task], *, budget: int = 20_000) -> dict:
    """Attack a screen's per-group sums (``GroupSums`` and the rank tests' ``RankSums``).

    A gene with one expressing cell in a group gives that cell's count (``pert_y``) and size
    factor (``pert_y / pert_norm``); the size factors found this way are complete when they
    number the group's cells and add up to the group's ``sum s`` (``pert_sf``). Then a gene
    with ``k`` expressing cells is solved over every ``k``-subset of cells: positive
    integers with the known ``sum y`` and ``sum y/s``; a single solution is claimed.
    """
    t = next((t for t in tasks if t.kind == "GroupSums"), None)
    if t is None:
        return {"groups": [], "scale": np.nan}
    msg = t.message
    sc = getattr(t.state, "scale", None) if t.state is not None else None
    scale = float(np.exp(sc.sf_log_scale)) if sc is not None and sc.sf_log_scale is not None \
        else np.nan
    Y, N, E = (np.asarray(msg[k], dtype=float) for k in ("pert_y", "pert_norm", "pert_expr"))
    n_p = np.asarray(msg["pert_n"]).sum(axis=1)
    S_p = np.asarray(msg["pert_sf"]).sum(axis=1)
    groups = []
    for p in np.flatnonzero(n_p > 0):
        n = int(round(n_p[p]))
        one = (np.abs(E[p] - 1) < 1e-9) & (Y[p] > 0)
        cand = np.sort(Y[p][one] / N[p][one])
        s_found: list = []
        for x in cand:
            if not s_found or abs(x / s_found[-1] - 1) > 1e-9:
                s_found.append(x)
        s_arr = np.array(s_found)
        if np.isfinite(scale):  # library sizes are integers: a certificate on each
            lib = s_arr * scale
            s_arr = s_arr[np.abs(lib - np.rint(lib)) <= 1e-6 * np.maximum(lib, 1)]
        complete = False
        if s_arr.size == n and abs(s_arr.sum() / S_p[p] - 1) < 1e-9:
            complete = True
        elif s_arr.size == n - 1 and np.isfinite(scale):
            last = S_p[p] - s_arr.sum()
            lib = last * scale
            if last > 0 and abs(lib - np.rint(lib)) <= 1e-6 * lib:
                s_arr = np.sort(np.append(s_arr, last))
                complete = True
        counts = np.full((Y.shape[1], n), np.nan)
        if complete:
            for g in range(Y.shape[1]):
                counts[g] = _screen_gene(Y[p, g], N[p, g], int(round(E[p, g])), s_arr, budget)
        groups.append(GroupClaims(int(p), n, s_arr, complete, counts, int(one.sum())))
    return {"groups": groups, "scale": scale, "singles": _singles(Y, N, E)}


def _singles(Y, N, E) -> list[tuple[int, int, float]]:
    """Every (group, gene) whose sum holds one expressing cell: ``(p, g, count)``."""
    one = (np.abs(E - 1) < 1e-9) & (Y > 0)
    return [(int(p), int(g), float(Y[p, g])) for p, g in zip(*np.nonzero(one), strict=True)]


def score_screen(result: dict, truth: dict) -> dict:
    """Grade :func:`attack_screen`'s claims. ``truth[p]``: (counts cells x genes, library
    sizes) of perturbation group ``p`` in the view. Cells are matched by library size.

    ``single_right`` / ``single_wrong``: counts read off a one-expressing-cell sum (the cell
    is not named: right when the group holds a cell with that count as the gene's only
    non-zero); ``counts_right`` / ``counts_wrong``: non-zero counts of the subset decoder.
    """
    out = defaultdict(int)
    scale = result["scale"]
    for p, g, y in result.get("singles", []):
        X = truth[p][0]
        nz = X[:, g][X[:, g] > 0]
        ok = nz.size == 1 and nz[0] == y
        out["single_right"] += int(ok)
        out["single_wrong"] += int(not ok)
    for gc in result["groups"]:
        X, lib = truth[gc.perturbation]
        order = np.argsort(lib, kind="stable")
        X, lib = X[order], lib[order]
        out["groups"] += 1
        out["cells"] += gc.n_cells
        if gc.s_complete and gc.s.size == lib.size:
            good = np.abs(gc.s * scale - lib) <= 1e-6 * lib
            out["lib_right"] += int(good.sum())
            out["lib_wrong"] += int((~good).sum())
        cl = gc.counts.T  # cells x genes
        if cl.shape != X.shape:
            continue
        has = np.isfinite(cl) & (X > 0)
        out["counts_right"] += int((has & (cl == X)).sum())
        out["counts_wrong"] += int((np.isfinite(cl) & (cl != X)).sum())
    nonzero = sum(int((x > 0).sum()) for x, _ in truth.values())
    out["nonzero_total"] = nonzero
    return dict(out)


def _screen_gene(Y: float, N: float, k: int, s: np.ndarray, budget: int) -> np.ndarray:
    """Counts of a group's cells for one gene from ``sum y``, ``sum y/s`` and the number of
    expressing cells, when a single assignment fits (else NaN)."""
    n = s.size
    out = np.full(n, np.nan)
    if k == 0:
        return np.zeros(n)
    if k > n or Y < k:
        return out
    from math import comb

    free = max(k - 2, 0)
    # work: subsets times the enumerated heads (each at most Y - 1 values)
    if comb(n, k) * max(Y - 1, 1) ** free > budget:
        return out
    sols = []
    for subset in itertools.combinations(range(n), k):
        ss = s[list(subset)]
        # y_1..y_{k-2} enumerated (positive), the last two solved from the two sums
        ranges = [range(1, int(Y)) for _ in range(free)]
        for head in itertools.product(*ranges):
            rest_y = Y - sum(head)
            rest_n = N - sum(h / x for h, x in zip(head, ss[:free], strict=False))
            if k == 1:
                if abs(rest_y / ss[0] - rest_n) <= 1e-9 * (abs(rest_n) + 1):
                    sols.append((subset, (rest_y,)))
                continue
            a, b = ss[-2], ss[-1]
            if abs(1 / a - 1 / b) < 1e-12 * (1 / a):
                # equal size factors: every split of the rest fits when the sums agree
                if rest_y >= 2 and abs(rest_y / a - rest_n) <= 1e-9 * (abs(rest_n) + 1):
                    return out
                continue
            ya = (rest_n - rest_y / b) / (1 / a - 1 / b)
            yb = rest_y - ya
            if (ya >= 0.5 and yb >= 0.5 and abs(ya - np.rint(ya)) < 1e-6 * max(ya, 1)
                    and abs(yb - np.rint(yb)) < 1e-6 * max(yb, 1)):
                sols.append((subset, (*head, float(np.rint(ya)), float(np.rint(yb)))))
            if len(sols) > 1:
                return out
    if len(sols) != 1:
        return out
    subset, ys = sols[0]
    out[:] = 0.0
    out[list(subset)] = ys
    return out




def attack_screen_subgroups(tasks: list[Task], study, max_cells: int = 7) -> list[dict]:
    """Size factors of a perturbation's cells within one design cell, from the last fit
    round's ``WaldSums.pert_wx``: per (perturbation, gene, design cell) the sum of
    ``w = mu / (1 + alpha mu)`` over those cells, ``mu = s m`` with ``m`` the mean table at the
    point the aggregator sent (``cf.mean_table``), ``alpha`` the fit's dispersions. With the
    site as a design factor, a design cell is one site, and ``GroupSums.pert_n`` (P, C) gives
    each site's count of the group's cells. Claims as :func:`fit_size_factors` (floor 1e-8).

    Returns
    -------
    list of dict
        ``{"perturbation", "cell", "s"}`` (sorted size factors; library sizes are ``s`` times
        the public scale).
    """
    from fed_de.core import screen_fit as cf

    last = [t for t in tasks if t.kind == "FitSums" and "wald.pert_wx" in t.message]
    grp = next((t for t in tasks if t.kind == "GroupSums"), None)
    if not last or grp is None:
        return []
    fit = last[-1].state.fit
    table = cf.mean_table(study.fit_design, fit.control.b, fit.beta)  # Q x C x G
    wx = np.asarray(last[-1].message["wald.pert_wx"])  # P x G x p (X = I: per cell)
    if not np.allclose(study.fit_design, np.eye(study.fit_design.shape[0])):
        wx = wx @ np.linalg.pinv(study.fit_design)  # per design cell
    pn = np.asarray(grp.message["pert_n"])
    out = []
    for p, c in zip(*np.nonzero((pn > 0.5) & (pn < max_cells + 0.5)), strict=True):
        ws = WeightSums()
        ws.add(table[p + 1, c], fit.alpha, 1, wx[p, :, c])
        f = fit_size_factors(ws, int(round(pn[p, c])), s_floor=1e-3, min_mu=1e-8, starts=4)
        if f.claimed:
            out.append({"perturbation": int(p), "cell": int(c), "s": f.values})
    return out
