"""Every site builds identical design columns from the declared study."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fed_de.design import design_matrix, make_study
from fed_de.errors import DesignError


def _study():
    return make_study("~ batch + condition + age", ["g1", "g2"],
                      {"batch": ["b1", "b2", "b3"], "condition": ["A", "B"]})


def test_coefficient_names_follow_deseq2():
    assert _study().coef_names == ["Intercept", "batch_b2_vs_b1", "batch_b3_vs_b1",
                                   "condition_B_vs_A", "age"]


def test_site_lacking_a_level_builds_identical_columns():
    study = _study()
    full = pd.DataFrame({"batch": ["b1", "b2", "b3", "b1"], "condition": ["A", "B", "A", "B"],
                         "age": [30, 40, 50, 60]}, index=list("abcd"))
    lacking = full.iloc[[0, 1, 3]]  # no b3 here
    X_full = design_matrix(study, full, "full")
    X_lack = design_matrix(study, lacking, "lacking")
    assert X_full.shape[1] == X_lack.shape[1] == 5
    np.testing.assert_array_equal(X_lack, X_full[[0, 1, 3]])
    assert (X_lack[:, 2] == 0).all()


def test_reference_level_is_the_declared_first():
    study = make_study("~ condition", ["g"], {"condition": ["B", "A"]})
    assert study.coef_names == ["Intercept", "condition_A_vs_B"]
    X = design_matrix(study, pd.DataFrame({"condition": ["A", "B"]}, index=["s1", "s2"]))
    np.testing.assert_array_equal(X, [[1, 1], [1, 0]])


def test_undeclared_level_is_an_error_naming_site_and_sample():
    study = _study()
    obs = pd.DataFrame({"batch": ["b1", "b9"], "condition": ["A", "B"], "age": [1, 2]},
                       index=["s1", "s2"])
    with pytest.raises(DesignError, match=r"site 'hosp'.*'b9'.*s2"):
        design_matrix(study, obs, "hosp")


def test_missing_column_and_nan_covariate_are_errors():
    study = _study()
    obs = pd.DataFrame({"batch": ["b1"], "condition": ["A"]}, index=["s1"])
    with pytest.raises(DesignError, match="lacks design column"):
        design_matrix(study, obs, "h")
    obs = pd.DataFrame({"batch": ["b1", "b2"], "condition": ["A", "B"], "age": [1, np.nan]},
                       index=["s1", "s2"])
    with pytest.raises(DesignError, match=r"'age'.*s2"):
        design_matrix(study, obs, "h")


def test_interaction_names():
    study = make_study("~ condition * batch", ["g"], {"batch": ["b1", "b2"],
                                                      "condition": ["A", "B"]})
    assert study.coef_names == ["Intercept", "condition_B_vs_A", "batch_b2_vs_b1",
                                "conditionB.batchb2"]
