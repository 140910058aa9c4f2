"""The same strategy on real Substra: subprocess backend (real functions, datasets, tasks),
and the remote path against a fake client that records every call."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import substra
import yaml

import fed_de
from fed_de.backends import substra as substra_runner
from fed_de.backends.plan import record_plan
from fed_de.backends.simulation import run_strict
from fed_de.bulk.strategy import DESeq2Strategy
from fed_de.demo_data import make_demo_study
from fed_de.errors import FedDEError, SiteTaskError
from fed_de.site import load_site


@pytest.fixture(scope="module")
def small():
    demo = make_demo_study(n_samples=48, n_genes=40, seed=2)
    sites = dict(list(demo.sites.items())[:2])
    return demo, sites


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return substra_runner.build_wheel(tmp_path_factory.mktemp("dist"))


def test_subprocess_backend_equals_simulation(small, tmp_path):
    """Full pipeline, 2 sites, on substra's subprocess backend, Cook's side chain (a fork of
    the sites' local states that rejoins at an aggregation) and refit included; their round
    counts are cut to keep the test at ~100 tasks, ~3 minutes."""
    demo, sites = small
    kw = dict(levels={"condition": ["A", "B"]}, genes=demo.genes,
              contrasts=[("condition", "B", "A")],
              rounds={"robust": 3, "refit_final": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = fed_de.deseq2(sites, "~ condition", backend="subprocess", workdir=tmp_path, **kw)
    sim = fed_de.deseq2(sites, "~ condition", **kw)
    np.testing.assert_allclose(real.dispersions.to_numpy(float), sim.dispersions.to_numpy(float),
                               rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(real.coefficients.to_numpy(), sim.coefficients.to_numpy(),
                               rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(real.results().to_numpy(), sim.results().to_numpy(),
                               rtol=1e-12, equal_nan=True)
    assert real.facts["sequential_steps"] == sim.facts["sequential_steps"]
    assert real.facts["tasks"] == sim.facts["tasks"]
    assert (tmp_path / "experiment").exists() and (tmp_path / "sites").exists()


class _Extra(DESeq2Strategy):
    def site_view(self, data):
        assert self.extra == 1.0  # set outside the constructor: lost remotely
        return super().site_view(data)


def test_attribute_set_outside_constructor_fails_in_strict_simulation(small):
    demo, sites = small
    study = fed_de.make_study("~ condition", demo.genes, {"condition": ["A", "B"]})
    strategy = _Extra(study.to_dict())
    strategy.extra = 1.0  # works on this instance, but a node rebuilds from constructor args
    assert strategy.extra == 1.0
    with pytest.raises(SiteTaskError, match="AttributeError.*extra"):
        run_strict(strategy, [load_site(a, n) for n, a in sites.items()])


# -- remote path, against a fake substra client ------------------------------------------
class FakeClient:
    """Records what fed_de asks of a substra client."""

    def __init__(self, org="HospA-MSP", statuses=("PLAN_STATUS_DOING", "PLAN_STATUS_DONE"),
                 failed_task=None):
        self.calls = []
        self.org = org
        self.statuses = list(statuses)
        self.failed_task = failed_task
        self.n = 0
        self.backend_mode = substra.BackendType.REMOTE

    def _key(self, kind):
        self.n += 1
        return f"{kind}-{self.n}"

    def organization_info(self):
        self.calls.append(("organization_info",))
        return types.SimpleNamespace(organization_id=self.org)

    def add_dataset(self, spec):
        self.calls.append(("add_dataset", spec))
        return self._key("dataset")

    def add_data_sample(self, spec, local=True):
        self.calls.append(("add_data_sample", spec, local))
        return self._key("sample")

    def add_function(self, spec):
        self.calls.append(("add_function", spec))
        return self._key("function")

    def add_compute_plan(self, spec, auto_batching=True, batch_size=500):
        self.calls.append(("add_compute_plan", spec))
        return types.SimpleNamespace(key=spec.key, status="PLAN_STATUS_CREATED")

    def get_compute_plan(self, key):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        self.calls.append(("get_compute_plan", key, status))
        return types.SimpleNamespace(key=key, status=status, done_count=0)

    def list_task(self, filters=None):
        self.calls.append(("list_task", filters))
        return [self.failed_task] if self.failed_task else []


def _keys(names):
    return {"aggregator_organization": "Agg-MSP",
            "sites": {n: {"organization_id": f"{n}-MSP", "dataset_key": f"ds-{n}",
                          "data_sample_keys": [f"s-{n}"]} for n in names}}


def _remote_strategy(demo):
    study = fed_de.make_study("~ condition", demo.genes, {"condition": ["A", "B"]})
    return DESeq2Strategy(study.to_dict())


def test_register_site_records_dataset_and_keys(small, tmp_path):
    demo, sites = small
    folder = demo.write(tmp_path / "data")["hospital_a"]
    client = FakeClient(org="HospA-MSP")
    keys_file = tmp_path / "keys.yaml"
    entry = substra_runner.register_site_remote(client, "hospital_a", folder, "Agg-MSP",
                                                keys_file, tmp_path / "work")
    kinds = [c[0] for c in client.calls]
    assert kinds == ["organization_info", "add_dataset", "add_data_sample"]
    dataset_spec = client.calls[1][1]
    assert Path(dataset_spec.data_opener).read_text() == substra_runner.OPENER_SOURCE
    assert dataset_spec.permissions.authorized_ids == ["HospA-MSP", "Agg-MSP"]
    assert client.calls[2][1].path == folder and client.calls[2][2] is True
    written = yaml.safe_load(keys_file.read_text())
    assert written["aggregator_organization"] == "Agg-MSP"
    assert written["sites"]["hospital_a"] == entry
    assert (folder / "site.json").exists()


def test_remote_run_submits_the_plan_polls_and_downloads(small, tmp_path, wheel):
    demo, _ = small
    client = FakeClient()
    downloads = []

    def download(client, compute_plan_key, round_idx):
        downloads.append((compute_plan_key, round_idx))
        return {"done": True}

    strategy = _remote_strategy(demo)
    run = substra_runner.run_remote(
        strategy, {"aggregator": {"url": "https://x", "token": "t"}}, _keys(["a", "b"]),
        workdir=tmp_path, wheel=wheel, poll_seconds=0.0,
        client_factory=lambda entry, name: client, download=download)
    plan = record_plan(_remote_strategy(demo), ["a-MSP", "b-MSP"], "Agg-MSP")
    functions = [c for c in client.calls if c[0] == "add_function"]
    submitted = [c for c in client.calls if c[0] == "add_compute_plan"]
    polls = [c for c in client.calls if c[0] == "get_compute_plan"]
    assert len(functions) == plan.facts()["distinct_functions"]
    assert len(submitted) == 1 and len(submitted[0][1].tasks) == len(plan.tasks)
    workers = {t.worker for t in submitted[0][1].tasks}
    assert workers == {"a-MSP", "b-MSP", "Agg-MSP"}
    assert [p[2] for p in polls] == ["PLAN_STATUS_DOING", "PLAN_STATUS_DONE"]
    assert downloads == [(submitted[0][1].key, plan.final_round)]
    assert run.shared_state == {"done": True}
    assert run.facts["sequential_steps"] == plan.sequential_steps


def test_remote_failure_names_task_and_organisation(small, tmp_path, wheel):
    demo, _ = small
    failed = types.SimpleNamespace(key="task-42", worker="b-MSP",
                                   function=types.SimpleNamespace(name="local_moments"))
    client = FakeClient(statuses=["PLAN_STATUS_DOING", "PLAN_STATUS_FAILED"],
                        failed_task=failed)
    with pytest.raises(SiteTaskError, match=r"task-42 \(local_moments\).*b-MSP") as info:
        substra_runner.run_remote(
            _remote_strategy(demo), {"aggregator": {"url": "u", "token": "t"}},
            _keys(["a", "b"]), workdir=tmp_path, wheel=wheel, poll_seconds=0.0,
            client_factory=lambda entry, name: client, download=lambda **k: {})
    assert info.value.site == "b" and info.value.step == "local_moments"  # b-MSP's site


def test_remote_timeout_and_bad_keys(small, tmp_path, wheel):
    demo, _ = small
    client = FakeClient(statuses=["PLAN_STATUS_DOING"])
    with pytest.raises(FedDEError, match="still doing after 0 s"):
        substra_runner.run_remote(
            _remote_strategy(demo), {"aggregator": {"url": "u", "token": "t"}},
            _keys(["a"]), workdir=tmp_path, wheel=wheel, poll_seconds=0.0, timeout=0.0,
            client_factory=lambda entry, name: client, download=lambda **k: {})
    bad = _keys(["a"])
    del bad["sites"]["a"]["dataset_key"]
    with pytest.raises(FedDEError, match=r"keys of site 'a' lack \['dataset_key'\]"):
        substra_runner.run_remote(_remote_strategy(demo), {"aggregator": {"url": "u"}}, bad,
                                  workdir=tmp_path, wheel=wheel)
    with pytest.raises(FedDEError, match="need 'token'"):
        substra_runner.make_client({"url": "https://x"}, "aggregator")


@pytest.mark.slow
def test_screen_runs_unchanged_on_subprocess_backend(tmp_path):
    """The screen strategy on substra's subprocess backend equals its simulation (~1 min)."""
    from fed_de.screening.api import COLUMNS, screen
    from fed_de.screening.data import make_screen

    scr = make_screen(n_cells=600, n_genes=25, n_perturbations=3, n_sites=2, seed=3)
    kw = {"perturbation_column": "perturbation", "control": "non-targeting"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = screen(scr.sites, **kw, backend="subprocess", workdir=tmp_path)
    sim = screen(scr.sites, **kw)
    for key in COLUMNS:
        np.testing.assert_allclose(real.arrays[key], sim.arrays[key], rtol=1e-12,
                                   equal_nan=True, err_msg=key)
    assert real.facts["sequential_steps"] == sim.facts["sequential_steps"] <= 30


def test_screen_on_a_remote_network_with_a_fake_client(tmp_path, wheel):
    """Screens: register-site with the screen opener, then a remote run (fake client)."""
    from fed_de.screening.api import screen
    from fed_de.screening.data import SCREEN_OPENER_SOURCE, make_screen, write_screen_site_folder
    from fed_de.screening.data import load_screen_site as load

    scr = make_screen(n_cells=300, n_genes=12, n_perturbations=2, n_sites=2, seed=4)
    keys_file = tmp_path / "keys.yaml"
    for name, adata in scr.sites.items():
        folder = write_screen_site_folder(load(adata, name), tmp_path / "data" / name)
        client = FakeClient(org=f"{name}-MSP")
        substra_runner.register_site_remote(client, name, folder, "Agg-MSP", keys_file,
                                            tmp_path / "work", kind="screen")
        assert Path(client.calls[1][1].data_opener).read_text() == SCREEN_OPENER_SOURCE
    agg = FakeClient(org="Agg-MSP")
    seen = []

    def download(client, compute_plan_key, round_idx):
        seen.append(round_idx)
        raise RuntimeError("stop after download")  # the fake network computes nothing

    from unittest import mock

    with mock.patch.object(substra_runner, "make_client", lambda entry, name: agg), \
            mock.patch("substrafl.model_loading.download_aggregate_shared_state", download), \
            pytest.raises(RuntimeError, match="stop after download"):
        screen(None, perturbation_column="perturbation", control="non-targeting",
               perturbations=scr.perturbations, genes=scr.genes, backend="remote",
               credentials={"aggregator": {"url": "u", "token": "t"}}, keys=keys_file,
               workdir=tmp_path / "run")
    submitted = [c for c in agg.calls if c[0] == "add_compute_plan"]
    assert len(submitted) == 1 and seen
    workers = {t.worker for t in submitted[0][1].tasks}
    assert workers == {f"{n}-MSP" for n in scr.sites} | {"Agg-MSP"}
