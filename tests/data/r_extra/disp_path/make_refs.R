# R DESeq2 references of the dispersion *path* for tests/test_disp_path.py
# (R 4.2.2, DESeq2 1.38.3, Debian bookworm packages). The tests only read what is written here.
# Regenerate from the repository root:
#   Rscript tests/data/r_extra/disp_path/make_refs.R /work/shared/data
#
# For each study it runs DESeq2's own dispersion steps (estimateSizeFactors,
# estimateDispersionsGeneEst, estimateDispersionsFit, estimateDispersionsMAP: what DESeq() runs)
# and saves the exact inputs of the two line searches -- the fitted means R used for the
# dispersion fit (assay "mu", left by estimateDispersionsGeneEst: linearModelMuNormalized for
# cell-means designs, else fitNbinomGLMs at alpha_hat; floored at minmu = 0.5), the counts, the
# design matrix, the start alpha_hat -- and R's outputs: the raw fitDisp results (log_alpha,
# iter, initial/last log posterior) of the gene-wise and MAP searches (re-run here through
# DESeq2's own fitDispWrapper and checked to reproduce the DESeq2 columns), the grid-refit flags,
# dispGeneEst, dispGeneIter, dispFit, dispPriorVar, dispMAP, dispIter and the final dispersion.
#
# Studies: real_pasilla (~ type + condition), real_marioni (~ run + tissue) from ../shared, and
# synth_small: a simulated 3 vs 3 study (~ condition, a cell-means design, so R takes the
# linear-model means) made here with a fixed seed. A study with more than 1,500 non-zero genes
# keeps a deterministic subset of them (pick_genes, below); its scalars (trend, prior
# variance) are those of the whole study. With a second and third argument the script writes
# elsewhere and keeps more genes (e.g. `... /work/shared/data /tmp/full 100000`: every gene).
suppressMessages(library(DESeq2))
args <- commandArgs(trailingOnly = TRUE)
shared <- if (length(args)) args[1] else "/work/shared/data"
out <- if (length(args) > 1) args[2] else "tests/data/r_extra/disp_path"
keep_max <- if (length(args) > 2) as.integer(args[3]) else 1500L
fmt <- function(v) ifelse(is.na(v), "NA", sprintf("%.17g", v))
write_gz <- function(df, file) {
  df[] <- lapply(df, function(col) if (is.numeric(col)) fmt(col) else col)
  con <- gzfile(file, "w")
  write.csv(df, con, row.names = FALSE, quote = FALSE)
  close(con)
}
read_layout <- function(folder) {
  cts <- read.csv(gzfile(Sys.glob(file.path(folder, "counts.csv*"))[1]), row.names = 1,
                  check.names = FALSE)
  md <- read.csv(file.path(folder, "metadata.csv"), row.names = 1)
  md <- md[rownames(cts), , drop = FALSE]
  for (f in names(md)) if (is.character(md[[f]])) md[[f]] <- factor(md[[f]])  # C-locale order
  list(counts = t(as.matrix(cts)), meta = md)
}

simulate_small <- function() {
  set.seed(13)
  G <- 1500
  base <- exp(runif(G, log(0.5), log(2000)))
  disp <- 0.05 + 2 / base
  disp <- disp * exp(rnorm(G, 0, 0.6))
  lfc <- ifelse(runif(G) < 0.15, rnorm(G, 0, 1.5), 0)
  sf <- c(0.8, 1.2, 1.0, 0.9, 1.3, 1.1)
  cond <- factor(rep(c("A", "B"), each = 3))
  mu <- outer(base, sf) * exp(outer(lfc, as.numeric(cond == "B")))
  cts <- matrix(rnbinom(G * 6, mu = mu, size = 1 / disp), nrow = G)
  dimnames(cts) <- list(sprintf("gene%04d", seq_len(G)), sprintf("s%d", 1:6))
  list(counts = cts, meta = data.frame(condition = cond, row.names = colnames(cts)))
}

# deterministic gene subset: every grid refit and every gene whose start is not at the floor
# but whose estimate is, then seeded samples of the hard cases (long gene-wise paths, long
# MAP paths, large counts, starts at the floor), then of the rest, up to `keep` genes
pick_genes <- function(genes, keep) {
  set.seed(1)
  floor_start <- genes$alpha_hat <= 1e-8 * (1 + 1e-9)
  take <- genes$gw_refit | genes$map_refit | (genes$dispGeneEst < 1e-6 & !floor_start)
  add <- function(take, pool, n) {
    idx <- which(pool & !take)
    if (length(idx) > n) idx <- idx[sample.int(length(idx), n)]
    take[idx] <- TRUE
    take
  }
  take <- add(take, genes$gw_iter >= 20 & !floor_start, 300)
  take <- add(take, genes$map_iter >= 11, 300)
  take <- add(take, genes$baseMean > 1000, 150)
  take <- add(take, floor_start, 150)
  take <- add(take, rep(TRUE, nrow(genes)), max(0, keep - sum(take)))
  which(take)
}

run_study <- function(name, counts, meta, design, keep = keep_max) {
  dds <- DESeqDataSetFromMatrix(counts, meta, design)
  dds <- estimateSizeFactors(dds)
  dds <- estimateDispersionsGeneEst(dds)
  mu_all <- assays(dds)[["mu"]]
  dds <- estimateDispersionsFit(dds)
  dds <- estimateDispersionsMAP(dds)
  mc <- mcols(dds)
  nz <- !mc$allZero
  X <- DESeq2:::getModelMatrix(dds)
  y <- counts(dds)[nz, , drop = FALSE]
  mu <- mu_all[nz, , drop = FALSE]
  minDisp <- 1e-8
  maxDisp <- max(10, ncol(dds))
  # alpha_hat exactly as estimateDispersionsGeneEst makes it
  objectNZ <- dds[nz, ]
  alpha_hat <- pmin(DESeq2:::roughDispEstimate(counts(objectNZ, normalized = TRUE), X),
                    DESeq2:::momentsDispEstimate(objectNZ))
  alpha_hat <- pmin(pmax(minDisp, alpha_hat), maxDisp)
  w <- matrix(1, nrow(y), ncol(y))
  fit <- function(start, prior_mean, prior_var, use_prior) {
    DESeq2:::fitDispWrapper(ySEXP = y, xSEXP = X, mu_hatSEXP = mu, log_alphaSEXP = start,
                            log_alpha_prior_meanSEXP = prior_mean,
                            log_alpha_prior_sigmasqSEXP = prior_var,
                            min_log_alphaSEXP = log(minDisp / 10), kappa_0SEXP = 1,
                            tolSEXP = 1e-6, maxitSEXP = 100, usePriorSEXP = use_prior,
                            weightsSEXP = w, useWeightsSEXP = FALSE,
                            weightThresholdSEXP = 1e-2, useCRSEXP = TRUE)
  }
  # gene-wise: fitDisp, noIncrease, grid refit of the unconverged (as in estimateDispersionsGeneEst)
  gw <- fit(log(alpha_hat), log(alpha_hat), 1, FALSE)
  est <- pmin(exp(gw$log_alpha), maxDisp)
  no_increase <- gw$last_lp < gw$initial_lp + abs(gw$initial_lp) / 1e6
  est[no_increase] <- alpha_hat[no_increase]
  gw_refit <- !(gw$iter < 100 & gw$iter != 1) & est > minDisp * 10
  if (any(gw_refit)) {
    est[gw_refit] <- DESeq2:::fitDispGridWrapper(
      y[gw_refit, , drop = FALSE], X, mu[gw_refit, , drop = FALSE], rep(0, sum(gw_refit)), 1,
      FALSE, w[gw_refit, , drop = FALSE], FALSE, 1e-2, TRUE)
  }
  est <- pmin(pmax(est, minDisp), maxDisp)
  stopifnot(identical(est, mc$dispGeneEst[nz]), identical(as.numeric(gw$iter),
                                                           as.numeric(mc$dispGeneIter[nz])))
  # MAP (as in estimateDispersionsMAP)
  prior_var <- attr(dispersionFunction(dds), "dispPriorVar")
  disp_fit <- mc$dispFit[nz]
  init <- ifelse(est > 0.1 * disp_fit, est, disp_fit)
  init[is.na(init)] <- disp_fit[is.na(init)]
  mp <- fit(log(init), log(disp_fit), prior_var, TRUE)
  map <- exp(mp$log_alpha)
  map_refit <- !(mp$iter < 100)
  if (any(map_refit)) {
    map[map_refit] <- DESeq2:::fitDispGridWrapper(
      y[map_refit, , drop = FALSE], X, mu[map_refit, , drop = FALSE], log(disp_fit)[map_refit],
      prior_var, TRUE, w[map_refit, , drop = FALSE], FALSE, 1e-2, TRUE)
  }
  map <- pmin(pmax(map, minDisp), maxDisp)
  stopifnot(identical(map, mc$dispMAP[nz]), identical(as.numeric(mp$iter),
                                                      as.numeric(mc$dispIter[nz])))
  genes <- data.frame(
    gene = rownames(y), baseMean = mc$baseMean[nz], alpha_hat = alpha_hat,
    gw_log_alpha = gw$log_alpha, gw_iter = gw$iter, gw_iter_accept = gw$iter_accept,
    gw_initial_lp = gw$initial_lp, gw_last_lp = gw$last_lp, gw_no_increase = no_increase,
    gw_refit = gw_refit, dispGeneEst = mc$dispGeneEst[nz], dispGeneIter = mc$dispGeneIter[nz],
    dispFit = disp_fit, map_init = init, map_log_alpha = mp$log_alpha, map_iter = mp$iter,
    map_iter_accept = mp$iter_accept, map_initial_lp = mp$initial_lp,
    map_last_lp = mp$last_lp, map_refit = map_refit, dispMAP = mc$dispMAP[nz],
    dispIter = mc$dispIter[nz], dispOutlier = mc$dispOutlier[nz],
    dispersion = mc$dispersion[nz])
  # gene subset: all floor / refit / maxit genes, then a seeded sample of the rest
  pick <- seq_len(nrow(genes))
  if (nrow(genes) > keep) pick <- pick_genes(genes, keep)
  d <- file.path(out, name)
  dir.create(d, showWarnings = FALSE, recursive = TRUE)
  write_gz(genes[pick, ], file.path(d, "genes.csv.gz"))
  write_gz(data.frame(gene = rownames(y)[pick], y[pick, , drop = FALSE], check.names = FALSE),
           file.path(d, "counts.csv.gz"))
  write_gz(data.frame(gene = rownames(y)[pick], mu[pick, , drop = FALSE], check.names = FALSE),
           file.path(d, "mu.csv.gz"))
  write.csv(data.frame(sample = colnames(dds), X, check.names = FALSE),
            file.path(d, "design.csv"), row.names = FALSE, quote = FALSE)
  trend <- dispersionFunction(dds)
  write_gz(data.frame(n_genes_nonzero = sum(nz), n_kept = length(pick),
                      dispPriorVar = prior_var,
                      varLogDispEsts = attr(trend, "varLogDispEsts"),
                      minDisp = minDisp, maxDisp = maxDisp,
                      linearMu = nlevels(DESeq2:::modelMatrixGroups(X)) == ncol(X)),
           file.path(d, "scalars.csv.gz"))
  cat(sprintf("%s: %d nonzero genes, kept %d; gw refit %d, map refit %d, max iter %d / %d\n",
              name, sum(nz), length(pick), sum(gw_refit), sum(map_refit), max(gw$iter),
              max(mp$iter)))
  invisible(genes)
}

p <- read_layout(file.path(shared, "real_pasilla"))
run_study("real_pasilla", p$counts, p$meta, ~ type + condition)
m <- read_layout(file.path(shared, "real_marioni"))
run_study("real_marioni", m$counts, m$meta, ~ run + tissue)
s <- simulate_small()
run_study("synth_small", s$counts, s$meta, ~ condition)
writeLines(capture.output(sessionInfo()), file.path(out, "sessionInfo.txt"))
