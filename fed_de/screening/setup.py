"""Perturbation screen, first rounds: the study, size factors, and the per-group sums.

A screen study declares the genes, the perturbations, the control label and the design
factors (the site, when sites have their own effect, and categorical covariates). Each cell
falls in a group ``q`` (0 = control, ``p + 1`` = perturbation ``p``; cells of other labels
are not used) and a design cell ``c`` (its combination of factor levels).

Round 1  local : check counts; library sizes (kept); sum of log library sizes, cells
                 (``poscounts``: per-gene sums of log positive counts)
         agg   : the global geometric-mean scale (``poscounts``: log geometric means)
Round 1b (``poscounts`` only) local : median-of-ratios factors (kept), sum of their logs
         agg   : the geometric-mean scale
Round 2  local : size factors (kept); per design cell: control sums of counts, normalised
                 counts and their squares, expressing cells; per perturbation: the same sums,
                 and per (perturbation, design cell) cells and size-factor sums
         agg   : expression filters, baseMean, moments dispersions, dispersion-search start,
                 Poisson starts of the control fit and of every perturbation effect
Size factors, codes and every per-cell quantity stay at the site.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import wraps

import numpy as np
import pandas as pd
from substrafl.remote import remote, remote_data

from fed_de.core import screen as core
from fed_de.errors import DesignError, DisclosureError, SiteDataError
from fed_de.screening._old_base import sends, sum_messages
from fed_de.screening.data import ScreenSite

SITE_FACTOR = "site"


@dataclass(frozen=True)
class ScreenStudy:
    """What every participant of a screen agrees on before any cell is read.

    Parameters
    ----------
    genes
        The study's genes; every site is aligned to them.
    perturbations
        The perturbation labels tested against the control (cells with other labels are not
        used).
    control
        Label of the control cells.
    perturbation_column
        Column of ``obs`` holding the labels.
    factors
        ``[[name, [levels...]], ...]``: the design factors of the control fit, reference level
        first. A factor named ``site`` whose levels are the site names, when ``site_factor``,
        is taken from the site's name rather than from ``obs``.
    site_factor
        Whether the first factor is the site itself.
    """

    genes: list[str]
    perturbations: list[str]
    control: str
    perturbation_column: str
    factors: list = field(default_factory=list)
    site_factor: bool = False

    def to_dict(self) -> dict:
        """Plain-python form, also readable as a :class:`fed_de.design.Study` (``~ 1``)."""
        d = asdict(self)
        d.update(design="~ 1", levels={}, continuous=[])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ScreenStudy:
        """Inverse of :meth:`to_dict`."""
        return cls(genes=list(d["genes"]), perturbations=list(d["perturbations"]),
                   control=str(d["control"]), perturbation_column=str(d["perturbation_column"]),
                   factors=[[str(n), [str(x) for x in lv]] for n, lv in d.get("factors", [])],
                   site_factor=bool(d.get("site_factor", False)))

    @property
    def n_levels(self) -> list[int]:
        """Number of levels of each factor."""
        return [len(lv) for _, lv in self.factors]

    @property
    def cell_design(self) -> np.ndarray:
        """Design rows of the design cells ``(C, p)``."""
        return core.cell_design(self.n_levels)

    @property
    def fit_design(self) -> np.ndarray:
        """Design rows the control fit uses: the cell design, or the identity when the design
        is saturated (one factor), so every design cell's mean is fitted on its own (same
        fitted means, and a cell without control counts cannot disturb the others)."""
        X = self.cell_design
        return np.eye(X.shape[0]) if X.shape[0] == X.shape[1] else X

    @property
    def coef_names(self) -> list[str]:
        """Names of the control fit's coefficients."""
        names = ["Intercept"]
        for name, levels in self.factors:
            names += [f"{name}_{lv}_vs_{levels[0]}" for lv in levels[1:]]
        return names

    @property
    def cell_names(self) -> list[str]:
        """Names of the design cells (``factor=level`` joined by ``,``)."""
        table = core.cell_table(self.n_levels)
        return [",".join(f"{n}={lv[i]}" for (n, lv), i in zip(self.factors, row, strict=True))
                or "all" for row in table]


def tracked(fn: Callable) -> Callable:
    """Record the task's peak traced memory in the local state (when tracemalloc runs)."""

    @wraps(fn)
    def wrapper(self, data_from_opener, shared_state=None, **kwargs):
        if not tracemalloc.is_tracing():
            return fn(self, data_from_opener, shared_state, **kwargs)
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = fn(self, data_from_opener, shared_state, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
        self.local["peak_bytes"] = max(int(self.local.get("peak_bytes", 0)), int(peak - base))
        return out

    return wrapper


class ScreenSetupMixin:
    """Rounds 1-2 of a screen: codes, size factors, group sums."""

    # -- site side ---------------------------------------------------------------------------
    def site_view(self, site: ScreenSite) -> ScreenSite:
        """The site with chunks in the study's gene order."""
        return site.aligned_to(self.screen.genes)

    def _codes(self, site: ScreenSite) -> tuple[np.ndarray, np.ndarray]:
        """Group (0 control, p + 1, -1 unused) and design cell of every cell of the site."""
        st = self.screen
        labels = site.obs_column(st.perturbation_column)
        q = pd.Categorical(labels, categories=[st.control, *st.perturbations]).codes
        q = q.astype(np.int64)  # -1: a label the study does not test (left out)
        levels = np.zeros((site.n_samples, len(st.factors)), dtype=np.int64)
        for f, (name, lv) in enumerate(st.factors):
            if f == 0 and st.site_factor:
                if site.name not in lv:
                    raise DesignError(f"site {site.name!r} is not a declared level of the site "
                                      f"factor {lv}")
                levels[:, f] = lv.index(site.name)
                continue
            values = site.obs_column(name)
            codes = pd.Categorical(values, categories=lv).codes
            if (codes < 0).any():
                bad = sorted(set(values[codes < 0]))[:5]
                raise DesignError(f"site {site.name!r}: covariate {name!r} holds undeclared "
                                  f"level(s) {bad}; declared: {lv}")
            levels[:, f] = codes
        c = core.cell_codes(levels, st.n_levels)
        return q, c

    def _check_disclosure(self, site: ScreenSite, q: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Apply the minimum group size: small perturbation groups are left out at this site;
        a design cell with perturbed cells but too few controls stops the site."""
        k = int(self.options.get("min_cell_size", 3))
        C = int(np.prod(self.screen.n_levels)) if self.screen.factors else 1
        Q = len(self.screen.perturbations) + 1
        used = q >= 0
        n = np.bincount(q[used] * C + c[used], minlength=Q * C).reshape(Q, C)
        if k > 0:
            small = (n > 0) & (n < k)
            small[0] = False
            if small.any():
                drop = small[np.maximum(q, 0), c] & (q > 0)
                q = np.where(drop, -1, q)
                n = np.where(small, 0, n)
            few_ctrl = (n[0] > 0) & (n[0] < k)
            if few_ctrl.any():
                cell = self.screen.cell_names[int(np.flatnonzero(few_ctrl)[0])]
                raise DisclosureError(
                    f"site {site.name!r}: design cell {cell} holds {int(n[0][few_ctrl][0])} "
                    f"control cell(s), fewer than min_cell_size={k}; their sums could reveal "
                    "single cells. Merge the covariate levels or lower min_cell_size")
        if not (n[0] > 0).any():
            raise SiteDataError(f"site {site.name!r} holds no control cell labelled "
                                f"{self.screen.control!r} in column "
                                f"{self.screen.perturbation_column!r}")
        return q

    @remote_data
    @sends(sum_log_lib=(), n_cells=(), sum_log=("Gp",))
    @tracked
    def local_screen_setup(self, data_from_opener: ScreenSite, shared_state=None) -> dict:
        """Check the site; library sizes (kept); the sums of the size-factor scale."""
        site = self.site_view(data_from_opener)
        q, c = self._codes(site)
        q = self._check_disclosure(site, q, c)
        kind = self.options.get("size_factors", "library")
        lib = np.zeros(site.n_samples)
        sum_log = np.zeros(len(self.screen.genes))
        for start, X in site.chunks():
            bad = core.check_counts(X)
            if bad:
                raise SiteDataError(f"site {site.name!r}: {bad} in cells {start}.."
                                    f"{start + X.shape[0] - 1}; fed_de models raw UMI counts")
            lib[start:start + X.shape[0]] = core.library_sizes(X)
            if kind == "poscounts":
                used = q[start:start + X.shape[0]] >= 0
                sum_log += core.log_positive_sums(X[np.flatnonzero(used)])
        q = np.where(lib > 0, q, -1)  # empty cells carry no information
        used = q >= 0
        self.local.update(q=q, c=c, lib=lib, n_used=int(used.sum()))
        return {"sum_log_lib": float(np.log(lib[used]).sum()), "n_cells": float(used.sum()),
                "sum_log": sum_log if kind == "poscounts" else np.zeros(0)}

    @remote
    def agg_screen_setup(self, shared_states: list[dict]) -> dict:
        """The global scale of library-size factors (or the poscounts geometric means)."""
        tot = sum_messages(shared_states)
        n = float(tot["n_cells"])
        if self.options.get("size_factors", "library") == "poscounts":
            lgm = np.where(tot["sum_log"] > 0, tot["sum_log"] / n, -np.inf)
            return {"log_geo_means": lgm, "n_cells": n}
        return {"sf_log_scale": float(tot["sum_log_lib"]) / n, "n_cells": n}

    @remote_data
    @sends(sum_log_sf=(), n_cells=())
    @tracked
    def local_screen_posfactors(self, data_from_opener: ScreenSite, shared_state: dict) -> dict:
        """``poscounts`` median-of-ratios factors (kept), and the sum of their logs."""
        site = self.site_view(data_from_opener)
        q = self.local["q"]
        raw = np.full(site.n_samples, np.nan)
        for start, X in site.chunks():
            raw[start:start + X.shape[0]] = core.poscounts_factors(X, shared_state["log_geo_means"])
        q = np.where(np.isfinite(raw) & (raw > 0), q, -1)
        used = q >= 0
        self.local.update(q=q, sf_raw=raw)
        return {"sum_log_sf": float(np.log(raw[used]).sum()), "n_cells": float(used.sum())}

    @remote
    def agg_screen_posscale(self, shared_states: list[dict]) -> dict:
        """``poscounts`` factors are divided by their geometric mean over all cells."""
        tot = sum_messages(shared_states)
        return {"sf_log_scale": float(tot["sum_log_sf"]) / float(tot["n_cells"]),
                "n_cells": float(tot["n_cells"])}

    def screen_size_factors(self, shared_state: dict) -> np.ndarray:
        """This site's final size factors (kept here)."""
        raw = self.local["sf_raw"] if "sf_raw" in self.local else self.local["lib"]
        sf = raw / np.exp(shared_state["sf_log_scale"])
        return np.where(self.local["q"] >= 0, sf, 1.0)

    def cell_groups(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Group, design cell, number of groups Q = P + 1 and of design cells C."""
        C = int(np.prod(self.screen.n_levels)) if self.screen.factors else 1
        return self.local["q"], self.local["c"], len(self.screen.perturbations) + 1, C

    def screen_group_sums(self, site: ScreenSite, log_values: bool = False) -> dict:
        """Sums over the site's cells per (group, design cell): ``(Q, C[, G])`` arrays."""
        q, c, Q, C = self.cell_groups()
        sf = self.local["sf"]
        code = np.where(q >= 0, q * C + c, -1)
        tot: dict = {}
        for start, X in site.chunks():
            sl = slice(start, start + X.shape[0])
            part = core.group_sums(X, sf[sl], code[sl], Q * C, log_values)
            for k, v in part.items():
                tot[k] = tot[k] + v if k in tot else v
        return {k: v.reshape((Q, C) + v.shape[1:]) for k, v in tot.items()}

    @remote_data
    @sends(ctrl_y=("C", "G"), ctrl_norm=("C", "G"), ctrl_norm2=("C", "G"),
           ctrl_expr=("C", "G"), ctrl_n=("C",), ctrl_sf=("C",), ctrl_inv_sf=("C",),
           pert_y=("P", "G"), pert_norm=("P", "G"), pert_expr=("P", "G"),
           pert_n=("P", "C"), pert_sf=("P", "C"),
           pc_y=("PCa", "G"), pc_norm=("PCa", "G"), pc_norm2=("PCa", "G"),
           pc_inv_sf=("PCa",))
    @tracked
    def local_screen_sums(self, data_from_opener: ScreenSite, shared_state: dict) -> dict:
        """Size factors (kept) and the sums of every group of cells."""
        site = self.site_view(data_from_opener)
        self.local["sf"] = self.screen_size_factors(shared_state)
        s = self.screen_group_sums(site)
        out = {
            "ctrl_y": s["y"][0], "ctrl_norm": s["norm"][0], "ctrl_norm2": s["norm2"][0],
            "ctrl_expr": s["expr"][0], "ctrl_n": s["n"][0], "ctrl_sf": s["sf"][0],
            "ctrl_inv_sf": s["inv_sf"][0],
            "pert_y": s["y"][1:].sum(axis=1), "pert_norm": s["norm"][1:].sum(axis=1),
            "pert_expr": s["expr"][1:].sum(axis=1), "pert_n": s["n"][1:],
            "pert_sf": s["sf"][1:],
        }
        G = len(self.screen.genes)
        if self.options.get("dispersion_cells", "control") == "all":
            out.update(pc_y=s["y"][1:].reshape(-1, G), pc_norm=s["norm"][1:].reshape(-1, G),
                       pc_norm2=s["norm2"][1:].reshape(-1, G),
                       pc_inv_sf=s["inv_sf"][1:].reshape(-1))
        else:
            out.update(pc_y=np.zeros((0, G)), pc_norm=np.zeros((0, G)),
                       pc_norm2=np.zeros((0, G)), pc_inv_sf=np.zeros(0))
        return out

    # -- aggregator side ---------------------------------------------------------------------
    def check_control_levels(self, ctrl_n: np.ndarray) -> None:
        """Every level of every factor needs control cells somewhere (else its effect is not
        identifiable from the controls); the error names the level."""
        st = self.screen
        table = core.cell_table(st.n_levels)
        for f, (name, levels) in enumerate(st.factors):
            for i, lv in enumerate(levels):
                if ctrl_n[table[:, f] == i].sum() > 0:
                    continue
                fix = ("every site needs control cells when sites have their own effect "
                       "(or pass site_effects=False)" if f == 0 and st.site_factor
                       else "drop the level or the covariate")
                raise DesignError(f"no control cell has {name}={lv!r}, so the control fit "
                                  f"cannot estimate its effect: {fix}")

    def screen_summary(self, tot: dict) -> dict:
        """Expression filters, baseMean and the cell counts, from the round-2 sums."""
        o = self.options
        n_ctrl = float(tot["ctrl_n"].sum())
        n_pert = tot["pert_n"].sum(axis=1)
        ctrl_norm = tot["ctrl_norm"].sum(axis=0)
        ctrl_expr = tot["ctrl_expr"].sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            ctrl_mean = ctrl_norm / n_ctrl
            pert_mean = tot["pert_norm"] / n_pert[:, None]
            base_mean = (ctrl_norm[None, :] + tot["pert_norm"]) / (n_ctrl + n_pert)[:, None]
        tested = core.expression_filter(
            ctrl_expr, ctrl_mean, n_ctrl, tot["pert_expr"], pert_mean, n_pert,
            min_pct_ctrl=float(o.get("min_pct_ctrl", 0.01)),
            min_pct_pert=float(o.get("min_pct_pert", 0.002)),
            min_mean_ctrl=float(o.get("min_mean_ctrl", 0.05)),
            min_mean_pert=float(o.get("min_mean_pert", 0.005)),
            min_cells_ctrl=int(o.get("min_cells_ctrl", 1)),
            min_cells_pert=int(o.get("min_cells_pert", 1)))
        return {"n_ctrl": n_ctrl, "n_pert": n_pert, "ctrl_mean": ctrl_mean,
                "pert_mean": pert_mean, "ctrl_pct": ctrl_expr / n_ctrl,
                "pert_pct": tot["pert_expr"] / np.maximum(n_pert, 1)[:, None],
                "base_mean": base_mean, "tested": tested}
