# Reference for tests/test_kernel_irls.py: genes whose DESeq2 IRLS (fitBeta) does not finish.
# DESeq2 1.38.3, fixed size factors and dispersions, design ~ condition (3 levels, 8 samples).
# For these genes fitBeta's first iterate leaves |beta| <= 30 (betaIter = maxit = 100), so
# DESeq2 refits them with optim (fitNbinomGLMsOptim): the coefficients below are optim's.
# Run from the repository root: Rscript tests/data/kernels/make_irls_unfinished.R
suppressPackageStartupMessages(library(DESeq2))
out_dir <- "tests/data/kernels"
sf <- c(1.013, 1.4711, 0.5116, 0.9587, 1.6934, 1.22, 0.6986, 0.7269)
condition <- factor(paste0("L", (seq_along(sf) - 1) %% 3))
counts <- rbind(
  zero_level_a = c(0, 0, 0, 2, 171, 0, 0, 0),
  zero_level_b = c(389, 0, 0, 0, 188, 0, 1, 35),
  zero_level_c = c(131, 0, 0, 0, 0, 71, 0, 0),
  zero_level_d = c(0, 0, 0, 3, 240, 0, 1, 0)
)
alpha <- c(3.2, 6.35, 6.1, 3.0)
storage.mode(counts) <- "integer"
colnames(counts) <- paste0("s", seq_along(sf) - 1)
dds <- DESeqDataSetFromMatrix(counts, data.frame(condition = condition), ~ condition)
sizeFactors(dds) <- sf
dispersions(dds) <- alpha
dds <- nbinomWaldTest(dds, quiet = TRUE)
mc <- mcols(dds)
coefs <- c("Intercept", "condition_L1_vs_L0", "condition_L2_vs_L0")
beta <- as.matrix(mc[, coefs]) * log(2)  # natural-log scale
colnames(beta) <- paste0("beta_", 0:2)
write.csv(data.frame(alpha = alpha, counts, beta, betaIter = mc$betaIter, check.names = FALSE),
          file.path(out_dir, "irls_unfinished.csv"))
write.csv(data.frame(size_factor = sf, level = as.integer(condition) - 1,
                     row.names = colnames(counts)),
          file.path(out_dir, "irls_unfinished_samples.csv"))
