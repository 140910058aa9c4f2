# R DESeq2 LRT references for fed_de's tests (DESeq2 1.38.3, R 4.2.2).
# Run from this folder: Rscript make_lrt_refs.R /path/to/shared/data
# Writes <case>_lrt.csv (results) and <case>_lrt_dispersions.csv with 17 significant digits.
suppressMessages(library(DESeq2))
args <- commandArgs(trailingOnly = TRUE)
data <- if (length(args)) args[1] else "../../../../../shared/data"
cases <- list(
  multi_factor = list(dir = "pydeseq2_synthetic", design = ~ group + condition,
                      reduced = ~ group),
  multi_factor_condition = list(dir = "pydeseq2_synthetic", design = ~ group + condition,
                                reduced = ~ condition),
  continuous = list(dir = "pydeseq2_continuous",
                    design = ~ group + condition + measurement,
                    reduced = ~ group + condition),
  continuous_measurement = list(dir = "pydeseq2_continuous",
                                design = ~ group + condition + measurement,
                                reduced = ~ group + measurement)
)
for (name in names(cases)) {
  cs <- cases[[name]]
  counts <- read.csv(file.path(data, cs$dir, "counts.csv"), row.names = 1, check.names = FALSE)
  meta <- read.csv(file.path(data, cs$dir, "metadata.csv"), row.names = 1)
  for (f in c("condition", "group")) meta[[f]] <- factor(meta[[f]])
  dds <- DESeqDataSetFromMatrix(t(as.matrix(counts)), meta, design = cs$design)
  dds <- DESeq(dds, test = "LRT", reduced = cs$reduced, quiet = TRUE)
  res <- results(dds)
  out <- data.frame(gene = rownames(res), as.data.frame(res))
  write.csv(format(out, digits = 17), paste0(name, "_lrt.csv"), row.names = FALSE, quote = FALSE)
  disp <- data.frame(gene = rownames(dds), dispersion = dispersions(dds),
                     fullDeviance = mcols(dds)$deviance)
  write.csv(format(disp, digits = 17), paste0(name, "_lrt_dispersions.csv"), row.names = FALSE,
            quote = FALSE)
}
writeLines(capture.output(sessionInfo()), "sessionInfo.txt")
