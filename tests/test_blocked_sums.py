"""Site sums computed in blocks of genes (bounded memory) are bit-identical to the same sums
over all genes at once: the IRLS candidates' sums, the closing round's X'WX, and the LRT's
deviances; and a whole run with tiny blocks gives the same results as with the default."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.special import gammaln

import fed_de
from fed_de.core import lrt, nb
from fed_de.demo_data import make_demo_study


def simulate(seed: int, n: int = 23, G: int = 41, K: int = 3):
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.integers(0, 2, n), rng.normal(size=n)])
    sf = rng.uniform(0.5, 2.0, n)
    y = rng.negative_binomial(2, 0.05, size=(n, G)).astype(float)
    y[:, 3] = 0.0  # an all-zero gene: means below the floor
    cands = rng.normal(0.0, 0.5, size=(G, K, 3))
    cands[:, :, 0] += 3.0
    cands[5, :, 0] = -4.0
    alpha = rng.uniform(0.01, 1.0, G)
    return y, X, sf, cands, alpha


@pytest.mark.parametrize("G, chunk", [(1, 5), (11, 5), (10, 3), (7, 7), (8, 7)])
def test_gene_blocks_cover_every_gene_once_with_no_lone_tail(G, chunk):
    blocks = nb.gene_blocks(G, chunk)
    covered = np.concatenate([np.arange(G)[b] for b in blocks])
    np.testing.assert_array_equal(covered, np.arange(G))
    sizes = [b.stop - b.start for b in blocks]
    assert max(sizes) <= chunk + 1
    assert min(sizes) > 1 or G == 1


@pytest.mark.parametrize("chunk", [4, 5, 1000])
def test_irls_candidate_sums_equal_the_unblocked_sums(monkeypatch, chunk):
    monkeypatch.setattr(nb, "GENE_CHUNK", chunk)
    y, X, sf, cands, alpha = simulate(0)
    genes = np.array([0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 20, 21, 22, 30, 31, 40])
    lgy1 = gammaln(y + 1.0).sum(axis=0)
    got = nb.irls_candidate_sums(y, genes, X, sf, cands[genes], alpha[genes], 0.5, lgy1[genes])
    for k in range(cands.shape[1]):
        ref = nb.irls_summands(y[:, genes], X, sf, cands[genes, k], alpha[genes], 0.5,
                               lgy1[genes])
        for key, value in ref.items():
            np.testing.assert_array_equal(got[key][:, k], value, err_msg=key)


@pytest.mark.parametrize("chunk", [4, 1000])
def test_fisher_gram_equals_gram_at_the_floored_means(monkeypatch, chunk):
    monkeypatch.setattr(nb, "GENE_CHUNK", chunk)
    y, X, sf, cands, alpha = simulate(1)
    beta = cands[:, 0]
    mu = nb.fitted_mu(X, beta, sf, 0.5)
    np.testing.assert_array_equal(nb.fisher_gram(X, beta, sf, alpha, 0.5),
                                  nb.gram(X, mu / (1.0 + alpha * mu)))


@pytest.mark.parametrize("chunk", [4, 1000])
def test_lrt_deviances_blocked_and_reduced_only_when_asked(monkeypatch, chunk):
    monkeypatch.setattr(nb, "GENE_CHUNK", chunk)
    y, X, sf, cands, alpha = simulate(2)
    beta, beta_r = cands[:, 0], cands[:, 1, :1]
    Xr = X[:, :1]
    with np.errstate(over="ignore"):
        mu, mu_r = sf[:, None] * np.exp(X @ beta.T), sf[:, None] * np.exp(Xr @ beta_r.T)
    both = lrt.lrt_site_deviances(y, sf, X, beta, Xr, beta_r, alpha)
    np.testing.assert_array_equal(both["deviance"], -2.0 * lrt.nb_log_likelihood(y, mu, alpha))
    np.testing.assert_array_equal(both["deviance_r"],
                                  -2.0 * lrt.nb_log_likelihood(y, mu_r, alpha))
    full = lrt.lrt_site_deviances(y, sf, X, beta, None, None, alpha)
    assert list(full) == ["deviance"]
    np.testing.assert_array_equal(full["deviance"], both["deviance"])


def _run(test: str):
    study = make_demo_study(n_samples=150, n_genes=150, seed=3)
    kw = {"test": "LRT", "reduced": "~ batch"} if test == "LRT" else {}
    res = fed_de.deseq2(study.sites, study.design, levels=study.levels, **kw)
    return res.results(("condition", "B", "A")).to_numpy(dtype=float)


@pytest.mark.parametrize("test", ["Wald", "LRT"])
def test_a_run_with_tiny_gene_blocks_gives_the_same_results(monkeypatch, test):
    default = _run(test)
    blocks = nb.gene_blocks
    # 150 genes: 21 blocks, a tail of 3 (the IRLS, closing and LRT sums; the dispersion
    # summands keep their own blocks)
    monkeypatch.setattr(nb, "gene_blocks", lambda G, chunk=None: blocks(G, 7))
    np.testing.assert_array_equal(_run(test), default)


@pytest.mark.parametrize("replace", [None, 7])
def test_cooks_counts_with_tiny_gene_blocks_give_the_same_run(monkeypatch, replace):
    from tests.conftest import DATA, split_sites

    cdir = DATA / "r_extra" / "cooks"
    counts = pd.read_csv(cdir / "counts.csv", index_col=0)
    meta = pd.read_csv(cdir / "metadata.csv", index_col=0)
    kw = {} if replace is None else {"min_replicates_for_replace": replace}

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fed_de.deseq2(split_sites(counts, meta, 3, seed=2), "~ batch + condition",
                                min_cell_size=0, **kw)
        return res.results().to_numpy(dtype=float), res.state.genes.cooks_outlier

    table, outliers = run()
    assert outliers is not None and outliers.any()  # the injected outliers are found
    blocks = nb.gene_blocks
    monkeypatch.setattr(nb, "gene_blocks", lambda G, chunk=None: blocks(G, 5))
    table_b, outliers_b = run()
    np.testing.assert_array_equal(table_b, table)
    np.testing.assert_array_equal(outliers_b, outliers)
