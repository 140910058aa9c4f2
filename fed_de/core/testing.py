"""Wald tests, contrasts and multiple-testing adjustment, following R DESeq2 1.38.

Pure numpy maths (no I/O, no federation): per-gene inputs are 1-D arrays aligned on genes, so
the server can run everything here on the aggregated per-gene estimates.

R sources ported (DESeq2 1.38.3 ``R/results.R``; R 4.2 ``stats``; genefilter's ``filtered_p``,
which DESeq2 1.38 carries as ``DESeq2:::filtered_p``):

* ``nbinomWaldTest`` / ``getContrast`` / ``results(lfcThreshold, altHypothesis)``
  -> :func:`wald_test`
* ``results(contrast=c(factor, level, reference))`` for treatment coding -> :func:`contrast_vector`
* ``stats::p.adjust(method="BH")``                    -> :func:`p_adjust_bh`
* ``stats::lowess`` (the C ``clowess``)               -> :func:`r_lowess`
* ``pvalueAdjustment`` + ``filtered_p``               -> :func:`independent_filtering`,
  :func:`adjust_pvalues`

Where R's arithmetic order matters for the last bits (sums in ``clowess``, the type-7 quantile
interpolation, ``n / i * p`` in BH) the R order is kept, so results agree with R to rounding.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

__all__ = [
    "ALT_HYPOTHESES",
    "wald_test",
    "threshold_test",
    "contrast_vector",
    "p_adjust_bh",
    "r_lowess",
    "r_quantile7",
    "independent_filtering",
    "adjust_pvalues",
    "quantile_name",
]

ALT_HYPOTHESES = ("greaterAbs", "lessAbs", "greater", "less")

# R's ``log2(exp(1))``: DESeq2 converts natural-log coefficients and SEs to log2 by multiplying
# with this constant (fitNbinomGLMs, getContrast), not by dividing by log(2).
_LOG2E = math.log2(math.exp(1.0))


def _as_1d(name: str, a: np.ndarray) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per gene), got shape {arr.shape}")
    return arr


def _upper_tail(q: np.ndarray) -> np.ndarray:
    # R's pnorm(q, lower.tail=FALSE). ndtr(-q) is accurate in the far tail (erfc based), so
    # p-values underflow no earlier than R's (R returns 0 from q > 37.52; this goes on into the
    # subnormal range up to q ~ 38.5).
    return ndtr(-q)


# ---------------------------------------------------------------------------------------------
# Wald test
# ---------------------------------------------------------------------------------------------


def wald_test(
    lfc_nat: np.ndarray,
    se_nat: np.ndarray,
    lfc_threshold: float = 0.0,
    alt_hypothesis: str = "greaterAbs",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """DESeq2's Wald statistic and p-value for a contrast, with an optional LFC threshold.

    Parameters
    ----------
    lfc_nat
        Per-gene contrast estimate on the natural-log scale, shape ``(G,)``.
    se_nat
        Its standard error on the natural-log scale, shape ``(G,)``.
    lfc_threshold
        ``lfcThreshold`` of ``results()``, on the log2 scale; must be ``>= 0``.
    alt_hypothesis
        ``altHypothesis`` of ``results()``: one of ``greaterAbs``, ``lessAbs``, ``greater``,
        ``less``. With ``less`` the null is ``LFC >= -lfc_threshold``.

    Returns
    -------
    log2_fold_change, lfc_se, stat, pvalue
        The ``log2FoldChange``, ``lfcSE``, ``stat`` and ``pvalue`` columns of ``results()``
        (normal reference distribution, i.e. ``useT=FALSE``). NaN inputs give NaN outputs.

    Raises
    ------
    ValueError
        Unknown ``alt_hypothesis``, negative ``lfc_threshold``, ``lessAbs`` with a zero
        threshold (as R), or mismatched shapes.

    Notes
    -----
    With ``lfc_threshold == 0`` and ``greaterAbs`` this is ``nbinomWaldTest``:
    ``stat = LFC / SE`` and ``pvalue = 2 * pnorm(|stat|, lower=FALSE)``. Otherwise R's
    ``results()`` formulas (DESeq2 >= 1.10 up to 1.38) are used verbatim, e.g. for
    ``greaterAbs``: ``stat = sign(LFC) * max((|LFC| - T) / SE, 0)`` and
    ``pvalue = min(1, 2 * pnorm((|LFC| - T) / SE, lower=FALSE))``; ``lessAbs`` keeps the larger
    of the two one-sided p-values and the smaller of the two clipped (non-negative) statistics.
    """
    if alt_hypothesis not in ALT_HYPOTHESES:
        raise ValueError(
            f"alt_hypothesis {alt_hypothesis!r} unknown; use one of {', '.join(ALT_HYPOTHESES)}"
        )
    thr = float(lfc_threshold)
    if not thr >= 0:  # also rejects NaN
        raise ValueError(f"lfc_threshold must be >= 0 (log2 scale), got {lfc_threshold!r}")
    if thr == 0 and alt_hypothesis == "lessAbs":
        raise ValueError("alt_hypothesis='lessAbs' needs a positive lfc_threshold")
    lfc_nat = _as_1d("lfc_nat", lfc_nat)
    se_nat = _as_1d("se_nat", se_nat)
    if lfc_nat.shape != se_nat.shape:
        raise ValueError(f"lfc_nat {lfc_nat.shape} and se_nat {se_nat.shape} differ in shape")

    lfc = _LOG2E * lfc_nat
    se = _LOG2E * se_nat
    stat, pvalue = threshold_test(lfc, se, thr, alt_hypothesis)
    return lfc, se, stat, pvalue


def threshold_test(
    lfc: np.ndarray, se: np.ndarray, lfc_threshold: float = 0.0,
    alt_hypothesis: str = "greaterAbs",
) -> tuple[np.ndarray, np.ndarray]:
    """``stat`` and ``pvalue`` of ``results()`` from a log2 fold change and its standard error.

    The formulas of :func:`wald_test`, on the log2 scale (inputs already checked there; here
    only ``alt_hypothesis`` is). With ``lfc_threshold == 0`` and ``greaterAbs`` this is
    ``nbinomWaldTest``'s ``LFC / SE`` and two-sided normal p-value, else ``results()``'s
    recomputation (``newStat``, ``newPvalue``).
    """
    if alt_hypothesis not in ALT_HYPOTHESES:
        raise ValueError(
            f"alt_hypothesis {alt_hypothesis!r} unknown; use one of {', '.join(ALT_HYPOTHESES)}"
        )
    thr = float(lfc_threshold)
    with np.errstate(divide="ignore", invalid="ignore"):
        if thr == 0 and alt_hypothesis == "greaterAbs":
            stat = lfc / se
            pvalue = 2 * _upper_tail(np.abs(stat))
        elif alt_hypothesis == "greaterAbs":
            q = (np.abs(lfc) - thr) / se
            stat = np.sign(lfc) * np.maximum(q, 0)
            pvalue = np.minimum(1, 2 * _upper_tail(q))
        elif alt_hypothesis == "lessAbs":
            q_above = (thr - lfc) / se
            q_below = (lfc + thr) / se
            stat = np.minimum(np.maximum(q_above, 0), np.maximum(q_below, 0))
            pvalue = np.maximum(_upper_tail(q_above), _upper_tail(q_below))
        elif alt_hypothesis == "greater":
            q = (lfc - thr) / se
            stat = np.maximum(q, 0)
            pvalue = _upper_tail(q)
        else:  # less
            stat = np.minimum((lfc + thr) / se, 0)
            pvalue = _upper_tail((-thr - lfc) / se)
    return stat, pvalue


# ---------------------------------------------------------------------------------------------
# Contrasts
# ---------------------------------------------------------------------------------------------


def contrast_vector(
    coef_names: list[str], factor: str, level: str, reference: str, base_level: str
) -> np.ndarray:
    """Numeric contrast for ``c(factor, level, reference)`` under treatment coding.

    Parameters
    ----------
    coef_names
        Design columns, ``Intercept`` and ``{factor}_{lvl}_vs_{base_level}`` (DESeq2's
        ``resultsNames``).
    factor, level, reference
        The contrast: log2 fold change of ``level`` over ``reference``.
    base_level
        The factor's reference level (its first declared level), which has no column.

    Returns
    -------
    np.ndarray
        Contrast weights aligned on ``coef_names``: ``+e(level)`` when ``reference`` is the
        base, ``-e(reference)`` when ``level`` is the base, else ``e(level) - e(reference)``.

    Raises
    ------
    ValueError
        Unknown factor or level (the message lists the valid ones), or
        ``level == reference``.
    """
    names = list(coef_names)
    suffix = f"_vs_{base_level}"
    prefix = f"{factor}_"
    columns = {
        n[len(prefix) : -len(suffix)]: i
        for i, n in enumerate(names)
        if n.startswith(prefix) and n.endswith(suffix) and len(n) > len(prefix) + len(suffix)
    }
    if not columns:
        raise ValueError(
            f"factor {factor!r} (reference level {base_level!r}) has no column "
            f"'{factor}_<level>_vs_{base_level}' in the design; design columns are {names}"
        )
    valid = [base_level, *columns]
    for role, lvl in (("level", level), ("reference", reference)):
        if lvl != base_level and lvl not in columns:
            raise ValueError(
                f"{role} {lvl!r} is not a level of factor {factor!r}; valid levels: {valid}"
            )
    if level == reference:
        raise ValueError(
            f"contrast level and reference are both {level!r}; they must be different levels "
            f"of factor {factor!r}"
        )
    c = np.zeros(len(names), dtype=np.float64)
    if level != base_level:
        c[columns[level]] += 1.0
    if reference != base_level:
        c[columns[reference]] -= 1.0
    return c


# ---------------------------------------------------------------------------------------------
# Benjamini-Hochberg
# ---------------------------------------------------------------------------------------------


def p_adjust_bh(p: np.ndarray) -> np.ndarray:
    """R's ``p.adjust(p, method="BH")``.

    NaN p-values are left out (``n`` is the number of non-NaN values, as R's lazily evaluated
    default ``n = length(p)`` after NA removal) and stay NaN. With ``n <= 1`` the input is
    returned unchanged, as R does.

    Parameters
    ----------
    p
        P-values, any 1-D shape ``(G,)``.

    Returns
    -------
    np.ndarray
        Adjusted p-values, same shape.
    """
    p = _as_1d("p", p)
    out = p.copy()
    keep = ~np.isnan(p)
    pk = p[keep]
    n = pk.size
    if n <= 1:
        return out
    o = np.argsort(-pk, kind="stable")  # decreasing; tie order cannot change the result
    i = np.arange(n, 0, -1, dtype=np.float64)
    # ``n / i * p[o]`` in R's evaluation order, then running minimum from the largest p down.
    q = np.minimum(1.0, np.minimum.accumulate((n / i) * pk[o]))
    adj = np.empty(n, dtype=np.float64)
    adj[o] = q
    out[keep] = adj
    return out


# ---------------------------------------------------------------------------------------------
# lowess (R's clowess)
# ---------------------------------------------------------------------------------------------


def _seqsum(a: np.ndarray) -> float:
    # Left-to-right accumulation like the C loops (np.sum is pairwise and rounds differently).
    return float(np.cumsum(a)[-1]) if a.size else 0.0


def _lowest(
    x: np.ndarray,
    y: np.ndarray,
    xs: float,
    nleft: int,
    nright: int,
    rw: np.ndarray,
    userw: bool,
) -> float | None:
    """clowess's ``lowest``: local weighted linear fit at ``xs`` (0-based window)."""
    n = x.size
    rng = x[n - 1] - x[0]
    h = max(xs - x[nleft], x[nright] - xs)
    h9 = 0.999 * h
    h1 = 0.001 * h
    # C scans j = nleft.. and stops at the first point right of xs farther than h9 (this picks
    # up ties beyond nright). Bound the scan: every x beyond xs + 2h is such a point.
    hi = min(n, int(np.searchsorted(x, xs + 2.0 * h, side="right")) + 1)
    xw = x[nleft:hi]
    r = np.abs(xw - xs)
    stop = (r > h9) & (xw > xs)
    if stop.any():
        k = int(np.argmax(stop))
    elif hi < n:  # cannot happen (x[hi-1] > xs + 2h); keep C semantics anyway
        xw = x[nleft:]
        r = np.abs(xw - xs)
        stop = (r > h9) & (xw > xs)
        k = int(np.argmax(stop)) if stop.any() else xw.size
    else:
        k = xw.size
    xw = xw[:k]
    r = r[:k]
    yw = y[nleft : nleft + k]
    inside = r <= h9
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r / h
        u = 1.0 - t * t * t
        w = np.where(r <= h1, 1.0, u * u * u)
    w = np.where(inside, w, 0.0)
    if userw:
        w = np.where(inside, w * rw[nleft : nleft + k], 0.0)
    a = _seqsum(w)
    if not a > 0.0:
        return None
    w = w / a
    if h > 0.0:
        a = _seqsum(w * xw)  # weighted centre of x
        b = xs - a
        d = xw - a
        c = _seqsum(w * (d * d))
        if math.sqrt(c) > 0.001 * rng:
            # points spread out enough to fit a slope
            b = b / c
            w = w * (b * d + 1.0)
    return _seqsum(w * yw)


def _clowess(x: np.ndarray, y: np.ndarray, f: float, nsteps: int, delta: float) -> np.ndarray:
    """R's C ``clowess`` on x sorted ascending; returns the fitted values."""
    n = x.size
    ys = np.empty(n, dtype=np.float64)
    if n < 2:
        ys[:] = y
        return ys
    ns = max(2, min(n, int(f * n + 1e-7)))
    rw = np.ones(n, dtype=np.float64)
    it = 1
    while it <= nsteps + 1:
        nleft, nright = 0, ns - 1
        last = -1  # previous estimated point (0-based; -1 = none)
        i = 0
        while True:
            if nright < n - 1:
                # slide the window right while that shrinks the radius
                d1 = x[i] - x[nleft]
                d2 = x[nright + 1] - x[i]
                if d1 > d2:
                    nleft += 1
                    nright += 1
                    continue
            fit = _lowest(x, y, float(x[i]), nleft, nright, rw, it > 1)
            ys[i] = y[i] if fit is None else fit  # all weights zero: copy the data
            if last < i - 1:
                # points skipped within delta: linear interpolation
                denom = x[i] - x[last]
                js = np.arange(last + 1, i)
                alpha = (x[js] - x[last]) / denom
                ys[js] = alpha * ys[i] + (1.0 - alpha) * ys[last]
            last = i
            cut = x[last] + delta
            # ties of x[last] (all <= cut) share its fitted value
            tie_end = int(np.searchsorted(x, x[last], side="right")) - 1
            if tie_end > last:
                ys[last + 1 : tie_end + 1] = ys[last]
                last = tie_end
            brk = max(int(np.searchsorted(x, cut, side="right")), last + 1)
            i = max(last + 1, brk - 1)
            if last >= n - 1:
                break
        res = y - ys
        sc = _seqsum(np.abs(res)) / n
        if it > nsteps:
            break
        ar = np.abs(res)
        m1 = n // 2
        if n % 2 == 0:
            m2 = n - m1 - 1
            part = np.partition(ar, (m2, m1))
            cmad = 3.0 * (part[m1] + part[m2])
        else:
            cmad = 6.0 * np.partition(ar, m1)[m1]
        if cmad < 1e-7 * sc:  # residuals effectively zero
            break
        c9 = 0.999 * cmad
        c1 = 0.001 * cmad
        with np.errstate(divide="ignore", invalid="ignore"):
            t = ar / cmad
            v = 1.0 - t * t
            rw = np.where(ar <= c1, 1.0, np.where(ar <= c9, v * v, 0.0))
        it += 1
    return ys


def r_lowess(
    x: np.ndarray,
    y: np.ndarray,
    f: float = 2 / 3,
    iter: int = 3,
    delta: float | None = None,
) -> np.ndarray:
    """R's ``lowess(x, y, f, iter, delta)$y``: the robust locally weighted smoother.

    A port of R's C ``clowess`` (Cleveland 1979/1981), including the ``delta`` shortcut
    (points within ``delta`` of the last fitted x are linearly interpolated), tie handling and
    the ``6 * median |residual|`` biweight robustness steps.

    Parameters
    ----------
    x, y
        Data, shape ``(n,)``, finite.
    f
        Smoother span: the fraction of points in each local fit.
    iter
        Number of robustifying iterations.
    delta
        Distance within which fits are interpolated; ``None`` means R's default
        ``0.01 * diff(range(x))``.

    Returns
    -------
    np.ndarray
        Fitted values in the order of ``x`` sorted ascending (stable, as R's ``order``).

    Raises
    ------
    ValueError
        Empty or non-finite input, mismatched shapes, ``f <= 0``, ``iter < 0`` or
        ``delta < 0`` (R's checks). R would smooth non-finite data into NaN; here it is refused.
    """
    x = _as_1d("x", x)
    y = _as_1d("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x {x.shape} and y {y.shape} differ in shape")
    if x.size == 0:
        raise ValueError("lowess needs at least one point")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("lowess needs finite x and y")
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"'f' must be finite and > 0, got {f!r}")
    if int(iter) != iter or iter < 0:
        raise ValueError(f"'iter' must be an integer >= 0, got {iter!r}")
    o = np.argsort(x, kind="stable")
    xs, ys = x[o], y[o]
    if delta is None:
        delta = 0.01 * (xs[-1] - xs[0])
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"'delta' must be finite and >= 0, got {delta!r}")
    return _clowess(xs, ys, float(f), int(iter), float(delta))


# ---------------------------------------------------------------------------------------------
# Independent filtering (DESeq2 pvalueAdjustment)
# ---------------------------------------------------------------------------------------------


def r_quantile7(x: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """R's ``quantile(x, probs, type=7)`` with R's interpolation arithmetic.

    numpy's ``linear`` method is the same estimator but rounds differently
    (``a + (b - a) * h`` vs R's ``(1 - h) * a + h * b``); R's form is kept so cutoffs compared
    with ``>=`` select exactly R's genes.
    """
    xs = np.sort(_as_1d("x", x))
    probs = np.clip(np.atleast_1d(np.asarray(probs, dtype=np.float64)), 0.0, 1.0)
    n = xs.size
    if n == 0:
        return np.full(probs.shape, np.nan)
    index = 1 + max(n - 1, 0) * probs
    lo = np.floor(index).astype(np.intp)
    hi = np.ceil(index).astype(np.intp)
    qs = xs[lo - 1].copy()
    xhi = xs[hi - 1]
    m = (index > lo) & (xhi != qs)
    h = (index - lo)[m]
    qs[m] = (1 - h) * qs[m] + h * xhi[m]
    return qs


def quantile_name(prob: float) -> str:
    """The name R's ``quantile()`` gives a probability: ``formatC(100 * p, format = "fg",
    digits = 7)`` followed by ``%`` (e.g. ``0.4135379694723289 -> "41.3538%"``)."""
    if not math.isfinite(prob):
        return ""
    text = np.format_float_positional(100.0 * prob, precision=7, unique=False,
                                      fractional=False, trim="-")
    return f"{text}%"


def _r_seq(start: float, stop: float, length: int) -> np.ndarray:
    # R's seq(from, to, length.out) for length > 2 with non-integer endpoints.
    if start == stop:
        return np.full(length, start, dtype=np.float64)
    n1 = length - 1
    mid = start + np.arange(1, length - 1, dtype=np.float64) * ((stop - start) / n1)
    return np.concatenate(([start], mid, [stop]))


def _bh_within(p: np.ndarray, use: np.ndarray) -> np.ndarray:
    # genefilter::filtered_p for one cutoff: BH inside the kept set, NaN elsewhere.
    out = np.full(p.shape, np.nan)
    if use.any():
        out[use] = p_adjust_bh(p[use])
    return out


def independent_filtering(
    base_mean: np.ndarray,
    pvalue: np.ndarray,
    alpha: float = 0.1,
    theta: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """DESeq2's ``pvalueAdjustment`` with ``independentFiltering=TRUE`` and BH.

    For each quantile ``theta`` of the filter statistic (the mean of normalised counts), genes
    with ``base_mean >= quantile(base_mean, theta)`` are kept and BH-adjusted among themselves
    (genefilter's ``filtered_p``). The number of rejections ``padj < alpha`` is smoothed with
    ``lowess(numRej ~ theta, f=1/5)``; the chosen ``theta`` is the first whose count exceeds
    the smoothed maximum minus the RMS of the residuals (over ``numRej > 0``), or the first
    ``theta`` when no count exceeds 10.

    Parameters
    ----------
    base_mean
        Filter statistic per gene, shape ``(G,)``, no NaN (R's ``quantile`` refuses NA).
    pvalue
        Raw p-values, shape ``(G,)``; NaN ones are ignored by BH and stay NaN.
    alpha
        Target FDR used to count rejections, ``0 < alpha < 1``.
    theta
        Quantile grid; default DESeq2's: 50 values from ``mean(base_mean == 0)`` to 0.95
        (or to 1 when that lower end is >= 0.95).

    Returns
    -------
    padj
        Adjusted p-values at the chosen threshold; NaN for filtered genes and NaN p-values.
    info
        What R keeps in ``metadata(res)``: ``filterThreshold`` (base-mean cutoff),
        ``filterThresholdName`` (its name in R, the quantile as ``"41.3538%"``),
        ``filterTheta``, ``numRej`` and ``theta`` (R's ``filterNumRej`` table; ``numRej``
        int), ``loFitY`` (lowess fit, in sorted-theta order as R's ``lo.fit$y``; ``lo.fit$x``
        is ``theta`` sorted), ``alpha``. Plain floats and arrays, fit for a shared state.

    Raises
    ------
    ValueError
        Empty input, mismatched shapes, NaN in ``base_mean``, bad ``alpha`` or fewer than two
        ``theta`` values.
    """
    base_mean = _as_1d("base_mean", base_mean)
    pvalue = _as_1d("pvalue", pvalue)
    if base_mean.shape != pvalue.shape:
        raise ValueError(f"base_mean {base_mean.shape} and pvalue {pvalue.shape} differ in shape")
    if base_mean.size == 0:
        raise ValueError("independent filtering needs at least one gene")
    if np.isnan(base_mean).any():
        raise ValueError("base_mean contains NaN; the filter statistic must be defined")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if theta is None:
        lower = float(np.mean(base_mean == 0))
        upper = 0.95 if lower < 0.95 else 1.0
        theta = _r_seq(lower, upper, 50)
    else:
        theta = np.asarray(theta, dtype=np.float64).ravel()
    if theta.size < 2:
        raise ValueError("theta needs at least two quantiles")

    cutoffs = r_quantile7(base_mean, theta)
    # One BH per theta (a loop over the <= 50 quantiles, each vectorised over genes).
    num_rej = np.array(
        [np.count_nonzero(_bh_within(pvalue, base_mean >= c) < alpha) for c in cutoffs],
        dtype=np.int64,
    )
    lo_y = r_lowess(theta, num_rej.astype(np.float64), f=1 / 5)
    if num_rej.max() <= 10:
        j = 0
    else:
        # As R, lo.fit$y (sorted-theta order) is indexed with numRej's positions.
        pos = num_rej > 0
        residual = num_rej[pos] - lo_y[pos]
        thresh = lo_y.max() - math.sqrt(float(np.mean(residual**2)))
        above = np.flatnonzero(num_rej > thresh)
        j = int(above[0]) if above.size else 0
    padj = _bh_within(pvalue, base_mean >= cutoffs[j])
    info = {
        "filterThreshold": float(cutoffs[j]),
        "filterThresholdName": quantile_name(float(theta[j])),
        "filterTheta": float(theta[j]),
        "numRej": num_rej,
        "theta": theta,
        "loFitY": lo_y,
        "alpha": float(alpha),
    }
    return padj, info


# ``adjust_pvalues`` takes a flag named like the function; keep a handle on the function.
_independent_filtering = independent_filtering


def adjust_pvalues(
    base_mean: np.ndarray,
    pvalue: np.ndarray,
    alpha: float = 0.1,
    independent_filtering: bool = True,
) -> tuple[np.ndarray, dict]:
    """``padj`` as ``results()`` computes it: independent filtering + BH, or plain BH.

    Parameters
    ----------
    base_mean, pvalue, alpha
        As in :func:`independent_filtering`.
    independent_filtering
        ``independentFiltering`` of ``results()``; ``False`` gives ``p.adjust(pvalue, "BH")``.

    Returns
    -------
    padj, info
        ``info`` is :func:`independent_filtering`'s metadata, or ``{}`` without filtering.
    """
    if independent_filtering:
        return _independent_filtering(base_mean, pvalue, alpha=alpha)
    return p_adjust_bh(pvalue), {}
