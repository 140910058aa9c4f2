"""What keeps a run's memory bounded gives the numbers of the unbounded computation: the
dispersion sums' distinct-count tables built a window of genes at a time, and the
simulation's messages handed to their one reader rather than held as pickles; and what an
analysis imports (scipy.stats alone costs ~0.4 s of CPU in every process)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fed_de.backends.simulation import _Held, _read_blob
from fed_de.bulk import cooks
from fed_de.bulk.state import RobustSearch
from fed_de.core import nb
from tests.test_kernel_nb import ll_part, simulate


def _pairs(G: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """1 to 4 points per gene, gene after gene (as the aggregator asks for them)."""
    rng = np.random.default_rng(seed)
    genes = np.repeat(np.arange(G), rng.integers(1, 5, G))
    return genes, rng.uniform(-4.0, 1.0, genes.size)


@pytest.mark.parametrize("ordered", [True, False])
def test_distinct_windows_give_the_numbers_of_one_table(monkeypatch, ordered):
    """Windows of 4 genes (pairs in gene order) or one table (pairs in any order): the same
    numbers as one table of every gene, and never a table of every gene in gene order."""
    y, X, sf, beta, alpha = simulate(11, n=40, G=30)
    y[::2, 5] = y[0, 5]  # ties
    mu = nb.fitted_mu(X, beta, sf, 0.5)
    genes, points = _pairs(30, 11)
    if not ordered:
        perm = np.random.default_rng(3).permutation(genes.size)
        genes, points = genes[perm], points[perm]
    monkeypatch.setattr(nb, "DISTINCT_MAX", 1.01)  # always tabulate
    whole = nb.disp_summands_at(y, mu, X, genes, points, block=40 * 4)
    widths = []
    distinct = nb._distinct
    monkeypatch.setattr(nb, "_distinct", lambda v: widths.append(v.shape[1]) or distinct(v))
    monkeypatch.setattr(nb, "GENE_CHUNK", 4)
    got = nb.disp_summands_at(y, mu, X, genes, points, block=40 * 4)
    for key, value in whole.items():
        np.testing.assert_array_equal(got[key], value)
    assert max(widths) == (4 if ordered else 30)  # a window of 4 genes, or every gene
    i = int(np.flatnonzero(genes == 5)[0])
    np.testing.assert_allclose(got["ll"][i], ll_part(y[:, 5], mu[:, 5], points[i]), rtol=1e-11)


def test_a_held_message_counts_the_bytes_of_its_pickle():
    """The size a site's message is booked at is its pickle's, byte for byte; a second
    reader gets an equal copy, not the object."""
    rng = np.random.default_rng(0)
    msg = {"_secagg": {"site": "a", "counts": {"n": (3,)}},
           "ll": rng.integers(0, 2**63, (2, 5000), dtype=np.uint64),
           "A": np.asfortranarray(rng.normal(size=(300, 6))), "tag": "x" * 70_000}
    held = _Held.of(msg, "task")
    assert held.n_bytes == len(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
    copy = _read_blob(held)
    assert copy is not msg and copy["ll"] is not msg["ll"]
    np.testing.assert_array_equal(copy["ll"], msg["ll"])
    with pytest.raises(TypeError, match="not picklable"):
        _Held.of({"f": lambda: 0}, "task")


def test_cooks_group_values_are_the_rows_of_the_whole_table():
    """Phase B's squared errors built for one group's members equal those rows of the
    table over every sample (the former construction)."""
    rng = np.random.default_rng(5)
    norm = rng.gamma(2.0, 50.0, (12, 7))
    groups = np.arange(12) % 3
    means = rng.gamma(2.0, 50.0, (7, 2))
    means[3, 1] = np.nan
    robust = RobustSearch(groups_active=np.ones(3, dtype=bool), ranks=np.zeros((3, 2)),
                          sizes=np.array([4, 4, 12]), n_cells=2, scales=np.ones(2), phase="B",
                          search=None, cell_means=means)
    for g in range(3):
        members = groups == g if g < 2 else np.ones(12, dtype=bool)
        expect = (norm - np.nan_to_num(means)[:, g][None, :]) ** 2 if g < 2 else norm
        np.testing.assert_array_equal(cooks._robust_values(norm, robust, g, members),
                                      expect[members])


def test_the_dispersion_search_in_gene_blocks_gives_the_numbers_of_one_block(monkeypatch):
    """The aggregator's dispersion search run on blocks of 37 genes (the tables of evaluated
    points then the size of a block) ends where one search over every gene does: the same
    gene-wise, trend, MAP and final dispersions, the same request sizes, bit for bit."""
    import fed_de
    from fed_de.bulk import dispersions
    from fed_de.demo_data import make_demo_study

    study = make_demo_study(n_samples=60, n_genes=300, seed=3)

    def run(block: int):
        monkeypatch.setattr(dispersions, "SEARCH_BLOCK", block)
        return fed_de.deseq2(study.sites, study.design, levels=study.levels,
                             min_cell_size=0)

    whole, blocks = run(10**6), run(37)
    for part in ("genewise", "trend", "MAP", "final"):
        np.testing.assert_array_equal(blocks.dispersions[part], whole.dispersions[part])
    np.testing.assert_array_equal(blocks.coefficients, whole.coefficients)
    assert blocks.facts["sequential_steps"] == whole.facts["sequential_steps"]
    assert blocks.facts["bytes_by_step"] == whole.facts["bytes_by_step"]


def test_the_cox_reid_term_in_chunks_is_the_term_of_every_matrix_at_once(monkeypatch):
    """Chunks of 7 matrices give the numbers of one batch, singular matrices included."""
    rng = np.random.default_rng(2)
    p = 3
    Z = rng.normal(size=(40, 5, 6, p))
    M = np.einsum("...ij,...ik->...jk", Z, Z)
    M[3, 2] = 0.0  # not positive definite: NaN
    iu = np.triu_indices(p)
    A = M[..., iu[0], iu[1]]
    A1, A2 = A * rng.normal(size=A.shape), A * rng.normal(size=A.shape)
    whole = nb._cox_reid(A, A1, A2, p)
    monkeypatch.setattr(nb, "CR_CHUNK", 7)
    got = nb.cox_reid(A, A1, A2, p)
    assert np.isnan(whole[0][3, 2])
    for g, w in zip(got, whole, strict=True):
        assert g.shape == (40, 5)
        np.testing.assert_array_equal(g, w)


def test_an_analysis_does_not_import_scipy_stats():
    """scipy.stats costs ~0.4 s of CPU to import, in every process that runs an analysis (a
    site's task too); the p-values and the Cook's cutoff need two scipy.special functions.
    A fresh interpreter runs a small federated analysis and lists what it imported."""
    import subprocess
    import sys

    code = ("import sys, warnings; warnings.simplefilter('ignore'); import fed_de; "
            "from fed_de.demo_data import make_demo_study; "
            "s = make_demo_study(n_samples=150, n_genes=60, seed=4); "
            "r = fed_de.deseq2(s.sites, s.design, levels=s.levels, test='LRT', "
            "reduced='~ batch'); r.results(); "
            "print(sorted(m for m in sys.modules if m.startswith('scipy.stats')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
