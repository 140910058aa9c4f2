"""What leaves a site: only per-gene / per-coefficient sums, never shaped by sample counts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import fed_de
from fed_de.bulk.cooks import K_THRESHOLDS
from fed_de.demo_data import make_demo_study
from fed_de.errors import DisclosureError, MessageSchemaError
from fed_de.federation.messages import Message, check_message, sums

POOLED_OFF = {"min_pooled_cell_size": 10, "min_nonzero": 0}  # the tests' pooled cells: 10+


def _two_sites(n_small: int = 7, n_large: int = 110, n_genes: int = 120):
    study = make_demo_study(n_samples=150, n_genes=n_genes, seed=11)
    pooled = study.pooled()
    obs = pooled.obs
    # a small site with both conditions in batch b1 only, a large one with everything
    small_idx = np.concatenate([
        np.flatnonzero((obs.batch == "b1") & (obs.condition == "A"))[:4],
        np.flatnonzero((obs.batch == "b1") & (obs.condition == "B"))[:n_small - 4]])
    rest = np.setdiff1d(np.arange(pooled.n_obs), small_idx)
    large_idx = np.random.default_rng(0).choice(rest, n_large, replace=False)
    return study, {"small": pooled[np.sort(small_idx)].copy(),
                   "large": pooled[np.sort(large_idx)].copy()}


def _state_arrays(obj, name="state"):
    """Every array in a (nested dataclass) run state."""
    if isinstance(obj, np.ndarray):
        yield name, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _state_arrays(v, f"{name}.{k}")
    elif hasattr(obj, "__dataclass_fields__"):
        for k in obj.__dataclass_fields__:
            yield from _state_arrays(getattr(obj, k), f"{name}.{k}")


def _array_leaves(message: dict):
    for key, value in message.items():
        yield key, np.asarray(value)


def later_dispersion_round(message: dict) -> bool:
    """Dispersion rounds after the first evaluate the points DESeq2's path asks for next; the
    two runs compared can ask for different points once rounding noise moves a decision, so
    their messages are not comparable term by term (the summands' additivity at given points
    is tested in tests/test_kernel_nb.py)."""
    return message["step"] == "disp_sums"


def additive_part(whole: dict, key: str, value) -> np.ndarray:
    """The part of a message that must add up across sites. Ratio size factors leave out
    every gene with a zero count anywhere, so a site sends no log sum for a gene with a zero
    of its own: the log sums add up on the genes with no zero in the pooled data."""
    arr = np.asarray(value, dtype=float)
    if whole["step"] == "log_sums" and key == "sum_log":
        arr = np.where(np.asarray(whole["message"]["n_zero"]) > 0, 0.0, arr)
    return arr


def test_sites_of_7_and_110_samples_send_identical_shapes():
    study, sites = _two_sites()
    res = fed_de.deseq2(sites, study.design, levels=study.levels, genes=study.genes, **POOLED_OFF,
                        record_messages=True, secure_aggregation=False)
    msgs = res.facts["messages"]
    by_site = {name: [m for m in msgs if m["site"] == name] for name in sites}
    small, large = by_site["small"], by_site["large"]
    # one message per local task: the main chain's rounds and the Cook's side chain's
    assert len(small) == len(large) >= res.facts["sequential_steps"] // 2
    for a, b in zip(small, large, strict=True):
        assert a["step"] == b["step"]
        assert set(a["message"]) == set(b["message"])
        for key in a["message"]:
            sa, sb = np.asarray(a["message"][key]).shape, np.asarray(b["message"][key]).shape
            assert sa == sb, (a["step"], key, sa, sb)


def test_no_message_carries_a_per_sample_array():
    study, sites = _two_sites(n_small=9, n_large=110)
    res = fed_de.deseq2(sites, study.design, levels=study.levels, genes=study.genes, **POOLED_OFF,
                        record_messages=True, secure_aggregation=False)
    G, p = len(study.genes), len(res.study.coef_names)
    n_cells = int(np.prod([len(v) for v in study.levels.values()]))
    # study sizes; points per gene; thresholds of the trimmed-mean search; design cells (+1);
    # and the number of refitted genes (the refit sends those genes only)
    allowed = {G, p, p * (p + 1) // 2, 1, 2, 3, 5, 6, 8, n_cells + 1,
               res.state.refit.n_refit}
    for m in res.facts["messages"]:
        n = sites[m["site"]].n_obs
        for key, arr in _array_leaves(m["message"]):
            if m["step"] == "robust_sums":
                # (open search targets, thresholds): targets are (gene, group, boundary)
                # triples the aggregator announced, the same list for every site
                assert arr.shape[1:] == (K_THRESHOLDS,), (m["step"], key, arr.shape)
                continue
            if m["step"].startswith("disp_sums"):
                # (gene, point) pairs the aggregator announced, then packed X'WX entries
                assert arr.shape[1:] in ((), (p * (p + 1) // 2,)), (m["step"], key, arr.shape)
                continue
            assert arr.dtype == np.float64, (m["step"], key)
            for dim in arr.shape:
                # every dimension is a study size (genes, coefficients, points per gene),
                # never the site's sample count
                assert dim in allowed or dim == np.prod(
                    [len(v) for v in study.levels.values()]), (m["step"], key, arr.shape)
                assert dim != n or n in allowed, (m["step"], key, arr.shape)


class _GeneSums(Message):
    s: np.ndarray = sums("G")


def test_a_message_off_schema_is_not_sent():
    dims = {"G": 3, "p": 2}
    check_message(_GeneSums(s=np.zeros(3)), dims, site="a", step="x")
    with pytest.raises(MessageSchemaError, match="not sent"):
        check_message(_GeneSums(s=np.zeros(4)), dims, site="a", step="x")
    with pytest.raises(MessageSchemaError, match="must be a Message"):
        check_message({"s": np.zeros(3), "extra": 1.0}, dims, site="a", step="x")
    with pytest.raises(MessageSchemaError, match="dtype"):
        check_message(_GeneSums(s=np.zeros(3, dtype=np.int64)), dims, site="a", step="x")


def test_small_design_cell_refuses_before_sending():
    study, sites = _two_sites()
    adata = sites["small"]
    # one B sample only in the small site: a cell of size 1
    keep = np.concatenate([np.flatnonzero(adata.obs.condition == "A"),
                           np.flatnonzero(adata.obs.condition == "B")[:1]])
    sites["small"] = adata[keep].copy()
    with pytest.raises(DisclosureError, match=r"site 'small'.*fewer than min_cell_size=3"):
        fed_de.deseq2(sites, study.design, levels=study.levels, genes=study.genes, **POOLED_OFF)
    res = fed_de.deseq2(sites, study.design, levels=study.levels, genes=study.genes,
                        min_cell_size=0)
    assert res.facts["min_cell_size"] == 0
    assert np.isfinite(res.results().log2FoldChange).any()


def test_too_few_samples_for_the_design_refuses():
    study, sites = _two_sites()
    sites["small"] = sites["small"][:3].copy()
    with pytest.raises(DisclosureError, match="coefficients"):
        fed_de.deseq2(sites, study.design, levels=study.levels, genes=study.genes,
                      min_cell_size=0)


def test_size_factors_never_leave_the_site():
    study, sites = _two_sites()
    res = fed_de.deseq2(sites, study.design, levels=study.levels, genes=study.genes, **POOLED_OFF,
                        record_messages=True, secure_aggregation=False)
    for m in res.facts["messages"]:
        if m["step"] == "robust_sums" or m["step"].startswith("disp_sums"):
            continue  # first dimension: search targets / points the aggregator announced
        for _key, arr in _array_leaves(m["message"]):
            assert arr.ndim == 0 or arr.shape[0] != sites[m["site"]].n_obs or \
                arr.shape[0] == len(study.genes)
    # nothing sample-level in the aggregator's final state either: no array has a site's
    # sample count as a dimension
    sizes = {a.n_obs for a in sites.values()} - {len(study.genes)}
    for name, arr in _state_arrays(res.state):
        assert not sizes & set(np.shape(arr)), (name, np.shape(arr))
    assert isinstance(res.results(), pd.DataFrame)


@pytest.mark.parametrize("test", ["Wald", "LRT"])
def test_every_message_is_a_sum_over_samples(test):
    """Additivity: in every round, site A's message + site B's message equals the message of
    A and B merged into one site. A maximum, a quantile or a single sample's value would not
    add up; a per-sample array would not even have a site-independent shape."""
    study, sites = _two_sites(n_small=9, n_large=110)
    kw = dict(levels=study.levels, genes=study.genes, record_messages=True, **POOLED_OFF,
              secure_aggregation=False, min_cell_size=0, test=test,
              reduced="~ batch" if test == "LRT" else None)
    fed = fed_de.deseq2(sites, study.design, **kw)
    merged = fed_de.deseq2({"merged": ad.concat(list(sites.values()))}, study.design, **kw)
    parts = {name: [m for m in fed.facts["messages"] if m["site"] == name] for name in sites}
    whole = merged.facts["messages"]
    assert len(whole) == len(parts["small"]) == len(parts["large"])
    for i, m in enumerate(whole):
        if later_dispersion_round(m):
            continue
        for key, value in m["message"].items():
            summed = sum(np.asarray(parts[n][i]["message"][key]) for n in sites)
            np.testing.assert_allclose(additive_part(m, key, summed),
                                       additive_part(m, key, value), rtol=1e-7, atol=1e-9,
                                       err_msg=f"{m['step']}:{key}")


def _demo_three_sites():
    """The bundled demo's three hospitals: 150 samples, every pooled design cell >= 16."""
    study = make_demo_study(n_samples=150, n_genes=200, seed=0)
    return study, {name: a.copy() for name, a in study.sites.items()}


def test_small_pooled_cell_refuses_after_counts_only():
    """Each site's (b1, B) cell passes the per-site minimum, the pooled cell of 12 does not:
    the run stops after the first round, which carries sample counts and per-gene log sums
    over whole sites, before any sum over a design cell is sent."""
    study, sites = _demo_three_sites()
    cell = {name: np.flatnonzero((a.obs.batch == "b1") & (a.obs.condition == "B"))
            for name, a in sites.items()}
    target = dict.fromkeys(sites, 4)  # 12 pooled, >= 3 at every site
    for name, idx in cell.items():
        assert len(idx) >= target[name]
        drop = idx[target[name]:]
        sites[name] = sites[name][np.setdiff1d(np.arange(sites[name].n_obs), drop)].copy()
    with pytest.raises(DisclosureError,
                       match=r"'condition': 'B', 'batch': 'b1'\} has 12 sample.*"
                             r"min_pooled_cell_size=15"):
        fed_de.deseq2(sites, study.design, levels=study.levels, record_messages=True)
    # 12 is allowed with an explicit, warned lower threshold; below 10 is refused outright
    with pytest.warns(UserWarning, match="min_pooled_cell_size=12"):
        res = fed_de.deseq2(sites, study.design, levels=study.levels, min_pooled_cell_size=12)
    assert res.facts["min_pooled_cell_size"] == 12
    with pytest.raises(ValueError, match="below 10 samples per pooled design cell"):
        fed_de.deseq2(sites, study.design, levels=study.levels, min_pooled_cell_size=9)


def test_gene_with_one_nonzero_count_in_a_pooled_cell_is_withheld():
    """A gene whose (b2, A) cell holds a single non-zero count over all sites: that count is
    what the cell's sums would reveal, so the gene sends zeros in every message after the
    first round and has no result."""
    study, sites = _demo_three_sites()
    g = 7
    first = True
    for a in sites.values():
        in_cell = np.flatnonzero((a.obs.batch == "b2") & (a.obs.condition == "A"))
        X = np.asarray(a.X, dtype=float)
        X[in_cell, g] = 0.0
        if first and len(in_cell):
            X[in_cell[0], g] = 37.0
            first = False
        a.X = X
    res = fed_de.deseq2(sites, study.design, levels=study.levels, record_messages=True,
                        secure_aggregation=False, contrasts=[("condition", "B", "A")],
                        shrink="apeglm", pca=True)
    withheld = np.asarray(res.state.genes.withheld)
    assert withheld[g] and res.facts["genes_withheld"] == int(withheld.sum())
    n_genes = len(withheld)
    table = res.results()
    assert table.iloc[g].isna().all()
    assert res.lfc_shrink(("condition", "B", "A")).iloc[g].isna().all()
    assert table.index[g] not in set(res.pca["genes"])
    assert len(res.pca["genes"]) == n_genes - withheld.sum()
    assert table.drop(index=table.index[withheld]).pvalue.notna().all()
    after_first = [m for m in res.facts["messages"] if m["step"] not in ("log_sums",)
                   and "key" not in m["step"]]
    assert len(after_first) > 20
    for m in after_first:
        for key, arr in _array_leaves(m["message"]):
            if arr.ndim and arr.shape[0] == n_genes:
                assert not np.any(arr[withheld]), (m["step"], key)


def test_defaults_equal_deseq2_on_the_pooled_genes_not_withheld():
    """Under every default rule the federated answer is the one-site answer on the pooled
    data without the withheld genes (they take no part: not in the trend, the priors,
    independent filtering or BH), Cook's outliers filtered as the federated run does."""
    study, sites = _demo_three_sites()
    kw = dict(levels=study.levels, contrasts=[("condition", "B", "A")], shrink="apeglm")
    fed = fed_de.deseq2(sites, study.design, **kw)
    withheld = np.asarray(fed.state.genes.withheld)
    assert withheld.any()  # the demo has genes with a single non-zero count in a cell
    kept = [g for g, w in zip(study.genes, withheld, strict=True) if not w]
    pooled = fed_de.deseq2(
        {"pooled": study.pooled()[:, kept].copy()}, study.design, genes=kept,
        min_replicates_for_replace=fed.facts["options"]["min_replicates_for_replace"], **kw)
    ours, ref = fed.results().loc[kept], pooled.results()
    for col in ref.columns:
        np.testing.assert_allclose(ours[col], ref[col], rtol=1e-9, atol=1e-12, err_msg=col)
    np.testing.assert_allclose(fed.lfc_shrink().loc[kept, "log2FoldChange"],
                               pooled.lfc_shrink()["log2FoldChange"], rtol=1e-8, atol=1e-10)
    assert fed.results()[withheld].isna().all().all()
