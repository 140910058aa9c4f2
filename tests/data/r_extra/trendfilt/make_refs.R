# R references for tests/test_core_locfit.py, tests/test_indfilt_real.py, tests/test_lrt_core.py
# and tests/test_contrast_zero.py: DESeq2's local dispersion trend (locfit), its automatic
# substitution for a failed parametric fit, independent filtering on real studies, the LRT
# with a reduced model ~ 1, and the all-zero contrast rule of results().
#
# Made with R 4.2.2 + DESeq2 1.38.3 + locfit 1.5-9.7 (Debian bookworm packages). The tests only
# read the files written here. Regenerate from the repository root with
#   Rscript tests/data/r_extra/trendfilt/make_refs.R [SHARED_DATA_DIR]
# where SHARED_DATA_DIR (default /work/shared/data) holds real_pasilla/ and real_marioni/ with
# R DESeq2 1.38.3's outputs (ref_deseq2_1.38.3/: dispersions, results, results_lrt, size factors).
suppressMessages({library(DESeq2); library(locfit)})
args <- commandArgs(trailingOnly = TRUE)
shared <- if (length(args) >= 1) args[1] else "/work/shared/data"
out <- "tests/data/r_extra/trendfilt"

fmt <- function(v, digits = 17) ifelse(is.na(v), "NA", sprintf(paste0("%.", digits, "g"), v))
write_table <- function(df, file, digits = 17) {
  df[] <- lapply(df, function(col) if (is.numeric(col)) fmt(col, digits) else col)
  con <- gzfile(file.path(out, file), "w")
  write.csv(df, con, row.names = FALSE, quote = FALSE)
  close(con)
}
ref_file <- function(study, f) gzfile(file.path(shared, paste0("real_", study),
                                                 "ref_deseq2_1.38.3", f))

# A DESeqDataSet whose mcols hold the given baseMean / dispGeneEst (as make_trend_refs.R): the
# trend functions only read those columns.
dds_with <- function(base_mean, disp_gene, all_zero) {
  G <- length(base_mean)
  counts <- matrix(1L, nrow = G, ncol = 2)
  counts[all_zero, ] <- 0L
  dds <- suppressMessages(DESeqDataSetFromMatrix(counts, data.frame(x = 1:2), ~ 1))
  sizeFactors(dds) <- c(1, 1)
  dds <- DESeq2:::getBaseMeansAndVariances(dds)
  mcols(dds)$baseMean <- ifelse(all_zero, 0, base_mean)
  mcols(dds)$dispGeneEst <- ifelse(all_zero, NA, disp_gene)
  dds
}

# ---- 1. fitType = "local" on R's own gene-wise estimates of two real studies ---------------
#   and 3. independent filtering on R's own p-values of the same studies (pvalueAdjustment, as
#   results() calls it). One table per study, all genes: baseMean, dispGeneEst (15 digits, as
#   read), R's local dispFit for 2000 sampled genes plus every gene outside the fitted range,
#   p-values, and for each case padj's NA flag (all genes) and padj (500 sampled genes).
summary_rows <- list(); meta_rows <- list(); curve_rows <- list()
set.seed(5)
for (study in c("pasilla", "marioni")) {
  d <- read.csv(ref_file(study, "dispersions.csv.gz"))
  res_w <- read.csv(ref_file(study, "results.csv.gz"))
  res_l <- read.csv(ref_file(study, "results_lrt.csv.gz"))
  stopifnot(identical(d$gene, res_w$gene), identical(d$gene, res_l$gene))
  meta <- read.csv(file.path(shared, paste0("real_", study), "metadata.csv"))
  m <- nrow(meta); p <- 3  # ~ type + condition, ~ run + tissue: 2-level factors
  dds <- dds_with(d$baseMean, d$dispGeneEst, d$allZero)
  dds <- suppressMessages(estimateDispersionsFit(dds, fitType = "local"))
  fn <- dispersionFunction(dds)
  mm <- matrix(1, nrow = m, ncol = p)  # only its dimensions are read
  prior <- estimateDispersionsPriorVar(dds, modelMatrix = mm)
  fit <- environment(fn)$fit
  G <- nrow(d)
  nz <- which(!d$allZero)
  used <- nz[d$dispGeneEst[nz] > 1e-6]
  rng <- range(log(d$baseMean[used]))
  outside <- nz[log(d$baseMean[nz]) < rng[1] | log(d$baseMean[nz]) > rng[2]]
  keepFit <- sort(unique(c(sample(nz, 2000), outside)))
  dispFit <- rep(NA_real_, G); dispFit[keepFit] <- mcols(dds)$dispFit[keepFit]
  cols <- list(baseMean = d$baseMean, dispGeneEst = ifelse(d$allZero, NA, d$dispGeneEst),
               dispFit = dispFit, pvalue = res_w$pvalue)
  cases <- list(c("pvalue", "0.05"), c("pvalue", "0.1"))
  if (study == "marioni") {
    cols$pvalue_lrt <- res_l$pvalue
    cases <- c(cases, list(c("pvalue_lrt", "0.05")))
  }
  keepPadj <- sort(sample(G, 500))
  for (case in cases) {
    alpha <- as.numeric(case[2])
    res <- DESeq2:::pvalueAdjustment(DataFrame(baseMean = cols$baseMean, pvalue = cols[[case[1]]]),
                                     independentFiltering = TRUE, alpha = alpha,
                                     pAdjustMethod = "BH")
    name <- paste0(case[1], "_", case[2])
    cols[[paste0("padjNA_", name)]] <- as.integer(is.na(res$padj))
    v <- rep(NA_real_, G); v[keepPadj] <- res$padj[keepPadj]
    cols[[paste0("padj_", name)]] <- v
    md <- metadata(res)
    meta_rows[[length(meta_rows) + 1]] <- data.frame(
      study = study, case = name, alpha = alpha, filterThreshold = unname(md$filterThreshold),
      filterTheta = md$filterTheta, quantileName = names(md$filterThreshold))
    curve_rows[[length(curve_rows) + 1]] <- data.frame(
      study = study, case = name, theta = md$filterNumRej$theta,
      numRej = md$filterNumRej$numRej, loFitY = md$lo.fit$y)
  }
  write_table(as.data.frame(cols), paste0(study, "_genes.csv.gz"), digits = 15)
  # locfit's own fit structure: vertices, vertex values / slopes (parametric part subtracted)
  write_table(data.frame(x = fit$eva$xev, value = fit$eva$coef[, 1], slope = fit$eva$coef[, 2]),
              paste0("locfit_vertices_", study, ".csv.gz"))
  summary_rows[[study]] <- data.frame(
    case = study, fitType = attr(fn, "fitType"), m = m, p = p,
    varLogDispEsts = attr(fn, "varLogDispEsts"), dispPriorVar = prior,
    xbar = fit$eva$pc[1], pc0 = fit$eva$pc[2], pc1 = fit$eva$pc[3], pc2 = fit$eva$pc[4],
    nv = fit$nvc[["nv"]])
}
write_table(do.call(rbind, meta_rows), "indfilt_meta.csv.gz")
write_table(do.call(rbind, curve_rows), "indfilt_curves.csv.gz")

# ---- 2. a DESeq() run where the parametric trend fails and R substitutes "local" -----------
#   Dispersion grows with the mean (alpha = 0.02 mu^0.4): extraPois < 0.
set.seed(13)
G <- 1500; m <- 8
mu <- 10^runif(G, 0.3, 4)
disp <- 0.02 * mu^0.4
cond <- factor(rep(c("A", "B"), each = m / 2))
lfc <- ifelse(runif(G) < 0.1, rnorm(G, 0, 1.5), 0)
cnt <- t(sapply(seq_len(G), function(i)
  rnbinom(m, mu = mu[i] * 2^(lfc[i] * (cond == "B")), size = 1 / disp[i])))
cnt[1:5, ] <- 0L  # all-zero genes
rownames(cnt) <- paste0("g", seq_len(G))
dds <- DESeqDataSetFromMatrix(cnt, data.frame(cond = cond), ~ cond)
msgs <- character(0)
dds <- withCallingHandlers(DESeq(dds, quiet = FALSE),
                           message = function(e) { msgs <<- c(msgs, conditionMessage(e))
                                                   invokeRestart("muffleMessage") })
stopifnot(any(grepl("local regression fit was automatically substituted", msgs)))
fn <- dispersionFunction(dds)
stopifnot(attr(fn, "fitType") == "local")
mc <- mcols(dds)
write_table(data.frame(gene = rownames(dds), baseMean = mc$baseMean,
                       dispGeneEst = mc$dispGeneEst, dispFit = mc$dispFit, dispMAP = mc$dispMAP,
                       dispersion = dispersions(dds), dispOutlier = mc$dispOutlier),
            "paramfail_deseq.csv.gz")
summary_rows[["paramfail_deseq"]] <- data.frame(
  case = "paramfail_deseq", fitType = attr(fn, "fitType"), m = m, p = 2,
  varLogDispEsts = attr(fn, "varLogDispEsts"), dispPriorVar = attr(fn, "dispPriorVar"),
  xbar = NA, pc0 = NA, pc1 = NA, pc2 = NA, nv = environment(fn)$fit$nvc[["nv"]])
write.csv(do.call(rbind, summary_rows), file.path(out, "local_summary.csv"), row.names = FALSE)

# ---- 3. LRT ~ type + condition vs ~ 1 on pasilla, with R's dispersions and size factors ----
#   nbinomLRT on a DESeqDataSet carrying R's final dispersions (the LRT run's dispersions are
#   the Wald run's: both fit the full design). A subset of genes keeps the file small; it
#   includes the genes whose IRLS hit maxit = 100 (R then refits them with optim).
counts <- read.csv(gzfile(file.path(shared, "real_pasilla", "counts.csv.gz")), row.names = 1,
                   check.names = FALSE)
meta <- read.csv(file.path(shared, "real_pasilla", "metadata.csv"), row.names = 1)
meta <- meta[rownames(counts), ]
meta[] <- lapply(meta, function(v) factor(v, levels = sort(unique(v), method = "radix")))
sf <- read.csv(ref_file("pasilla", "size_factors.csv.gz"))
disp <- read.csv(ref_file("pasilla", "dispersions.csv.gz"))
lrt_ref <- read.csv(ref_file("pasilla", "results_lrt.csv.gz"))
dds <- DESeqDataSetFromMatrix(t(as.matrix(counts)), meta, ~ type + condition)
sizeFactors(dds) <- sf$size_factor[match(colnames(dds), sf$sample)]
dds <- estimateDispersionsGeneEst(dds, quiet = TRUE)  # the mu assay Cook's distances read
dispersions(dds) <- disp$dispersion[match(rownames(dds), disp$gene)]
dds <- nbinomLRT(dds, reduced = ~ 1, quiet = TRUE)
mc <- mcols(dds)
stopifnot(isTRUE(all.equal(mc$LRTStatistic, lrt_ref$stat[match(rownames(dds), lrt_ref$gene)],
                           tolerance = 1e-10)))
nzg <- which(!mc$allZero)
keep <- sort(unique(c(which(rownames(dds) == "FBgn0000078"), which(mc$betaIter >= 100),
                      sample(nzg, 1500))))
out_lrt <- data.frame(gene = rownames(dds)[keep], dispersion = dispersions(dds)[keep],
                      baseMean = mc$baseMean[keep], LRTStatistic = mc$LRTStatistic[keep],
                      LRTPvalue = mc$LRTPvalue[keep], fullBetaConv = mc$fullBetaConv[keep],
                      reducedBetaConv = mc$reducedBetaConv[keep], betaIter = mc$betaIter[keep],
                      deviance = mc$deviance[keep])
out_lrt <- cbind(out_lrt, as.data.frame(counts(dds)[keep, , drop = FALSE]))
write_table(out_lrt, "lrt_pasilla.csv.gz")
write.csv(data.frame(sample = colnames(dds), size_factor = sizeFactors(dds),
                     type = meta$type, condition = meta$condition),
          file.path(out, "lrt_pasilla_samples.csv"), row.names = FALSE)

# ---- 4. results() on a contrast whose two groups are all zero --------------------------------
#   cond has levels A (reference), B, C; 4 samples each, crossed with a 2-level batch.
set.seed(21)
G <- 400; m <- 12
cd <- data.frame(cond = factor(rep(c("A", "B", "C"), each = 4)),
                 batch = factor(rep(c("x", "y"), times = 6)))
mu <- 10^runif(G, 0.5, 3)
cnt <- t(sapply(seq_len(G), function(i) rnbinom(m, mu = mu[i], size = 5)))
bc <- 11:40;  cnt[bc, cd$cond %in% c("B", "C")] <- 0L   # B and C all zero
ab <- 41:60;  cnt[ab, cd$cond %in% c("A", "B")] <- 0L   # A (reference) and B all zero
cnt[1:4, ] <- 0L                                        # all-zero genes
rownames(cnt) <- paste0("g", seq_len(G))
dds <- DESeq(DESeqDataSetFromMatrix(cnt, cd, ~ batch + cond), quiet = TRUE)
rn <- resultsNames(dds)
stopifnot(identical(rn, c("Intercept", "batch_y_vs_x", "cond_B_vs_A", "cond_C_vs_A")))
tab <- function(res, prefix) {
  df <- data.frame(res$log2FoldChange, res$lfcSE, res$stat, res$pvalue, res$padj)
  names(df) <- paste0(prefix, c("log2FoldChange", "lfcSE", "stat", "pvalue", "padj"))
  df
}
# getContrast: the contrast before cleanContrast's all-zero rule
raw <- function(num) {
  r <- DESeq2:::getContrast(dds, num, useT = FALSE, minmu = 0.5)
  df <- data.frame(r$log2FoldChange, r$lfcSE)
  names(df) <- paste0("raw_", paste(num, collapse = "_"), "_", c("log2FoldChange", "lfcSE"))
  df
}
zero <- cbind(
  data.frame(gene = rownames(dds), baseMean = mcols(dds)$baseMean,
             maxCooks = mcols(dds)$maxCooks),
  as.data.frame(cnt),
  raw(c(0, 0, -1, 1)), raw(c(0, 0, 1, 0)),
  tab(results(dds, contrast = c("cond", "C", "B")), "CB_"),
  tab(results(dds, contrast = c("cond", "B", "A")), "BA_"),
  tab(results(dds, contrast = c("cond", "C", "B"), lfcThreshold = 1), "CB_gA1_"),
  tab(results(dds, contrast = c("cond", "C", "B"), lfcThreshold = 1, altHypothesis = "lessAbs"),
      "CB_lA1_"),
  tab(results(dds, contrast = c(0, 0, -1, 1)), "numCB_"),
  tab(results(dds, name = "cond_B_vs_A"), "nameBA_"))
ddsl <- nbinomLRT(dds, reduced = ~ batch, quiet = TRUE)
zero <- cbind(zero, tab(results(ddsl, contrast = c("cond", "C", "B")), "lrtCB_"),
              data.frame(lrt_stat = mcols(ddsl)$LRTStatistic, lrt_pvalue = mcols(ddsl)$LRTPvalue,
                         lrt_maxCooks = mcols(ddsl)$maxCooks))
write_table(zero, "contrast_zero.csv.gz")
write.csv(cd, file.path(out, "contrast_zero_samples.csv"), row.names = TRUE)

writeLines(capture.output(sessionInfo()), file.path(out, "sessionInfo.txt"))
