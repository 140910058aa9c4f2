# R DESeq2 reference for tests/test_deseq2_accuracy.py's demo study (see make_data.py).
# Rscript tests/data/r_extra/demo120/make_refs.R  (from the repository root, after make_data.py;
# counts.csv may be deleted afterwards)
suppressMessages(library(DESeq2))
d <- "tests/data/r_extra/demo120/"
cts <- as.matrix(read.csv(paste0(d, "counts.csv"), row.names = 1, check.names = FALSE))
md <- read.csv(paste0(d, "metadata.csv"), row.names = 1)
md$condition <- factor(md$condition)
md$batch <- factor(md$batch)
dds <- DESeqDataSetFromMatrix(cts, md, ~ batch + condition)
dds <- DESeq(dds, quiet = TRUE)
r <- results(dds, contrast = c("condition", "B", "A"))
write.csv(as.data.frame(r), paste0(d, "r_results.csv"))
writeLines(paste("R", getRversion(), "DESeq2", packageVersion("DESeq2")),
           paste0(d, "r_version.txt"))
