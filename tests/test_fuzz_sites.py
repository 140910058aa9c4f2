"""Fuzzed sites (issue 14, item 5): whatever a site's files hold, loading and validating it
gives a correct site or a :class:`~fed_de.errors.FedDEError` naming the site, never another
exception (a traceback)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fed_de
from fed_de.api import declare_study, load_sites
from fed_de.demo_data import make_demo_study
from fed_de.errors import FedDEError
from fed_de.validation import MAX_COUNT, validate_site

SITE = "fuzz_site"
FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0,
                max_size=6)
counts = st.one_of(st.integers(0, 2**64), st.integers(-3, 3),
                   st.floats(allow_nan=True, allow_infinity=True))


def load_and_validate(source, levels=None) -> fed_de.site.SiteData:
    """What fed_de does with a site before any round: load, declare, validate."""
    (site,) = load_sites({SITE: source})
    study = declare_study([site], "~ condition", levels or {"condition": ["A", "B"]})
    validate_site(study, site, min_cell_size=0, n_sites=1)
    return site


def outcome(source, levels=None):
    """The loaded site, or the FedDEError (which must name the site)."""
    try:
        return load_and_validate(source, levels)
    except FedDEError as err:
        assert SITE in str(err), str(err)
        return err


@st.composite
def tables(draw):
    """A counts table (samples x genes) and its metadata, with fuzzed names and values."""
    n = draw(st.integers(0, 5))
    g = draw(st.integers(0, 4))
    samples = draw(st.lists(names, min_size=n, max_size=n))
    genes = draw(st.lists(names, min_size=g, max_size=g))
    values = draw(st.lists(st.lists(counts, min_size=g, max_size=g), min_size=n, max_size=n))
    cond = draw(st.lists(st.sampled_from(["A", "B", " A", "a", ""]), min_size=n, max_size=n))
    frame = pd.DataFrame(values, index=samples, columns=genes, dtype=object)
    meta = pd.DataFrame({"condition": cond}, index=samples)
    return frame, meta


@FAST
@given(tables(), st.sampled_from(["csv", "tsv"]))
def test_fuzzed_tables_load_or_are_refused_clearly(table, fmt):
    frame, meta = table
    with tempfile.TemporaryDirectory() as tmp:
        sep = "," if fmt == "csv" else "\t"
        frame.to_csv(Path(tmp) / f"counts.{fmt}", sep=sep)
        meta.to_csv(Path(tmp) / f"metadata.{fmt}", sep=sep)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = outcome(Path(tmp))
    if not isinstance(got, FedDEError):  # accepted: exactly the counts written
        assert got.counts.shape == (len(got.samples), len(got.genes))
        assert np.all(np.isfinite(got.counts)) and np.all(np.asarray(got.counts) >= 0)
        assert np.all(np.asarray(got.counts) <= MAX_COUNT)


@FAST
@given(st.one_of(st.binary(max_size=60), st.text(max_size=60)), st.sampled_from(
    ["", "sample,g1\n", "\ufeffsample,g1\ns1,3\n", "sample\ts1\n", "# comment only\n"]))
def test_fuzzed_file_bytes_never_crash_the_loader(body, metadata):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "counts.csv"
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
        (Path(tmp) / "metadata.csv").write_text(metadata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome(Path(tmp))


@pytest.mark.parametrize("body, message", [
    ("", "cannot read"), ("sample,g1,g2\n", "none of the 0 row ids"),
    ("sample,g1,g1\ns1,1,2\ns2,3,4\ns3,0,1\ns4,5,5\n", "duplicated column name"),
])
def test_empty_header_only_and_duplicated_genes_are_named(tmp_path, body, message):
    (tmp_path / "counts.csv").write_text(body)
    (tmp_path / "metadata.csv").write_text("sample,condition\ns1,A\ns2,B\ns3,A\ns4,B\n")
    with pytest.raises(FedDEError, match=message) as info:
        load_and_validate(tmp_path)
    assert SITE in str(info.value)


def _adata(X, n=4, g=3, obs=True):
    frame = pd.DataFrame({"condition": ["A", "B"] * (n // 2)},
                         index=[f"s {i} é" for i in range(n)]) if obs else None
    return ad.AnnData(X, obs=frame, var=pd.DataFrame(index=[f"gène\t{j}" for j in range(g)]))


@FAST
@given(st.integers(0, 2**63 - 1), st.sampled_from([np.int32, np.int64, np.uint64,
                                                   np.float64]))
def test_counts_above_2_31_and_sums_past_int64_are_exact_or_refused(big, dtype):
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None and big > info.max:
        big = int(info.max)
    X = np.array([[big, 1, 0], [big, 2, 5], [3, 0, 1], [big, 7, 2]], dtype=dtype)
    got = outcome(_adata(X))
    if big > MAX_COUNT:  # float64 holds integers exactly up to 2**53: refused, not rounded
        assert isinstance(got, FedDEError) and "2**53" in str(got)
    else:
        assert not isinstance(got, FedDEError), got
        np.testing.assert_array_equal(got.counts, X.astype(np.float64))
        total = float(np.asarray(got.counts).sum(axis=0)[0])  # 3 big + 3: no int wrap-around
        assert total == pytest.approx(3 * big + 3, rel=1e-15, abs=0)


def test_sparse_counts_with_explicit_zeros_give_the_dense_answer():
    demo = make_demo_study(n_samples=150, n_genes=40, seed=5)
    sparse_sites = {}
    for name, adata in demo.sites.items():
        X = sp.csr_matrix(np.asarray(adata.X))
        rows, cols = np.nonzero(np.asarray(adata.X) == 0)
        X = sp.csr_matrix((np.append(X.data, np.zeros(rows.size)),
                           (np.append(X.nonzero()[0], rows), np.append(X.nonzero()[1], cols))),
                          shape=X.shape)
        X.sum_duplicates()
        assert X.nnz == X.shape[0] * X.shape[1]  # every zero stored explicitly
        sparse_sites[name] = ad.AnnData(X, obs=adata.obs, var=adata.var)
    kw = dict(levels=demo.levels, genes=demo.genes, contrasts=[("condition", "B", "A")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = fed_de.deseq2(demo.sites, demo.design, **kw).results()
        sparse = fed_de.deseq2(sparse_sites, demo.design, **kw).results()
    pd.testing.assert_frame_equal(dense, sparse)


def test_h5ad_with_a_missing_obs_column_and_a_folder_of_two_h5ad(tmp_path):
    adata = _adata(np.ones((4, 3)))
    del adata.obs["condition"]
    adata.write_h5ad(tmp_path / "site.h5ad")
    got = outcome(tmp_path / "site.h5ad")
    assert isinstance(got, FedDEError) and "condition" in str(got)
    _adata(np.ones((4, 3))).write_h5ad(tmp_path / "other.h5ad")
    got = outcome(tmp_path)
    assert isinstance(got, FedDEError) and "other.h5ad" in str(got) and "keep one" in str(got)
    got = outcome(_adata(np.array([[1, 2, 3]] * 4), obs=False))
    assert isinstance(got, FedDEError)
