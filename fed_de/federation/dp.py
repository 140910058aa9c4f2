"""Distributed differential privacy: clipped per-sample contributions, Gaussian noise shares,
and a zero-concentrated DP (zCDP) accountant.

The mechanism, for one array of one message: every sample's contribution to the array is
clipped row by row to a public L2 bound ``c`` (a row: one gene, or one requested point), the
clipped contributions are summed, and each of the ``k`` sites adds Gaussian noise of variance
``sigma^2 / k`` to every entry; the securely aggregated total then carries N(0, sigma^2).
Neighbouring studies differ in one sample's counts (metadata and design are public), so one
sample's clipped contribution moves the array by at most ``2 c sqrt(rows)`` in L2: the
sensitivity ``Delta``. Every array released gets ``sigma = z Delta`` for one noise multiplier
``z``, so each release costs ``rho = Delta^2 / (2 sigma^2) = 1 / (2 z^2)`` (Bun & Steinke 2016,
Prop. 1.6); releases compose by adding their ``rho`` (adaptively chosen requests included), and
``rho``-zCDP gives ``(rho + 2 sqrt(rho log(1/delta)), delta)``-DP (their Prop. 1.3).

Everything here is numpy in, numpy out; the pipelines decide what a contribution is.
"""

from __future__ import annotations

import math

import numpy as np


# -- accountant ------------------------------------------------------------------------------------
def epsilon_from_rho(rho: float, delta: float) -> float:
    """``epsilon`` of ``rho``-zCDP at ``delta``: ``rho + 2 sqrt(rho log(1/delta))``."""
    if rho == math.inf:
        return math.inf
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def rho_from_epsilon(epsilon: float, delta: float) -> float:
    """The largest ``rho`` whose zCDP guarantee gives ``(epsilon, delta)``-DP (the inverse of
    :func:`epsilon_from_rho`: ``rho = (sqrt(L + epsilon) - sqrt(L))^2``, ``L = log(1/delta)``)."""
    if not (epsilon > 0):
        raise ValueError(f"dp_epsilon must be positive, not {epsilon}")
    if not (0 < delta < 1):
        raise ValueError(f"dp_delta must lie in (0, 1), not {delta}")
    if epsilon == math.inf:
        return math.inf
    L = math.log(1.0 / delta)
    return (math.sqrt(L + epsilon) - math.sqrt(L)) ** 2


def gaussian_rho(sensitivity: float, sigma: float) -> float:
    """zCDP cost of one Gaussian mechanism: ``Delta^2 / (2 sigma^2)``."""
    if sigma == 0:
        return math.inf if sensitivity > 0 else 0.0
    return sensitivity**2 / (2.0 * sigma**2)


def noise_multiplier(n_releases: int, rho: float) -> float:
    """``z`` such that ``n_releases`` Gaussian releases of ``sigma = z Delta`` cost ``rho``
    together (``0``: no noise, for ``rho = inf``)."""
    if rho == math.inf or n_releases == 0:
        return 0.0
    return math.sqrt(n_releases / (2.0 * rho))


def sensitivity(bound: float, rows: int) -> float:
    """L2 sensitivity of a sum of per-sample contributions clipped row by row to ``bound``
    when one sample's contribution is replaced: ``2 bound sqrt(rows)``."""
    return 2.0 * bound * math.sqrt(rows)


# -- mechanism -------------------------------------------------------------------------------------
def clip_rows(contributions: np.ndarray, bound: float) -> np.ndarray:
    """Clip each sample's contribution row by row to L2 norm ``bound``.

    ``contributions`` is ``(n_samples, rows, ...)`` (a scalar field: ``(n_samples,)``); a row
    is everything after the first two axes. A row holding a non-finite value contributes
    zeros (a function of that sample alone, so the bound still holds). ``bound = inf`` leaves
    the rows as they are.
    """
    c = np.asarray(contributions, dtype=np.float64)
    if bound == math.inf:
        return c
    flat = c.reshape(c.shape[0], -1, 1) if c.ndim == 1 else c.reshape(c.shape[:2] + (-1,))
    finite = np.isfinite(flat).all(axis=-1, keepdims=True)
    flat = np.where(finite, flat, 0.0)
    norms = np.sqrt(np.sum(flat * flat, axis=-1, keepdims=True))
    scale = np.ones_like(norms)
    over = norms > bound
    scale[over] = bound / norms[over]
    return (flat * scale).reshape(c.shape)


def noise_share(shape: tuple, sigma: float, n_sites: int,
                rng: np.random.Generator) -> np.ndarray:
    """One site's share of the noise: N(0, sigma^2 / n_sites) per entry (floating-point
    Gaussian sampling; see docs/privacy.md for its caveat)."""
    if sigma == 0:
        return np.zeros(shape)
    return rng.normal(0.0, sigma / math.sqrt(n_sites), size=shape)


def rows_of(shape: tuple) -> int:
    """Rows of an array clipped row by row: its first dimension (a scalar: one row)."""
    return int(shape[0]) if len(shape) else 1


def release(contributions: np.ndarray, bound: float, z: float, n_sites: int,
            rng: np.random.Generator) -> np.ndarray:
    """A site's noisy share of one array: clipped contributions summed, plus its noise share
    of ``sigma = z * sensitivity``."""
    clipped = clip_rows(contributions, bound)
    total = clipped.sum(axis=0)
    sigma = z * sensitivity(bound, rows_of(total.shape)) if z else 0.0
    return total + noise_share(total.shape, sigma, n_sites, rng)


# -- aggregator-side post-processing (free under DP) -----------------------------------------------
def nearest_psd_packed(packed: np.ndarray, p: int, floor: float = 1e-8) -> np.ndarray:
    """Project packed symmetric ``p x p`` matrices onto those with eigenvalues >= ``floor``
    times their largest absolute eigenvalue (at least ``floor``): a noisy X'WX stays
    invertible."""
    iu = np.triu_indices(p)
    A = np.zeros(packed.shape[:-1] + (p, p))
    A[..., iu[0], iu[1]] = packed
    A[..., iu[1], iu[0]] = packed
    A = np.nan_to_num(A)
    vals, vecs = np.linalg.eigh(A)
    top = np.max(np.abs(vals), axis=-1, keepdims=True)
    vals = np.maximum(vals, np.maximum(floor * top, floor))
    B = (vecs * vals[..., None, :]) @ np.swapaxes(vecs, -1, -2)
    return B[..., iu[0], iu[1]]
