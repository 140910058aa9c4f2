"""The ``fed-de`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fed_de.cli_common import parse_sites, print_facts

app = typer.Typer(add_completion=False, help="Federated differential expression (DESeq2-grade).")
console = Console()


@app.callback()
def main() -> None:
    """fed_de: the pooled DESeq2 answer from per-site sums, run as a substrafl compute plan."""


@app.command()
def demo(
    samples: int = typer.Option(150, help="Samples in the generated study."),
    genes: int = typer.Option(5000, help="Genes in the generated study."),
    seed: int = typer.Option(0, help="Random seed of the generated study."),
    out: Path | None = typer.Option(None, help="Folder for the site data and results."),
) -> None:
    """Simulate a three-hospital study, run fed_de on it, compare with the pooled analysis."""
    from fed_de.demo_run import run_demo

    report = run_demo(n_samples=samples, n_genes=genes, seed=seed, out=out, console=console)
    if out is not None:
        (out / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))


def _parse_sites(site: list[str]) -> dict[str, Path]:
    return parse_sites(site)


def _parse_levels(levels: list[str]) -> dict[str, list[str]]:
    out = {}
    for item in levels:
        if "=" not in item:
            raise typer.BadParameter(f"--levels expects FACTOR=REF,LEVEL2,..., got {item!r}")
        name, values = item.split("=", 1)
        out[name] = [v for v in values.split(",") if v]
    return out


def package_versions() -> dict[str, str]:
    """Versions of the packages whose objects travel between nodes."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("fed-de", "numpy", "scipy", "pandas", "anndata", "formulaic", "substrafl",
                "substra"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@app.command()
def run(
    site: list[str] = typer.Option(..., "--site", help="NAME=PATH: a site folder or .h5ad."),
    design: str = typer.Option(..., "--design", help="Design formula, e.g. '~ batch + condition'."),
    contrast: tuple[str, str, str] | None = typer.Option(
        None, "--contrast", help="FACTOR LEVEL REFERENCE (default: last coefficient)."),
    alpha: float = typer.Option(0.1, help="Significance level for independent filtering."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    levels: list[str] = typer.Option([], "--levels",
                                     help="Declared levels FACTOR=REF,LEVEL2,... (repeatable)."),
    size_factors: str = typer.Option("ratio", help="ratio or poscounts."),
    fit_type: str = typer.Option("parametric", help="Dispersion trend: parametric or mean."),
    lfc_threshold: float = typer.Option(0.0, help="lfcThreshold of the Wald test."),
    alt_hypothesis: str = typer.Option("greaterAbs", help="greaterAbs, lessAbs, greater, less."),
    min_cell_size: int = typer.Option(3, help="Smallest design cell a site accepts (0 = off)."),
    round_counts: bool = typer.Option(False, help="Round non-integer counts instead of refusing."),
    test: str = typer.Option("Wald", "--test", help="Wald or LRT."),
    reduced: str | None = typer.Option(None, "--reduced", help="Reduced design for the LRT."),
    cooks: bool = typer.Option(True, "--cooks/--no-cooks",
                               help="DESeq2's Cook's outlier filtering, replacement and refit."),
    backend: str = typer.Option("simulation", help="simulation, subprocess or remote."),
    workdir: Path | None = typer.Option(None, help="Run directory of the substra backends."),
    credentials: Path | None = typer.Option(None, help="Remote: credentials YAML."),
    keys: Path | None = typer.Option(None, help="Remote: dataset keys YAML (register-site)."),
    genes: Path | None = typer.Option(None, help="File with the study's genes, one per line."),
    timeout: float | None = typer.Option(None, help="Remote: seconds to wait for the plan."),
    plan_only: bool = typer.Option(False, "--plan-only",
                                   help="Print the plan and the messages; submit nothing."),
    workers: int = typer.Option(1, "--workers", help="Simulation: worker processes running "
                                "a round's site tasks at once (-1: every CPU)."),
    spill_dir: Path | None = typer.Option(None, "--spill-dir", help="Simulation: keep "
                                          "messages and run states as files under this "
                                          "folder instead of in memory."),
) -> None:
    """Run the federated DESeq2 pipeline (Wald or LRT) over the given sites (simulation)."""
    import time

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    import fed_de
    from fed_de.errors import FedDEError

    sites = _parse_sites(site) if backend != "remote" else {}
    if backend == "remote" and (credentials is None or keys is None):
        raise typer.BadParameter("--backend remote needs --credentials and --keys")
    gene_list = genes.read_text().split() if genes else None
    if plan_only:
        _print_plan(sites, design, _parse_levels(levels) or None, gene_list, keys, test,
                    reduced, size_factors, min_cell_size, cooks)
        return
    started = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        count = {"n": 0}

        def progress(step, org, round_idx):
            count["n"] += 1
            bar.update(task, description=f"round {round_idx}: {step} at {org} "
                                         f"(task {count['n']})")

        try:
            res = fed_de.deseq2(
                sites, design, contrasts=[contrast] if contrast else None, alpha=alpha,
                levels=_parse_levels(levels) or None, size_factors=size_factors,
                fit_type=fit_type, min_cell_size=min_cell_size, round_counts=round_counts,
                progress=progress, test=test, reduced=reduced, cooks=cooks, backend=backend,
                workdir=workdir, credentials=credentials, keys=keys, timeout=timeout,
                genes=gene_list, n_jobs=workers, spill_dir=spill_dir,
            )
            table = res.results(contrast, lfc_threshold=lfc_threshold,
                                alt_hypothesis=alt_hypothesis)
        except (FedDEError, ValueError) as err:
            console.print(f"[red]error:[/] {err}")
            raise typer.Exit(code=2) from None
    out.mkdir(parents=True, exist_ok=True)
    table.reset_index().to_csv(out / "results.csv", index=False)
    disp = res.dispersions.rename(columns={"outlier": "outlier_flag"})
    disp[["genewise", "trend", "MAP", "final", "outlier_flag"]].reset_index().to_csv(
        out / "dispersions.csv", index=False)
    facts = dict(res.facts)
    facts["wall_seconds"] = round(time.perf_counter() - started, 3)
    facts["design"] = design
    facts["contrast"] = list(contrast) if contrast else res.study.coef_names[-1]
    facts["alpha"] = alpha
    facts["test"] = test
    facts["cooks"] = cooks
    if res.cooks:
        facts["cooks_outliers_filtered"] = int(res.cooks["outlier"].sum())
        facts["genes_refitted"] = int(res.cooks["refitted"].sum())
        facts["genes_replaced_now_zero"] = int(res.cooks["new_all_zero"].sum())
    if reduced:
        facts["reduced"] = reduced
    facts["package_versions"] = package_versions()
    (out / "run.json").write_text(json.dumps(facts, indent=2, default=str))
    n_sig = int((table["padj"] < alpha).sum())
    console.print(f"{len(table)} genes, {n_sig} with padj < {alpha}; wrote results.csv, "
                  f"dispersions.csv, run.json to {out}")
    print_facts(facts, console=console)


def _print_plan(sites, design, levels, genes, keys, test, reduced, size_factors,
                min_cell_size, cooks=True) -> None:
    """``--plan-only``: steps, tasks, distinct functions, and each site's messages."""
    from fed_de.api import declare_study, load_sites
    from fed_de.backends.plan import record_plan
    from fed_de.bulk.strategy import DESeq2Strategy
    from fed_de.design import make_study

    if sites:
        loaded = load_sites(sites)
        study = declare_study(loaded, design, levels, genes)
        names = [s.name for s in loaded]
    else:
        import yaml

        names = list((yaml.safe_load(Path(keys).read_text()) or {}).get("sites", {}))
        if genes is None:
            raise typer.BadParameter("--plan-only with --keys needs --genes")
        study = make_study(design, genes, levels or {})
    strategy = DESeq2Strategy(study.to_dict(), size_factors=size_factors, test=test,
                              reduced=reduced, min_cell_size=min_cell_size, cooks=cooks,
                              n_sites=len(names))
    rec = record_plan(strategy, names)
    facts = rec.facts()
    console.print(f"[bold]plan[/]: {facts['sequential_steps']} sequential steps, "
                  f"{facts['tasks']} tasks, {facts['distinct_functions']} distinct functions, "
                  f"{len(names)} sites, {len(study.genes)} genes, coefficients "
                  f"{study.coef_names}")
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


@app.command("register-site")
def register_site(
    site: Path = typer.Option(..., "--site", help="The site's data folder (CSVs or .h5ad)."),
    name: str = typer.Option(..., "--name", help="Site name used in the study."),
    credentials: Path = typer.Option(..., help="Credentials YAML."),
    org: str = typer.Option(..., "--as", help="Entry of the credentials YAML to use."),
    aggregator_org: str = typer.Option(..., help="Organisation id of the aggregator."),
    keys: Path = typer.Option(Path("keys.yaml"), help="Keys YAML to write or update."),
    kind: str = typer.Option("deseq2", help="deseq2 (bulk counts) or screen (cells, .h5ad)."),
) -> None:
    """Register this site's dataset on its own Substra node and record its keys."""
    from fed_de.backends.substra import _load_yaml, make_client, register_site_remote
    from fed_de.errors import FedDEError

    try:
        creds = _load_yaml(credentials)
        if org not in creds:
            raise FedDEError(f"credentials have no entry {org!r} (entries: {list(creds)})")
        client = make_client(creds[org], org)
        entry = register_site_remote(client, name, site, aggregator_org, keys, kind=kind)
    except FedDEError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(code=2) from None
    console.print(f"registered {name!r} as dataset {entry['dataset_key']} at "
                  f"{entry['organization_id']}; keys written to {keys}")


@app.command()
def validate(
    site: list[str] = typer.Option(..., "--site", help="NAME=PATH: a site folder or .h5ad."),
    design: str = typer.Option(..., "--design", help="Design formula."),
    levels: list[str] = typer.Option([], "--levels",
                                     help="Declared levels FACTOR=REF,LEVEL2,... (repeatable)."),
    genes: Path | None = typer.Option(None, help="File with the study's genes, one per line."),
    min_cell_size: int = typer.Option(3, help="Smallest design cell a site accepts (0 = off)."),
    round_counts: bool = typer.Option(False, help="Accept non-integer counts (rounded)."),
) -> None:
    """Check site data against a study before joining it; nothing is sent anywhere."""
    from fed_de.api import declare_study, load_sites
    from fed_de.errors import FedDEError
    from fed_de.validation import validate_sites

    try:
        loaded = load_sites(_parse_sites(site))
        gene_list = genes.read_text().split() if genes else None
        study = declare_study(loaded, design, _parse_levels(levels) or None, gene_list)
    except (FedDEError, ValueError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(code=2) from None
    rows = validate_sites({s.name: s for s in loaded}, study, min_cell_size=min_cell_size,
                          round_counts=round_counts)
    table = Table(title=f"fed-de validate: {design} ({study.n_coefs} coefficients, "
                        f"{len(study.genes)} genes)")
    for col in ("site", "samples", "genes", "status"):
        table.add_column(col)
    for r in rows:
        status = "[green]ok[/]" if r["ok"] else f"[red]{r['problem']}[/]"
        table.add_row(r["site"], str(r["samples"]), str(r["genes"]), status)
    console.print(table)
    if not all(r["ok"] for r in rows):
        raise typer.Exit(code=1)


def _register_screen() -> None:
    from fed_de.screening.cli import screen_command

    app.command("screen")(screen_command)


_register_screen()

if __name__ == "__main__":  # pragma: no cover
    app()
