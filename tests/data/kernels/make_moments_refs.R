# Reference for tests/test_kernel_moments.py: DESeq2's starting values on a small data set.
# DESeq2 1.38.3 internals: getBaseMeansAndVariances, momentsDispEstimate, roughDispEstimate,
# linearModelMu, and fitNbinomGLMs' IRLS start (QR solve of log(normalised counts + 0.1)).
# Design ~ batch + condition (4 cells of 3 samples, p = 3), reduced ~ batch.
# Run from the repository root: Rscript tests/data/kernels/make_moments_refs.R
suppressPackageStartupMessages(library(DESeq2))
out_dir <- "tests/data/kernels/moments"
dir.create(out_dir, showWarnings = FALSE)
set.seed(20240611)
n <- 12
G <- 30
cd <- data.frame(batch = factor(rep(c("b1", "b2"), each = 6)),
                 condition = factor(rep(c("A", "B"), times = 6)),
                 row.names = paste0("s", seq_len(n)))
sf_true <- exp(rnorm(n, 0, 0.3))
base <- exp(runif(G, 0, 7))
lfc <- rnorm(G, 0, 1)
disp <- exp(runif(G, -4, 0))
mu <- outer(base, sf_true) * exp(outer(lfc, as.numeric(cd$condition == "B")))
counts <- matrix(rnbinom(n * G, mu = mu, size = 1 / disp), nrow = G,
                 dimnames = list(paste0("g", seq_len(G)), rownames(cd)))
counts[3, 1:4] <- 0L  # sparse genes: linear-fit means below 1 and 0.1
counts[4, ] <- c(0L, 0L, 1L, 0L, 0L, 0L, 0L, 2L, 0L, 0L, 0L, 0L)
dds <- DESeqDataSetFromMatrix(counts, cd, ~ batch + condition)
dds <- estimateSizeFactors(dds, type = "poscounts")
dds <- DESeq2:::getBaseMeansAndVariances(dds)
norm <- counts(dds, normalized = TRUE)
X <- model.matrix(~ batch + condition, cd)
Xr <- model.matrix(~ batch, cd)
rough <- DESeq2:::roughDispEstimate(y = norm, x = X)
moments <- DESeq2:::momentsDispEstimate(dds)
max_disp <- max(10, n)
alpha_hat <- pmin(pmax(1e-8, pmin(rough, moments)), max_disp)
qr_start <- function(x) {
  q <- qr(x)
  t(solve(qr.R(q), t(qr.Q(q)) %*% t(log(norm + 0.1))))
}
b <- qr_start(X)
br <- qr_start(Xr)
colnames(b) <- paste0("beta_init_", 0:2)
colnames(br) <- paste0("beta_init_reduced_", 0:1)
lin <- DESeq2:::linearModelMu(norm, X)
write.csv(t(counts), file.path(out_dir, "counts.csv"))
write.csv(data.frame(cd, size_factor = sizeFactors(dds)), file.path(out_dir, "metadata.csv"))
write.csv(data.frame(base_mean = mcols(dds)$baseMean, base_var = mcols(dds)$baseVar,
                     moments_disp = moments, rough_disp = rough, alpha_hat = alpha_hat, b, br,
                     row.names = rownames(dds)),
          file.path(out_dir, "r_starts.csv"))
write.csv(t(lin), file.path(out_dir, "linear_mu.csv"))
