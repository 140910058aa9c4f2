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


def _irls_reference(y, X, sf, beta, alpha, block, min_mu=0.5):
    """``irls_summands``' numbers from array expressions, element by element in the compiled
    passes' order of operations, the deviance summed over samples in sample order; its
    mean-free parts are sums over the caller's ``block`` (their order follows its layout)."""
    raw = np.exp(X @ beta.T) * sf[:, None]
    mu = np.where((raw >= min_mu) | np.isnan(raw), raw, min_mu)
    denom = alpha * mu + 1.0
    w = mu / denom
    v = np.where(raw > min_mu, ((alpha * y + 1.0) * w) / denom, w)
    r = 1.0 / alpha
    z = (np.log(mu / sf[:, None]) + (y - mu) / mu) * w
    terms = (np.log(mu) - np.log(mu + r)) * y - np.log1p(mu / r) * r
    logp = terms[0].copy()
    for row in terms[1:]:
        logp += row
    dev = -2.0 * (logp + nb.nb_lgamma_ratio(block, alpha) - gammaln(block + 1.0).sum(axis=0))
    return {"xtwx": nb.gram(X, w), "xtwz": np.ascontiguousarray(z).T @ X, "deviance": dev,
            "xtwx_obs": nb.gram(X, v)}


@pytest.mark.parametrize("layout", ["C", "F", "int"])
def test_irls_summands_reusing_one_work_equal_the_array_expressions(layout):
    # IrlsWork lends its temporaries and a C-ordered copy of the counts to every candidate of
    # a block; a site's columns taken by index are F-ordered, counts may be integers
    y, X, sf, cands, alpha = simulate(4)
    block = {"C": y, "F": np.asfortranarray(y), "int": y.astype(np.int64)}[layout]
    work = nb.IrlsWork(block)
    for k in range(cands.shape[1]):
        got = nb.irls_summands(block, X, sf, cands[:, k], alpha, 0.5, None, None, work)
        ref = _irls_reference(y, X, sf, cands[:, k], alpha, block)
        for key, value in ref.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{key}, candidate {k}")


def test_site_lgamma_ratio_is_each_blocks_value_and_follows_the_counts(monkeypatch):
    from fed_de.bulk.state import DESeq2Options, Site, SiteState
    from fed_de.design import make_study
    from fed_de.site import site_from_anndata

    monkeypatch.setattr(nb, "GENE_CHUNK", 7)
    s = make_demo_study(n_samples=30, n_genes=40, seed=3, n_sites=2)
    data = site_from_anndata(s.sites["hospital_01"], "hospital_01")
    site = Site(data=data, kept=SiteState(), study=make_study(s.design, list(data.genes),
                                                                s.levels),
                options=DESeq2Options())
    alpha = np.random.default_rng(5).uniform(0.01, 2.0, 40)
    got = site.lgamma_ratio(alpha)
    assert site.lgamma_ratio(alpha.copy()) is got  # the same dispersions: kept
    genes = np.array([1, 2, 3, 8, 9, 17, 18, 30, 31, 39])  # an IRLS round's unstopped genes
    for sl in nb.gene_blocks(genes.size):  # the value of every block of the fit's genes
        g = genes[sl]
        np.testing.assert_array_equal(got[g], nb.nb_lgamma_ratio(site.counts()[:, g], alpha[g]))
    other = site.lgamma_ratio(alpha * 2.0)  # the next fit's dispersions: recomputed
    np.testing.assert_array_equal(other, nb.nb_lgamma_ratio(site.counts()[:, np.arange(40)],
                                                            alpha * 2.0))
    site.replace_counts(site.counts() + 1.0)  # Cook's replacements: the caches follow
    np.testing.assert_array_equal(site.lgamma_ratio(alpha * 2.0), nb.nb_lgamma_ratio(
        site.counts()[:, np.arange(40)], alpha * 2.0))
    np.testing.assert_array_equal(site.lgamma_y1(), gammaln(site.counts() + 1.0).sum(axis=0))
