"""Independent filtering (fed_de.core.testing) against R DESeq2 1.38.3 on two real studies.

R's own ``baseMean`` and p-values (pasilla 7 x 14,599, marioni 10 x 5,088; Wald, and for
marioni also the LRT) go through DESeq2's ``pvalueAdjustment`` (``make_refs.R`` in
``data/r_extra/trendfilt/``) and through :func:`fed_de.core.testing.independent_filtering`.
R's metadata (``filterThreshold`` and its name, ``filterTheta``, ``filterNumRej``,
``lo.fit``) and padj must agree: padj's NA pattern on every gene, its values on 500 sampled
genes. Measured: identical thresholds, rejection counts and NA patterns; padj and lo.fit within
rounding (see the tolerances).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fed_de.core.testing import adjust_pvalues, independent_filtering

REF = Path(__file__).parent / "data" / "r_extra" / "trendfilt"
CASES = [("pasilla", "pvalue", 0.05), ("pasilla", "pvalue", 0.1), ("marioni", "pvalue", 0.05),
         ("marioni", "pvalue", 0.1), ("marioni", "pvalue_lrt", 0.05)]


def _case_name(column: str, alpha: float) -> str:
    return f"{column}_{alpha:g}"


@pytest.fixture(scope="module")
def meta() -> pd.DataFrame:
    return pd.read_csv(REF / "indfilt_meta.csv.gz", float_precision="round_trip")


@pytest.fixture(scope="module")
def curves() -> pd.DataFrame:
    return pd.read_csv(REF / "indfilt_curves.csv.gz", float_precision="round_trip")


@pytest.mark.parametrize(("study", "column", "alpha"), CASES)
def test_independent_filtering_matches_r_on_real_study(study, column, alpha, meta, curves):
    genes = pd.read_csv(REF / f"{study}_genes.csv.gz", float_precision="round_trip")
    name = _case_name(column, alpha)
    ref = meta[(meta.study == study) & (meta.case == name)].iloc[0]
    curve = curves[(curves.study == study) & (curves.case == name)]
    padj, info = independent_filtering(genes["baseMean"].to_numpy(), genes[column].to_numpy(),
                                       alpha=alpha)
    # the chosen cutoff, exactly
    assert info["filterThreshold"] == ref["filterThreshold"]
    assert info["filterTheta"] == ref["filterTheta"]
    assert info["filterThresholdName"] == ref["quantileName"]
    # the filterNumRej table and lo.fit
    np.testing.assert_array_equal(info["theta"], curve["theta"].to_numpy())
    np.testing.assert_array_equal(info["numRej"], curve["numRej"].to_numpy())
    np.testing.assert_allclose(info["loFitY"], curve["loFitY"].to_numpy(), rtol=1e-12)
    # padj: the same genes filtered, the same values
    r_na = genes[f"padjNA_{name}"].to_numpy() == 1
    np.testing.assert_array_equal(np.isnan(padj), r_na)
    kept = genes[f"padj_{name}"].notna().to_numpy()
    assert kept.sum() > 250
    np.testing.assert_allclose(padj[kept], genes[f"padj_{name}"][kept], rtol=1e-13, atol=0)
    # genes filtered by the cutoff (finite p-value, padj NA) exist: the filter is active
    assert np.count_nonzero(r_na & genes[column].notna().to_numpy()) > 100
    # adjust_pvalues (what results() calls) gives the same
    padj2, info2 = adjust_pvalues(genes["baseMean"].to_numpy(), genes[column].to_numpy(), alpha)
    np.testing.assert_array_equal(padj2, padj)
    assert info2["filterThreshold"] == info["filterThreshold"]
