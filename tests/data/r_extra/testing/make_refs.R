# Reference values for tests/test_core_testing.py, produced with R 4.2.2 + DESeq2 1.38.3
# (Debian bookworm packages r-base-core, r-bioc-deseq2). The tests only read the CSVs written
# here; they never call R. Regenerate from the repository root with:
#   Rscript tests/data/r_extra/testing/make_refs.R
suppressMessages(library(DESeq2))
out <- "tests/data/r_extra/testing"

# 17 significant digits so Python reads back the very doubles R used.
fmt <- function(v) ifelse(is.na(v), "NA", sprintf("%.17g", v))
write_table <- function(df, file) {
  df[] <- lapply(df, function(col) if (is.numeric(col)) fmt(col) else col)
  con <- gzfile(file.path(out, file), "w")
  write.csv(df, con, row.names = FALSE, quote = FALSE)
  close(con)
}

meta_rows <- list()
curve_rows <- list()
keep_meta <- function(case, res, alpha) {
  md <- metadata(res)
  if (is.null(md$filterThreshold)) return(invisible())
  meta_rows[[length(meta_rows) + 1]] <<- data.frame(
    case = case, alpha = alpha, filterThreshold = unname(md$filterThreshold),
    filterTheta = md$filterTheta)
  curve_rows[[length(curve_rows) + 1]] <<- data.frame(
    case = case, theta = md$filterNumRej$theta, numRej = md$filterNumRej$numRej,
    loFitY = md$lo.fit$y)
}

# ---- 1. DESeq2 end to end: Wald tests for every altHypothesis, and padj ----------------------
set.seed(20240611)
dds <- makeExampleDESeqDataSet(n = 3000, m = 8, betaSD = 0.7, interceptMean = 4,
                               interceptSD = 2.5)
counts(dds)[1:60, ] <- 0L  # all-zero genes: baseMean 0, NA p-values
dds <- DESeq(dds, quiet = TRUE)
specs <- list(
  default = list(),
  alpha005 = list(alpha = 0.05),
  noindfilt = list(independentFiltering = FALSE),
  greaterAbs = list(lfcThreshold = 0.5, altHypothesis = "greaterAbs"),
  lessAbs = list(lfcThreshold = 0.5, altHypothesis = "lessAbs"),
  greater = list(lfcThreshold = 0.5, altHypothesis = "greater"),
  less = list(lfcThreshold = 0.5, altHypothesis = "less"),
  greaterAbs_T1 = list(lfcThreshold = 1, altHypothesis = "greaterAbs"),
  lessAbs_T2 = list(lfcThreshold = 2, altHypothesis = "lessAbs")
)
for (nm in names(specs)) {
  args <- c(list(dds, contrast = c("condition", "B", "A")), specs[[nm]])
  res <- do.call(results, args)
  alpha <- if (is.null(specs[[nm]]$alpha)) 0.1 else specs[[nm]]$alpha
  df <- data.frame(baseMean = res$baseMean, log2FoldChange = res$log2FoldChange,
                   lfcSE = res$lfcSE, stat = res$stat, pvalue = res$pvalue, padj = res$padj)
  write_table(df, paste0("deseq2_", nm, ".csv.gz"))
  keep_meta(paste0("deseq2_", nm), res, alpha)
}

# ---- 2. pvalueAdjustment on synthetic (baseMean, pvalue) tables -----------------------------
adjust <- function(case, baseMean, pvalue, alpha = 0.1) {
  res <- DataFrame(baseMean = baseMean, pvalue = pvalue)
  res <- DESeq2:::pvalueAdjustment(res, independentFiltering = TRUE, alpha = alpha,
                                   pAdjustMethod = "BH")
  write_table(data.frame(baseMean = baseMean, pvalue = pvalue, padj = res$padj),
              paste0("indfilt_", case, ".csv.gz"))
  keep_meta(paste0("indfilt_", case), res, alpha)
}
signal_table <- function(G, frac_de, zero_frac, na_frac, effect) {
  bm <- exp(rnorm(G, 3, 2))
  bm[sample(G, round(zero_frac * G))] <- 0
  de <- runif(G) < frac_de
  z <- rnorm(G, mean = ifelse(de, effect * log1p(bm), 0))
  p <- 2 * pnorm(-abs(z))
  p[bm == 0] <- NA
  p[sample(G, round(na_frac * G))] <- NA
  list(bm = bm, p = p)
}
set.seed(1)
t1 <- signal_table(6000, 0.2, 0.03, 0.01, 0.8)
adjust("many", t1$bm, t1$p)
adjust("many_alpha005", t1$bm, t1$p, alpha = 0.05)
set.seed(2)
t2 <- signal_table(4000, 0.08, 0.0, 0.0, 0.6)
t2$bm <- round(t2$bm, 1)  # many ties in the filter statistic
adjust("ties", t2$bm, t2$p)
set.seed(3)
t3 <- signal_table(3000, 0.0, 0.1, 0.0, 0)  # all null: few rejections, theta[1] kept
adjust("null", t3$bm, t3$p)
set.seed(4)
t4 <- signal_table(4000, 0.9, 0.96, 0.0, 2)  # > 95% zeros: theta runs up to 1
adjust("mostly_zero", t4$bm, t4$p)
set.seed(5)
G <- 8000
bm5 <- exp(rnorm(G, 2, 2.5))
de5 <- runif(G) < 0.15
p5 <- ifelse(de5 & bm5 > 5, rbeta(G, 0.05, 20), runif(G))  # signal only above a mean
adjust("weak_low", bm5, p5)

write_table(do.call(rbind, meta_rows), "adjust_meta.csv.gz")
write_table(do.call(rbind, curve_rows), "adjust_curves.csv.gz")

# ---- 3. p.adjust BH with NA and ties ---------------------------------------------------------
set.seed(6)
p <- c(runif(300)^3, rep(0.01, 7), rep(1, 3), NA, NA, 0)
p <- sample(p)
write_table(data.frame(p = p, padj = p.adjust(p, method = "BH")), "padjust_bh.csv.gz")

# ---- 4. lowess -------------------------------------------------------------------------------
lw <- list()
add_lowess <- function(case, x, y, f = 2 / 3, iter = 3L, delta = NULL) {
  fit <- if (is.null(delta)) lowess(x, y, f = f, iter = iter) else
    lowess(x, y, f = f, iter = iter, delta = delta)
  lw[[length(lw) + 1]] <<- data.frame(case = case, f = f, iter = iter,
                                      delta = if (is.null(delta)) NA else delta,
                                      x = x, y = y, fit = fit$y)
}
set.seed(7)
x <- runif(200, 0, 10); y <- sin(x) + rnorm(200, sd = 0.3); y[c(5, 50, 150)] <- 8
add_lowess("sine_default", x, y)
add_lowess("sine_f01_iter0", x, y, f = 0.1, iter = 0L)
add_lowess("sine_delta0", x, y, f = 0.3, delta = 0)
add_lowess("sine_delta_big", x, y, f = 0.5, delta = 1.5)
xt <- round(runif(150, 0, 5), 1); yt <- xt^2 + rnorm(150)
add_lowess("ties", xt, yt, f = 0.25)
th <- seq(0, 0.95, length = 50); nr <- round(400 * (1 - exp(-8 * th)) - 300 * th^4 + rnorm(50, 0, 5))
add_lowess("numrej_like", th, nr, f = 1 / 5)
add_lowess("constant_y", 1:30, rep(2.5, 30), f = 0.3)
add_lowess("two_points", c(2, 1), c(5, 3))
add_lowess("one_point", 3, 4)
set.seed(8)
xb <- rexp(3000); yb <- log1p(xb) + rnorm(3000, sd = 0.2)
add_lowess("big_default", xb, yb, f = 0.2)
write_table(do.call(rbind, lw), "lowess.csv.gz")

# ---- 5. quantile type 7 ----------------------------------------------------------------------
set.seed(9)
qx <- c(round(rexp(97) * 10, 2), 0, 0, 0)
qp <- c(0, 0.01, 0.0193877551020408, seq(0.03, 0.95, length = 50), 0.999, 1)
write_table(data.frame(prob = qp, q = unname(quantile(qx, qp))), "quantile7.csv.gz")
write_table(data.frame(x = qx), "quantile7_x.csv.gz")

# ---- 6. normal upper tail (pnorm(q, lower.tail=FALSE)), far into the tail ----------------------
qq <- c(seq(0, 10, by = 0.125), seq(10.5, 40, by = 0.5))
write_table(data.frame(q = qq, upper = pnorm(qq, lower.tail = FALSE)), "pnorm_upper.csv.gz")
