"""Runs that survive faults (issue 14): results written whole and first, a failed run's
record, sites that defend themselves, remote networks that fail politely."""

from __future__ import annotations

import json
import threading
import types
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import substra
import yaml
from typer.testing import CliRunner

import fed_de
from fed_de import files
from fed_de.backends import substra as substra_runner
from fed_de.backends.simulation import run_strict
from fed_de.bulk.state import RunState, Totals
from fed_de.bulk.strategy import DESeq2Strategy
from fed_de.cli import app
from fed_de.demo_data import make_demo_study
from fed_de.errors import (
    DisclosureError,
    FedDEError,
    RemoteError,
    SiteDataError,
    SiteTaskError,
)
from fed_de.federation.calls import aggregator_step, as_call
from fed_de.site import load_site

WIDE = {"COLUMNS": "250", "TERM": "dumb"}


def cli(args):
    return CliRunner(env=WIDE).invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo():
    return make_demo_study(n_samples=150, n_genes=60, seed=4)


def _site_args(demo, tmp_path: Path) -> list[str]:
    folders = demo.write(tmp_path / "sites")
    return [a for n, p in folders.items() for a in ("--site", f"{n}={p}")]


def _levels(demo) -> list[str]:
    return [a for k, v in demo.levels.items() for a in ("--levels", f"{k}={','.join(v)}")]


# -- 1. results first, atomically; a failed run's record ---------------------------------------
def test_a_failed_write_leaves_no_half_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old complete file\n")

    def half(tmp: Path):
        tmp.write_text("gene,log2Fold")  # a crash in the middle of writing
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_with(target, half)
    assert target.read_text() == "old complete file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary left
    files.write_csv(pd.DataFrame({"a": [1]}), target, index=False)
    assert target.read_text() == "a\n1\n" and oct(target.stat().st_mode)[-3:] != "600"


def test_failed_run_writes_run_json_with_the_step_the_site_and_the_facts(demo, tmp_path,
                                                                          monkeypatch):
    from fed_de.bulk.state import Site

    real_cells = Site.cells

    def cells(self):
        if self.name == "hospital_b":
            raise OSError("disk read error on /data/hospital_b")
        return real_cells(self)

    monkeypatch.setattr(Site, "cells", cells)
    out = tmp_path / "out"
    res = cli(["run", *_site_args(demo, tmp_path), "--design", demo.design, *_levels(demo),
               "--out", out])
    assert res.exit_code == 2, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert "hospital_b" in line and "log_sums" in line and "disk read error" in line
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["error_type"] == "SiteTaskError"
    assert record["site"] == "hospital_b" and record["step"] == "log_sums"
    # the key round ran (3 sites + aggregator), and at most the other sites' first task
    assert 4 <= record["facts"]["tasks"] <= 6
    assert record["command_line"][:2] == ["fed-de", "run"] and record["design"] == demo.design
    assert not (out / "results.csv").exists()


def test_successful_run_json_says_ok_and_results_come_before_optional_output(
        demo, tmp_path, monkeypatch):
    """A report that fails after the fit leaves the results and run.json complete."""
    import fed_de.report

    def broken(*a, **k):
        raise RuntimeError("matplotlib font cache broken")

    monkeypatch.setattr(fed_de.report, "write_report", broken)
    out = tmp_path / "out"
    res = cli(["run", *_site_args(demo, tmp_path), "--design", demo.design, *_levels(demo),
               "--contrast", "condition", "B", "A", "--out", out, "--report", out / "r.html"])
    assert res.exit_code == 1 and "font cache" in res.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "ok"
    assert len(pd.read_csv(out / "results.csv")) == len(demo.genes)
    assert (out / "results.h5ad").stat().st_size > 0


def test_failed_screen_writes_run_json(tmp_path, monkeypatch):
    import fed_de.screening.setup as setup
    from fed_de.screening.data import make_screen

    def unreadable(*args, **kwargs):
        raise OSError("input/output error reading the cells")

    monkeypatch.setattr(setup, "_check_disclosure", unreadable)

    scr = make_screen(n_cells=200, n_genes=8, n_perturbations=2, n_sites=2, seed=1)
    args = []
    for name, adata in scr.sites.items():
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
        args += ["--site", f"{name}={tmp_path / f'{name}.h5ad'}"]
    res = cli(["screen", *args, "--perturbation-column", "guide", "--control",
               "non-targeting", "--out", tmp_path / "o"])
    assert res.exit_code == 2 and "guide" in res.stderr
    assert not (tmp_path / "o").exists()  # refused before any task: nothing written
    res = cli(["screen", *args, "--perturbation-column", "perturbation", "--control",
               "non-targeting", "--out", tmp_path / "o"])
    assert res.exit_code == 2 and "input/output error" in res.stderr
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["status"] == "failed" and "input/output error" in record["error"]
    assert record["step"] == "setup_sums" and record["site"] in scr.sites
    assert record["command_line"][:2] == ["fed-de", "screen"]


def _cli_site_files(folder: Path, n_genes: int) -> tuple[dict, list, list]:
    """Two small demo sites written as .h5ad files in ``folder`` with the study's genes.txt:
    the sites, the CLI's ``--site`` arguments, the genes."""
    small = make_demo_study(n_samples=48, n_genes=n_genes, seed=2)
    sites = dict(list(small.sites.items())[:2])
    args = []
    for name, adata in sites.items():
        adata.write_h5ad(folder / f"{name}.h5ad")
        args += ["--site", f"{name}={folder / f'{name}.h5ad'}"]
    (folder / "genes.txt").write_text("\n".join(small.genes))
    return sites, args, small.genes


@pytest.mark.slow
def test_cli_on_the_subprocess_backend_writes_the_simulations_results(tmp_path):
    """``fed-de run --backend subprocess`` end to end (substra's real tasks; ~50 tasks
    without Cook's): the files equal the simulation's, the facts print (no KeyError)."""
    sites, args, genes = _cli_site_files(tmp_path, n_genes=40)
    out = tmp_path / "out"
    res = cli(["-q", "run", *args, "--design", "~ condition", "--levels", "condition=A,B",
               "--genes", tmp_path / "genes.txt", "--contrast", "condition", "B", "A",
               "--no-cooks", "--backend", "subprocess", "--workdir", tmp_path / "work",
               "--out", out])
    assert res.exit_code == 0, res.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = fed_de.deseq2(sites, "~ condition", levels={"condition": ["A", "B"]},
                            genes=genes, contrasts=[("condition", "B", "A")], cooks=False)
    table = pd.read_csv(out / "results.csv", index_col=0)
    np.testing.assert_allclose(table.to_numpy(), sim.results().to_numpy(), rtol=1e-10,
                               equal_nan=True)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok" and record["backend"] == "subprocess"
    assert record["tasks"] == sim.facts["tasks"] and record["compute_plan_key"]
    from fed_de.cli_common import print_facts

    print_facts(record)  # the subprocess backend's facts print (issue 14's KeyError)


# -- 2. sites defend themselves --------------------------------------------------------------
def _strategy(demo, **kw) -> DESeq2Strategy:
    study = fed_de.make_study(demo.design, demo.genes, demo.levels)
    return DESeq2Strategy(study.to_dict(), n_sites=len(demo.sites), **kw)


def _loaded(demo):
    return [load_site(a, n) for n, a in demo.sites.items()]


def test_a_site_refuses_when_its_data_changed_between_tasks(demo):
    sites = _loaded(demo)
    target = sites[1]
    calls = []

    def change_data(step, org, round_idx):  # called before each task
        calls.append(step)
        if len(calls) == 12:  # mid-run: one count of hospital_b's storage changes
            counts = np.array(target.counts, copy=True)
            counts[0, 0] += 1
            counts.setflags(write=False)
            object.__setattr__(target, "counts", counts)

    with pytest.raises(SiteDataError, match=r"site 'hospital_b'.*changed since its first "
                                            r"task") as info:
        run_strict(_strategy(demo), sites, progress=change_data)
    assert info.value.site == "hospital_b" and info.value.step
    assert info.value.facts["tasks"] >= 12
    unchanged = run_strict(_strategy(demo), _loaded(demo))  # the same run, data untouched
    assert unchanged.ledger.tasks > 12


def test_a_screen_site_refuses_when_its_data_changed_between_tasks():
    """A screen site keeps the digest of its cells too: one count changed mid-run (its
    storage rewritten) is refused at its next task, naming the site and the step; the same
    run on untouched data goes through."""
    import scipy.sparse as sp

    from fed_de.screening.api import screen
    from fed_de.screening.data import load_screen_site, make_screen

    scr = make_screen(n_cells=600, n_genes=40, n_perturbations=3, seed=1)
    kw = dict(perturbation_column="perturbation", control="non-targeting", method="t_test")
    sites = {n: load_screen_site(a, n) for n, a in scr.sites.items()}
    target = list(sites.values())[1]
    calls = []

    def change_data(step, org, round_idx):  # called before each task
        calls.append(step)
        if len(calls) == 5:
            X = sp.csr_matrix(target.adata.X, dtype=np.float64, copy=True)
            X[0, 0] += 1
            target.adata.X = X

    with pytest.raises(SiteDataError, match=rf"site '{target.name}'.*changed since its "
                                            r"first task") as info:
        screen(sites, **kw, progress=change_data)
    assert info.value.site == target.name and info.value.step
    unchanged = screen({n: load_screen_site(a, n) for n, a in scr.sites.items()}, **kw)
    assert unchanged.facts["tasks"] > 5


def _local(strategy, site, state, step):
    """One site task as a node runs it, with a crafted request."""
    return strategy.local(data_from_opener=site, shared_state=state,
                          site_step=as_call(step).encode(), _skip=True)


def test_a_site_refuses_requests_outside_the_protocol(demo):
    from fed_de.bulk.size_factors import log_sums

    site = _loaded(demo)[0]
    strategy = _strategy(demo, secure_aggregation=False)
    _local(strategy, site, RunState(), log_sums)  # the protocol's first request: answered
    crafted = [
        (RunState(totals=Totals(n_samples=np.nan)), "totals.n_samples holds NaN"),
        (RunState(totals=Totals(n_samples=150.0, xtx=np.array([1.0, np.inf]))),
         "totals.xtx holds NaN or infinite"),
        (RunState(rows=np.array([3, 3, 7])), "gene selection"),
        (RunState(rows=np.array([0, len(demo.genes)])), "gene selection"),
        (RunState(totals="150 samples"), "part 'totals' is a str"),
        ({"totals": None}, "is a dict, not a RunState"),
    ]
    for state, message in crafted:
        with pytest.raises(DisclosureError, match=message) as info:
            _local(strategy, site, state, log_sums)
        assert "hospital_a" in str(info.value) and "nothing sent" in str(info.value)


def _tamper_robust(monkeypatch, change):
    """The aggregator's robust_refine, followed by ``change`` of the state it sends."""
    from fed_de.bulk import cooks

    real = cooks.robust_refine

    @aggregator_step(writes=("robust",))
    def robust_refine(sums, robust):
        out = real(sums, robust)
        return {"robust": change(out["robust"])}

    robust_refine.__module__ = cooks.__name__  # the plan names it as the real one

    monkeypatch.setattr(cooks, "robust_refine", robust_refine)


def _narrow_ranks(robust):
    ranks = robust.ranks.copy()
    ranks[:, 1] = ranks[:, 0]  # every trimmed set: one sample
    return replace(robust, ranks=ranks)


def _single_tie(robust):
    from fed_de.bulk.cooks import _carried, _dense

    search = _dense(robust.search)  # the run state carries the fields its readers read
    tie, n_hi, n_lo = search.tie.copy(), search.n_hi.copy(), search.n_lo.copy()
    tie[:, 0] = True
    n_lo[:, 0] = np.nan_to_num(n_lo[:, 0])
    n_hi[:, 0] = n_lo[:, 0] + 1  # a "tied" bracket of one sample: one value summed
    return replace(robust, search=_carried(replace(
        search, tie=tie, n_hi=n_hi, n_lo=n_lo, lo=np.nan_to_num(search.lo),
        hi=np.nan_to_num(search.hi, posinf=np.inf), done=search.done | True)))  # none open


def _thresholds_of_closed_targets(robust):
    search = robust.search  # the open targets' thresholds, then as many more
    return replace(robust, search=replace(search, thresholds=np.concatenate(
        [search.thresholds, search.thresholds])))


def _bracket_of_a_closed_target(robust):
    search = robust.search  # brackets travel for open and tied targets only
    return replace(robust, search=replace(search, lo=np.append(search.lo, 0.0)))


@pytest.mark.parametrize("change, message", [
    (_narrow_ranks, "trimming ranks are not those"),
    (_single_tie, "tied bracket of fewer than two"),
    (_thresholds_of_closed_targets, "not 15 per open target"),
    (_bracket_of_a_closed_target, "brackets and thresholds do not match"),
])
def test_a_site_refuses_a_trimmed_sum_narrowed_by_the_aggregator(demo, monkeypatch, change,
                                                                  message):
    """Cook's trimmed means sum normalised counts over an interval the aggregator names: a
    tampered aggregator narrowing it to one sample is refused before anything is sent."""
    _tamper_robust(monkeypatch, change)
    with pytest.raises(DisclosureError, match=message) as info:
        run_strict(_strategy(demo), _loaded(demo))
    assert info.value.site in demo.sites and info.value.step.startswith("robust_")


# -- checkpoint and resume ------------------------------------------------------------------
def _unreadable_after(monkeypatch, site: str, reads: int):
    """hospital storage that fails after ``reads`` reads of the site's counts (a disk that
    goes away mid-run)."""
    from fed_de.bulk.state import Site

    real, seen = Site.counts, {"n": 0}

    def counts(self):
        if self.name == site:
            seen["n"] += 1
            if seen["n"] > reads:
                raise OSError(f"[Errno 5] Input/output error: '/data/{site}/counts.csv'")
        return real(self)

    monkeypatch.setattr(Site, "counts", counts)


def test_a_failed_run_resumes_from_its_checkpoint_and_equals_an_uninterrupted_one(
        demo, tmp_path, monkeypatch):
    kw = dict(levels=demo.levels, genes=demo.genes, contrasts=[("condition", "B", "A")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = fed_de.deseq2(demo.sites, demo.design, **kw)
        folder = tmp_path / "checkpoint"
        _unreadable_after(monkeypatch, "hospital_b", 30)
        with pytest.raises(SiteTaskError, match=r"'hospital_b'.*Input/output error") as info:
            fed_de.deseq2(demo.sites, demo.design, checkpoint=folder, **kw)
        assert info.value.site == "hospital_b" and info.value.step
        assert (folder / "plan.json").exists() and list(folder.glob("*.local"))
        monkeypatch.undo()  # the disk is back
        resumed = fed_de.deseq2(demo.sites, demo.design, checkpoint=folder, **kw)
    for a, b in ((resumed.results(), full.results()), (resumed.dispersions, full.dispersions),
                 (resumed.coefficients, full.coefficients)):
        np.testing.assert_array_equal(a.to_numpy(float), b.to_numpy(float))
    reused = resumed.facts["checkpoint"]
    assert reused["rounds_reused"] > 3 and reused["site_tasks_reused"] > 0
    assert resumed.facts["tasks"] + reused["tasks_reused"] <= full.facts["tasks"]
    assert not folder.exists()  # ended well: nothing left to resume


def test_a_checkpoint_of_other_options_is_refused(demo, tmp_path, monkeypatch):
    kw = dict(levels=demo.levels, genes=demo.genes, checkpoint=tmp_path / "c")
    _unreadable_after(monkeypatch, "hospital_a", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SiteTaskError):
            fed_de.deseq2(demo.sites, demo.design, **kw)
        monkeypatch.undo()
        with pytest.raises(FedDEError, match="checkpoint of another run"):
            fed_de.deseq2(demo.sites, demo.design, fit_type="mean", **kw)


def test_cli_resume(demo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["run", *_site_args(demo, tmp_path), "--design", demo.design, *_levels(demo),
            "--contrast", "condition", "B", "A", "--out", out, "--checkpoint", out / "ckpt"]
    _unreadable_after(monkeypatch, "hospital_c", 12)
    res = cli(args)
    assert res.exit_code == 2 and "hospital_c" in res.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    res = cli(["resume", out, "--backend", "subprocess"])  # a checkpoint is the simulation's
    assert res.exit_code == 2 and "--backend simulation" in res.stderr
    res = cli(["resume", out])
    assert res.exit_code == 0, res.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok" and record["checkpoint"]["rounds_reused"] > 0
    res = cli(["resume", tmp_path])
    assert res.exit_code == 2 and "no run started with --checkpoint" in res.stderr


# -- 3. remote networks fail politely ----------------------------------------------------------
class _Client:
    """A substra client whose calls raise the given exceptions, in turn."""

    def __init__(self, errors, status="PLAN_STATUS_DONE"):
        self.errors = list(errors)
        self.status = status
        self.polls = 0

    def get_compute_plan(self, key):
        self.polls += 1
        if self.errors:
            raise self.errors.pop(0)
        return types.SimpleNamespace(key=key, status=self.status, done_count=3)


class _Failing:
    """A substra client whose every call raises ``error``."""

    backend_mode = substra.BackendType.REMOTE

    def __init__(self, error):
        self.error = error

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise self.error

        return fail


def _wheel(folder: Path) -> Path:
    """A stand-in wheel file (the fake clients never install it)."""
    path = folder / "fed_de-0.0.0-py3-none-any.whl"
    path.write_bytes(b"not installed")
    return path


def _sx(name, status=None):
    from substra.sdk import exceptions as sx

    return getattr(sx, name)(f"{name} from the node", status)


def test_transient_polling_errors_are_retried_with_back_off():
    waits = []
    client = _Client([_sx("ConnectionError"), _sx("GatewayUnavailable", 502),
                      _sx("InternalServerError", 500)])
    substra_runner.wait_for(client, "cp-1", plan_tasks=3, poll_seconds=2.0, sleep=waits.append)
    assert client.polls == 4 and waits == [2.0, 4.0, 8.0]
    client = _Client([_sx("ConnectionError")] * 4)
    with pytest.raises(substra.sdk.exceptions.ConnectionError):
        substra_runner.wait_for(client, "cp-1", plan_tasks=3, poll_seconds=1.0, retries=3,
                                sleep=waits.append)
    client = _Client([_sx("AuthenticationError", 401)])  # not transient: not retried
    with pytest.raises(substra.sdk.exceptions.AuthenticationError):
        substra_runner.wait_for(client, "cp-1", plan_tasks=3, sleep=waits.append)
    assert client.polls == 1


@pytest.mark.parametrize("error, fix", [
    (_sx("ConnectionError"), "check the url in the credentials file"),
    (_sx("AuthenticationError", 401), "generate a new token"),
    (_sx("AuthorizationError", 403), "ask that organisation's admin"),
    (_sx("GatewayUnavailable", 503), "down or overloaded"),
    (_sx("NotFound", 404), "check the keys file"),
])
def test_remote_errors_are_one_line_naming_the_organisation_the_url_and_the_fix(
        tmp_path, monkeypatch, demo, error, fix):
    monkeypatch.setattr(substra, "Client", lambda **kwargs: _Failing(error))
    monkeypatch.setattr("fed_de.backends.substra.build_wheel", lambda dest: _wheel(tmp_path))
    creds = {"aggregator": {"url": "https://substra.coord.test", "token": "t0k3n"}}
    keys = {"aggregator_organization": "Agg", "sites": {"a": {
        "organization_id": "A", "dataset_key": "d", "data_sample_keys": ["s"]}}}
    (tmp_path / "creds.yaml").write_text(yaml.safe_dump(creds))
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump(keys))
    (tmp_path / "genes.txt").write_text("\n".join(demo.genes))
    res = cli(["run", "--backend", "remote", "--credentials", tmp_path / "creds.yaml",
               "--keys", tmp_path / "keys.yaml", "--design", "~ condition", "--levels",
               "condition=A,B", "--genes", tmp_path / "genes.txt", "--out", tmp_path / "o"])
    assert res.exit_code == 2
    (line,) = res.stderr.strip().splitlines()
    assert "organisation 'aggregator' at https://substra.coord.test" in line and fix in line
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["status"] == "failed" and record["error_type"] == "RemoteError"
    # register-site, on a hospital's node
    (tmp_path / "site").mkdir()
    creds["hospital_a"] = {"url": "https://substra.hosp-a.test", "token": "t"}
    (tmp_path / "creds.yaml").write_text(yaml.safe_dump(creds))
    res = cli(["register-site", "--site", tmp_path / "site", "--name", "hospital_a",
               "--credentials", tmp_path / "creds.yaml", "--as", "hospital_a",
               "--aggregator-org", "Agg", "--keys", tmp_path / "k.yaml"])
    assert res.exit_code == 2
    (line,) = res.stderr.strip().splitlines()
    assert "'hospital_a' at https://substra.hosp-a.test" in line and fix in line


def test_remote_error_keeps_the_plan_key_in_the_failed_record(demo, tmp_path):
    """Polling fails for good after submission: the error says where, and the facts keep
    the compute plan key to reattach to."""
    from test_substra import FakeClient, _keys, _remote_strategy

    class Lost(FakeClient):
        def get_compute_plan(self, key):
            raise _sx("AuthenticationError", 401)

    client = Lost()
    seen = []
    with pytest.raises(RemoteError, match="generate a new token") as info:
        substra_runner.run_remote(
            _remote_strategy(demo), {"aggregator": {"url": "https://n.test", "token": "t"}},
            _keys(["a"]), workdir=tmp_path, wheel=_wheel(tmp_path), poll_seconds=0.0,
            client_factory=lambda entry, name: client,
            progress=lambda step, org, r: seen.append(step))
    key = info.value.facts["compute_plan_key"]
    assert key and f"submitted compute plan {key}" in seen
    assert info.value.facts["tasks"] > 0 and info.value.url == "https://n.test"
    assert isinstance(info.value, fed_de.errors.FedDEError)
    assert not isinstance(info.value, SiteTaskError)


# -- resume on Substra: a new compute plan from the failed plan's downloaded state ----------
def _corrupt(path: Path) -> None:
    """A storage fault: the site's data file becomes unreadable garbage."""
    path.write_bytes(b"\x00 disk error \x00")


def _fault_after(n_tasks: int, path: Path) -> threading.Event:
    """Corrupt ``path`` once ``n_tasks`` new tasks of substra's subprocess backend are done
    (read from its in-memory database, which this process holds); set the event to stop."""
    from substra.sdk import schemas
    from substra.sdk.backends.local import db

    tasks = db.get_db()._data[schemas.Type.Task]
    before, stop = set(tasks), threading.Event()

    def watch():
        while not stop.wait(0.1):
            done = [t for k, t in list(tasks.items())
                    if k not in before and getattr(t.status, "value", t.status) == "STATUS_DONE"]
            if len(done) >= n_tasks:
                _corrupt(path)
                return

    threading.Thread(target=watch, daemon=True).start()
    return stop

def _two_small_sites(cooks: bool, **rounds) -> tuple[dict, dict]:
    """Two sites of a 48-sample demo study, and the run arguments of the resume tests (few
    rounds: the subprocess runs stay short)."""
    small = make_demo_study(n_samples=48, n_genes=30, seed=2)
    sites = dict(list(small.sites.items())[:2])
    return sites, dict(levels={"condition": ["A", "B"]}, genes=small.genes,
                       contrasts=[("condition", "B", "A")], cooks=cooks,
                       rounds={"mu": 2, "genewise": 2, "final": 2, **rounds})



@pytest.mark.slow
def test_a_failed_subprocess_plan_resumes_as_a_new_plan_from_its_downloaded_state(
        tmp_path, monkeypatch):
    """Site storage fails mid-plan on substra's subprocess backend: the error names the site
    and step and carries the seed (the last finished round's state, downloaded before the
    backend is gone); a new plan from it, after the site re-derives its state from its data,
    equals an uninterrupted simulation."""
    from fed_de.backends.resume import load_seed, save_seed

    sites, kw = _two_small_sites(cooks=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = fed_de.deseq2(sites, "~ condition", **kw)
        site = list(sites)[1]
        data = tmp_path / "w1" / "sites" / site / "site.h5ad"
        stop = _fault_after(12, data)  # the site's disk fails mid-plan
        with pytest.raises(SiteTaskError) as info:
            fed_de.deseq2(sites, "~ condition", backend="subprocess",
                          workdir=tmp_path / "w1", **kw)
        stop.set()
        err = info.value  # the site, its step and round, from the failed plan's record
        assert err.site == site and f"at site {site} (organisation " in str(err)
        assert err.step.startswith(("irls_sums", "disp_sums", "rough_sums", "log_sums"))
        assert f"({err.step}, round " in str(err)
        assert err.resume is not None, err.resume_error
        save_seed(err.resume, tmp_path / "run")
        resumed = fed_de.deseq2(sites, "~ condition", backend="subprocess",
                                workdir=tmp_path / "w2", resume_from=tmp_path / "run", **kw)
    seed = load_seed(tmp_path / "run")
    assert resumed.facts["resumed"]["from_round"] == seed.round_idx >= 3
    assert resumed.facts["resumed"]["tasks_reused"] > 0
    assert resumed.facts["tasks"] < full.facts["tasks"]
    for a, b in ((resumed.results(), full.results()), (resumed.dispersions, full.dispersions),
                 (resumed.coefficients, full.coefficients)):
        np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-10,
                                   equal_nan=True)


@pytest.mark.slow
def test_cli_resumes_a_failed_subprocess_run_as_a_new_plan(tmp_path):
    """docker/README.md's procedure on substra's subprocess backend: `fed-de run` fails at a
    site mid-plan (its disk); run.json names the site and step, and the folder keeps the last
    finished round's state; `fed-de resume OUT --backend simulation` continues it as a new
    plan (rounds before the state not run again) and writes the uninterrupted run's files."""
    sites, args, genes = _cli_site_files(tmp_path, n_genes=30)
    out, site = tmp_path / "out", list(sites)[0]
    stop = _fault_after(10, tmp_path / "work" / "sites" / site / "site.h5ad")
    res = cli(["run", *args, "--design", "~ condition", "--levels", "condition=A,B",
               "--genes", tmp_path / "genes.txt", "--contrast", "condition", "B", "A",
               "--no-cooks", "--backend", "subprocess", "--workdir", tmp_path / "work",
               "--out", out])
    stop.set()
    assert res.exit_code == 2 and f"at site {site}" in res.stderr, res.stderr
    assert f"fed-de resume {out}" in res.stderr and not (out / "results.csv").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["site"] == site
    assert record["step"] not in (None, "unknown") and record["resume"]["available"]
    assert record["resume"]["from_round"] >= 3 and (out / "resume.pkl").exists()

    res = cli(["resume", out, "--backend", "simulation"])
    assert res.exit_code == 0, res.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = fed_de.deseq2(sites, "~ condition", levels={"condition": ["A", "B"]},
                             genes=genes, contrasts=[("condition", "B", "A")],
                             cooks=False)
    table = pd.read_csv(out / "results.csv", index_col=0)
    np.testing.assert_allclose(table.to_numpy(), full.results().to_numpy(), rtol=1e-10,
                               equal_nan=True)
    done = json.loads((out / "run.json").read_text())
    line = done["command_line"]
    assert done["status"] == "ok" and line[line.index("--backend") + 1] == "simulation"
    assert done["resumed"]["from_round"] == record["resume"]["from_round"]
    assert 0 < done["resumed"]["tasks_reused"] and done["tasks"] < full.facts["tasks"]
    assert "--resume-from" in done["command_line"]


# -- resume from any round, Cook's side chain in flight (the simulation stands in for substra)
def _plan_states(monkeypatch, sites, design="~ condition", **kw):
    """A simulated run's result, strategy, and the run state after every aggregation by
    round (as substra keeps them for a plan submitted with clean_models=False)."""
    from fed_de import api
    from fed_de.backends import simulation

    states, seen = {}, {}
    update, run = simulation.StrictAggregationNode.update_states, api.run

    def capture(self, operation, *, round_idx=None, **more):
        ref = update(self, operation, round_idx=round_idx, **more)
        states.setdefault(round_idx, []).append(self._platform.get_shared(ref.key))
        return ref

    def keep_strategy(strategy, *args, **more):
        seen["strategy"] = strategy
        return run(strategy, *args, **more)

    with monkeypatch.context() as m:
        m.setattr(simulation.StrictAggregationNode, "update_states", capture)
        m.setattr(api, "run", keep_strategy)
        full = fed_de.deseq2(sites, design, **kw)
    return full, seen["strategy"], states


def _failed_plan(states: dict, finished):
    """A substra client and download function showing a failed plan whose aggregations of
    the rounds ``finished`` (a predicate) were done."""
    tasks = [types.SimpleNamespace(worker="agg", status="STATUS_DONE", key=f"t{r}",
                                   metadata={"round_idx": str(r)})
             for r in states if finished(r)]
    client = types.SimpleNamespace(list_task=lambda filters=None: tasks)

    def download(client, compute_plan_key, round_idx):
        (state,) = states[round_idx]  # one aggregation per round (side chain: the other parity)
        return state

    return client, download


@pytest.mark.parametrize("robust_rounds", [6, 1])  # side chain ends after / before the main
def test_a_plan_resumes_from_any_round_with_cooks_side_chain_in_flight(monkeypatch,
                                                                       robust_rounds):
    """Cook's on: a plan fails anywhere (side chain in flight or not, finished or not started);
    the seed holds the main chain's last state and the side chain's (or the state it forked
    from), and the new plan from it equals the uninterrupted run exactly, running fewer
    tasks."""
    from fed_de.backends.resume import download_seed

    sites, kw = _two_small_sites(cooks=True, robust=robust_rounds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, strategy, states = _plan_states(monkeypatch, sites, **kw)
        side = sorted(r for r, s in states.items() if s[0].robust is not None)
        main = sorted(set(states) - set(side))
        assert len(side) >= 4 and side[0] < main[-1]  # the side chain overlaps the main
        assert (side[-1] > main[-1]) == (robust_rounds == 6)
        cases = {f"fails at round {f}": (lambda r, f=f: r < f) for f in range(4, main[-1] + 1)}
        cases["side chain fails at its start"] = lambda r: r in main[:-2]
        cases["side chain behind the main"] = lambda r: r in main[:-1] or r in side[:3]
        expected = full.results().to_numpy(float)
        kinds = set()
        for name, finished in cases.items():
            seed = download_seed(*_failed_plan(states, finished)[:1], "cp", strategy, "agg",
                                 download=_failed_plan(states, finished)[1])
            kinds.add("side" if seed.side is None else
                      "forked" if seed.side.robust is None else "in flight")
            res = fed_de.deseq2(sites, "~ condition", resume_from=seed, **kw)
            np.testing.assert_array_equal(res.results().to_numpy(float), expected,
                                          err_msg=name)
            assert res.facts["tasks"] < full.facts["tasks"], name
    assert kinds == {"side", "forked", "in flight"}


@pytest.mark.parametrize("first_fails, then_fails", [
    ("side in flight", "later"), ("side in flight", "at once"),
    ("side not started", "at once")])
def test_a_resumed_plan_that_fails_again_resumes_again(monkeypatch, first_fails, then_fails):
    """A resumed plan (Cook's side chain in flight, or to restart) fails in its turn, later
    or before any round of its own finished: its finished aggregations (the installed seeds,
    numbered as the states they hold, among them) seed a third plan, which still equals the
    uninterrupted run."""
    from fed_de.backends.resume import download_seed

    sites, kw = _two_small_sites(cooks=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, strategy, states = _plan_states(monkeypatch, sites, **kw)
        main = sorted(r for r, st in states.items() if st[0].robust is None)
        failed = ((lambda r: r < 12) if first_fails == "side in flight"
                  else (lambda r: r in main[:-3]))
        first = download_seed(*_failed_plan(states, failed)[:1], "cp1", strategy, "agg",
                              download=_failed_plan(states, failed)[1])
        assert first.side is not None
        assert (first.side.robust is None) == (first_fails == "side not started")
        _, again, states2 = _plan_states(monkeypatch, sites, resume_from=first, **kw)
        failed = ((lambda r: r < first.round_idx + 5) if then_fails == "later"
                  else (lambda r: r <= first.round_idx))
        second = download_seed(*_failed_plan(states2, failed)[:1], "cp2", again, "agg",
                               download=_failed_plan(states2, failed)[1])
        assert (second.round_idx > first.round_idx) == (then_fails == "later")
        res = fed_de.deseq2(sites, "~ condition", resume_from=second, **kw)
    np.testing.assert_array_equal(res.results().to_numpy(float), full.results().to_numpy(float))
