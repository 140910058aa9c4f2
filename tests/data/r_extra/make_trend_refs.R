# Extra R references for tests/test_core_trend.py (fed_de.core.trend).
# Generated with R 4.2.2 + DESeq2 1.38.3 (Debian bookworm packages):
#   cd tests/data/r_extra && Rscript make_trend_refs.R
# Each case writes <case>_genes.csv (baseMean, dispGeneEst -> dispFit, dispOutlier) and
# <case>_summary.csv (fitType, coefficients, varLogDispEsts, dispPriorVar, m, p). The trend is
# fitted by DESeq2's own estimateDispersionsFit / estimateDispersionsPriorVar on a
# DESeqDataSet whose mcols are overwritten with the simulated dispGeneEst / baseMean.
suppressMessages(library(DESeq2))
options(digits = 17)

run_case <- function(name, base_mean, disp_gene, m, p, fitType = "parametric") {
  G <- length(base_mean)
  all_zero <- is.na(base_mean) | base_mean <= 0
  counts <- matrix(1L, nrow = G, ncol = m)
  counts[all_zero, ] <- 0L
  cd <- data.frame(x = seq_len(m))
  for (j in seq_len(p - 1)) cd[[paste0("v", j)]] <- rnorm(m)
  frm <- if (p == 1) ~ 1 else as.formula(paste("~", paste(paste0("v", seq_len(p - 1)), collapse = "+")))
  dds <- suppressMessages(DESeqDataSetFromMatrix(counts, cd, frm))
  sizeFactors(dds) <- rep(1, m)
  dds <- DESeq2:::getBaseMeansAndVariances(dds)
  bm <- base_mean; bm[all_zero] <- 0
  mcols(dds)$baseMean <- bm
  dg <- disp_gene; dg[all_zero] <- NA
  mcols(dds)$dispGeneEst <- dg
  dds <- suppressMessages(estimateDispersionsFit(dds, fitType = fitType))
  fn <- dispersionFunction(dds)
  mm <- model.matrix(frm, cd)
  stopifnot(ncol(mm) == p)
  prior <- estimateDispersionsPriorVar(dds, modelMatrix = mm)
  vld <- attr(fn, "varLogDispEsts")
  dispFit <- mcols(dds)$dispFit
  outl <- log(dg) > log(dispFit) + 2 * sqrt(vld)
  outl[is.na(outl)] <- FALSE
  coefs <- attr(fn, "coefficients")
  if (is.null(coefs)) coefs <- c(NA, NA)
  meanDisp <- attr(fn, "mean")
  if (is.null(meanDisp)) meanDisp <- NA
  write.csv(data.frame(baseMean = base_mean, dispGeneEst = disp_gene, dispFit = dispFit,
                       dispOutlier = outl),
            paste0(name, "_genes.csv"), row.names = FALSE)
  write.csv(data.frame(fitType = attr(fn, "fitType"), asymptDisp = coefs[1],
                       extraPois = coefs[2], meanDisp = meanDisp, varLogDispEsts = vld,
                       dispPriorVar = prior, m = m, p = p),
            paste0(name, "_summary.csv"), row.names = FALSE)
}

# A: 2000 genes around 0.05 + 2/mu with large log-normal scatter, 40 genes at minDisp
#    (excluded by useForFit), 10 all-zero genes; m - p = 10 so dispPriorVar > 0.25.
set.seed(42)
mu <- 10^runif(2000, 0.3, 4)
dg <- (0.05 + 2 / mu) * exp(rnorm(2000, 0, 0.9))
dg[sample(2000, 40)] <- 1e-8
mu[1:10] <- NA; dg[1:10] <- NA
run_case("param2000", mu, dg, m = 12, p = 2)

# B: same kind of data, fitType = "mean" with 3000 genes (R's trim = 0.001 drops 4 + 4).
set.seed(7)
mu <- 10^runif(3000, 0, 4)
dg <- (0.1 + 1 / mu) * exp(rnorm(3000, 0, 1))
dg[sample(3000, 30)] <- 1e-8
run_case("mean3000", mu, dg, m = 20, p = 3, fitType = "mean")

# C: dispersion increasing with the mean: extraPois < 0, the parametric fit fails in R
#    (R then uses fitType = "local").
set.seed(3)
mu <- 10^runif(300, 0, 4)
dg <- (0.01 * mu^0.5) * exp(rnorm(300, 0, 0.3))
run_case("paramfail", mu, dg, m = 10, p = 2)

# D: small residual df (m - p = 1, 2, 3): residuals log(chi2_df/df) + N(0, v) around a
#    parametric trend; R's Monte-Carlo KL matching (set.seed(2), R's RNG and loess).
for (df in 1:3) {
  set.seed(100 + df)
  G <- 3000
  mu <- 10^runif(G, 0.5, 4)
  tr <- 0.05 + 2 / mu
  dg <- tr * exp(log(rchisq(G, df) / df) + rnorm(G, 0, 1))
  run_case(paste0("smalldf", df), mu, dg, m = 2 + df, p = 2)
}

# E: loess(span = 0.2) as used in the small-df branch, on a fixed noisy KL-like curve:
#    surface = "direct" (what fed_de computes) and the default "interpolate".
set.seed(11)
grid <- seq(0, 8, length = 200)
y <- (grid - 1.3)^2 / 10 + 0.05 * sin(5 * grid) + rnorm(200, 0, 0.02)
fine <- seq(0, 8, length = 1000)
direct <- predict(loess(y ~ grid, span = 0.2, surface = "direct"), fine)
interp <- predict(loess(y ~ grid, span = 0.2), fine)
write.csv(data.frame(x = grid, y = y), "loess_input.csv", row.names = FALSE)
write.csv(data.frame(x = fine, direct = direct, interpolate = interp), "loess_output.csv",
          row.names = FALSE)

# F: pieces of the small-df branch for case smalldf1 (m - p = 1), recomputed exactly as
#    estimateDispersionsPriorVar does with set.seed(2): the KL curve R smoothed (its argmin
#    is R's dispPriorVar), and KL values for three deterministic "simulated" samples (ragged,
#    with values on breaks and outside (-10, 10)) to check the histogram / KL arithmetic.
g <- read.csv("smalldf1_genes.csv"); s <- read.csv("smalldf1_summary.csv")
res <- log(g$dispGeneEst) - log(g$dispFit)
obsDist <- res[g$dispGeneEst >= 1e-6]
brks <- -20:20/2
obsDist <- obsDist[obsDist > min(brks) & obsDist < max(brks)]
obsDistHist <- hist(obsDist, breaks = brks, plot = FALSE)
kl_of <- function(randDist) {
  randDist <- randDist[randDist > min(brks) & randDist < max(brks)]
  randDistHist <- hist(randDist, breaks = brks, plot = FALSE)
  z <- c(obsDistHist$density, randDistHist$density)
  small <- min(z[z > 0])
  sum(obsDistHist$density * (log(obsDistHist$density + small) - log(randDistHist$density + small)))
}
m <- s$m; p <- s$p
set.seed(2)
obsVarGrid <- seq(from = 0, to = 8, length = 200)
klDivs <- sapply(obsVarGrid, function(x)
  kl_of(log(rchisq(1e4, df = (m - p))) + rnorm(1e4, 0, sqrt(x)) - log(m - p)))
fine <- seq(from = 0, to = 8, length = 1000)
argminKL <- fine[which.min(predict(loess(klDivs ~ obsVarGrid, span = .2), fine))]
stopifnot(abs(max(argminKL, 0.25) - s$dispPriorVar) < 1e-12)
write.csv(data.frame(grid = obsVarGrid, klDivs = klDivs), "smalldf1_kl.csv", row.names = FALSE)
write.csv(data.frame(density = obsDistHist$density), "smalldf1_obs_density.csv", row.names = FALSE)
r1 <- c(qnorm(ppoints(3000), -0.3, 1.2), -9.5, -0.5, 0, 0.5, 1, 9.5, 10, -10)
r2 <- qnorm(ppoints(2000), 0.5, 3.5)
r3 <- log(qchisq(ppoints(4000), 1))
L <- max(length(r1), length(r2), length(r3))
pad <- function(v) c(v, rep(NA, L - length(v)))
write.csv(data.frame(r1 = pad(r1), r2 = pad(r2), r3 = pad(r3)), "kl_rand_input.csv",
          row.names = FALSE)
write.csv(data.frame(kl = c(kl_of(r1), kl_of(r2), kl_of(r3))), "kl_rand_output.csv",
          row.names = FALSE)

# G: stats::glm(y ~ I(x), family = Gamma("identity"), start = ...) itself, on data whose
#    IRLS steps leave the domain (mu <= 0: "step size truncated due to divergence"), one that
#    does not converge in 25 iterations, and one stopped by maxit = 2.
glm_in <- list(); glm_out <- list()
glm_case <- function(name, x, y, start, maxit = 25) {
  w <- character(0)
  f <- withCallingHandlers(
    glm(y ~ I(x), family = Gamma(link = "identity"), start = start,
        control = glm.control(maxit = maxit)),
    warning = function(w0) { w <<- c(w, conditionMessage(w0)); invokeRestart("muffleWarning") })
  glm_in[[name]] <<- data.frame(case = name, x = x, y = y, start0 = start[1], start1 = start[2],
                                maxit = maxit)
  glm_out[[name]] <<- data.frame(case = name, intercept = coef(f)[[1]], slope = coef(f)[[2]],
                                 converged = f$converged, iter = f$iter,
                                 halved = any(grepl("step size truncated", w)))
}
for (seed in 1:3) {
  set.seed(seed)
  x <- runif(15, 0, 1)
  y <- (1 / (0.05 + 3 * x)) * rgamma(15, shape = 1, rate = 1)
  glm_case(c("halve1", "halve2", "noconv")[seed], x, y, c(mean(y), 0))
}
set.seed(5)
x <- runif(40, 0, 1)
y <- pmax(5 - 4.95 * x, 0.01) * rgamma(40, shape = 2, rate = 2)
glm_case("plain", x, y, c(0.1, 1))
glm_case("maxit2", x, y, c(0.1, 1), maxit = 2)
write.csv(do.call(rbind, glm_in), "glm_input.csv", row.names = FALSE)
write.csv(do.call(rbind, glm_out), "glm_output.csv", row.names = FALSE)
