# R DESeq2 on a study of two genes (fed_de's demo generator, make_demo_study(n_samples=200,
# n_genes=2, seed=4), sites pooled): the parametric trend fails, and the local fit sees one
# gene above 100 * minDisp, a single abscissa, where locfit predicts a constant.
# Run from this folder: Rscript make_refs.R (writes r_results.csv, r_version.txt).
suppressMessages(library(DESeq2))
cts <- as.matrix(read.csv("counts.csv", row.names = 1, check.names = FALSE))
cd <- read.csv("metadata.csv", row.names = 1)
cd$batch <- factor(cd$batch)
cd$condition <- factor(cd$condition)
dds <- DESeqDataSetFromMatrix(cts, cd, ~ batch + condition)
dds <- DESeq(dds)
res <- as.data.frame(results(dds))
out <- cbind(res, as.data.frame(mcols(dds)[, c("dispGeneEst", "dispFit", "dispMAP",
                                               "dispersion")]))
write.csv(out, "r_results.csv")
writeLines(c(paste("DESeq2", packageVersion("DESeq2")), paste("locfit",
             packageVersion("locfit")), R.version.string), "r_version.txt")
