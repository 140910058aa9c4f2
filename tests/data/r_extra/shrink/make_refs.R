# R DESeq2 references for fed_de's shrinkage, VST and PCA maths.
# Run from this folder: Rscript make_refs.R   (R 4.2.2, DESeq2 1.38.3; see sessionInfo.txt)
#
# Per dataset folder (pasilla: ~ type + condition; marioni: ~ run + tissue;
# demo3: ~ batch + condition, fed_de.demo_data.make_demo_study(48, 400, seed=3), see make_data.py):
#   mle.csv.gz        inputs as DESeq() left them, non-zero genes, 8 digits: dispersion (final),
#                     MLE coefficients (log2) but the intercept, the standard error (SE_*) of the
#                     first coefficient shrunk; where DESeq() replaced outliers also baseMean,
#                     dispFit, replace
#   size_factors.csv  sizeFactors(dds)
#   normal_*.csv.gz   lfcShrink(type = "normal") log2FoldChange and lfcSE (every 8th gene)
#   priors.json       dispersion trend coefficients; betaPriorVar of every lfcShrink call;
#                     apeglm's prior variance for the first coefficient (apeglm::priorVar's
#                     estimator, with R's uniroot, on log(2) * (MLE, SE) as
#                     lfcShrink(type = "apeglm") passes them)
# pasilla also: VST (blind = FALSE) with the parametric, mean and local trends (every 20th gene),
# plotPCA(returnData = TRUE) and prcomp() of the top-500 genes.
# synthetic (PyDESeq2's single-factor data): size factors and the trend coefficients behind
# R 1.34's r_vst.csv (blind), r_vst_with_design.csv (blind = FALSE), r_mean_vst.csv (blind, mean).
suppressMessages(library(DESeq2))
suppressMessages(library(jsonlite))

sig <- function(df, digits = 10) {
  for (j in seq_along(df)) if (is.numeric(df[[j]])) df[[j]] <- signif(df[[j]], digits)
  df
}
write_gz <- function(df, path, digits = 10) {
  con <- gzfile(path, "w")
  write.csv(sig(df, digits), con, row.names = TRUE, quote = FALSE)
  close(con)
}

load_dds <- function(dir, design, factors) {
  counts <- t(as.matrix(read.csv(gzfile(file.path(dir, "counts.csv.gz")), row.names = 1,
                                 check.names = FALSE)))
  meta <- read.csv(file.path(dir, "metadata.csv"), row.names = 1)
  meta <- meta[colnames(counts), , drop = FALSE]
  for (f in factors) {
    meta[[f]] <- factor(meta[[f]], levels = sort(unique(as.character(meta[[f]])),
                                                 method = "radix"))
  }
  dds <- DESeqDataSetFromMatrix(counts, meta, design)
  DESeq(dds, quiet = TRUE)
}

# apeglm::priorVar's estimator (Efron & Morris), written out: apeglm is not installed here.
ape_prior_var <- function(mle, se, min.var = .001^2, max.var = 20^2) {
  keep <- !is.na(mle)
  X <- mle[keep]
  D <- se[keep]^2
  S <- X^2
  I <- function(A) 1 / (2 * (A + D)^2)
  objective <- function(A) sum((S - D) * I(A)) / sum(I(A)) - A
  if (objective(min.var) < 0) min.var else uniroot(objective, interval = c(min.var, max.var))$root
}

shrink_refs <- function(dir, design, factors, coefs, contrasts) {
  dds <- load_dds(dir, design, factors)
  mc <- mcols(dds)
  rn <- resultsNames(dds)
  nz <- !mc$allZero
  mle <- data.frame(dispersion = mc$dispersion, row.names = rownames(dds))
  # genes whose outlier counts DESeq() replaced before refitting (lfcShrink fits the original
  # counts); their baseMean and dispFit are those of the replaced counts, so only then are
  # baseMean and dispFit stored (otherwise: rowMeans(counts / sf), asymptDisp + extraPois / it)
  replaced <- if (is.null(mc$replace)) rep(FALSE, nrow(dds)) else !is.na(mc$replace) & mc$replace
  if (any(replaced)) {
    mle$baseMean <- mc$baseMean
    mle$dispFit <- mc$dispFit
    mle$replace <- as.integer(replaced)
  }
  for (nm in rn[-1]) mle[[nm]] <- mc[[nm]]
  mle[[paste0("SE_", coefs[1])]] <- mc[[paste0("SE_", coefs[1])]]
  write_gz(mle[nz, ], file.path(dir, "mle.csv.gz"), digits = 8)  # all-zero genes left out
  write.csv(data.frame(sizeFactor = sizeFactors(dds)), file.path(dir, "size_factors.csv"),
            quote = FALSE)
  # shrunken values for every 8th non-zero gene (file size); every replaced gene as well
  keep <- nz & (seq_len(nrow(dds)) %% 8 == 1 | replaced)
  priors <- list(normal = list(), apeglm = list(),
                 trend = as.list(attr(dispersionFunction(dds), "coefficients")))
  for (nm in coefs) {
    shr <- lfcShrink(dds, coef = nm, type = "normal", quiet = TRUE)
    write_gz(data.frame(log2FoldChange = shr$log2FoldChange, lfcSE = shr$lfcSE,
                        row.names = rownames(dds))[keep, ],
             file.path(dir, paste0("normal_", nm, ".csv.gz")))
    priors$normal[[nm]] <- as.list(priorInfo(shr)$betaPriorVar)
  }
  for (cn in contrasts) {
    key <- paste(cn, collapse = "_")
    shr <- lfcShrink(dds, contrast = cn, type = "normal", quiet = TRUE)
    write_gz(data.frame(log2FoldChange = shr$log2FoldChange, lfcSE = shr$lfcSE,
                        row.names = rownames(dds))[keep, ],
             file.path(dir, paste0("normal_", key, ".csv.gz")))
    priors$normal[[key]] <- as.list(priorInfo(shr)$betaPriorVar)
  }
  res <- results(dds, name = coefs[1])
  priors$apeglm[[coefs[1]]] <- ape_prior_var(log(2) * res$log2FoldChange, log(2) * res$lfcSE)
  writeLines(toJSON(priors, digits = NA, auto_unbox = TRUE, pretty = TRUE),
             file.path(dir, "priors.json"))
  dds
}

# --- shrinkage ---------------------------------------------------------------------------------
pas <- shrink_refs("pasilla", ~ type + condition, c("type", "condition"),
                   c("condition_untreated_vs_treated", "type_single_read_vs_paired_end"),
                   list(c("condition", "untreated", "treated")))
invisible(shrink_refs("marioni", ~ run + tissue, c("run", "tissue"), c("tissue_Liver_vs_Kidney"),
            list(c("tissue", "Liver", "Kidney"))))
invisible(shrink_refs("demo3", ~ batch + condition, c("batch", "condition"),
            c("condition_B_vs_A", "batch_b3_vs_b1"),
            list(c("batch", "b3", "b2"), c("condition", "B", "A"))))

# --- VST and PCA on pasilla (blind = FALSE) -----------------------------------------------------
every20 <- seq(1, nrow(pas), by = 20)
vst_out <- list()
vsd <- varianceStabilizingTransformation(pas, blind = FALSE)
write_gz(as.data.frame(assay(vsd)[every20, ]), "pasilla/vst_parametric.csv.gz")
vst_out$parametric <- as.list(attr(dispersionFunction(pas), "coefficients"))

pas_mean <- estimateDispersionsFit(pas, fitType = "mean", quiet = TRUE)
vsd_mean <- varianceStabilizingTransformation(pas_mean, blind = FALSE)
write_gz(as.data.frame(assay(vsd_mean)[every20, ]), "pasilla/vst_mean.csv.gz")
vst_out$mean <- attr(dispersionFunction(pas_mean), "mean")

# local trend: the VST integrates 1 / sqrt(trend(x) x^2 + mean(1/sf) x) numerically on a grid;
# the trend's values on that grid are stored so the integration can be checked on its own.
pas_local <- estimateDispersionsFit(pas, fitType = "local", quiet = TRUE)
vsd_local <- varianceStabilizingTransformation(pas_local, blind = FALSE)
write_gz(as.data.frame(assay(vsd_local)[every20, ]), "pasilla/vst_local.csv.gz")
ncounts <- counts(pas_local, normalized = TRUE)
xg <- sinh(seq(asinh(0), asinh(max(ncounts)), length.out = 1000))[-1]
write_gz(data.frame(x = xg, trend = dispersionFunction(pas_local)(xg)), "pasilla/local_trend_grid.csv.gz")
vst_out$local_max_ncount <- max(ncounts)
writeLines(toJSON(vst_out, digits = NA, auto_unbox = TRUE, pretty = TRUE), "pasilla/vst.json")

pca_data <- plotPCA(vsd, intgroup = c("condition", "type"), returnData = TRUE)
write.csv(sig(data.frame(PC1 = pca_data$PC1, PC2 = pca_data$PC2, row.names = pca_data$name)),
          "pasilla/plotpca.csv", quote = FALSE)
rv <- MatrixGenerics::rowVars(assay(vsd))
select <- order(rv, decreasing = TRUE)[seq_len(min(500, length(rv)))]
pca <- prcomp(t(assay(vsd)[select, ]))
write.csv(sig(as.data.frame(pca$x[, 1:4])), "pasilla/prcomp_x.csv", quote = FALSE)
writeLines(toJSON(list(percentVar = attr(pca_data, "percentVar"),
                       sdev2 = pca$sdev^2, top_genes = rownames(pas)[select]),
                  digits = NA, pretty = TRUE), "pasilla/pca.json")

# --- synthetic single-factor data: the trends behind PyDESeq2's r_vst*.csv -----------------------
counts <- t(as.matrix(read.csv("../../pydeseq2_synthetic/counts.csv", row.names = 1)))
meta <- read.csv("../../pydeseq2_synthetic/metadata.csv", row.names = 1, stringsAsFactors = TRUE)
dds <- DESeqDataSetFromMatrix(counts, meta[colnames(counts), , drop = FALSE], ~ condition)
dds <- estimateSizeFactors(dds)
syn <- list(size_factors = unname(sizeFactors(dds)))
blind_fit <- function(fitType) {
  # what varianceStabilizingTransformation(blind = TRUE) does before transforming
  b <- dds
  design(b) <- ~ 1
  b <- estimateDispersionsGeneEst(b, quiet = TRUE)
  estimateDispersionsFit(b, quiet = TRUE, fitType = fitType)
}
syn$blind_parametric <- as.list(attr(dispersionFunction(blind_fit("parametric")), "coefficients"))
syn$blind_mean <- attr(dispersionFunction(blind_fit("mean")), "mean")
dds <- estimateDispersions(dds, quiet = TRUE)
syn$design_parametric <- as.list(attr(dispersionFunction(dds), "coefficients"))
writeLines(toJSON(syn, digits = NA, auto_unbox = TRUE, pretty = TRUE), "synthetic/vst.json")

writeLines(capture.output(sessionInfo()), "sessionInfo.txt")
