# R DESeq2 references for the injected-outlier dataset (Rscript make_refs.R)
suppressMessages(library(DESeq2))
counts <- t(as.matrix(read.csv("counts.csv", row.names = 1)))
meta <- read.csv("metadata.csv", row.names = 1, stringsAsFactors = TRUE)
meta$condition <- factor(meta$condition, levels = c("A", "B"))
meta$batch <- factor(meta$batch, levels = c("b1", "b2"))
dds <- DESeqDataSetFromMatrix(counts, meta, ~ batch + condition)
dds <- DESeq(dds, quiet = TRUE)
res <- results(dds, contrast = c("condition", "B", "A"))
out <- data.frame(res)
mc <- mcols(dds)
out$replace <- mc$replace
out$maxCooks <- mc$maxCooks
out$dispGeneEst <- mc$dispGeneEst
out$dispersion <- mc$dispersion
write.csv(out, "r_results.csv")
write.csv(data.frame(sizeFactor = sizeFactors(dds)), "r_size_factors.csv")
cat(as.character(packageVersion("DESeq2")), "\n", file = "r_version.txt")
