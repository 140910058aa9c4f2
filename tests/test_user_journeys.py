"""A user's first day (issue 17): the documented commands run as written, and every mistake a
new user makes gets an early, clear answer.

Part 1 runs the README's "Use it" section, and every command of the README, docs/ and
docker/README.md (a fake substra client stands in for a remote network; where an example runs
on substra's subprocess backend, the simulation stands in for it: the backends' equality is
``tests/test_substra.py``'s job). Part 2 walks through the issue's items, one test or more
each, asserting what the message names.
"""

from __future__ import annotations

import json
import re
import shlex
import types
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from typer.testing import CliRunner

import fed_de
from fed_de.api import SINGLE_SITE
from fed_de.bulk.results import ResultsSummary, summarize
from fed_de.cli import app
from fed_de.core.testing import adjust_pvalues
from fed_de.demo_data import make_demo_study
from fed_de.errors import DesignError, DisclosureError, FitWarning, SiteDataError
from fed_de.site import load_site

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docker" / "README.md"]
WIDE = {"COLUMNS": "250", "TERM": "dumb"}


# -- helpers ---------------------------------------------------------------------------------
def cli(args, **kw):
    """``fed-de ARGS`` through typer's runner (stdout and stderr apart)."""
    return CliRunner(env=WIDE).invoke(app, [str(a) for a in args], **kw)


def blocks(path: Path, lang: str, section: str | None = None) -> list[str]:
    """Fenced code blocks of a language in a markdown file (optionally one ``##`` section)."""
    text = path.read_text()
    if section is not None:
        start = text.index(f"## {section}")
        nxt = text.find("\n## ", start + 3)
        text = text[start:nxt if nxt > 0 else None]
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def commands(path: Path) -> list[str]:
    """Every shell command of a markdown file's bash blocks (continuations joined, comments
    dropped, ``&&`` chains split)."""
    out = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out += [c.strip() for c in line.split("&&")]
    return out


def run_site(demo, n=None):
    """The demo's sites (the first ``n``), copies."""
    items = list(demo.sites.items())[:n]
    return {k: v.copy() for k, v in items}


def quiet_deseq2(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fed_de.deseq2(*args, **kw)


class TaskCounter:
    """A progress callback counting the tasks that ran."""

    def __init__(self):
        self.n = 0

    def __call__(self, step, org, round_idx):
        self.n += 1


@pytest.fixture(scope="module")
def demo():
    return make_demo_study(n_samples=150, n_genes=150, seed=4)


@pytest.fixture(scope="module")
def fit(demo):
    """The demo study fitted once (three sites, declared levels)."""
    return quiet_deseq2(demo.sites, demo.design, levels=demo.levels, genes=demo.genes,
                        contrasts=[("condition", "B", "A")])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    from fed_de.backends.substra import build_wheel

    return build_wheel(tmp_path_factory.mktemp("dist"))


# ============================================================================================
# Part 1: the documentation runs as written
# ============================================================================================
#: Commands the docs show that set up an environment or need a Docker daemon: not run here.
NOT_RUN = {
    "python3 -m venv .venv", ". .venv/bin/activate", 'pip install -e ".[test]"',
    "python -m pytest -q",  # the suite itself
    "docker build -f docker/Dockerfile -t fed-de:0.1.0 /tmp/fed_de_image",
    "docker run --rm fed-de:0.1.0 python -c \"import fed_de; print(fed_de.__version__)\"",
}
#: Every other documented command, and the test here that runs it.
RUN_BY = {
    "fed-de demo": "test_readme_demo_command",
    "fed-de run --site a=data/a --site b=data/b --design \"~ batch + condition\" "
    "--contrast condition B A --alpha 0.1 --out results/": "test_readme_cli_example",
    "fed-de screen --site a=a.h5ad --site b=b.h5ad --site c=c.h5ad --perturbation-column "
    "perturbation --control non-targeting [--method nb_glm] [--alpha 0.05] --out results/":
        "test_docs_screen_examples",
    "fed-de run --site a=data/a --site b=data/b --design \"~ batch + condition\" --contrast "
    "condition B A --out out/ --shrink apeglm --pca --plots out/plots --report "
    "out/report.html --reference pooled.csv": "test_docs_shrinkage_command",
    "docker/build_context.sh /tmp/fed_de_image": "test_docker_build_context_script",
    "fed-de validate --site hospital_a=/data/study --design \"~ batch + condition\" "
    "--levels condition=A,B --levels batch=b1,b2,b3": "test_docker_readme_network_walkthrough",
    "fed-de register-site --site /data/study --name hospital_a --credentials credentials.yaml "
    "--as hospital_a --aggregator-org AggregatorMSP --keys keys.yaml":
        "test_docker_readme_network_walkthrough",
    "fed-de run --backend remote --credentials credentials.yaml --keys keys.yaml --design "
    "\"~ batch + condition\" --levels condition=A,B --levels batch=b1,b2,b3 --genes genes.txt "
    "--contrast condition B A --out results/ --timeout 7200":
        "test_docker_readme_network_walkthrough",
    "fed-de run --backend remote --keys keys.yaml --design \"~ batch + condition\" --levels "
    "condition=A,B --levels batch=b1,b2,b3 --genes genes.txt --plan-only":
        "test_docker_readme_network_walkthrough",
    "fed-de status PLAN_KEY --credentials credentials.yaml":
        "test_docker_readme_status_and_download_after_a_timeout",
    "fed-de download PLAN_KEY --out results/":
        "test_docker_readme_status_and_download_after_a_timeout",
    "fed-de resume results/ --credentials credentials.yaml":
        "test_docker_readme_resume_a_failed_plan_as_a_new_plan",
}


def _normal(cmd: str) -> str:
    return " ".join(cmd.split())


def documented(prefix: str) -> list[str]:
    """Documented commands starting with ``prefix``, normalised, each once."""
    return list(dict.fromkeys(c for d in DOCS for c in map(_normal, commands(d))
                              if c.startswith(prefix)))


def test_every_documented_command_is_run_here():
    """A command added to the README, docs/ or docker/ fails this test until a test runs it
    (or it is listed as environment set-up)."""
    found = {_normal(c) for d in DOCS for c in commands(d)}
    unknown = found - NOT_RUN - set(RUN_BY)
    assert not unknown, f"documented commands no test runs: {unknown}"
    gone = set(RUN_BY) - found
    assert not gone, f"tests run commands the docs no longer show: {gone}"
    names = set(globals())
    assert set(RUN_BY.values()) <= names


def _readme_data(tmp_path: Path, demo) -> dict:
    """What the README's "Use it" section names: data/a (a folder), data/b (a folder),
    data/b.h5ad, an AnnData adata_c, PyDESeq2-style DataFrames, a scanpy-style AnnData."""
    folders = demo.write(tmp_path / "written")
    data = tmp_path / "data"
    data.mkdir()
    folders["hospital_a"].rename(data / "a")
    folders["hospital_b"].rename(data / "b")
    demo.sites["hospital_b"].write_h5ad(data / "b.h5ad")
    a = demo.sites["hospital_a"]
    counts = pd.DataFrame(np.asarray(a.X), index=a.obs_names, columns=a.var_names)
    norm = a.copy()
    norm.layers["counts"] = norm.X.copy()
    norm.X = np.log1p(np.asarray(norm.X) / np.asarray(norm.X).sum(1, keepdims=True) * 1e4)
    return {"adata_c": demo.sites["hospital_c"].copy(), "counts_df": counts,
            "metadata_df": a.obs.copy(), "adata_norm": norm}


def test_readme_use_it_section(tmp_path, monkeypatch, demo):
    """The README's "Use it" code, as written, on data laid out as it names them (~15 s).

    Its last line runs on substra's subprocess backend; here the simulation stands in for
    that backend's executor (``run_subprocess``), which still receives the study's strategy,
    the loaded sites and ``workdir``."""
    from fed_de.backends import substra as substra_backend
    from fed_de.backends.simulation import run_strict

    (code,) = blocks(ROOT / "README.md", "python", "Use it")
    monkeypatch.chdir(tmp_path)
    namespace = _readme_data(tmp_path, demo)
    calls = []

    def stand_in(strategy, sites, *, workdir, progress=None, **kw):
        names = [s.name for s in sites]
        calls.append((type(strategy).__name__, names, Path(workdir).resolve()))
        sim = run_strict(strategy, sites, progress=progress)
        return substra_backend.SubstraRun(sim.shared_state, sim.ledger.facts(), "stand-in")

    monkeypatch.setattr(substra_backend, "run_subprocess", stand_in)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        exec(compile(code, "README.md#use-it", "exec"), namespace)  # noqa: S102
    res = namespace["res"]
    assert calls == [("DESeq2Strategy", ["hospital_a", "hospital_b", "hospital_c"],
                      (tmp_path / "run").resolve())]
    # the same analysis from the in-memory sites: data/a and data/b.h5ad were read as written
    ref = quiet_deseq2(demo.sites, "~ batch + condition", levels=demo.levels,
                       contrasts=[("condition", "B", "A")])
    pd.testing.assert_frame_equal(res.results(), ref.results())
    pd.testing.assert_frame_equal(namespace["real"].results(), res.results())
    assert (tmp_path / "results" / "results.csv").exists()
    one = quiet_deseq2({"x": demo.sites["hospital_a"]}, "~ condition")
    pd.testing.assert_frame_equal(namespace["one"].results(), one.results())
    pd.testing.assert_frame_equal(namespace["lab"].results(), one.results())


def test_readme_cli_example(tmp_path, monkeypatch, demo):
    """``fed-de run`` as the README shows it, on data/a and data/b."""
    (cmd,) = documented("fed-de run --site a=data/a --site b=data/b --design "
                        "\"~ batch + condition\" --contrast condition B A --alpha")
    monkeypatch.chdir(tmp_path)
    _readme_data(tmp_path, demo)
    res = cli(shlex.split(cmd)[1:])
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "results"
    assert {p.name for p in out.iterdir()} == {"results.csv", "dispersions.csv",
                                                "coefficients.csv", "results.h5ad", "run.json"}
    ref = quiet_deseq2(run_site(demo, 2), "~ batch + condition",
                       contrasts=[("condition", "B", "A")], alpha=0.1)
    table = pd.read_csv(out / "results.csv", index_col=0)
    np.testing.assert_allclose(table.to_numpy(), ref.results().to_numpy(), rtol=1e-12,
                               equal_nan=True)
    n = int((ref.results().baseMean > 0).sum())  # withheld genes (NaN) are not counted
    assert f"out of {n} with nonzero total read count" in res.stdout  # R's summary(res)


def test_docs_shrinkage_command(tmp_path, monkeypatch, demo):
    """docs/shrinkage.md's command: shrunken results, PCA tables, plots and the report, the
    shrunken LFCs those of the Python API on the same two sites."""
    (cmd,) = documented("fed-de run --site a=data/a --site b=data/b --design "
                        "\"~ batch + condition\" --contrast condition B A --out out/ --shrink")
    monkeypatch.chdir(tmp_path)
    _readme_data(tmp_path, demo)
    ref = quiet_deseq2(run_site(demo, 2), "~ batch + condition",
                       contrasts=[("condition", "B", "A")], shrink="apeglm", pca=True)
    ref.results().to_csv(tmp_path / "pooled.csv")
    res = cli(shlex.split(cmd)[1:])
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "out"
    table = pd.read_csv(out / "results.csv", index_col=0)
    want = ref.lfc_shrink()
    np.testing.assert_allclose(table["log2FoldChangeShrunk"], want["log2FoldChange"],
                               rtol=1e-12, equal_nan=True)
    assert {"pca_axes.csv", "pca_centroids.csv", "report.html"} <= {p.name for p in
                                                                   out.iterdir()}
    plots = {p.suffix for p in (out / "plots").iterdir()}
    assert plots == {".png", ".svg"}
    assert "<html" in (out / "report.html").read_text()[:500].lower()


@pytest.mark.slow
def test_readme_demo_command(tmp_path, monkeypatch):
    """``fed-de demo`` as documented (150 x 5,000, pooled runs and PyDESeq2; ~2 min)."""
    monkeypatch.chdir(tmp_path)  # the demo writes its report into the working directory
    (cmd,) = documented("fed-de demo")
    res = cli(shlex.split(cmd)[1:])
    assert res.exit_code == 0, res.stderr
    assert "Federated vs pooled" in res.stdout
    assert "{'" not in res.stdout  # a table, not Python dicts
    assert "100%" in res.stderr  # the progress bar ran to its total
    assert (tmp_path / "fed_de_demo_report.html").exists()


def _screen_files(tmp_path: Path):
    from fed_de.screening.data import make_screen

    # large enough that the disclosure rules leave genes to fit a trend on (900 cells: none)
    scr = make_screen(n_cells=1800, n_genes=40, n_perturbations=3, n_sites=3, seed=5)
    first = scr.perturbations[0]
    paths = {}
    for key, adata in zip("abc", scr.sites.values(), strict=True):
        adata = adata.copy()
        labels = adata.obs["perturbation"].astype(str).replace(first, "KLF1")
        adata.obs["perturbation"] = labels.to_numpy()
        paths[key] = tmp_path / f"{key}.h5ad"
        adata.write_h5ad(paths[key])
    return scr, paths


def test_docs_screen_examples(tmp_path, monkeypatch):
    """docs/screen.md: its Python block and its command (optional flags given)."""
    monkeypatch.chdir(tmp_path)
    _, paths = _screen_files(tmp_path)
    (code,) = blocks(ROOT / "docs" / "screen.md", "python")
    namespace = {"adata_b": ad.read_h5ad(paths["b"])}
    exec(compile(code, "docs/screen.md", "exec"), namespace)  # noqa: S102
    assert list(namespace["res"]["KLF1"].columns) == ["baseMean", "log2FoldChange", "lfcSE",
                                                       "stat", "pvalue", "padj"]
    (cmd,) = documented("fed-de screen")
    args = shlex.split(cmd.replace("[", "").replace("]", ""))[1:]
    res = cli(args)
    assert res.exit_code == 0, res.stderr
    run = json.loads((tmp_path / "results" / "run.json").read_text())
    np.testing.assert_allclose(
        pd.read_csv(tmp_path / "results" / "results.csv").query("perturbation == 'KLF1'")
        ["log2FoldChange"].to_numpy(), namespace["res"]["KLF1"]["log2FoldChange"].to_numpy(),
        rtol=1e-12, equal_nan=True)
    # item 13: the screen's run.json carries versions too
    assert run["package_versions"]["numpy"] == np.__version__
    assert run["fed_de_version"] == fed_de.__version__ and run["command_line"][:2] == [
        "fed-de", "screen"]


@pytest.mark.slow
def test_docker_build_context_script(tmp_path):
    """docker/build_context.sh writes the wheel and the exact pins (the Docker build and run
    lines need a daemon, absent here; tests/test_wheel.py installs the same wheel)."""
    import subprocess
    import sys

    (cmd,) = documented("docker/build_context.sh")
    out = tmp_path / "image"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    subprocess.run(["bash", str(ROOT / cmd.split()[0]), str(out)], check=True, cwd=ROOT,
                   env=env, capture_output=True, timeout=600)
    assert list(out.glob("fed_de-*.whl"))
    pins = (out / "requirements.txt").read_text().split()
    assert f"numpy=={np.__version__}" in pins and "substrafl==1.0.0" in pins


class _Network:
    """A local stand-in for a remote Substra network: fed_de's own code runs unchanged up
    to the substra client, a fake that records the calls; the compute plan's result is what
    the same plan gives in simulation over the registered folders."""

    def __init__(self, monkeypatch, wheel, result_state):
        import substra
        from test_substra import FakeClient

        self.clients = []

        def client(**kwargs):
            name = kwargs["client_name"]
            fake = FakeClient(org=f"{name}-MSP", statuses=("PLAN_STATUS_DONE",))
            fake.kwargs = kwargs
            self.clients.append(fake)
            return fake

        monkeypatch.setattr(substra, "Client", client)
        monkeypatch.setattr("fed_de.backends.substra.build_wheel", lambda dest: wheel)
        monkeypatch.setattr("substrafl.model_loading.download_aggregate_shared_state",
                            lambda **kw: result_state)


def _network_files(monkeypatch, folder: Path, demo) -> None:
    """The coordinator's files of the fake network's walkthrough, in ``folder`` (the working
    directory from now on): credentials, the sites' keys, the study's genes."""
    monkeypatch.chdir(folder)
    Path("credentials.yaml").write_text(yaml.safe_dump(
        {"aggregator": {"url": "https://substra.coord.test", "token": "t0k3n"}}))
    Path("keys.yaml").write_text(yaml.safe_dump({
        "aggregator_organization": "AggregatorMSP", "sites": {n: {
            "organization_id": f"{n}-MSP", "dataset_key": f"d-{n}",
            "data_sample_keys": [f"s-{n}"]} for n in demo.sites}}))
    Path("genes.txt").write_text("\n".join(demo.genes))


def test_docker_readme_network_walkthrough(tmp_path, monkeypatch, demo, wheel):
    """docker/README.md, as written: a hospital lacking a batch level validates and registers
    its data, the coordinator runs the study (a fake network) and prints the plan."""
    docker = ROOT / "docker" / "README.md"
    folders = demo.write(tmp_path / "hospitals")
    monkeypatch.chdir(tmp_path)
    creds = {"aggregator": {"url": "https://substra.coord.test", "token": "t0k3n"},
             **{n: {"url": f"https://substra.{n}.test", "username": "u", "password": "p"}
                for n in demo.sites}}
    Path("credentials.yaml").write_text(yaml.safe_dump(creds))
    Path("genes.txt").write_text("\n".join(demo.genes))
    ref = quiet_deseq2(demo.sites, demo.design, levels=demo.levels, genes=demo.genes,
                       contrasts=[("condition", "B", "A")])
    net = _Network(monkeypatch, wheel, ref.state)

    (validate,) = documented("fed-de validate")
    (register,) = documented("fed-de register-site")
    assert "b3" in validate and "b3" not in set(demo.sites["hospital_c"].obs["batch"])
    for name, folder in folders.items():  # hospital_c has no sample of batch b3
        args = shlex.split(validate.replace("/data/study", str(folder))
                           .replace("hospital_a", name))[1:]
        res = cli(args)
        assert res.exit_code == 0, res.stderr
        if name == "hospital_c":
            assert "levels absent here: batch=b3" in res.stdout
        args = shlex.split(register.replace("/data/study", str(folder))
                           .replace("hospital_a", name))[1:]
        res = cli(args)
        assert res.exit_code == 0, res.stderr
    keys = yaml.safe_load(Path("keys.yaml").read_text())
    assert list(keys["sites"]) == list(demo.sites)
    assert [c.kwargs["client_name"] for c in net.clients] == list(demo.sites)
    assert json.loads((folders["hospital_c"] / "site.json").read_text())["name"] == "hospital_c"

    (run,) = [c for c in documented("fed-de run --backend remote") if "--out" in c]
    res = cli(shlex.split(run)[1:])
    assert res.exit_code == 0, res.stderr
    submitted = [c for c in net.clients[-1].calls if c[0] == "add_compute_plan"]
    assert len(submitted) == 1
    assert {t.worker for t in submitted[0][1].tasks} == {
        f"{n}-MSP" for n in demo.sites} | {"AggregatorMSP"}
    table = pd.read_csv(tmp_path / "results" / "results.csv", index_col=0)
    np.testing.assert_allclose(table.to_numpy(), ref.results().to_numpy(), rtol=1e-12,
                               equal_nan=True)

    (plan,) = documented("fed-de run --backend remote --keys")
    res = cli(shlex.split(plan)[1:])
    assert res.exit_code == 0, res.stderr
    functions = int(re.search(r"(\d+) distinct functions", res.stdout)[1])
    stated = int(re.search(r"registered functions \((\d+) for the Wald", docker.read_text())[1])
    assert functions == stated  # the number docker/README.md quotes is the plan's


def test_docker_readme_status_and_download_after_a_timeout(tmp_path, monkeypatch, demo, wheel):
    """docker/README.md step 5: the run times out (the plan keeps running), run.json keeps
    the plan key; `fed-de status` follows it; `fed-de download` writes the results of that
    plan, submitting nothing."""
    import substra
    from test_substra import FakeClient

    _network_files(monkeypatch, tmp_path, demo)
    ref = quiet_deseq2(demo.sites, demo.design, levels=demo.levels, genes=demo.genes,
                       contrasts=[("condition", "B", "A")])
    net = _Network(monkeypatch, wheel, ref.state)
    statuses = {"now": ["PLAN_STATUS_DOING"]}

    def client(**kwargs):
        fake = FakeClient(org="AggregatorMSP", statuses=statuses["now"])
        net.clients.append(fake)
        return fake

    monkeypatch.setattr(substra, "Client", client)
    (run,) = [c for c in documented("fed-de run --backend remote") if "--out" in c]
    res = cli(shlex.split(run.replace("--timeout 7200", "--timeout 0"))[1:])
    assert res.exit_code == 2 and "still doing" in res.stderr and "fed-de status" in res.stderr
    record = json.loads(Path("results/run.json").read_text())
    key = record["facts"]["compute_plan_key"]
    assert record["status"] == "failed" and key and not Path("results/results.csv").exists()

    (status,) = documented("fed-de status")
    res = cli(shlex.split(status.replace("PLAN_KEY", key))[1:])
    assert res.exit_code == 0 and f"compute plan {key}: doing" in res.stdout
    statuses["now"] = ["PLAN_STATUS_DONE"]
    (download,) = documented("fed-de download")
    res = cli(shlex.split(download.replace("PLAN_KEY", key))[1:])
    assert res.exit_code == 0, res.stderr
    assert not [c for c in net.clients[-1].calls if c[0] == "add_compute_plan"]
    table = pd.read_csv(tmp_path / "results" / "results.csv", index_col=0)
    np.testing.assert_allclose(table.to_numpy(), ref.results().to_numpy(), rtol=1e-12,
                               equal_nan=True)
    record = json.loads(Path("results/run.json").read_text())
    assert record["status"] == "ok" and "--attach" in record["command_line"]
    statuses["now"] = ["PLAN_STATUS_FAILED"]
    res = cli(shlex.split(status.replace("PLAN_KEY", key))[1:])
    assert res.exit_code == 1 and "ended with status failed" in res.stderr


def test_docker_readme_resume_a_failed_plan_as_a_new_plan(tmp_path, monkeypatch, demo, wheel):
    """docker/README.md step 6 on a fake network: a site's task fails mid-plan; `fed-de run`
    and `fed-de status` name the site, step and round; `fed-de download` saves the failed
    plan's last state; `fed-de resume` submits a new, shorter plan that installs it and
    writes the results (the network's states are the simulation's, by round)."""
    import substra
    from test_faults import _plan_states
    from test_substra import FakeClient

    _network_files(monkeypatch, tmp_path, demo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _, states = _plan_states(monkeypatch, demo.sites, levels=demo.levels,
                                      genes=demo.genes, contrasts=[("condition", "B", "A")],
                                      design=demo.design)
    fail_round = sorted(states)[len(states) // 2]
    failed = types.SimpleNamespace(key="task-9", worker="hospital_b-MSP",
                                   function=types.SimpleNamespace(name="fed_de_function"),
                                   metadata={"round_idx": str(fail_round - 1)})
    done = [types.SimpleNamespace(key=f"agg-{r}", worker="AggregatorMSP", status="STATUS_DONE",
                                  metadata={"round_idx": str(r)})
            for r in states if r < fail_round]
    statuses = {"now": ["PLAN_STATUS_FAILED"]}
    clients = []

    class Network(FakeClient):
        def list_task(self, filters=None):
            self.calls.append(("list_task", filters))
            return [failed] if (filters or {}).get("status") else done

    def client(**kwargs):
        clients.append(Network(org="AggregatorMSP", statuses=statuses["now"]))
        return clients[-1]

    def download(client, compute_plan_key, round_idx):
        (state,) = states[round_idx]
        return state

    monkeypatch.setattr(substra, "Client", client)
    monkeypatch.setattr("fed_de.backends.substra.build_wheel", lambda dest: wheel)
    monkeypatch.setattr("substrafl.model_loading.download_aggregate_shared_state", download)
    (run,) = [c for c in documented("fed-de run --backend remote") if "--out" in c]
    res = cli(shlex.split(run)[1:])
    assert res.exit_code == 2 and "at site hospital_b (organisation hospital_b-MSP)" in res.stderr
    first = [c[1] for c in clients[-1].calls if c[0] == "add_compute_plan"]
    key = json.loads(Path("results/run.json").read_text())["facts"]["compute_plan_key"]
    (status,) = documented("fed-de status")
    res = cli(shlex.split(status.replace("PLAN_KEY", key))[1:])
    assert res.exit_code == 1
    assert f"round {fail_round - 1}) failed at organisation hospital_b-MSP" in res.stderr
    Path("results/resume.pkl").unlink()  # as if the run had not seen the failure
    (download_cmd,) = documented("fed-de download")
    res = cli(shlex.split(download_cmd.replace("PLAN_KEY", key))[1:])
    assert res.exit_code == 2 and "fed-de resume results" in res.stderr
    record = json.loads(Path("results/run.json").read_text())
    assert record["status"] == "failed" and record["site"] == "hospital_b"
    assert record["resume"]["from_round"] < fail_round and Path("results/resume.pkl").exists()

    statuses["now"] = ["PLAN_STATUS_DONE"]
    (resume,) = documented("fed-de resume")
    res = cli(shlex.split(resume)[1:])
    assert res.exit_code == 0, res.stderr
    (second,) = [c[1] for c in clients[-1].calls if c[0] == "add_compute_plan"]
    assert len(second.tasks) < len(first[0].tasks) and second.key != key
    table = pd.read_csv(tmp_path / "results" / "results.csv", index_col=0)
    np.testing.assert_allclose(table.to_numpy(), ref.results().to_numpy(), rtol=1e-12,
                               equal_nan=True)
    record = json.loads(Path("results/run.json").read_text())
    assert record["status"] == "ok" and record["resumed"]["from_compute_plan"] == key
    assert "--attach" not in record["command_line"]


# ============================================================================================
# Part 2: the items
# ============================================================================================
# -- 1. scanpy's layout: log-normalised X, raw counts in a layer ------------------------------
@pytest.fixture(scope="module")
def scanpy_site(demo):
    """hospital_a as scanpy keeps it: log1p-normalised X, raw counts in layers['counts']."""
    a = demo.sites["hospital_a"].copy()
    raw = np.asarray(a.X, dtype=float)
    a.layers["counts"] = sp.csr_matrix(raw)
    a.X = np.log1p(raw / raw.sum(1, keepdims=True) * 1e4)
    return a


def test_layer_names_the_integer_layer_and_round_counts_refuses_log_values(
        demo, scanpy_site, tmp_path):
    sites = {**run_site(demo), "hospital_a": scanpy_site}
    kw = dict(levels=demo.levels, genes=demo.genes)
    with pytest.raises(SiteDataError, match=r"site 'hospital_a'.*non-integer.*layer\(s\) "
                                            r"\['counts'\].*layer='counts' \(--layer counts\)"):
        fed_de.deseq2(sites, demo.design, **kw)
    with pytest.raises(SiteDataError, match=r"look log-transformed.*largest value.*"
                                            r"round_counts='force'"):
        fed_de.deseq2(sites, demo.design, round_counts=True, **kw)
    with_layer = quiet_deseq2(sites, demo.design, layer={"hospital_a": "counts"}, **kw)
    pd.testing.assert_frame_equal(with_layer.results(), quiet_deseq2(
        demo.sites, demo.design, **kw).results())
    forced = quiet_deseq2(sites, demo.design, round_counts="force", **kw)
    assert forced.facts["options"]["round_counts"] == "force"
    # the CLI, validate and run alike
    path = tmp_path / "a.h5ad"
    scanpy_site.write_h5ad(path)
    res = cli(["validate", "--site", f"a={path}", "--design", "~ condition"])
    assert res.exit_code == 1 and "--layer counts" in res.stderr
    res = cli(["validate", "--site", f"a={path}", "--design", "~ condition", "--layer",
               "counts", "--n-sites", "1"])
    assert res.exit_code == 0, res.stderr
    res = cli(["run", "--site", f"a={path}", "--design", "~ condition", "--round-counts",
               "--out", tmp_path / "o"])
    assert res.exit_code == 2 and "look log-transformed" in res.stderr
    others = []
    for name in ("hospital_b", "hospital_c"):
        demo.sites[name].write_h5ad(tmp_path / f"{name}.h5ad")
        others += ["--site", f"{name}={tmp_path / f'{name}.h5ad'}"]
    res = cli(["run", "--site", f"hospital_a={path}", *others, "--design", demo.design,
               "--force-round-counts", "--out", tmp_path / "o"])
    assert res.exit_code == 0, res.stderr
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["options"]["round_counts"] == "force"  # run.json says counts were rounded


def test_round_counts_still_rounds_estimated_counts(demo):
    """Estimated counts (salmon-like: large, fractional) are rounded as before."""
    a = demo.sites["hospital_b"].copy()
    rng = np.random.default_rng(0)
    a.X = np.asarray(a.X, dtype=float) + rng.uniform(-0.4, 0.4, a.shape) * (np.asarray(a.X) > 0)
    sites = {**run_site(demo), "hospital_b": a}
    kw = dict(levels=demo.levels, genes=demo.genes)
    with pytest.raises(SiteDataError, match="round_counts=True"):
        fed_de.deseq2(sites, demo.design, **kw)
    res = quiet_deseq2(sites, demo.design, round_counts=True, **kw)
    pd.testing.assert_frame_equal(res.results(), quiet_deseq2(demo.sites, demo.design,
                                                              **kw).results())


def test_screen_layer(tmp_path):
    from fed_de.screening.data import make_screen

    scr = make_screen(n_cells=600, n_genes=30, n_perturbations=2, n_sites=2, seed=6)
    kw = {"perturbation_column": "perturbation", "control": "non-targeting"}
    moved = {}
    for name, adata in scr.sites.items():
        b = adata.copy()
        b.layers["counts"] = b.X.copy()
        b.X = sp.csr_matrix(np.log1p(b.X.toarray()))
        moved[name] = b
    ref = fed_de.screen(scr.sites, **kw)
    res = fed_de.screen(moved, layer="counts", **kw)
    np.testing.assert_array_equal(res.arrays["log2FoldChange"], ref.arrays["log2FoldChange"])
    paths = {}
    for name, adata in moved.items():
        paths[name] = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(paths[name])
    args = ["screen", *[a for n, p in paths.items() for a in ("--site", f"{n}={p}")],
            "--perturbation-column", "perturbation", "--control", "non-targeting",
            "--layer", "counts", "--out", tmp_path / "out"]
    res = cli(args)
    assert res.exit_code == 0, res.stderr
    long = pd.read_csv(tmp_path / "out" / "results.csv")
    np.testing.assert_allclose(long["log2FoldChange"].to_numpy(),
                               ref.to_long()["log2FoldChange"].to_numpy(), equal_nan=True)


# -- 2. level spellings across sites ----------------------------------------------------------
def _lowercase(adata, column="condition"):
    b = adata.copy()
    b.obs[column] = b.obs[column].astype(str).str.lower().to_numpy()
    return b


def test_levels_differing_by_case_between_sites_are_an_error(demo, tmp_path):
    sites = {**run_site(demo), "hospital_b": _lowercase(demo.sites["hospital_b"])}
    with pytest.raises(DesignError, match=r"factor 'condition'.*case or whitespace.*"
                                          r"'A' at \['hospital_a', 'hospital_c'\].*"
                                          r"'a' at \['hospital_b'\]"):
        fed_de.deseq2(sites, demo.design)
    folders = demo.write(tmp_path / "s")
    counts = folders["hospital_b"] / "metadata.csv"
    meta = pd.read_csv(counts, index_col=0)
    meta["condition"] = meta["condition"].str.lower() + " "
    meta.to_csv(counts)
    res = cli(["validate", *[a for n, p in folders.items() for a in ("--site", f"{n}={p}")],
               "--design", demo.design])
    assert res.exit_code == 2 and "hospital_b" in res.stderr and "case" in res.stderr
    # declared levels: the site's error says which declared level it means
    with pytest.raises(DesignError, match=r"site 'hospital_b'.*'a' differs from the declared "
                                          r"'A' only by case"):
        fed_de.deseq2(sites, demo.design, levels=demo.levels)


def test_inferred_levels_are_printed_and_recorded(demo, tmp_path):
    folders = demo.write(tmp_path / "s")
    res = cli(["run", *[a for n, p in folders.items() for a in ("--site", f"{n}={p}")],
               "--design", demo.design, "--out", tmp_path / "o"])
    assert res.exit_code == 0, res.stderr
    assert "levels read from the sites" in res.stdout
    assert "batch=b1,b2,b3; condition=A,B" in res.stdout
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["options"]["levels_inferred"] == ["batch", "condition"]
    assert run["options"]["levels"] == {"batch": ["b1", "b2", "b3"], "condition": ["A", "B"]}


# -- 3. a design naming a missing column ----------------------------------------------------
def test_design_typo_names_the_column_the_site_and_the_closest_name(demo, tmp_path):
    with pytest.raises(DesignError, match=r"site 'hospital_a'.*'conditon'.*has \['condition', "
                                          r"'batch'\].*Did you mean 'condition'\?"):
        fed_de.deseq2(demo.sites, "~ batch + conditon")
    with pytest.raises(DesignError, match=r"levels are declared for \['conditon'\].*"
                                          r"Did you mean 'condition'"):
        fed_de.deseq2(demo.sites, "~ condition", levels={"conditon": ["A", "B"]})
    folders = demo.write(tmp_path / "s")
    res = cli(["run", "--site", f"a={folders['hospital_a']}", "--design",
               "~ batch + conditon", "--out", tmp_path / "o"])
    assert res.exit_code == 2
    assert "No objects to concatenate" not in res.stderr
    assert "'conditon'" in res.stderr and "'condition'" in res.stderr


# -- 4. options and contrasts checked before the first round --------------------------------
@pytest.mark.parametrize("kw, pattern", [
    ({"contrasts": [("condition", "C", "A")]}, r"'C' is not a level of 'condition'"),
    ({"contrasts": [("treatment", "B", "A")]}, r"'treatment' is not a factor"),
    ({"contrasts": ["condition_C_vs_A"]}, r"coefficient 'condition_C_vs_A' unknown"),
    ({"contrasts": [[0, 1]]}, r"needs 4 values"),
    ({"fit_type": "parametirc"}, r"fit_type 'parametirc' unknown.*'local'"),
    ({"size_factors": "median"}, r"size_factors 'median' unknown.*'poscounts'"),
    ({"test": "LRT"}, r"needs a reduced design"),
    ({"test": "LRT", "reduced": "~ condition + batch"}, r"nested"),
    ({"alpha": 1.5}, r"alpha must be in \(0, 1\)"),
    ({"round_counts": "yes"}, r"round_counts must be"),
])
def test_bad_options_refused_before_any_task(demo, kw, pattern):
    counter = TaskCounter()
    with pytest.raises(ValueError, match=pattern):
        fed_de.deseq2(demo.sites, demo.design, levels=demo.levels, progress=counter, **kw)
    assert counter.n == 0  # nothing ran, nothing was sent


def test_cli_choices_are_listed_and_refused_early(demo, tmp_path):
    help_text = cli(["run", "--help"]).stdout
    for choices in ("ratio|poscounts", "parametric|local|mean",
                    "greaterAbs|lessAbs|greater|less", "Wald|LRT",
                    "simulation|subprocess|remote"):
        assert choices in help_text
    assert "two sites" in help_text  # the disclosure rule's scope (item 7)
    screen_help = cli(["screen", "--help"]).stdout
    assert "nb_glm|wilcoxon|t_test" in screen_help and "library|poscounts" in screen_help
    folders = demo.write(tmp_path / "s")
    sites = [a for n, p in folders.items() for a in ("--site", f"{n}={p}")]
    base = ["run", *sites, "--design", demo.design, "--out", tmp_path / "o"]
    for extra, message in ((["--alt-hypothesis", "bigger"], "'bigger' is not one of"),
                           (["--fit-type", "loess"], "'loess' is not one of"),
                           (["--alt-hypothesis", "lessAbs"], "needs a positive lfc_threshold"),
                           (["--contrast", "condition", "C", "A"], "'C' is not a level"),
                           (["--contrast", "condition", "B"], "three words")):
        res = cli([*base, *extra])
        assert res.exit_code == 2 and message in res.stderr, (extra, res.stderr)
        assert "100%" not in res.stderr and not (tmp_path / "o").exists()


# -- 5. the count tables labs have ---------------------------------------------------------
def _frames(adata):
    return (pd.DataFrame(np.asarray(adata.X), index=adata.obs_names, columns=adata.var_names),
            adata.obs.copy())


def test_transposed_tsv_and_featurecounts_tables(demo, tmp_path, caplog):
    a = demo.sites["hospital_a"]
    counts, meta = _frames(a)
    ref = load_site(a, "a")

    def same(site):
        np.testing.assert_array_equal(site.counts, ref.counts)
        assert site.genes == ref.genes and site.samples == ref.samples

    tsv = tmp_path / "tsv"
    tsv.mkdir()
    counts.to_csv(tsv / "counts.tsv", sep="\t")
    meta.to_csv(tsv / "metadata.tsv", sep="\t")
    same(load_site(tsv, "a"))
    # genes x samples (R's layout): read transposed, with a warning
    rt = tmp_path / "transposed"
    rt.mkdir()
    counts.T.to_csv(rt / "counts.csv")
    meta.to_csv(rt / "metadata.csv")
    with caplog.at_level("WARNING", logger="fed_de"):
        same(load_site(rt, "a"))
    assert "genes x samples" in caplog.text and "read transposed" in caplog.text
    # partly transposed: said so, with the fix
    bad = counts.T.copy()
    bad.insert(0, "gene_name", [f"name{i}" for i in range(len(bad))])
    bad.to_csv(rt / "counts.csv")
    with pytest.raises(SiteDataError, match=r"counts.csv looks transposed.*\['gene_name'\] "
                                            r"are not.*transpose it"):
        load_site(rt, "a")
    # featureCounts output: a comment line, Geneid + annotation columns, BAM paths as samples
    fc = tmp_path / "featurecounts"
    fc.mkdir()
    table = counts.T.copy()
    table.columns = [f"/data/bam/{s}.bam" for s in table.columns]
    for col, val in (("Chr", "chr1"), ("Start", 1), ("End", 100), ("Strand", "+"),
                     ("Length", 100)):
        table.insert(len([c for c in table.columns if not c.startswith("/")]), col, val)
    table.index.name = "Geneid"
    with open(fc / "counts.txt", "w") as fh:
        fh.write('# Program:featureCounts v2.0.6; Command:"featureCounts" "-a" "genes.gtf"\n')
        table.to_csv(fh, sep="\t")
    meta.to_csv(fc / "metadata.csv")
    same(load_site(fc, "a"))
    # and through the command line
    res = cli(["validate", "--site", f"a={fc}", "--design", "~ condition", "--n-sites", "1"])
    assert res.exit_code == 0, res.stderr


def test_no_sample_in_common_is_named(demo, tmp_path):
    counts, meta = _frames(demo.sites["hospital_a"])
    meta.index = [f"X{i}" for i in range(len(meta))]
    with pytest.raises(SiteDataError,
                       match=rf"none of the {len(meta)} row ids of counts.*sample id"):
        load_site((counts, meta), "a")


# -- 6. errors on stderr, exit codes, --debug, --version, --quiet/--verbose ------------------
def test_errors_go_to_stderr_and_unexpected_ones_take_one_line(demo, tmp_path, monkeypatch,
                                                                wheel):
    import fed_de.api

    folders = demo.write(tmp_path / "s")
    sites = [a for n, p in folders.items() for a in ("--site", f"{n}={p}")]
    res = cli(["run", *sites, "--design", "~ conditon", "--out", tmp_path / "o"])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "error" not in res.stdout

    def boom(*a, **k):
        raise RuntimeError("socket closed\n" + "  frame\n" * 400)

    monkeypatch.setattr(fed_de.api, "run", boom)
    res = cli(["run", *sites, "--design", demo.design, "--out", tmp_path / "o"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert lines[0] == "error: unexpected RuntimeError: socket closed"
    assert "fed-de --debug run" in lines[-1] and len(lines) == 2
    res = cli(["--debug", "run", *sites, "--design", demo.design, "--out", tmp_path / "o"])
    assert isinstance(res.exception, RuntimeError)  # --debug: the exception and traceback
    assert cli(["--version"]).stdout.strip() == f"fed-de {fed_de.__version__}"


def test_failed_remote_connection_is_one_line(tmp_path, monkeypatch, demo, wheel):
    """A real substra client to an unreachable network: one error line, not a traceback."""
    monkeypatch.setattr("fed_de.backends.substra.build_wheel", lambda dest: wheel)
    Path(tmp_path / "creds.yaml").write_text(yaml.safe_dump(
        {"aggregator": {"url": "http://127.0.0.1:9", "token": "t"}}))
    Path(tmp_path / "keys.yaml").write_text(yaml.safe_dump(
        {"aggregator_organization": "Agg", "sites": {"a": {
            "organization_id": "A", "dataset_key": "d", "data_sample_keys": ["s"]}}}))
    Path(tmp_path / "genes.txt").write_text("\n".join(demo.genes))
    res = cli(["run", "--backend", "remote", "--credentials", tmp_path / "creds.yaml",
               "--keys", tmp_path / "keys.yaml", "--design", "~ condition", "--levels",
               "condition=A,B", "--genes", tmp_path / "genes.txt", "--out", tmp_path / "o",
               "--timeout", "5"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr
    assert "'aggregator' at http://127.0.0.1:9: ConnectionError" in lines[0]
    assert "check the url in the credentials file" in lines[0]
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["status"] == "failed" and record["site"] == "aggregator"


def test_placeholder_credentials_refused_before_connecting(monkeypatch, tmp_path):
    import substra

    def connect(**kwargs):
        raise AssertionError("connected with placeholder credentials")

    monkeypatch.setattr(substra, "Client", connect)
    template = ROOT / "examples" / "remote" / "credentials.yaml"
    keys = ROOT / "examples" / "remote" / "keys.yaml"
    res = cli(["run", "--backend", "remote", "--credentials", template, "--keys", keys,
               "--design", "~ condition", "--levels", "condition=A,B", "--genes", template,
               "--out", tmp_path / "o"])
    assert res.exit_code == 2 and "placeholder" in res.stderr and "'aggregator'" in res.stderr
    res = cli(["register-site", "--site", tmp_path, "--name", "hospital_a", "--credentials",
               template, "--as", "hospital_a", "--aggregator-org", "Agg"])
    assert res.exit_code == 2 and "placeholder" in res.stderr and "'hospital_a'" in res.stderr


def test_quiet_and_verbose(demo, tmp_path):
    folders = demo.write(tmp_path / "s")
    sites = [a for n, p in folders.items() for a in ("--site", f"{n}={p}")]
    res = cli(["-q", "run", *sites, "--design", demo.design, "--out", tmp_path / "q"])
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == ""
    res = cli(["--verbose", "run", *sites, "--design", demo.design, "--levels",
               "condition=A,B", "--out", tmp_path / "v"])
    assert res.exit_code == 0, res.stderr
    assert "info: levels read from the sites" in res.stderr and "batch=b1,b2,b3" in res.stderr


# -- 7. the disclosure rule from two sites on -------------------------------------------------
def test_one_site_is_not_held_to_the_disclosure_rule(demo, tmp_path):
    """A lab's own 11 samples, one design cell of 2: it runs alone with the defaults; the
    same site in a three-site study refuses before sending anything."""
    c = demo.sites["hospital_c"]
    cell = c.obs["condition"].astype(str) + c.obs["batch"].astype(str)
    take = {k: 2 if i == 0 else 3 for i, k in enumerate(sorted(cell.unique()))}
    keep = np.concatenate([np.flatnonzero(cell.to_numpy() == k)[:n] for k, n in take.items()])
    small = c[np.sort(keep)].copy()
    cells = small.obs.groupby(["condition", "batch"], observed=True).size()
    assert cells.min() == 2 and small.n_obs == 11
    res = quiet_deseq2({"lab": small}, demo.design)
    assert res.facts["options"]["disclosure_rule_applied"] is False
    table = res.results()
    assert np.isfinite(table.loc[table.baseMean > 0, "log2FoldChange"]).all()
    with pytest.raises(DisclosureError, match=r"site 'hospital_c' refuses.*has 2 sample.*"
                                              r"min_cell_size=3") as info:
        quiet_deseq2({**run_site(demo), "hospital_c": small}, demo.design)
    assert info.value.step.startswith("log_sums")  # its first data task: nothing sent
    path = tmp_path / "lab.h5ad"
    small.write_h5ad(path)
    out = cli(["run", "--site", f"lab={path}", "--design", demo.design, "--out", tmp_path / "o"])
    assert out.exit_code == 0, out.stderr


# -- 9. PyDESeq2's inputs --------------------------------------------------------------------
def test_dataframe_pairs_as_pydeseq2_takes_them(demo):
    a = demo.sites["hospital_a"]
    counts, meta = _frames(a)
    ref = quiet_deseq2({"x": a}, "~ condition")
    one = quiet_deseq2(counts, "~ condition", metadata=meta)
    pair = quiet_deseq2({SINGLE_SITE: (counts, meta.iloc[::-1])}, "~ condition")
    bare = quiet_deseq2((counts, meta), "~ condition")
    for other in (one, pair, bare):
        pd.testing.assert_frame_equal(other.results(), ref.results())
    assert list(one.facts["bytes_sent_by_site"]) == [SINGLE_SITE]
    with pytest.raises(SiteDataError, match="needs its metadata"):
        fed_de.deseq2({"x": counts}, "~ condition")
    with pytest.raises(SiteDataError, match=r"\(counts, metadata\)"):
        fed_de.deseq2({"x": (counts,)}, "~ condition")


# -- 10. summary() and repr ------------------------------------------------------------------
def test_summary_text_is_rs():
    """R's own summary(res) outputs (DESeq2 1.38-era, alpha 0.05): the same numbers print
    the same text."""
    r_text = """out of 17806 with nonzero total read count
adjusted p-value < 0.05
LFC > 1.00 (up)    : 416, 2.3%
LFC < -1.00 (down) : 141, 0.79%
outliers [1]       : 95, 0.53%
low counts [2]     : 0, 0%
(mean count < 3)
[1] see 'cooksCutoff' argument of ?results
[2] see 'independentFiltering' argument of ?results"""
    s = ResultsSummary("x", 17806, 0.05, 1.0, 416, 141, 95, 0, 2.9)
    assert str(s) == r_text
    s = ResultsSummary("x", 24897, 0.05, 0.0, 8783, 7786, 0, 1, 0.2)
    assert str(s).splitlines()[2:7] == ["LFC > 0 (up)       : 8783, 35%",
                                        "LFC < 0 (down)     : 7786, 31%",
                                        "outliers [1]       : 0, 0%",
                                        "low counts [2]     : 1, 0.004%", "(mean count < 0)"]


def test_summary_counts_and_short_repr(fit):
    table = fit.results()
    s = fit.summary()
    padj, lfc = table["padj"], table["log2FoldChange"]
    assert s.up == int(((padj < 0.1) & (lfc > 0)).sum())
    assert s.down == int(((padj < 0.1) & (lfc < 0)).sum())
    assert s.low_counts == int((table["pvalue"].notna() & padj.isna()).sum())
    assert s.outliers == int(((table["baseMean"] > 0) & table["pvalue"].isna()).sum())
    # genes withheld by the disclosure rule (baseMean NaN) take no part in the filter
    seen = table[table["baseMean"].notna()]
    _, info = adjust_pvalues(seen["baseMean"].to_numpy(), seen["pvalue"].to_numpy(), 0.1)
    assert s.filter_threshold == info["filterThreshold"]
    # with a threshold the counts follow R: LFC beyond +/- lfcThreshold
    t = fit.results(lfc_threshold=0.5)
    s = summarize(t)
    assert s.up == int(((t.padj < 0.1) & (t.log2FoldChange > 0.5)).sum())
    assert "LFC > 0.50 (up)" in str(s)
    text = repr(fit)
    assert len(text) < 1000 and "condition_B_vs_A" in text and "150 genes" in text


# -- 11. several contrasts, name=, numeric vectors, no negative zero ---------------------------
def test_contrast_lists_names_and_vectors(fit):
    many = fit.results([("condition", "B", "A"), ("batch", "b3", "b2"), "batch_b2_vs_b1",
                        [0, 0, 0, 1]])
    assert list(many) == ["condition_B_vs_A", "batch_b3_vs_b2", "batch_b2_vs_b1",
                          "contrast_0_0_0_1"]
    pd.testing.assert_frame_equal(many["contrast_0_0_0_1"], many["condition_B_vs_A"],
                                  check_like=True)
    pd.testing.assert_frame_equal(fit.results(name="batch_b2_vs_b1"), many["batch_b2_vs_b1"])
    b3_b2 = fit.results(np.array([0, -1, 1, 0]))
    np.testing.assert_allclose(b3_b2.to_numpy(), many["batch_b3_vs_b2"].to_numpy(),
                               rtol=1e-12, equal_nan=True)
    assert many["batch_b3_vs_b2"].attrs["description"]["log2FoldChange"] == (
        "log2 fold change (MLE): batch b3 vs b2")
    with pytest.raises(ValueError, match="contrast= or name="):
        fit.results(("condition", "B", "A"), name="batch_b2_vs_b1")


def test_no_negative_zero_below_an_lfc_threshold(fit, tmp_path):
    table = fit.results(lfc_threshold=1.0)
    zero = table["stat"] == 0
    assert zero.any() and not np.signbit(table.loc[zero, "stat"]).any()
    fit.write(tmp_path, lfc_threshold=1.0)
    text = (tmp_path / "results.csv").read_text()
    assert not re.search(r"(^|,)-0\.0(,|$)", text, flags=re.M) and ",0.0," in text


def test_cli_repeated_and_numeric_contrasts(demo, tmp_path):
    folders = demo.write(tmp_path / "s")
    sites = [a for n, p in folders.items() for a in ("--site", f"{n}={p}")]
    res = cli(["run", *sites, "--design", demo.design, "--levels", "condition=A,B",
               "--levels", "batch=b1,b2,b3", "--contrast", "condition", "B", "A",
               "--contrast", "0,-1,1,0", "--name", "batch_b2_vs_b1", "--out", tmp_path / "o"])
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "o"
    files = sorted(p.name for p in out.glob("results_*.csv"))
    assert files == ["results_batch_b2_vs_b1.csv", "results_condition_B_vs_A.csv",
                     "results_contrast_0_-1_1_0.csv"]
    run = json.loads((out / "run.json").read_text())
    ref = quiet_deseq2(demo.sites, demo.design, levels=demo.levels)
    assert run["tasks"] == ref.facts["tasks"]  # one fit; the contrasts need no round
    for label, c in (("contrast_0_-1_1_0", ("batch", "b3", "b2")),
                     ("batch_b2_vs_b1", "batch_b2_vs_b1")):
        table = pd.read_csv(out / f"results_{label}.csv", index_col=0)
        np.testing.assert_allclose(table.to_numpy(), ref.results(c).to_numpy(), rtol=1e-12,
                                   equal_nan=True)
    assert res.stdout.count("with nonzero total read count") == 3  # a summary per contrast


# -- 12. output files -----------------------------------------------------------------------
def test_output_files_use_rs_names_and_record_the_filter(fit, tmp_path):
    paths = fit.write(tmp_path)
    disp = pd.read_csv(paths["dispersions"], index_col=0, float_precision="round_trip")
    # R's columns, then fed_de's own: the genes a disclosure rule withheld
    assert list(disp.columns) == ["baseMean", "dispGeneEst", "dispFit", "dispMAP",
                                  "dispersion", "dispOutlier", "allZero", "betaConv",
                                  "withheld"]
    np.testing.assert_allclose(disp["dispersion"], fit.dispersions["final"], rtol=1e-15)
    coef = pd.read_csv(paths["coefficients"], index_col=0, float_precision="round_trip")
    assert list(coef.columns) == fit.coef_names
    np.testing.assert_allclose(coef.to_numpy(), fit.state.genes.beta / np.log(2), rtol=1e-14)
    table = fit.results()
    # genes withheld by the disclosure rule (baseMean NaN) take no part in the filter
    seen = table[table["baseMean"].notna()]
    _, info = adjust_pvalues(seen["baseMean"].to_numpy(), seen["pvalue"].to_numpy(), 0.1)
    assert table.attrs["filterThreshold"] == info["filterThreshold"]
    run = json.loads(paths["run"].read_text())
    entry = run["contrasts"]["condition_B_vs_A"]
    assert entry["filterThreshold"] == info["filterThreshold"]
    assert entry["description"]["pvalue"] == "Wald test p-value: condition B vs A"
    h5 = ad.read_h5ad(paths["h5ad"])
    assert h5.shape == (1, 150) and list(h5.obs_names) == ["condition_B_vs_A"]
    np.testing.assert_allclose(h5.layers["padj"][0], table["padj"], equal_nan=True)
    assert list(h5.var.columns) == list(disp.columns)
    assert h5.uns["coefficient_names"].tolist() == fit.coef_names
    assert json.loads(h5.uns["fed_de"]["facts"])["tasks"] == fit.facts["tasks"]


def test_lrt_description(demo):
    res = quiet_deseq2(demo.sites, demo.design, levels=demo.levels, test="LRT",
                       reduced="~ batch")
    assert res.results().attrs["description"]["pvalue"] == (
        "LRT p-value: '~ batch + condition' vs '~ batch'")


# -- 13. run.json reproduces the run -----------------------------------------------------------
def test_run_json_is_enough_to_reproduce_the_run(demo, tmp_path):
    folders = demo.write(tmp_path / "s")
    sites = [a for n, p in folders.items() for a in ("--site", f"{n}={p}")]
    res = cli(["run", *sites, "--design", demo.design, "--fit-type", "mean",
               "--size-factors", "poscounts", "--alpha", "0.05", "--lfc-threshold", "0.5",
               "--alt-hypothesis", "greater", "--no-cooks", "--out", tmp_path / "o"])
    assert res.exit_code == 0, res.stderr
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    o = run["options"]
    for key, val in (("fit_type", "mean"), ("fit_type_used", "mean"),
                     ("size_factors", "poscounts"), ("alpha", 0.05), ("cooks", False),
                     ("round_counts", False), ("min_cell_size", 3)):
        assert o[key] == val, key
    (c,) = run["contrasts"].values()
    assert (c["lfcThreshold"], c["altHypothesis"]) == (0.5, "greater")
    assert run["command_line"][:2] == ["fed-de", "run"] and "--no-cooks" in run["command_line"]
    assert run["python"] and run["fed_de_version"] == fed_de.__version__
    assert run["fed_de_commit"] and run["started"]
    assert run["package_versions"]["pandas"] == pd.__version__
    # the recorded options give the same answer again
    again = quiet_deseq2({n: folders[n] for n in folders}, o["design"], levels=o["levels"],
                         size_factors=o["size_factors"], fit_type=o["fit_type"],
                         alpha=o["alpha"], cooks=o["cooks"], min_cell_size=o["min_cell_size"])
    table = pd.read_csv(tmp_path / "o" / "results.csv", index_col=0)
    np.testing.assert_allclose(table.to_numpy(), again.results(
        lfc_threshold=c["lfcThreshold"], alt_hypothesis=c["altHypothesis"]).to_numpy(),
        rtol=1e-12, equal_nan=True)


# -- 14. warnings reach the user -------------------------------------------------------------
@pytest.fixture(scope="module")
def trend_fails():
    """Dispersion growing with the mean: DESeq2's parametric trend fails, locfit is used."""
    rng = np.random.default_rng(4)
    G, n = 300, 12
    mu = 10 ** rng.uniform(0, 4, G)
    disp = 0.01 * np.sqrt(mu) * np.exp(rng.normal(0, 0.3, G))
    counts = rng.negative_binomial(1 / disp, 1 / (1 + mu * disp), size=(n, G)).astype(float)
    obs = pd.DataFrame({"condition": ["A"] * 6 + ["B"] * 6},
                       index=[f"s{i}" for i in range(n)])
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))


def test_trend_fallback_is_a_warning_and_recorded(trend_fails, tmp_path):
    with pytest.warns(FitWarning, match="local regression fit was automatically substituted"):
        res = fed_de.deseq2({"lab": trend_fails}, "~ condition")
    assert res.facts["options"]["fit_type_used"] == "local"
    assert any("substituted" in w for w in res.facts["warnings"])
    path = tmp_path / "lab.h5ad"
    trend_fails.write_h5ad(path)
    out = cli(["run", "--site", f"lab={path}", "--design", "~ condition", "--out",
               tmp_path / "o"])
    assert out.exit_code == 0 and "warning: dispersion trend" in out.stderr
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["options"]["fit_type_used"] == "local"
    assert any("substituted" in w for w in run["warnings"])


def test_non_converged_genes_are_a_warning(demo):
    with pytest.warns(FitWarning, match=r"(\d+) rows did not converge in beta") as rec:
        res = fed_de.deseq2(demo.sites, demo.design, levels=demo.levels, cooks=False,
                            rounds={"final": 1, "fallback": 0})
    (text,) = [str(w.message) for w in rec if "did not converge" in str(w.message)]
    n = int(re.search(r"(\d+) rows", text)[1])
    g = res.gene_table
    assert n == int((~g["betaConv"] & ~g["allZero"] & ~g["withheld"]).sum()) > 0


def test_withheld_genes_are_not_counted_as_unconverged():
    """A withheld gene has no fit (zero sums, betaConv False): it is marked ``withheld`` in
    the gene table and left out of the "did not converge" count."""
    study = make_demo_study(n_samples=150, n_genes=1000, seed=0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = fed_de.deseq2(study.sites, study.design, levels=study.levels, cooks=False)
    g = res.gene_table
    assert int(g["withheld"].sum()) == res.facts["genes_withheld"] > 0
    assert not g.loc[g["withheld"], "betaConv"].any()
    text = [str(w.message) for w in rec if "did not converge in beta" in str(w.message)]
    unconverged = int((~g["betaConv"] & ~g["allZero"] & ~g["withheld"]).sum())
    if unconverged:
        (t,) = text
        assert int(re.search(r"(\d+) rows", t)[1]) == unconverged
    else:
        assert text == []


def test_cooks_refits_and_filters_are_warnings():
    from test_cooks import LEVELS, injected_sites

    with pytest.warns(FitWarning) as rec:
        res = fed_de.deseq2(injected_sites(True), "~ batch + condition", levels=LEVELS,
                            min_cell_size=0)
    text = [str(w.message) for w in rec if issubclass(w.category, FitWarning)]
    assert any("6 gene(s) refitted" in t for t in text)
    assert any("4 gene(s) with an outlier have p-value NA" in t for t in text)
    assert res.facts["genes_refitted"] == 6


# -- 15. progress ----------------------------------------------------------------------------
def test_progress_bar_counts_the_plans_tasks(demo, capsys):
    from fed_de.backends.plan import record_plan
    from fed_de.bulk.strategy import DESeq2Strategy
    from fed_de.progress import TaskBar

    study = fed_de.make_study(demo.design, demo.genes, demo.levels)
    total = len(record_plan(DESeq2Strategy(study.to_dict(), n_sites=3),
                            list(demo.sites)).tasks)
    with TaskBar(total) as bar:
        res = quiet_deseq2(demo.sites, demo.design, levels=demo.levels, progress=bar)
    assert bar.completed == total == res.facts["tasks"]
    quiet_deseq2(demo.sites, demo.design, levels=demo.levels, progress=True)
    err = capsys.readouterr().err
    assert f"{total}/{total}" in err and "100%" in err


def test_demo_shows_progress_and_an_agreement_table(tmp_path):
    from rich.console import Console

    from fed_de.demo_run import run_demo

    console = Console(record=True, width=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_demo(n_samples=150, n_genes=200, seed=1, console=console, progress=True,
                          report=tmp_path / "report.html")
    text = console.export_text()
    assert "Federated vs pooled" in text and "gathered in one place" in text
    assert "fed_de, all samples pooled as one site" in text
    assert "{'" not in text
    assert report["vs_pooled_fed_de"]["differing_calls"] == 0


def test_unknown_round_key_names_the_keys(demo):
    with pytest.raises(ValueError, match=r"unknown round count; keys: .*'refit_mu'"):
        fed_de.deseq2(demo.sites, demo.design, rounds={"refit_disp": 1})
    with pytest.raises(ValueError, match="non-negative integer"):
        fed_de.deseq2(demo.sites, demo.design, rounds={"final": -1})
