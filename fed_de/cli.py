"""The ``fed-de`` command line.

Global options come before the command: ``fed-de [--version] [--debug] [-q|-v] COMMAND``.
Errors go to stderr with a non-zero exit code (2: bad input or options; 1: unexpected).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer
from rich.table import Table

from fed_de import files
from fed_de.cli_common import (
    STATE,
    AltHypothesis,
    Backend,
    FedDECommand,
    FitType,
    SiteKind,
    SizeFactors,
    Test,
    cli_errors,
    command_line,
    configure,
    console,
    parse_sites,
    print_facts,
    record_failure,
    report_warnings,
    value,
)

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  help="Federated differential expression (DESeq2-grade).")

MIN_CELL_HELP = ("Disclosure rule: a site refuses a design cell with fewer samples (0 = off). "
                 "Applies from two sites on: a one-site run sends nothing to another "
                 "organisation and is not checked.")
MIN_POOLED_HELP = ("Disclosure rule (two sites on): the study refuses a pooled design cell "
                   "with fewer samples; 10-14 runs with a warning.")
ROUND_HELP = ("Round non-integer counts (e.g. salmon/kallisto estimates) instead of refusing "
              "them; counts that look log-transformed are still refused.")
FORCE_HELP = "Round counts even when they look log-transformed or normalised."
LAYER_HELP = ("AnnData layer holding the raw counts (e.g. counts, when X is normalised) of "
              "every .h5ad site; SITE=LAYER for one site (repeatable).")


def _version(show: bool) -> None:
    if show:
        import fed_de

        typer.echo(f"fed-de {fed_de.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print fed_de's version and exit."),
    debug: bool = typer.Option(False, "--debug",
                               help="Show the full traceback when a command fails."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="Print errors only: no progress, tables or warnings."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Also print what fed_de does (levels used, files read)."),
) -> None:
    """fed_de: the pooled DESeq2 answer from per-site sums, run as a substrafl compute plan."""
    configure(debug=debug, quiet=quiet, verbose=verbose)


@app.command(cls=FedDECommand)
@cli_errors("demo")
def demo(
    samples: int = typer.Option(150, help="Samples in the generated study."),
    genes: int = typer.Option(5000, help="Genes in the generated study."),
    seed: int = typer.Option(0, help="Random seed of the generated study."),
    out: Path | None = typer.Option(None, help="Folder for the site data and results."),
    report_path: Path | None = typer.Option(
        None, "--report", help="HTML report (default: OUT/report.html, else "
                               "fed_de_demo_report.html)."),
) -> None:
    """Simulate a three-hospital study, run fed_de on it (apeglm shrinkage, federated PCA),
    compare with the pooled analysis, and write an HTML report."""
    from fed_de.demo_run import run_demo

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_demo(n_samples=samples, n_genes=genes, seed=seed, out=out,
                          console=console, progress=not STATE["quiet"],
                          report=report_path)
    report_warnings(caught)
    if out is not None:
        files.write_json(out / "demo_report.json", report, default=str)


def _parse_layer(items: list[str]) -> str | dict[str, str] | None:
    """``--layer NAME`` (every site) or ``--layer SITE=NAME`` (repeatable)."""
    if not items:
        return None
    named = [i for i in items if "=" in i]
    if not named:
        if len(items) > 1:
            raise typer.BadParameter("--layer NAME applies to every site; give it once, or "
                                     "SITE=NAME per site")
        return items[0]
    if len(named) != len(items):
        raise typer.BadParameter("--layer: give one NAME for every site, or SITE=NAME per "
                                 "site, not both")
    return dict(i.split("=", 1) for i in items)


def _parse_levels(levels: list[str]) -> dict[str, list[str]]:
    out = {}
    for item in levels:
        if "=" not in item:
            raise typer.BadParameter(f"--levels expects FACTOR=REF,LEVEL2,..., got {item!r}")
        name, values = item.split("=", 1)
        out[name] = [v for v in values.split(",") if v]
    return out


def parse_contrast(text: str):
    """One ``--contrast``: ``FACTOR LEVEL REFERENCE`` (three words), comma-separated weights
    over the coefficients, or a coefficient name."""
    words = text.split()
    if len(words) == 3:
        return tuple(words)
    if len(words) != 1:
        raise typer.BadParameter(
            f"--contrast {text!r}: give FACTOR LEVEL REFERENCE (three words), a coefficient "
            "name, or comma-separated weights such as 0,0,1,-1")
    if "," in text:
        try:
            return [float(w) for w in text.split(",")]
        except ValueError:
            raise typer.BadParameter(f"--contrast {text!r}: weights must be numbers, e.g. "
                                     "0,0,1,-1") from None
    return text


@app.command(cls=FedDECommand)
@cli_errors("run")
def run(
    ctx: typer.Context,
    site: list[str] = typer.Option(
        [], "--site", help="NAME=PATH: a folder with counts + metadata tables (CSV, TSV or "
                           "featureCounts output) or an .h5ad (repeat; not with --backend "
                           "remote)."),
    design: str = typer.Option(..., "--design", help="Design formula, e.g. '~ batch + condition'."),
    contrast: list[str] = typer.Option(
        [], "--contrast", metavar="FACTOR LEVEL REF | COEF | W1,W2,..",
        help="A contrast: FACTOR LEVEL REFERENCE, a coefficient name, or comma-separated "
             "weights over the coefficients. Repeat for several (one results file each, no "
             "new round). Default: the last coefficient."),
    name: list[str] = typer.Option([], "--name", help="A coefficient to test (DESeq2's name=; "
                                                      "repeatable)."),
    alpha: float = typer.Option(0.1, help="Significance level for independent filtering."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (needed unless "
                                                        "--plan-only)."),
    levels: list[str] = typer.Option([], "--levels",
                                     help="Declared levels FACTOR=REF,LEVEL2,... (repeatable)."),
    size_factors: SizeFactors = typer.Option(SizeFactors.ratio, help="DESeq2's sfType."),
    fit_type: FitType = typer.Option(FitType.parametric, help="Dispersion trend (fitType)."),
    lfc_threshold: float = typer.Option(0.0, min=0.0, help="lfcThreshold of the Wald test."),
    alt_hypothesis: AltHypothesis = typer.Option(AltHypothesis.greaterAbs,
                                                 help="altHypothesis of the Wald test."),
    min_cell_size: int = typer.Option(3, min=0, help=MIN_CELL_HELP),
    min_pooled_cell_size: int = typer.Option(15, min=10, help=MIN_POOLED_HELP),
    round_counts: bool = typer.Option(False, help=ROUND_HELP),
    force_round_counts: bool = typer.Option(False, "--force-round-counts", help=FORCE_HELP),
    layer: list[str] = typer.Option([], "--layer", help=LAYER_HELP),
    test: Test = typer.Option(Test.Wald, "--test", help="Wald or LRT (with --reduced)."),
    reduced: str | None = typer.Option(None, "--reduced", help="Reduced design for the LRT."),
    cooks: bool = typer.Option(True, "--cooks/--no-cooks",
                               help="DESeq2's Cook's outlier filtering, replacement and refit."),
    min_replicates_for_replace: float | None = typer.Option(
        None, help="DESeq2's minReplicatesForReplace. Default: 7 for one site; from two sites "
                   "inf (outliers are filtered, not replaced: a refit would reveal them)."),
    backend: Backend = typer.Option(Backend.simulation, help="Where the plan runs."),
    workdir: Path | None = typer.Option(None, help="Run directory of the substra backends."),
    credentials: Path | None = typer.Option(None, help="Remote: credentials YAML."),
    keys: Path | None = typer.Option(None, help="Remote: dataset keys YAML (register-site)."),
    genes: Path | None = typer.Option(None, help="File with the study's genes, one per line."),
    timeout: float | None = typer.Option(None, help="Remote: seconds to wait for the plan."),
    plan_only: bool = typer.Option(False, "--plan-only",
                                   help="Print the plan and the messages; submit nothing."),
    shrink: str | None = typer.Option(
        None, "--shrink", help="LFC shrinkage after the fit: apeglm or normal (lfcShrink)."),
    shrink_coef: list[str] = typer.Option(
        [], "--shrink-coef", help="What to shrink: a coefficient name or FACTOR,LEVEL,REF "
                                  "(repeatable; default: the --contrast)."),
    posterior_threshold: float = typer.Option(
        0.0, help="With --shrink: t of the probAbsLFCgt column, P(|LFC| > t) (log2)."),
    credible_level: float = typer.Option(0.9, help="With --shrink: credible interval level."),
    pca: bool = typer.Option(False, "--pca", help="VST at each site and a federated PCA."),
    pca_genes: int = typer.Option(500, help="With --pca: the most variable genes used."),
    pca_group: str | None = typer.Option(None, help="With --pca: factor of the centroids."),
    plots: Path | None = typer.Option(None, "--plots", help="Folder for the plots (PNG + SVG)."),
    report: Path | None = typer.Option(None, "--report", help="Write a self-contained HTML "
                                                              "report here."),
    reference: Path | None = typer.Option(
        None, "--reference", help="Pooled reference results (CSV or fed_de run folder) "
                                  "compared in the report."),
    workers: int = typer.Option(1, "--workers", help="Simulation: worker processes running "
                                "a round's site tasks at once (-1: every CPU)."),
    spill_dir: Path | None = typer.Option(None, "--spill-dir", help="Simulation: keep "
                                          "messages and run states as files under this "
                                          "folder instead of in memory."),
    attach: str | None = typer.Option(None, "--attach", help="Remote: wait for this compute "
                                      "plan, submitted before with the same options, "
                                      "instead of submitting one (see fed-de download)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Simulation: keep the "
                                           "run's frontier in this folder, so that a failed "
                                           "run resumes (fed-de resume OUT)."),
    dp_epsilon: float | None = typer.Option(
        None, "--dp-epsilon", help="Opt-in differential privacy: (epsilon, --dp-delta)-DP of "
                                   "everything the aggregator sees, for one sample's counts "
                                   "(clipped contributions + Gaussian noise from every site; "
                                   "Cook's off; costs accuracy: docs/privacy.md)."),
    dp_delta: float = typer.Option(1e-6, "--dp-delta", help="With --dp-epsilon: delta."),
    dp_clip: float = typer.Option(1.0, "--dp-clip", help="With --dp-epsilon: scales every "
                                  "public clip bound (fed_de.bulk.dp.BOUNDS)."),
    dp_floor: bool = typer.Option(True, "--dp-floor/--no-dp-floor", help="With --dp-epsilon: "
                                  "final dispersions no lower than the trend."),
    resume_from: Path | None = typer.Option(
        None, "--resume-from", help="A folder holding a failed compute plan's state "
        "(resume.pkl, saved by a failed substra run or fed-de download): a new plan runs "
        "only the rounds after it (fed-de resume OUT sets it)."),
) -> None:
    """Run the federated DESeq2 pipeline (Wald or LRT) over the given sites.

    Writes results (one CSV per contrast), dispersions, coefficients, results.h5ad, run.json.
    """
    import fed_de
    from fed_de.bulk.results import check_results_options, contrast_label

    backend, test = value(backend), value(test)
    remote = backend == "remote"
    if remote and site:
        raise typer.BadParameter("--backend remote: the data stays at the hospitals; give "
                                 "--keys (written by fed-de register-site), not --site")
    if remote and (keys is None or (credentials is None and not plan_only)):
        raise typer.BadParameter("--backend remote needs --keys, and --credentials to submit")
    if out is None and not plan_only:
        raise typer.BadParameter("give --out DIR (the folder for the results), or --plan-only")
    sites = {} if remote else parse_sites(site)
    gene_list = genes.read_text().split() if genes else None
    contrasts = [parse_contrast(c) for c in contrast] + list(name)
    rounding = "force" if force_round_counts else round_counts
    check_results_options(alpha, lfc_threshold, value(alt_hypothesis))
    if reference is not None and not reference.exists():
        raise typer.BadParameter(f"--reference {reference} does not exist (a results CSV or "
                                 "a fed_de run folder)")
    post = _postfit_args(shrink, shrink_coef, pca, pca_genes, pca_group)
    if plan_only:
        _print_plan(sites, design, _parse_levels(levels) or None, gene_list, keys, test,
                    reduced, value(size_factors), min_cell_size, cooks, _parse_layer(layer),
                    post)
        return
    with warnings.catch_warnings(record=True) as caught, \
            record_failure(out, command_line(ctx, "run"), design=design, backend=backend):
        warnings.simplefilter("always")
        res = fed_de.deseq2(
            sites, design, contrasts=contrasts or None, alpha=alpha,
            levels=_parse_levels(levels) or None, size_factors=value(size_factors),
            fit_type=value(fit_type), min_cell_size=min_cell_size,
            min_pooled_cell_size=min_pooled_cell_size, round_counts=rounding,
            min_replicates_for_replace=min_replicates_for_replace,
            layer=_parse_layer(layer), progress=not STATE["quiet"], test=test, reduced=reduced,
            cooks=cooks, backend=backend, workdir=workdir, credentials=credentials,
            keys=keys, timeout=timeout, genes=gene_list, n_jobs=workers, spill_dir=spill_dir,
            attach=attach, checkpoint=checkpoint, resume_from=resume_from, **post,
            **_dp_args(dp_epsilon, dp_delta, dp_clip, dp_floor))
    res.facts["warnings"] = report_warnings(caught)
    if shrink:
        res.facts.update(posterior_threshold=posterior_threshold, credible_level=credible_level)
    res.facts.update(command_line=command_line(ctx, "run"), design=design, alpha=alpha,
                     test=test, cooks=res.facts["options"]["cooks"], reduced=reduced,
                     contrast=[contrast_label(res.study, c) for c in contrasts or [None]])
    kw = dict(lfc_threshold=lfc_threshold, alt_hypothesis=value(alt_hypothesis))
    # results first (the shrinkage columns beside the MLEs), then anything optional
    paths = res.write(out, contrasts or None, posterior=(posterior_threshold, credible_level),
                      **kw)
    _write_pca_tables(res, out)
    inferred = res.facts["options"]["levels_inferred"]
    if inferred:
        console.print("levels read from the sites (declare them with --levels to fix the "
                      "reference level): " + "; ".join(
                          f"{k}={','.join(res.study.levels[k])}" for k in inferred),
                      highlight=False, soft_wrap=True)
    for c in contrasts or [None]:
        label = contrast_label(res.study, c)
        console.print(f"\n[bold]{label}[/] ({paths['results:' + label].name})", highlight=False)
        console.print(str(res.summary(c, **kw)), highlight=False, markup=False)
    console.print(f"\nwrote {', '.join(sorted({p.name for p in paths.values()}))} to {out}",
                  highlight=False, soft_wrap=True)
    _write_postfit(res, contrasts[0] if contrasts else None, out, plots, report, reference)
    print_facts(res.facts, console=console)


def _dp_args(dp_epsilon: float | None, dp_delta: float, dp_clip: float,
             dp_floor: bool) -> dict:
    """``fed_de.deseq2``'s differential-privacy arguments (none unless --dp-epsilon; Cook's
    is then turned off by fed_de.deseq2, with a warning)."""
    if dp_epsilon is None:
        return {}
    return {"dp_epsilon": dp_epsilon, "dp_delta": dp_delta, "dp_clip": dp_clip,
            "dp_floor": dp_floor}


def _postfit_args(shrink, shrink_coef, pca, pca_genes, pca_group) -> dict:
    """``fed_de.deseq2``'s post-fit arguments from the command line's."""
    if not shrink and not pca:
        return {}
    coefs = [tuple(c.split(",")) if "," in c else c for c in shrink_coef]
    return {"shrink": shrink, "shrink_coef": coefs or None, "pca": pca,
            "pca_genes": pca_genes, "pca_group": pca_group}


def _write_pca_tables(res, out: Path) -> None:
    """The PCA's axes and centroids (results files: written before anything optional)."""
    import pandas as pd

    if res.state.pca is None:
        return
    summary = res.pca
    files.write_csv(summary["axes"], out / "pca_axes.csv", index_label="gene")
    rows = [frame.assign(site=site) for site, frame in
            summary.get("centroids_by_site", {}).items()]
    if rows:
        files.write_csv(pd.concat(rows).rename_axis("level").reset_index(),
                        out / "pca_centroids.csv", index=False)


def _write_postfit(res, contrast, out: Path, plots: Path | None, report: Path | None,
                   reference: Path | None) -> None:
    """Plots and the HTML report, as asked (after the results files)."""
    from fed_de.report import save_plots, write_report

    post = res.facts.get("postfit")
    if post:
        console.print(f"post-fit phase (shrinkage, PCA): {post['rounds']} rounds, "
                      f"{post['sequential_steps']} sequential steps, "
                      f"{post['payload_bytes_per_site_per_gene']:,.0f} B per gene per site")
    if plots is not None:
        paths = save_plots(res, plots, contrast)
        console.print(f"wrote {len(paths)} plot files (PNG + SVG) to {plots}")
    if report is not None:
        write_report(res, report, contrast, reference=reference,
                     reference_name=f"reference {reference}" if reference else "reference")
        console.print(f"wrote the report {report}")


def _print_plan(sites, design, levels, genes, keys, test, reduced, size_factors,
                min_cell_size, cooks=True, layer=None, post: dict | None = None) -> None:
    """``--plan-only``: steps, tasks, distinct functions, and each site's messages."""
    from fed_de.api import declare_study, load_sites, postfit_options
    from fed_de.backends import declared_site_names
    from fed_de.backends.plan import record_plan
    from fed_de.bulk.strategy import DESeq2Strategy
    from fed_de.design import make_study

    if sites:
        loaded = load_sites(sites, layer)
        study = declare_study(loaded, design, levels, genes)
        names = [s.name for s in loaded]
    else:
        names = list(declared_site_names([], keys))
        if genes is None:
            raise typer.BadParameter("--plan-only with --keys needs --genes")
        study = make_study(design, genes, levels or {})
    post = post or {}
    extra = postfit_options(study, None, post.get("shrink"), post.get("shrink_coef"),
                            post.get("pca", False), post.get("pca_genes", 500),
                            post.get("pca_group"), tuple(names)) if post else {}
    strategy = DESeq2Strategy(study.to_dict(), size_factors=size_factors, test=test,
                              reduced=reduced, min_cell_size=min_cell_size, cooks=cooks,
                              n_sites=len(names), **extra)
    rec = record_plan(strategy, names)
    facts = rec.facts()
    console.print(f"[bold]plan[/]: {facts['sequential_steps']} sequential steps, "
                  f"{facts['tasks']} tasks, {facts['distinct_functions']} distinct functions, "
                  f"{len(names)} sites, {len(study.genes)} genes, coefficients "
                  f"{study.coef_names}", highlight=False)
    table = Table(title=f"messages each site may send ({names[0]} shown; all sites alike; "
                        "declared shapes, every optional part counted)")
    for col in ("round", "local step", "keys and shapes", "payload bytes (upper bound)"):
        table.add_column(col)
    for t in rec.tasks:
        if t.worker == names[0] and t.message is not None:
            desc = ", ".join(f"{k}{list(v)}" for k, v in t.message.items()) or "(nothing)"
            n = sum(int(__import__("numpy").prod(v)) for v in t.message.values()) * 8
            table.add_row(str(t.round_idx), t.method, desc, f"{n:,}")
    console.print(table)
    print_plan_bytes(facts, len(study.genes), console)


def print_plan_bytes(facts: dict, n_genes: int, console) -> None:
    """The plan's byte figures, labelled as the upper bounds they are."""
    payload = max(facts["payload_bytes_upper_bound_by_site"].values(), default=0)
    masked = max(facts["bytes_upper_bound_by_site"].values(), default=0)
    console.print(f"bytes each site sends, upper bound (every optional part counted; a run "
                  f"measures what is sent): payload {payload:,} ({payload / n_genes:,.0f} per "
                  f"gene)" + (f", masked by secure aggregation {masked:,} "
                              f"({masked / n_genes:,.0f} per gene)" if facts["masked"] else ""))


@app.command("register-site", cls=FedDECommand)
@cli_errors("register-site")
def register_site(
    site: Path = typer.Option(..., "--site", help="The site's data folder (tables or .h5ad)."),
    name: str = typer.Option(..., "--name", help="Site name used in the study."),
    credentials: Path = typer.Option(..., help="Credentials YAML."),
    org: str = typer.Option(..., "--as", help="Entry of the credentials YAML to use."),
    aggregator_org: str = typer.Option(..., help="Organisation id of the aggregator."),
    keys: Path = typer.Option(Path("keys.yaml"), help="Keys YAML to write or update."),
    kind: SiteKind = typer.Option(SiteKind.deseq2,
                                  help="deseq2 (bulk counts) or screen (cells, .h5ad)."),
    layer: str | None = typer.Option(
        None, "--layer", help="AnnData layer holding the raw counts (recorded in the folder's "
                              "site.json, which the node's opener reads)."),
) -> None:
    """Register this site's dataset on its own Substra node and record its keys."""
    from fed_de.backends.substra import (
        _load_yaml,
        make_client,
        register_site_remote,
        remote_errors,
    )
    from fed_de.errors import FedDEError

    creds = _load_yaml(credentials)
    if org not in creds:
        raise FedDEError(f"credentials have no entry {org!r} (entries: {list(creds)})")
    client = make_client(creds[org], org)
    with remote_errors(org, creds[org].get("url"), "registering the dataset at"):
        entry = register_site_remote(client, name, site, aggregator_org, keys,
                                     kind=value(kind), layer=layer)
    console.print(f"registered {name!r} as dataset {entry['dataset_key']} at "
                  f"{entry['organization_id']}; keys written to {keys}", highlight=False)


@app.command("status", cls=FedDECommand)
@cli_errors("status")
def status(
    plan_key: str = typer.Argument(..., help="The compute plan key fed-de run printed."),
    credentials: Path = typer.Option(..., help="Credentials YAML."),
    org: str = typer.Option("aggregator", "--as", help="Entry of the credentials YAML."),
) -> None:
    """Where a compute plan submitted to a Substra network stands (tasks done, failures)."""
    from fed_de.backends.substra import _load_yaml, make_client, plan_status, remote_errors
    from fed_de.errors import FedDEError

    creds = _load_yaml(credentials)
    if org not in creds:
        raise FedDEError(f"credentials have no entry {org!r} (entries: {list(creds)})")
    client = make_client(creds[org], org)
    with remote_errors(org, creds[org].get("url")):
        info = plan_status(client, plan_key)
    tasks = f" ({info['done']}/{info['total']} tasks)" if info["total"] else ""
    console.print(f"compute plan {plan_key}: {info['status']}{tasks}", highlight=False)
    if "failed" in info:
        typer.echo(f"error: {info['failed']}", err=True)
        raise typer.Exit(code=1)


def _rerun(out: Path, extra: list[str], what: str, drop: tuple[str, ...] = ()) -> None:
    """Run again the ``fed-de run`` command ``out/run.json`` records, with ``extra`` (and
    without the options ``drop`` names)."""
    from fed_de.errors import FedDEError

    record_path = out / "run.json"
    if not record_path.exists():
        raise FedDEError(f"{record_path} does not exist: give the --out folder of the run "
                         f"to {what}")
    args = list(json.loads(record_path.read_text()).get("command_line") or [])
    if args[:2] != ["fed-de", "run"]:
        raise FedDEError(f"{record_path} records no fed-de run command ({args[:2]}); rerun "
                         "that command instead")
    args = _without(args[2:], [*drop, *(o for o in extra if o.startswith("--"))])
    code = typer.main.get_command(app).main(["run", *args, *extra], standalone_mode=False)
    if isinstance(code, int) and code:  # the rerun failed (it printed why)
        raise typer.Exit(code=code)


def _without(args: list[str], options: list[str]) -> list[str]:
    """``args`` less ``options`` and their values (``--opt VALUE`` or ``--opt=VALUE``): the
    ones a rerun gives anew (a previous download's ``--attach``, a resume's backend)."""
    out, i = [], 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        if name in options:
            i += 1 if "=" in args[i] else 2
            continue
        out.append(args[i])
        i += 1
    return out


@app.command("resume", cls=FedDECommand)
@cli_errors("resume")
def resume(
    out: Path = typer.Argument(..., help="The --out folder of a run that failed or was "
                               "interrupted: a substra run's (it holds the failed plan's "
                               "state, resume.pkl) or a simulated run's with --checkpoint."),
    backend: Backend | None = typer.Option(None, help="Where the new plan runs (a substra "
                                           "run's resume; default: the recorded one)."),
    credentials: Path | None = typer.Option(None, help="Remote: credentials YAML (default: "
                                            "the recorded one)."),
    workdir: Path | None = typer.Option(None, help="Run directory of the substra backends "
                                        "(default: the recorded one)."),
) -> None:
    """Continue a failed or interrupted run with the recorded command's options.

    A substra run (its folder holds the failed compute plan's downloaded state,
    resume.pkl) continues as a new compute plan that runs only the rounds after that
    state, on the recorded backend or --backend; a simulated run started with
    --checkpoint reruns, and the tasks that finished are not run again.
    """
    from fed_de.backends.resume import SEED_FILE
    from fed_de.errors import FedDEError

    record = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    extra = [*(["--backend", value(backend)] if backend is not None else []),
             *(["--credentials", str(credentials)] if credentials is not None else []),
             *(["--workdir", str(workdir)] if workdir is not None else [])]
    if (out / SEED_FILE).exists():
        # a new plan: not the failed one a download attached to
        _rerun(out, ["--resume-from", str(out), *extra], "resume", drop=("--attach",))
        return
    if "--checkpoint" not in (record.get("command_line") or []):
        raise FedDEError(f"{out} holds no failed compute plan's state ({SEED_FILE}: fed-de "
                         "download PLAN_KEY --out OUT saves it) and no run started with "
                         "--checkpoint; nothing to resume from: run the command again")
    if value(backend) not in (None, "simulation"):
        raise FedDEError("a checkpoint resumes on the simulation only (--backend simulation)")
    _rerun(out, extra, "resume")


@app.command("download", cls=FedDECommand)
@cli_errors("download")
def download(
    plan_key: str = typer.Argument(..., help="The compute plan key fed-de run printed."),
    out: Path = typer.Option(..., "--out", help="The run's output folder: its run.json "
                             "(written when the run failed or was interrupted) holds the "
                             "command that submitted the plan."),
) -> None:
    """Wait for a compute plan a failed or interrupted ``fed-de run`` submitted, download its
    result and write the results files, as that run would have; a plan that failed leaves
    its last state a new plan can start from in the folder instead (resume.pkl:
    fed-de resume OUT continues it)."""
    _rerun(out, ["--attach", plan_key], f"download (or rerun it with --attach {plan_key})")


@app.command(cls=FedDECommand)
@cli_errors("validate")
def validate(
    site: list[str] = typer.Option(..., "--site", help="NAME=PATH: a site folder or .h5ad."),
    design: str = typer.Option(..., "--design", help="Design formula."),
    levels: list[str] = typer.Option([], "--levels",
                                     help="Declared levels FACTOR=REF,LEVEL2,... (repeatable)."),
    genes: Path | None = typer.Option(None, help="File with the study's genes, one per line."),
    min_cell_size: int = typer.Option(3, min=0, help=MIN_CELL_HELP),
    round_counts: bool = typer.Option(False, help=ROUND_HELP),
    force_round_counts: bool = typer.Option(False, "--force-round-counts", help=FORCE_HELP),
    layer: list[str] = typer.Option([], "--layer", help=LAYER_HELP),
    n_sites: int = typer.Option(
        0, "--n-sites", min=0,
        help="Sites in the study. 0 (default): several; the disclosure rule applies, and with "
             "one --site the design's rank is left to the whole study (levels this site "
             "lacks are listed). 1: a one-site analysis, nothing leaves the site."),
) -> None:
    """Check site data against a study before joining it; nothing is sent anywhere."""
    from fed_de.api import declare_study, load_sites
    from fed_de.validation import validate_sites

    loaded = load_sites(parse_sites(site), _parse_layer(layer))
    gene_list = genes.read_text().split() if genes else None
    study = declare_study(loaded, design, _parse_levels(levels) or None, gene_list)
    rows = validate_sites({s.name: s for s in loaded}, study, min_cell_size=min_cell_size,
                          round_counts="force" if force_round_counts else round_counts,
                          n_sites=n_sites)
    table = Table(title=f"fed-de validate: {design} ({study.n_coefs} coefficients, "
                        f"{len(study.genes)} genes)")
    for col in ("site", "samples", "genes", "status"):
        table.add_column(col, overflow="fold")
    for r in rows:
        status = "[green]ok[/]" + (f" ({r['note']})" if r.get("note") else "") if r["ok"] \
            else f"[red]{_escape(r['problem'])}[/]"
        table.add_row(r["site"], str(r["samples"]), str(r["genes"]), status)
    console.print(table)
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        typer.echo(f"error: {r['problem']}", err=True)
    if failed:
        raise typer.Exit(code=1)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _register_screen() -> None:
    from fed_de.screening.cli import screen_command

    app.command("screen", cls=FedDECommand)(screen_command)


_register_screen()

if __name__ == "__main__":  # pragma: no cover
    app()
