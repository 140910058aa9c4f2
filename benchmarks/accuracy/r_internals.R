# DESeq2's intermediates, objectives and plug-in experiments for the step-by-step comparison
# with fed_de (issue 13). R 4.2.2 + DESeq2 1.38.3. From the repository root, after
# run_fed_de.py:
#
#   Rscript benchmarks/accuracy/r_internals.R pasilla [DATADIR]
#   Rscript benchmarks/accuracy/r_internals.R marioni [DATADIR]
#
# DATADIR (default /work/scratch/accuracy_data) holds fed_<study>_one.csv.gz and
# fed_<study>_one_mu.csv.gz; this writes DATADIR/r_<study>_*.csv.gz:
#
# genes.csv.gz   per non-zero gene, R's path: the gene-wise start (rough, moments, alpha_init),
#                the raw line search (log alpha, iterations, accepted steps, initial / last log
#                posterior, last gradient and curvature), DESeq2's decisions (noIncrease: start
#                kept; refit on the grid: iter == 1 or == maxit and estimate > 1e-7), the grid
#                value; the same for the MAP search; and the objectives at R's and fed_de's
#                values and at the optimum (found here by a dense grid + Newton), at R's mu and
#                at fed_de's mu: gw_* without prior, map_* with R's prior (trend and variance),
#                mapfed_* with fed_de's prior.
# mu.csv.gz      R's means of the dispersion fit (genes x samples).
# plug_*.csv.gz  R's nbinomWaldTest + results(alpha = 0.05) (and the LRT for pasilla) with the
#                dispersions replaced:
#                  plug_fed:      fed_de's final dispersions;
#                  plug_optmap:   the optimum of R's own MAP objective (R's mu, prior), R's
#                                 outlier rule: how much R's stopping short changes;
#                  plug_fedfix:   fed_de's gene-wise, trend, prior and outlier flags, with the
#                                 optimum of fed_de's MAP objective (fed_de's mu): fed_de once
#                                 its MAP search reaches the optimum;
#                  plug_fedgw:    fed_de's gene-wise estimates through R's trend, prior, MAP;
#                  plug_optgw:    the optimum of R's gene-wise objective through R's trend,
#                                 prior, MAP (what an exact gene-wise optimiser gives).
suppressMessages(library(DESeq2))
args <- commandArgs(trailingOnly = TRUE)
study <- args[1]
datadir <- if (length(args) >= 2) args[2] else "/work/scratch/accuracy_data"
here <- "tests/data/r_extra/real"
designs <- list(pasilla = ~ type + condition, marioni = ~ run + tissue)
contrasts <- list(pasilla = c("condition", "treated", "untreated"),
                  marioni = c("tissue", "Liver", "Kidney"))
minDisp <- 1e-8
fmt <- function(v) {
  if (is.logical(v)) return(ifelse(is.na(v), "NA", ifelse(v, "TRUE", "FALSE")))
  if (!is.numeric(v)) return(as.character(v))
  ifelse(is.na(v), "NA", sprintf("%.17g", v))
}
write_gz <- function(df, file) {
  df[] <- lapply(df, fmt)
  con <- gzfile(file.path(datadir, paste0("r_", study, "_", file)), "w")
  write.csv(df, con, row.names = FALSE, quote = FALSE)
  close(con)
}
c_factor <- function(x) factor(x, levels = sort(unique(x), method = "radix"))

cts <- as.matrix(read.csv(file.path(here, study, "counts.csv.gz"), row.names = 1,
                          check.names = FALSE))
md <- read.csv(file.path(here, study, "metadata.csv"), row.names = 1)[rownames(cts), ]
for (v in names(md)) md[[v]] <- c_factor(md[[v]])
dds <- DESeqDataSetFromMatrix(t(cts), md, designs[[study]])

# ---- the DESeq() pipeline, one step at a time --------------------------------------------
dds <- estimateSizeFactors(dds)
dds <- estimateDispersionsGeneEst(dds, quiet = TRUE)
mu_all <- assays(dds)[["mu"]]
dds <- estimateDispersionsFit(dds, quiet = TRUE)
dds <- estimateDispersionsMAP(dds, quiet = TRUE)
fit <- nbinomWaldTest(dds, quiet = TRUE)
res_r <- results(fit, contrast = contrasts[[study]], alpha = 0.05)

nz <- !mcols(dds)$allZero
X <- model.matrix(designs[[study]], md)
y <- counts(dds)[nz, , drop = FALSE]
mu <- mu_all[nz, , drop = FALSE]
G <- nrow(y)
maxDisp <- max(10, ncol(y))
ones <- matrix(1, G, ncol(y))
mc <- mcols(dds)[nz, ]
priorVar <- attr(dispersionFunction(dds), "dispPriorVar")

line_search <- function(mu, start, prior_mean, prior_var, use_prior, maxit = 100L) {
  DESeq2:::fitDispWrapper(ySEXP = y, xSEXP = X, mu_hatSEXP = mu, log_alphaSEXP = log(start),
                          log_alpha_prior_meanSEXP = prior_mean,
                          log_alpha_prior_sigmasqSEXP = prior_var,
                          min_log_alphaSEXP = log(minDisp / 10), kappa_0SEXP = 1,
                          tolSEXP = 1e-6, maxitSEXP = as.integer(maxit),
                          usePriorSEXP = use_prior, weightsSEXP = ones,
                          useWeightsSEXP = FALSE, weightThresholdSEXP = 0.01,
                          useCRSEXP = TRUE)
}
# DESeq2's exact objective (log-likelihood + Cox-Reid [+ log-normal prior]) at alpha, with its
# gradient and curvature in log alpha: the line search run for zero iterations.
objective <- function(mu, alpha, prior_mean, prior_var, use_prior) {
  r <- line_search(mu, alpha, prior_mean, prior_var, use_prior, maxit = 0L)
  list(f = r$initial_lp, g = r$initial_dlp, h = r$last_d2lp)
}
# Global maximiser over [minDisp, maxDisp]: 400-point grid in log alpha, three 41-point
# refinements around the best point, then Newton steps kept only where they improve.
optimum <- function(mu, prior_mean, prior_var, use_prior) {
  grid <- seq(log(minDisp), log(maxDisp), length.out = 400)
  step <- grid[2] - grid[1]
  vals <- sapply(grid, function(a) objective(mu, rep(exp(a), G), prior_mean, prior_var,
                                             use_prior)$f)
  best <- grid[max.col(vals, ties.method = "first")]
  for (k in 1:3) {
    local <- sapply(seq(-1, 1, length.out = 41), function(d) {
      a <- pmin(pmax(best + d * step, log(minDisp)), log(maxDisp))
      objective(mu, exp(a), prior_mean, prior_var, use_prior)$f
    })
    off <- seq(-1, 1, length.out = 41)[max.col(local, ties.method = "first")]
    best <- pmin(pmax(best + off * step, log(minDisp)), log(maxDisp))
    step <- step / 20
  }
  for (k in 1:3) {
    o <- objective(mu, exp(best), prior_mean, prior_var, use_prior)
    cand <- pmin(pmax(best - o$g / o$h, log(minDisp)), log(maxDisp))
    ok <- is.finite(cand) & o$h < 0
    oc <- objective(mu, exp(ifelse(ok, cand, best)), prior_mean, prior_var, use_prior)
    better <- ok & oc$f > o$f
    best[better] <- cand[better]
  }
  exp(best)
}

# ---- gene-wise: R's path -----------------------------------------------------------------
rough <- DESeq2:::roughDispEstimate(y = counts(dds, normalized = TRUE)[nz, , drop = FALSE],
                                    x = X)
moments <- DESeq2:::momentsDispEstimate(dds[nz, ])
alpha_init <- pmin(pmax(minDisp, pmin(rough, moments)), maxDisp)
gw <- line_search(mu, alpha_init, log(alpha_init), 1, FALSE)
gw_raw <- pmin(exp(gw$log_alpha), maxDisp)
noIncrease <- gw$last_lp < gw$initial_lp + abs(gw$initial_lp) / 1e6
gw_kept <- ifelse(noIncrease, alpha_init, gw_raw)
gw_refit <- !(gw$iter < 100 & gw$iter != 1) & gw_kept > minDisp * 10
stopifnot(isTRUE(all.equal(pmin(pmax(ifelse(gw_refit, mc$dispGeneEst, gw_kept), minDisp),
                                 maxDisp), mc$dispGeneEst, tolerance = 0)))

# ---- MAP: R's path -----------------------------------------------------------------------
map_init <- ifelse(mc$dispGeneEst > 0.1 * mc$dispFit, mc$dispGeneEst, mc$dispFit)
mp <- line_search(mu, map_init, log(mc$dispFit), priorVar, TRUE)
map_raw <- exp(mp$log_alpha)
stopifnot(all(mp$iter == mc$dispIter))

# ---- fed_de's values and means -------------------------------------------------------------
fed <- read.csv(file.path(datadir, paste0("fed_", study, "_one.csv.gz")), row.names = 1)
fed <- fed[rownames(y), ]
fed_mu <- as.matrix(read.csv(file.path(datadir, paste0("fed_", study, "_one_mu.csv.gz")),
                             row.names = 1, check.names = FALSE))[rownames(y), colnames(y)]
ftrend <- jsonlite::fromJSON(file.path(datadir, paste0("fed_", study, "_one_trend.json")))

out <- data.frame(gene = rownames(y), baseMean = mc$baseMean, rough = rough,
                  moments = moments, alpha_init = alpha_init,
                  gw_ls = exp(gw$log_alpha), gw_iter = gw$iter, gw_accept = gw$iter_accept,
                  gw_initial_lp = gw$initial_lp, gw_last_lp = gw$last_lp,
                  gw_last_dlp = gw$last_dlp, gw_last_d2lp = gw$last_d2lp,
                  gw_noIncrease = noIncrease, gw_gridRefit = gw_refit,
                  dispGeneEst = mc$dispGeneEst, dispFit = mc$dispFit,
                  map_init = map_init, map_ls = map_raw, map_iter = mp$iter,
                  map_accept = mp$iter_accept, map_last_dlp = mp$last_dlp,
                  map_gridRefit = mp$iter >= 100, dispMAP = mc$dispMAP,
                  dispersion = mc$dispersion, dispOutlier = mc$dispOutlier)

cat("gene-wise objectives\n")
for (w in c("r", "fed")) {
  m <- if (w == "r") mu else fed_mu
  opt <- optimum(m, log(alpha_init), 1, FALSE)
  out[[paste0("gw_opt_mu", w)]] <- opt
  for (who in c("r", "fed", "opt")) {
    a <- switch(who, r = mc$dispGeneEst, fed = fed$disp_gene, opt = opt)
    o <- objective(m, a, log(alpha_init), 1, FALSE)
    out[[paste0("gw_f_", who, "_mu", w)]] <- o$f
    out[[paste0("gw_g_", who, "_mu", w)]] <- o$g
  }
}
cat("MAP objectives\n")
for (w in c("r", "fed")) {
  m <- if (w == "r") mu else fed_mu
  for (pr in c("r", "fed")) {
    pmean <- if (pr == "r") log(mc$dispFit) else log(fed$disp_fit)
    pvar <- if (pr == "r") priorVar else ftrend$disp_prior_var
    tag <- paste0(if (pr == "r") "map" else "mapfed", "_")
    opt <- optimum(m, pmean, pvar, TRUE)
    out[[paste0(tag, "opt_mu", w)]] <- opt
    for (who in c("r", "fed", "opt")) {
      a <- switch(who, r = mc$dispMAP, fed = fed$disp_map, opt = opt)
      o <- objective(m, a, pmean, pvar, TRUE)
      out[[paste0(tag, "f_", who, "_mu", w)]] <- o$f
    }
  }
}
write_gz(out, "genes.csv.gz")
write_gz(data.frame(gene = rownames(y), mu), "mu.csv.gz")

# ---- plug-in experiments -------------------------------------------------------------------
plug <- function(dds_in, disp, tag) {
  d <- dds_in
  full <- rep(NA_real_, nrow(d))
  full[nz] <- disp
  dispersions(d) <- full
  d <- nbinomWaldTest(d, quiet = TRUE)
  r <- results(d, contrast = contrasts[[study]], alpha = 0.05)
  df <- data.frame(gene = rownames(d), dispersion = full, log2FoldChange = r$log2FoldChange,
                   lfcSE = r$lfcSE, stat = r$stat, pvalue = r$pvalue, padj = r$padj,
                   filterThreshold = unname(metadata(r)$filterThreshold))
  if (study == "pasilla") {
    for (red in list(list("lrt1", ~ 1), list("lrttype", ~ type))) {
      l <- results(nbinomLRT(d, reduced = red[[2]], quiet = TRUE), alpha = 0.05)
      df[[paste0(red[[1]], "_stat")]] <- l$stat
      df[[paste0(red[[1]], "_pvalue")]] <- l$pvalue
      df[[paste0(red[[1]], "_padj")]] <- l$padj
    }
  }
  write_gz(df[nz, ], paste0("plug_", tag, ".csv.gz"))
}
# R's own final dispersions through the same code: checks the plug-in path reproduces R
plug(dds, mc$dispersion, "r")
plug(dds, fed$dispersion, "fed")
opt_final <- ifelse(mc$dispOutlier, mc$dispGeneEst, out$map_opt_mur)
plug(dds, opt_final, "optmap")
# fed_de's own gene-wise, trend and prior with its MAP search run to the optimum (fed_de's mu):
# what fed_de gives once its MAP search converges
fed_fixed <- ifelse(as.logical(fed$disp_outlier), fed$disp_gene, out$mapfed_opt_mufed)
plug(dds, fed_fixed, "fedfix")
# gene-wise estimates replaced, then R's own trend, prior and MAP
from_genewise <- function(gw_values, tag) {
  d <- dds
  full <- rep(NA_real_, nrow(d))
  full[nz] <- gw_values
  mcols(d)$dispGeneEst <- full
  d <- estimateDispersionsFit(d, quiet = TRUE)
  d <- estimateDispersionsMAP(d, quiet = TRUE)
  f <- dispersionFunction(d)
  write(jsonlite::toJSON(list(coefficients = as.list(attr(f, "coefficients")),
                              fitType = attr(f, "fitType"),
                              varLogDispEsts = attr(f, "varLogDispEsts"),
                              dispPriorVar = attr(f, "dispPriorVar")),
                         auto_unbox = TRUE, digits = NA),
        file.path(datadir, paste0("r_", study, "_plug_", tag, "_trend.json")))
  plug(d, mcols(d)$dispersion[nz], tag)
}
from_genewise(pmin(pmax(fed$disp_gene, minDisp), maxDisp), "fedgw")
from_genewise(out$gw_opt_mur, "optgw")
cat("done\n")
