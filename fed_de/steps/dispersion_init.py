"""Starting values of the DESeq2 fit: baseMean, moments and rough dispersions, linear fits.

Round A  local : size factors (kept at the site), then per-gene sums of normalised counts and
                 their squares, sum of 1/sf, X^T X, X^T (normalised counts), and the number of
                 samples in each declared design cell (to tell a cell-means design)
         agg   : baseMean, DESeq2's moments dispersion, the least-squares fit on normalised
                 counts (DESeq2's ``linearModelMu``)
Round B  local : sum of ((y - mu)^2 - mu) / mu^2 with the linear-fit means floored at 1
                 (``roughDispEstimate``) and X^T log(normalised + 0.1) (the IRLS start)
         agg   : ``alpha_hat = clip(min(rough, moments), minDisp, maxDisp)`` and initial betas
With ``poscounts`` the size factors get their global rescaling after round A; every round-A
sum is scaled exactly at the aggregator.
"""

from __future__ import annotations

import itertools

import numpy as np
from substrafl.remote import remote, remote_data

from fed_de.core import nb
from fed_de.design import check_covariates
from fed_de.errors import DesignError
from fed_de.simulation.opener import SiteData
from fed_de.steps.base import sends, sum_messages
from fed_de.steps.irls import start_irls

MIN_DISP = 1e-8


def check_full_rank(xtx: np.ndarray, names: list[str]) -> None:
    """Refuse a design that is rank deficient over all sites together.

    Only the summed Gram matrix is used, so no site's own rank is revealed. The columns
    involved in each linear dependency are named.
    """
    scale = np.sqrt(np.clip(np.diag(xtx), 1e-300, None))
    corr = xtx / np.outer(scale, scale)
    vals, vecs = np.linalg.eigh(corr)
    null = vals < 1e-10 * max(vals.max(), 1.0)
    if not null.any():
        return
    groups = []
    for v in vecs[:, null].T:
        cols = [names[i] for i in np.flatnonzero(np.abs(v) > 1e-6)]
        groups.append(" + ".join(cols))
    raise DesignError(
        "the design matrix is not full rank over all sites together: these columns are "
        f"linearly dependent: {'; '.join(groups)}. A level may be absent from every site, "
        "or two terms may be confounded (e.g. batch nested in condition); remove or merge "
        "terms or levels in the design"
    )


def design_cells(study) -> list[tuple]:
    """Every combination of declared factor levels (the study's design cells)."""
    return list(itertools.product(*study.levels.values()))


def cell_index(study, site: SiteData) -> np.ndarray:
    """Index in :func:`design_cells` of each of the site's samples (factor designs)."""
    cells = {"\x1f".join(c): i for i, c in enumerate(design_cells(study))}
    frame = check_covariates(study, site.obs, site.name)[list(study.levels)]
    keys = frame.astype(str).agg("\x1f".join, axis=1)
    return np.array([cells[k] for k in keys], dtype=int)


class DispersionInitMixin:
    """Moments, rough dispersions and IRLS starting values."""

    @remote_data
    @sends(sum_norm=("G",), sum_norm_sq=("G",), sum_inv_sf=(), sum_log_sf=(), n_samples=(),
           xtx=("T",), xty=("G", "p"), cell_counts=("C",))
    def local_moments(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """Size factors, then the sums behind baseMean, moments and the linear fit."""
        site = data_from_opener
        sf = self.compute_size_factors(site, shared_state)
        X = self.local["design"]
        norm = self.counts(site) / sf[:, None]
        return {
            "sum_norm": norm.sum(axis=0),
            "sum_norm_sq": (norm * norm).sum(axis=0),
            "sum_inv_sf": float((1.0 / sf).sum()),
            "sum_log_sf": float(np.log(sf).sum()),
            "n_samples": float(site.n_samples),
            "xtx": nb.gram(X, np.ones(site.n_samples)),
            "xty": norm.T @ X,
            "cell_counts": self._cell_counts(site),
        }

    @remote
    def agg_moments(self, shared_states: list[dict]) -> dict:
        """baseMean, moments dispersion, linear fit; decide DESeq2's linear-mu shortcut."""
        tot = sum_messages(shared_states)
        n, p = tot["n_samples"], self.study.n_coefs
        c = self.size_factor_scale(tot["sum_log_sf"], n)  # normalised counts scale by c
        mean = tot["sum_norm"] * c / n
        var = (tot["sum_norm_sq"] * c * c - n * mean * mean) / (n - 1)
        xim = tot["sum_inv_sf"] * c / n
        all_zero = mean == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            moments = (var - xim * mean) / mean**2
        xtx = nb.unpack(tot["xtx"], p)
        check_full_rank(xtx, self.study.coef_names)
        beta_lin = np.linalg.solve(xtx, (tot["xty"] * c).T).T
        # DESeq2 uses the linear fit for mu when the design has as many distinct rows as
        # coefficients (a cell-means design); with continuous terms rows are distinct.
        n_cells = int((tot["cell_counts"] > 0).sum())
        linear = (not self.study.continuous) and n_cells == p
        return {"base_mean": mean, "all_zero": all_zero, "moments_disp": moments,
                "beta_lin": beta_lin, "sf_scale": c, "n_samples": n, "linear_mu": linear,
                "xtx": tot["xtx"], "xim": xim, "cell_counts": tot["cell_counts"]}

    @remote_data
    @sends(rough=("G",), xt_logy=("G", "p"), xt_loglin=("G", "p"))
    def local_rough(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """Final size factors; rough-dispersion sums and the log-linear IRLS start."""
        site = data_from_opener
        sf = self.local["size_factors_raw"] / shared_state["sf_scale"]
        self.local["size_factors"] = sf
        X = self.local["design"]
        norm = self.counts(site) / sf[:, None]
        lin = X @ shared_state["beta_lin"].T
        mu = np.maximum(lin, 1.0)
        rough = (((norm - mu) ** 2 - mu) / mu**2).sum(axis=0)
        return {"rough": rough, "xt_logy": np.log(norm + 0.1).T @ X,
                "xt_loglin": np.log(np.maximum(lin, 0.1)).T @ X}

    @remote_data
    @sends(rough=("G",), xt_logy=("G", "p"), xt_loglin=("G", "p"), xr_logy=("G", "pr"),
           xr_loglin=("G", "pr"), xrtxr=("Tr",))
    def local_rough_lrt(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """:meth:`local_rough` plus the reduced model's IRLS starting sums (LRT)."""
        out = self.local_rough(data_from_opener=data_from_opener, shared_state=shared_state,
                               _skip=True)
        Xr, X = self.local["design_reduced"], self.local["design"]
        norm = self.counts(data_from_opener) / self.local["size_factors"][:, None]
        lin = X @ shared_state["beta_lin"].T
        out.update(xr_logy=np.log(norm + 0.1).T @ Xr,
                   xr_loglin=np.log(np.maximum(lin, 0.1)).T @ Xr,
                   xrtxr=nb.gram(Xr, np.ones(Xr.shape[0])))
        return out

    @remote
    def agg_rough(self, shared_states: list[dict], mu_rounds: int = 0) -> dict:
        """``alpha_hat`` (start of the dispersion search) and the IRLS starting betas."""
        *messages, prev = shared_states
        tot = sum_messages(messages)
        n, p = prev["n_samples"], self.study.n_coefs
        rough = np.maximum(tot["rough"] / (n - p), 0.0)
        max_disp = max(10.0, n)
        alpha_hat = np.clip(np.fmin(rough, prev["moments_disp"]), MIN_DISP, max_disp)
        xtx = nb.unpack(prev["xtx"], p)
        beta0 = np.linalg.solve(xtx, tot["xt_logy"].T).T
        # a second start: log of the linear-fit means (exact cell means for cell-means designs)
        beta_alt = np.linalg.solve(xtx, tot["xt_loglin"].T).T
        state = dict(prev)
        state.update(alpha_hat=alpha_hat, alpha_init=alpha_hat, beta_init=beta0,
                     beta_alt=beta_alt, max_disp=max_disp, irls_mu_rounds=mu_rounds)
        # the means of the dispersion fit: IRLS with alpha_hat, unless the linear fit serves
        frozen = prev["all_zero"] | bool(prev["linear_mu"])
        state["irls_mu"] = start_irls(beta0, frozen, beta_alt)
        if "xr_logy" in tot:  # LRT: starts of the reduced model's fit
            pr = int(round((np.sqrt(8 * tot["xrtxr"].size + 1) - 1) / 2))
            xrtxr = nb.unpack(tot["xrtxr"], pr)
            state["beta_init_reduced"] = np.linalg.solve(xrtxr, tot["xr_logy"].T).T
            state["beta_alt_reduced"] = np.linalg.solve(xrtxr, tot["xr_loglin"].T).T
        state["disp_points"] = self.initial_disp_points(state)
        return state

    def _cell_counts(self, site: SiteData) -> np.ndarray:
        if not self.study.levels:
            return np.zeros(1)
        cells = cell_index(self.study, site)
        return np.bincount(cells, minlength=len(design_cells(self.study))).astype(float)
