# R DESeq2 1.38.3 references on real and real-ish studies (issue 13), for fed_de's tests.
# R 4.2.2 + DESeq2 1.38.3 (Debian bookworm r-base-core, r-bioc-deseq2). Tests only read the
# files written here; they never call R. From the repository root:
#
#   Rscript tests/data/r_extra/real/make_refs.R            # the committed files
#   Rscript tests/data/r_extra/real/make_refs.R OUTDIR all # every gene of every table, to OUTDIR
#
# Inputs (site layout, samples x genes): pasilla/ and marioni/ (copies of ../shared/data/real_*),
# demo3/ and demo3_age/ (written by make_data.py). As for the shared references: DESeq() defaults
# unless said, character columns become factors with levels in C-locale order (the first is the
# reference), alpha 0.05.
#
# Numbers are written with 17 significant digits (exact doubles). The per-gene tables of pasilla
# and marioni hold a subset of the genes (see keep_genes) so that the files stay small; `all`
# writes every gene that is not all-zero (what benchmarks/accuracy reads). calls.csv.gz (padj NA
# pattern and sign of each call at padj < 0.05, every analysis) always covers every gene.
suppressMessages({
  library(DESeq2)
  library(jsonlite)
})
args <- commandArgs(trailingOnly = TRUE)
here <- "tests/data/r_extra/real"
out <- if (length(args) >= 1) args[1] else here
all_genes <- length(args) >= 2 && args[2] == "all"
alpha <- 0.05

fmt <- function(v) {
  if (is.logical(v)) return(ifelse(is.na(v), "NA", ifelse(v, "TRUE", "FALSE")))
  if (!is.numeric(v)) return(as.character(v))
  ifelse(is.na(v), "NA", sprintf("%.17g", v))
}
write_table <- function(df, study, file) {
  dir.create(file.path(out, study), showWarnings = FALSE, recursive = TRUE)
  df[] <- lapply(df, fmt)
  con <- gzfile(file.path(out, study, file), "w")
  write.csv(df, con, row.names = FALSE, quote = FALSE)
  close(con)
}
c_factor <- function(x) factor(x, levels = sort(unique(x), method = "radix"))
read_site <- function(study) {
  folder <- file.path(here, study)
  cf <- file.path(folder, "counts.csv.gz")
  mf <- file.path(folder, c("metadata.csv", "metadata.csv.gz"))
  cts <- as.matrix(read.csv(cf, row.names = 1, check.names = FALSE))
  md <- read.csv(mf[file.exists(mf)][1], row.names = 1, stringsAsFactors = FALSE)
  md <- md[rownames(cts), , drop = FALSE]
  for (v in names(md)) if (is.character(md[[v]])) md[[v]] <- c_factor(md[[v]])
  list(counts = t(cts), meta = md)
}
run_deseq <- function(site, design, ...) {
  dds <- DESeqDataSetFromMatrix(site$counts, site$meta, design)
  DESeq(dds, quiet = TRUE, ...)
}

# Genes kept in the committed per-gene tables of pasilla and marioni: every `stride`-th gene that
# is not all-zero (in the order of the counts), plus every gene the default fit treats specially
# (dispersion outlier, gene-wise line search at its 100-iteration cap, so refitted on R's grid,
# a MAP search of 13+ iterations, an IRLS of 50+ iterations or not converged). The same genes in
# every table of a study. `all` keeps every gene that is not all-zero.
keep_genes <- function(dds, stride) {
  mc <- mcols(dds)
  ok <- !mc$allZero
  if (all_genes) return(ok)
  special <- mc$dispOutlier | mc$dispGeneIter >= 100 | mc$dispIter >= 13 |
    mc$betaIter >= 50 | !mc$betaConv
  ok & (special | cumsum(ok) %% stride == 0)
}
res_cols <- function(res, prefix = "") {
  df <- data.frame(log2FoldChange = res$log2FoldChange, lfcSE = res$lfcSE, stat = res$stat,
                   pvalue = res$pvalue, padj = res$padj)
  if (nzchar(prefix)) names(df) <- paste0(prefix, "_", names(df))
  df
}
test_cols <- function(res, prefix) {
  df <- data.frame(stat = res$stat, pvalue = res$pvalue, padj = res$padj)
  names(df) <- paste0(prefix, "_", names(df))
  df
}
disp_cols <- function(dds) {
  mc <- mcols(dds)
  data.frame(dispGeneEst = mc$dispGeneEst, dispGeneIter = mc$dispGeneIter, dispFit = mc$dispFit,
             dispMAP = mc$dispMAP, dispIter = mc$dispIter, dispersion = mc$dispersion,
             dispOutlier = mc$dispOutlier)
}
# All genes, small columns only: padj NA pattern and the sign of each call at padj < alpha.
calls_cols <- function(res, prefix) {
  call <- ifelse(!is.na(res$padj) & res$padj < alpha, sign(res$log2FoldChange), 0)
  df <- data.frame(as.integer(is.na(res$padj)), as.integer(call))
  names(df) <- paste0(prefix, c("_padjNA", "_call"))
  df
}
trend_facts <- function(dds) {
  f <- dispersionFunction(dds)
  list(fitType = attr(f, "fitType"), coefficients = as.list(attr(f, "coefficients")),
       dispPriorVar = attr(f, "dispPriorVar"), varLogDispEsts = attr(f, "varLogDispEsts"))
}
ifilter_facts <- function(res) {
  md <- metadata(res)
  list(alpha = md$alpha, filterThreshold = unname(md$filterThreshold),
       filterThresholdName = names(md$filterThreshold), filterTheta = md$filterTheta,
       nTested = sum(!is.na(res$pvalue)), nPadjNA = sum(is.na(res$padj)),
       nCalls = sum(res$padj < md$alpha, na.rm = TRUE))
}
ifilter_table <- function(res) {
  md <- metadata(res)
  data.frame(theta = md$filterNumRej$theta, numRej = md$filterNumRej$numRej,
             loFitX = md$lo.fit$x, loFitY = md$lo.fit$y)
}
# jsonlite prints at most 15 significant digits: doubles go in verbatim with 17.
exact <- function(x) {
  if (is.list(x)) return(lapply(x, exact))
  if (is.double(x) && length(x) == 1 && !is.na(x)) return(structure(sprintf("%.17g", x),
                                                                  class = "json"))
  x
}
write_json_file <- function(x, study, file) {
  dir.create(file.path(out, study), showWarnings = FALSE, recursive = TRUE)
  write(toJSON(exact(x), auto_unbox = TRUE, json_verbatim = TRUE, pretty = TRUE),
        file.path(out, study, file))
}

# ---- 1. pasilla ~ type + condition and marioni ~ run + tissue ---------------------------
real <- list(pasilla = list(design = ~ type + condition,
                            contrast = c("condition", "treated", "untreated"), stride = 16),
             marioni = list(design = ~ run + tissue, contrast = c("tissue", "Liver", "Kidney"),
                            stride = 6))
for (study in names(real)) {
  cs <- real[[study]]
  site <- read_site(study)
  dds <- run_deseq(site, cs$design)
  keep <- keep_genes(dds, cs$stride)
  res05 <- results(dds, contrast = cs$contrast, alpha = 0.05)
  res10 <- results(dds, contrast = cs$contrast, alpha = 0.1)
  # metadata(res): the independent-filtering threshold fed_de must reproduce
  write_json_file(list(alpha0.05 = ifilter_facts(res05), alpha0.1 = ifilter_facts(res10),
                       trend = trend_facts(dds), coefficients = resultsNames(dds),
                       sizeFactors = as.list(sizeFactors(dds)),
                       R = R.version.string, DESeq2 = as.character(packageVersion("DESeq2"))),
                  study, "facts.json")
  # the default analysis itself (the shared refs hold it with 15 digits, every gene)
  co <- coef(dds)
  colnames(co) <- paste0("coef_", colnames(co))
  write_table(data.frame(gene = rownames(dds), baseMean = res05$baseMean, res_cols(res05),
                         disp_cols(dds), co)[keep, ], study, "default.csv.gz")
  calls <- data.frame(gene = rownames(dds), calls_cols(res05, "default"))
  # every gene's baseMean and p-value: the input of independent filtering
  write_table(data.frame(gene = rownames(dds), baseMean = res05$baseMean,
                         pvalue = res05$pvalue), study, "pvalues.csv.gz")
  write_table(ifilter_table(res05), study, "ifilter_alpha0.05.csv.gz")
  write_table(ifilter_table(res10), study, "ifilter_alpha0.1.csv.gz")
  # mcols(dds): iteration counts and convergence for every gene; deviance and maxCooks
  mc <- mcols(dds)
  write_table(data.frame(gene = rownames(dds), dispGeneIter = mc$dispGeneIter,
                         dispIter = mc$dispIter, betaIter = mc$betaIter,
                         betaConv = mc$betaConv)[!mc$allZero, ], study, "iterations.csv.gz")
  write_table(data.frame(gene = rownames(dds), deviance = mc$deviance,
                         maxCooks = mc$maxCooks)[keep, ], study, "mcols.csv.gz")
  if (study == "pasilla") {
    # lfcThreshold = 1, greaterAbs and lessAbs (log2FoldChange and lfcSE as the default results)
    ga <- results(dds, contrast = cs$contrast, alpha = alpha, lfcThreshold = 1,
                  altHypothesis = "greaterAbs")
    la <- results(dds, contrast = cs$contrast, alpha = alpha, lfcThreshold = 1,
                  altHypothesis = "lessAbs")
    write_table(data.frame(gene = rownames(dds), test_cols(ga, "greaterAbs"),
                           test_cols(la, "lessAbs"))[keep, ], study, "lfc_threshold1.csv.gz")
    calls <- data.frame(calls, calls_cols(ga, "greaterAbs"), calls_cols(la, "lessAbs"))
    # LRT against the partial reduced model ~ type
    lrt <- run_deseq(site, cs$design, test = "LRT", reduced = ~ type)
    rl <- results(lrt, alpha = alpha)
    write_table(data.frame(gene = rownames(lrt), test_cols(rl, "lrt"),
                           fullDeviance = mcols(lrt)$deviance)[keep, ],
                study, "lrt_reduced_type.csv.gz")
    calls <- data.frame(calls, calls_cols(rl, "lrt"))
    write_json_file(ifilter_facts(rl), study, "lrt_reduced_type_facts.json")

    # ---- 2. interaction ~ type + condition + type:condition ------------------------------
    inter <- run_deseq(site, ~ type + condition + type:condition)
    nm <- resultsNames(inter)
    ri <- results(inter, name = nm[4], alpha = alpha)
    rc <- results(inter, name = nm[3], alpha = alpha)
    write_table(data.frame(gene = rownames(inter), res_cols(ri, "interaction"),
                           res_cols(rc, "condition"), disp_cols(inter))[keep, ],
                study, "interaction.csv.gz")
    calls <- data.frame(calls, calls_cols(ri, "interaction"), calls_cols(rc, "condition"))
    write_json_file(list(coefficients = nm, interaction_name = nm[4], condition_name = nm[3],
                         interaction = ifilter_facts(ri), condition = ifilter_facts(rc),
                         trend = trend_facts(inter)), study, "interaction_facts.json")
  }

  # ---- 5. fitType = "local" ---------------------------------------------------------------
  loc <- run_deseq(site, cs$design, fitType = "local")
  rloc <- results(loc, contrast = cs$contrast, alpha = alpha)
  write_table(data.frame(gene = rownames(loc), disp_cols(loc), res_cols(rloc))[keep, ],
              study, "local.csv.gz")
  write_table(data.frame(calls, calls_cols(rloc, "local")), study, "calls.csv.gz")
  write_json_file(list(results = ifilter_facts(rloc), trend = trend_facts(loc)), study,
                  "local_facts.json")
}

# ---- 3. demo3: contrast between two non-reference levels, all-zero groups ----------------
site <- read_site("demo3")
site$meta$site <- NULL
dds <- run_deseq(site, ~ batch + condition)
r32 <- results(dds, contrast = c("batch", "b3", "b2"), alpha = alpha)
rcd <- results(dds, name = "condition_B_vs_A", alpha = alpha)
keep <- !mcols(dds)$allZero
write_table(data.frame(gene = rownames(dds), baseMean = r32$baseMean, res_cols(r32, "b3_vs_b2"),
                       res_cols(rcd, "condition"), disp_cols(dds))[keep, ],
            "demo3", "results.csv.gz")
write_json_file(list(b3_vs_b2 = ifilter_facts(r32), condition = ifilter_facts(rcd),
                     trend = trend_facts(dds), coefficients = resultsNames(dds),
                     sizeFactors = as.list(sizeFactors(dds))), "demo3", "facts.json")

# ---- 4. demo3_age: a continuous covariate -------------------------------------------------
site <- read_site("demo3_age")
site$meta$site <- NULL
dds <- run_deseq(site, ~ age + batch + condition)
rage <- results(dds, name = "age", alpha = alpha)
rcd <- results(dds, name = "condition_B_vs_A", alpha = alpha)
keep <- !mcols(dds)$allZero
write_table(data.frame(gene = rownames(dds), baseMean = rage$baseMean, res_cols(rage, "age"),
                       res_cols(rcd, "condition"), disp_cols(dds))[keep, ],
            "demo3_age", "results.csv.gz")
write_json_file(list(age = ifilter_facts(rage), condition = ifilter_facts(rcd),
                     trend = trend_facts(dds), coefficients = resultsNames(dds),
                     sizeFactors = as.list(sizeFactors(dds))), "demo3_age", "facts.json")
writeLines(capture.output(sessionInfo()), file.path(out, "sessionInfo.txt"))
