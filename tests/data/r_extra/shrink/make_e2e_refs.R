# End-to-end R references for fed_de's VST and PCA on demo3 (fed_de.demo_data.make_demo_study(
# 48, 400, seed=3), ~ batch + condition, see demo3/make_data.py), where fed_de's fit agrees with
# R closely. Run from this folder: Rscript make_e2e_refs.R   (R 4.2.2, DESeq2 1.38.3)
#   demo3/vst_blind_false.csv.gz  varianceStabilizingTransformation(blind = FALSE), all genes
#   demo3/plotpca.json            plotPCA(intgroup = "condition", returnData = TRUE): PC1, PC2
#                                 per sample, percentVar; the 400 genes ranked by rowVars
suppressMessages(library(DESeq2))
suppressMessages(library(jsonlite))

counts <- t(as.matrix(read.csv(gzfile("demo3/counts.csv.gz"), row.names = 1,
                               check.names = FALSE)))
meta <- read.csv("demo3/metadata.csv", row.names = 1)
meta <- meta[colnames(counts), , drop = FALSE]
for (f in c("batch", "condition")) meta[[f]] <- factor(meta[[f]])
dds <- DESeq(DESeqDataSetFromMatrix(counts, meta, ~ batch + condition), quiet = TRUE)
vsd <- varianceStabilizingTransformation(dds, blind = FALSE)
con <- gzfile("demo3/vst_blind_false.csv.gz", "w")
write.csv(signif(t(assay(vsd)), 12), con, quote = FALSE)
close(con)
pd <- plotPCA(vsd, intgroup = "condition", returnData = TRUE)
rv <- MatrixGenerics::rowVars(assay(vsd))
writeLines(toJSON(list(samples = as.character(pd$name), PC1 = pd$PC1, PC2 = pd$PC2,
                       percentVar = attr(pd, "percentVar"),
                       ranked_genes = rownames(dds)[order(rv, decreasing = TRUE)],
                       trend = as.list(attr(dispersionFunction(dds), "coefficients")),
                       size_factors = unname(sizeFactors(dds))),
                  digits = NA, pretty = TRUE), "demo3/plotpca.json")
