# Reference values for tests/test_deseq2_accuracy.py, produced with R 4.2.2 + DESeq2 1.38.3
# (Debian bookworm packages r-base-core, r-bioc-deseq2). The tests only read the files written
# here; they never call R. Regenerate from the repository root with:
#   Rscript tests/data/r_extra/deseq2/make_refs.R
#
# 1. lowcount/: PyDESeq2's synthetic data (100 samples x 10 genes, ~ condition) plus five barely
#    expressed genes (1 to 12 reads in total, hard-coded below). DESeq2's gene-wise line search
#    starts at the rough estimate, which is clipped to minDisp = 1e-8 for such genes; the
#    profile likelihood is flat there, so the search stops at once and the start is kept
#    (dispGeneEst = 1e-8, dispGeneIter 1..4). These genes then stay out of the trend fit
#    (useForFit needs dispGeneEst >= 100 * minDisp), which is what decides the trend, the
#    prior variance and the dispersion-outlier flags of the ten ordinary genes.
# 2. wide_beta.csv.gz: per-gene IRLS facts for PyDESeq2's "wide" data (~ group + condition):
#    every gene converges by plain IRLS (betaConv TRUE, up to 22 iterations; no optim refit).
suppressMessages(library(DESeq2))
out <- "tests/data/r_extra/deseq2"
fmt <- function(v) ifelse(is.na(v), "NA", sprintf("%.17g", v))
write_table <- function(df, file) {
  df[] <- lapply(df, function(col) if (is.numeric(col)) fmt(col) else col)
  con <- gzfile(file.path(out, file), "w")
  write.csv(df, con, row.names = FALSE, quote = FALSE)
  close(con)
}
read_layout <- function(folder) {
  cts <- read.csv(file.path(folder, "counts.csv"), row.names = 1, check.names = FALSE)
  md <- read.csv(file.path(folder, "metadata.csv"), row.names = 1)
  list(counts = as.matrix(cts), meta = md[rownames(cts), , drop = FALSE])
}
gene_table <- function(dds, res) {
  mc <- mcols(dds)
  data.frame(gene = rownames(dds), baseMean = res$baseMean,
             log2FoldChange = res$log2FoldChange, lfcSE = res$lfcSE, stat = res$stat,
             pvalue = res$pvalue, padj = res$padj, dispGeneEst = mc$dispGeneEst,
             dispGeneIter = mc$dispGeneIter, dispFit = mc$dispFit, dispMAP = mc$dispMAP,
             dispersion = mc$dispersion, dispOutlier = mc$dispOutlier,
             betaConv = mc$betaConv, betaIter = mc$betaIter, allZero = mc$allZero)
}

# ---- 1. barely expressed genes ---------------------------------------------------------------
syn <- read_layout("tests/data/pydeseq2_synthetic")
low <- list(low1 = c(sample82 = 1),
            low2 = c(sample18 = 2, sample24 = 2),
            low3 = c(sample4 = 2, sample10 = 1, sample58 = 1),
            low4 = c(sample4 = 1, sample12 = 2, sample16 = 1, sample68 = 2, sample72 = 1),
            low5 = c(sample28 = 1, sample32 = 2, sample65 = 2, sample66 = 1, sample69 = 1,
                     sample72 = 2, sample76 = 1, sample91 = 2))
cts <- syn$counts
for (g in names(low)) {
  col <- setNames(integer(nrow(cts)), rownames(cts))
  col[names(low[[g]])] <- low[[g]]
  cts <- cbind(cts, col)
  colnames(cts)[ncol(cts)] <- g
}
dir.create(file.path(out, "lowcount"), showWarnings = FALSE)
write.csv(data.frame(sample = rownames(cts), cts, check.names = FALSE),
          file.path(out, "lowcount", "counts.csv"), row.names = FALSE, quote = FALSE)
write.csv(data.frame(sample = rownames(syn$meta), syn$meta),
          file.path(out, "lowcount", "metadata.csv"), row.names = FALSE, quote = FALSE)
md <- syn$meta
md$condition <- factor(md$condition, levels = c("A", "B"))
dds <- DESeqDataSetFromMatrix(t(cts), md, ~ condition)
dds <- DESeq(dds, quiet = TRUE)
res <- results(dds, contrast = c("condition", "B", "A"), alpha = 0.1)
write_table(gene_table(dds, res), "lowcount/results.csv.gz")
trend <- attr(dispersionFunction(dds), "coefficients")
write_table(data.frame(asymptDisp = trend[["asymptDisp"]], extraPois = trend[["extraPois"]],
                       dispPriorVar = attr(dispersionFunction(dds), "dispPriorVar")),
            "lowcount/trend.csv.gz")

# ---- 2. IRLS facts on the wide data ----------------------------------------------------------
wide <- read_layout("tests/data/pydeseq2_wide")
md <- wide$meta
md$condition <- factor(md$condition, levels = c("A", "B"))
md$group <- factor(md$group, levels = c("X", "Y"))
dds <- DESeqDataSetFromMatrix(t(wide$counts), md, ~ group + condition)
dds <- DESeq(dds, quiet = TRUE)
res <- results(dds, contrast = c("condition", "B", "A"), alpha = 0.1)
write_table(gene_table(dds, res), "wide_beta.csv.gz")
