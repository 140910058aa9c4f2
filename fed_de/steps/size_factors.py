"""Federated median-of-ratios size factors and baseMean (DESeq2 ``ratio`` / ``poscounts``).

Round 1  local : sum of log positive counts and number of zeros per gene, sample count
         agg   : log geometric means over all samples of all sites
Round 2  local : each sample's size factor (kept at the site); sum of normalised counts per
                 gene; sum of log size factors (``poscounts`` rescales to geometric mean 1)
         agg   : baseMean, and the ``poscounts`` rescaling factor
The size factors never leave their site.
"""

from __future__ import annotations

import numpy as np
from substrafl.remote import remote, remote_data

from fed_de.core import size_factors as sf_core
from fed_de.design import design_matrix
from fed_de.errors import SiteDataError
from fed_de.simulation.opener import SiteData
from fed_de.steps.base import sends, sum_messages
from fed_de.validation import aligned_counts, validate_site


class SizeFactorsMixin:
    """Local and aggregation methods of the size-factor step."""

    # -- round 1 ---------------------------------------------------------------------------
    @remote_data
    @sends(sum_log=("G",), n_zero=("G",), n_samples=())
    def local_log_sums(self, data_from_opener: SiteData, shared_state=None) -> dict:
        """Validate the site, keep its design matrix, send per-gene log-count sums."""
        site = data_from_opener
        X = validate_site(
            self.study, site,
            min_cell_size=int(self.options.get("min_cell_size", 3)),
            round_counts=bool(self.options.get("round_counts", False)),
        )
        self.local["design"] = X
        if getattr(self, "reduced", None) is not None:
            self.local["design_reduced"] = design_matrix(self.reduced, site.obs, site.name)
        counts = self.counts(site)
        sum_log, n_zero = sf_core.log_count_sums(counts)
        return {"sum_log": sum_log, "n_zero": n_zero, "n_samples": float(site.n_samples)}

    @remote
    def agg_log_means(self, shared_states: list[dict]) -> dict:
        """Log geometric means over every sample of every site."""
        tot = sum_messages(shared_states)
        kind = self.options.get("size_factors", "ratio")
        log_means = sf_core.log_geometric_means(tot["sum_log"], tot["n_zero"], tot["n_samples"],
                                                kind)
        return {"log_geo_means": log_means, "n_samples": float(tot["n_samples"])}

    # -- round 2 ---------------------------------------------------------------------------
    def compute_size_factors(self, site: SiteData, shared_state: dict) -> np.ndarray:
        """Raw size factors of this site's samples (stored locally, never sent)."""
        kind = self.options.get("size_factors", "ratio")
        counts = self.counts(site)
        sf = sf_core.median_ratio_factors(counts, shared_state["log_geo_means"], kind)
        bad = ~np.isfinite(sf) | (sf <= 0)
        if bad.any():
            samples = [site.samples[i] for i in np.flatnonzero(bad)[:5]]
            raise SiteDataError(
                f"site {site.name!r}: sample(s) {samples} share no expressed gene with the "
                "study's geometric means, so no size factor exists; check these samples' "
                "counts (empty library?) or remove them"
            )
        self.local["size_factors_raw"] = sf
        self.local["size_factors"] = sf  # final for 'ratio'; rescaled later for 'poscounts'
        return sf

    @remote_data
    @sends(sum_norm=("G",), sum_log_sf=(), n_samples=())
    def local_size_factors(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """Size factors at the site; per-gene sums of counts over raw size factors."""
        sf = self.compute_size_factors(data_from_opener, shared_state)
        norm = self.counts(data_from_opener) / sf[:, None]
        return {"sum_norm": norm.sum(axis=0), "sum_log_sf": float(np.log(sf).sum()),
                "n_samples": float(data_from_opener.n_samples)}

    @remote
    def agg_base_mean(self, shared_states: list[dict]) -> dict:
        """baseMean per gene (mean of normalised counts over all samples)."""
        tot = sum_messages(shared_states)
        n = float(tot["n_samples"])
        scale = self.size_factor_scale(tot["sum_log_sf"], n)
        # size factors are divided by scale, so normalised counts are multiplied by it
        return {"base_mean": tot["sum_norm"] * scale / n, "sf_scale": scale, "n_samples": n}

    def size_factor_scale(self, sum_log_sf: float, n_samples: float) -> float:
        """``poscounts`` divides size factors by their geometric mean; ``ratio`` does not."""
        if self.options.get("size_factors", "ratio") == "poscounts":
            return float(np.exp(sum_log_sf / n_samples))
        return 1.0

    @remote_data
    @sends()
    def local_finalize_size_factors(self, data_from_opener: SiteData, shared_state: dict) -> dict:
        """Apply the global rescaling to this site's size factors (nothing is sent)."""
        self.local["size_factors"] = self.local["size_factors_raw"] / shared_state["sf_scale"]
        return {}

    # -- helpers ---------------------------------------------------------------------------
    def counts(self, site: SiteData) -> np.ndarray:
        """Site counts aligned to the study's genes (rounded when the study asks for it).

        After Cook's replacement (closing round) the refit uses the replaced counts.
        """
        if "replaced_counts" in self.local:
            return self.local["replaced_counts"]
        counts = aligned_counts(self.study, site)
        if self.options.get("round_counts", False):
            counts = np.round(counts)
        return counts
