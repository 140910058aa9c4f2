"""The study a federation agrees on, and the design matrix every site builds from it.

The study (formula, factor levels, gene list) is declared by the user and shipped to every site
as constructor arguments; it is never collected from the sites. Each site builds its design
columns from the same formulaic ``ModelSpec``, so a site that lacks a level still produces the
identical columns (all zeros for that level).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import formulaic
import numpy as np
import pandas as pd

from fed_de.errors import DesignError


@dataclass(frozen=True)
class Study:
    """What every participant of a study agrees on before any data is touched.

    Parameters
    ----------
    design
        Wilkinson formula, e.g. ``"~ batch + condition"``.
    levels
        Levels of every categorical term, reference level first.
    genes
        The gene list of the study; every site is aligned to it.
    continuous
        Numeric terms of the formula (everything in the formula that is not in ``levels``).
    """

    design: str
    levels: dict[str, list[str]]
    genes: list[str]
    continuous: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-python form, safe to pass as substrafl constructor arguments."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Study:
        """Inverse of :meth:`to_dict`."""
        return cls(
            design=d["design"],
            levels={k: list(v) for k, v in d["levels"].items()},
            genes=list(d["genes"]),
            continuous=list(d.get("continuous", [])),
        )

    @property
    def coef_names(self) -> list[str]:
        """DESeq2-style names of the design columns."""
        return _spec(self.design, _freeze(self.levels), tuple(self.continuous))[1]

    @property
    def n_coefs(self) -> int:
        """Number of design columns (p)."""
        return len(self.coef_names)

    @property
    def intercept_only(self) -> bool:
        """The design is ``~ 1`` (DESeq2 does not fit it: see :mod:`fed_de.core.lrt`)."""
        return self.coef_names == ["Intercept"]


def formula_variables(design: str) -> list[str]:
    """Variables a formula needs from the sample metadata, in formula order."""
    formula = formulaic.Formula(_rhs(design))
    return sorted(formula.required_variables, key=lambda v: _rhs(design).find(v))


def make_study(
    design: str,
    genes: list[str],
    levels: dict[str, list[str]] | None = None,
    continuous: list[str] | None = None,
) -> Study:
    """Build and check a :class:`Study`.

    Every variable of the formula must be declared either as a factor (``levels``) or as a
    continuous term; by default variables without declared levels are continuous.
    """
    levels = {k: [str(x) for x in v] for k, v in (levels or {}).items()}
    variables = formula_variables(design)
    continuous = list(continuous) if continuous is not None else [
        v for v in variables if v not in levels
    ]
    undeclared = [v for v in variables if v not in levels and v not in continuous]
    if undeclared:
        raise DesignError(
            f"design {design!r} uses {undeclared} which are neither declared factors (levels=) "
            "nor continuous terms; declare their levels so that every site codes them alike"
        )
    for name, lv in levels.items():
        if len(lv) < 2:
            raise DesignError(f"factor {name!r} declares {len(lv)} level(s); a factor needs >= 2")
        if len(set(lv)) != len(lv):
            raise DesignError(f"factor {name!r} declares duplicated levels: {lv}")
    if len(set(genes)) != len(genes):
        dup = pd.Index(genes)[pd.Index(genes).duplicated()].tolist()[:5]
        raise DesignError(f"the study's gene list has duplicated genes, e.g. {dup}")
    study = Study(design=design, levels=levels, genes=[str(g) for g in genes],
                  continuous=continuous)
    _ = study.coef_names  # fail early on a formula formulaic cannot build
    return study


def reduced_study(study: Study, reduced: str) -> Study:
    """The study of an LRT's reduced model: same levels and genes, a nested formula."""
    variables = formula_variables(reduced)
    unknown = [v for v in variables if v not in study.levels and v not in study.continuous]
    if unknown:
        raise DesignError(f"reduced design {reduced!r} uses {unknown}, which the full design "
                          f"{study.design!r} does not; the reduced model must be nested")
    red = Study(design=reduced, levels={k: v for k, v in study.levels.items() if k in variables},
                genes=study.genes, continuous=[c for c in study.continuous if c in variables])
    missing = [c for c in red.coef_names if c not in study.coef_names]
    if missing or red.n_coefs >= study.n_coefs:
        raise DesignError(
            f"reduced design {reduced!r} must be nested in {study.design!r} with fewer "
            f"coefficients (reduced: {red.coef_names}; full: {study.coef_names})")
    return red


def design_matrix(study: Study, obs: pd.DataFrame, site: str = "site") -> np.ndarray:
    """The site's design matrix (samples x coefficients), float64.

    Raises
    ------
    DesignError
        When a design column is missing, a covariate has NaN, or a factor holds a level
        the study did not declare; the message names the site and samples.
    """
    spec, _ = _spec(study.design, _freeze(study.levels), tuple(study.continuous))
    frame = check_covariates(study, obs, site)
    mm = spec.get_model_matrix(frame)
    return np.asarray(mm, dtype=np.float64)


def check_covariates(study: Study, obs: pd.DataFrame, site: str) -> pd.DataFrame:
    """Validate a site's sample metadata against the study and return the typed frame."""
    needed = list(study.levels) + list(study.continuous)
    missing = [c for c in needed if c not in obs.columns]
    if missing:
        raise DesignError(missing_column_message(missing, list(obs.columns), site,
                                                 study.design))
    frame = {}
    for name, lv in study.levels.items():
        col = obs[name]
        na = col.isna().to_numpy()
        if na.any():
            raise DesignError(
                f"site {site!r}: factor {name!r} is missing for sample(s) "
                f"{list(obs.index[na][:5])}; fill it in or drop those samples"
            )
        values = col.astype(str)
        bad = ~values.isin(lv).to_numpy()
        if bad.any():
            found = sorted(set(values[bad]))
            near = {f: d for f in found for d in lv if normalise_level(f) == normalise_level(d)}
            hint = ("; " + ", ".join(f"{f!r} differs from the declared {d!r} only by case or "
                                     "whitespace" for f, d in near.items())
                    + ": recode the samples to the declared spelling") if near else (
                "; declare them in the study's levels or recode the samples")
            raise DesignError(
                f"site {site!r}: factor {name!r} has level(s) {found} "
                f"(sample(s) {list(obs.index[bad][:5])}) that the study does not declare "
                f"(declared: {lv}){hint}"
            )
        frame[name] = pd.Categorical(values, categories=lv)
    for name in study.continuous:
        try:
            values = pd.to_numeric(obs[name]).astype(float)
        except (TypeError, ValueError) as err:
            raise DesignError(
                f"site {site!r}: continuous covariate {name!r} is not numeric ({err}); "
                "declare it as a factor with levels= or fix the values"
            ) from None
        bad = ~np.isfinite(values.to_numpy())
        if bad.any():
            raise DesignError(
                f"site {site!r}: continuous covariate {name!r} is NaN/inf for sample(s) "
                f"{list(obs.index[bad][:5])}; impute or drop those samples"
            )
        frame[name] = values.to_numpy()
    return pd.DataFrame(frame, index=obs.index)



def normalise_level(level: str) -> str:
    """A level's spelling with case and whitespace ignored (to find near-duplicates)."""
    return "".join(str(level).split()).casefold()


def closest_name(name: str, names: list[str]) -> str | None:
    """The name in ``names`` closest to ``name`` (a likely typo), if any is close."""
    import difflib

    by_fold = {n.casefold(): n for n in names}
    if name.casefold() in by_fold:
        return by_fold[name.casefold()]
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return match[0] if match else None


def missing_column_message(missing: list[str], columns: list[str], site: str,
                           design: str) -> str:
    """Error text for design variables a site's metadata lacks: the site, the columns it
    has, and the closest column to each missing one."""
    near = {m: c for m in missing if (c := closest_name(m, columns)) is not None}
    if len(near) == 1 and len(missing) == 1:
        hint = f" Did you mean {next(iter(near.values()))!r}?"
    else:
        hint = "".join(f" Did you mean {c!r} for {m!r}?" for m, c in near.items())
    return (f"site {site!r}: metadata lacks design column(s) {missing} of the design "
            f"{design!r} (has {columns}).{hint} Fix the design or add the column to "
            "metadata.csv / obs")


def level_spellings(values_by_site: dict[str, list[str]], factor: str) -> None:
    """Refuse levels of ``factor`` that differ between sites only by case or whitespace
    (``"a"`` at one site, ``"A"`` at another): they would be coded as different levels."""
    spellings: dict[str, dict[str, list[str]]] = {}
    for site, values in values_by_site.items():
        for v in values:
            spellings.setdefault(normalise_level(v), {}).setdefault(v, []).append(site)
    clashes = {k: v for k, v in spellings.items() if len(v) > 1}
    if clashes:
        desc = "; ".join(", ".join(f"{sp!r} at {sites}" for sp, sites in group.items())
                         for group in clashes.values())
        raise DesignError(
            f"factor {factor!r} is spelled differently across sites, only by case or "
            f"whitespace: {desc}. They would be coded as different levels; recode the "
            "samples to one spelling, or declare the levels (levels=, --levels)")


def design_cells(study: Study) -> list[tuple]:
    """Every combination of declared factor levels (the study's design cells)."""
    return list(itertools.product(*study.levels.values()))


def cell_index(study: Study, obs: pd.DataFrame, site: str = "site") -> np.ndarray:
    """Index in :func:`design_cells` of each sample (factor designs)."""
    cells = {"\x1f".join(c): i for i, c in enumerate(design_cells(study))}
    frame = check_covariates(study, obs, site)[list(study.levels)]
    keys = frame.astype(str).agg("\x1f".join, axis=1)
    return np.array([cells[k] for k in keys], dtype=int)


def cell_design_rows(study: Study, model: Study | None = None) -> np.ndarray:
    """Row of ``model``'s design matrix (default: the study's) for every declared cell of
    ``study`` (cells x coefficients)."""
    return _cell_rows(_design_key(study), _design_key(model or study)).copy()


def _design_key(study: Study) -> tuple:
    """What a design matrix depends on (not the genes): a cache key."""
    return (study.design, tuple((k, tuple(v)) for k, v in study.levels.items()),
            tuple(study.continuous))


@lru_cache(maxsize=64)
def _cell_rows(study_key: tuple, model_key: tuple) -> np.ndarray:
    """:func:`cell_design_rows`, built once per process (every site task of a round asks for
    it, and formulaic takes ~0.1 s)."""
    study, model = (Study(design=k[0], levels={n: list(v) for n, v in k[1]}, genes=[],
                          continuous=list(k[2])) for k in (study_key, model_key))
    obs = pd.DataFrame(design_cells(study), columns=list(study.levels))
    return design_matrix(model, obs, "cells")


def n_distinct_rows(study: Study, present: np.ndarray | None = None) -> int:
    """Distinct rows of the design matrix over the declared cells (``present``: those with
    samples). DESeq2 takes mu from the linear fit when this equals the number of
    coefficients; a declared factor the formula leaves out splits cells, not rows."""
    rows = cell_design_rows(study)
    if present is not None:
        rows = rows[np.asarray(present, dtype=bool)]
    return len(np.unique(np.asarray(rows, dtype=float), axis=0))


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

def _rhs(design: str) -> str:
    design = design.strip()
    if "~" not in design:
        raise DesignError(f"design {design!r} must be a formula such as '~ batch + condition'")
    lhs, rhs = design.split("~", 1)
    if lhs.strip():
        raise DesignError(f"design {design!r} must not have a left-hand side")
    return rhs.strip() or "1"


def _freeze(levels: dict[str, list[str]]) -> tuple:
    return tuple((k, tuple(v)) for k, v in levels.items())


@lru_cache(maxsize=64)
def _spec(design: str, levels: tuple, continuous: tuple) -> tuple:
    """formulaic ModelSpec built from a skeleton holding every declared level (cached)."""
    lv = {k: list(v) for k, v in levels}
    n = max([len(v) for v in lv.values()] + [2])
    skeleton = {k: pd.Categorical([v[i % len(v)] for i in range(n)], categories=v)
                for k, v in lv.items()}
    for c in continuous:
        skeleton[c] = np.arange(n, dtype=float)
    try:
        mm = formulaic.model_matrix(_rhs(design), pd.DataFrame(skeleton))
    except Exception as err:  # formulaic raises many types for a bad formula
        raise DesignError(f"cannot build design {design!r}: {err}") from None
    names = [_deseq2_name(c, lv) for c in mm.columns]
    return mm.model_spec, names


_TERM = re.compile(r"^(?P<f>[^\[]+)\[T\.(?P<l>.+)\]$")


def _deseq2_name(column: str, levels: dict[str, list[str]]) -> str:
    """``condition[T.B]`` -> ``condition_B_vs_A`` (DESeq2's resultsNames style)."""
    parts = column.split(":")
    out = []
    for part in parts:
        m = _TERM.match(part)
        if m and m["f"] in levels:
            out.append((m["f"], m["l"]))
        else:
            out.append((part, None))
    if len(out) == 1:
        f, lvl = out[0]
        return f"{f}_{lvl}_vs_{levels[f][0]}" if lvl is not None else f
    return ".".join(f"{f}{lvl}" if lvl is not None else f for f, lvl in out)


def factor_contrast_levels(study: Study, factor: str, level: str, ref: str,
                           what: str = "contrast") -> list[str]:
    """The levels of ``factor``, once ``factor``, ``level`` and ``ref`` are checked against the
    study (``ValueError`` naming what exists otherwise)."""
    if factor not in study.levels:
        raise ValueError(f"{what} factor {factor!r} is not a factor of the design "
                         f"(factors: {list(study.levels)})")
    levels = study.levels[factor]
    for x in (level, ref):
        if x not in levels:
            raise ValueError(f"{what} level {x!r} is not a level of {factor!r} "
                             f"(levels: {levels})")
    return levels
