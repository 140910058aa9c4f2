"""The screen study: what every participant agrees on before any cell is read.

A screen study declares the genes, the perturbations, the control label and the design
factors (the site, when sites have their own effect, and categorical covariates). Each cell
falls in a group ``q`` (0 = control, ``p + 1`` = perturbation ``p``; cells of other labels
are not used) and a design cell ``c`` (its combination of factor levels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from fed_de.core.screen_sums import cell_design, cell_table

#: Name of the factor that is the site itself.
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
        return cell_design(self.n_levels)

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
        table = cell_table(self.n_levels)
        return [",".join(f"{n}={lv[i]}" for (n, lv), i in zip(self.factors, row, strict=True))
                or "all" for row in table]
