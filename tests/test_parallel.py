"""The simulation's worker processes, spilling, freeing, and the byte figures it reports.

Workers (``n_jobs``) and spilling (``spill_dir``) change where a task runs and where its
outputs wait, never the answer: every comparison below is exact. Byte figures are checked
against the messages themselves (plaintext float64 values and their masked encoding).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from substrafl.compute_plan_builder import ComputePlanBuilder
from substrafl.remote import remote, remote_data
from typer.testing import CliRunner

import fed_de
from fed_de.backends import check_workers
from fed_de.backends.plan import record_plan
from fed_de.backends.simulation import RunLedger, payload_nbytes, resolve_jobs, run_strict
from fed_de.backends.substra import measure_outputs, run_facts
from fed_de.bulk.strategy import DESeq2Strategy
from fed_de.cli_common import print_facts
from fed_de.demo_data import make_demo_study
from fed_de.errors import DisclosureError, FedDEError, SiteTaskError
from fed_de.federation.secure import MaskedMessage
from fed_de.site import load_site

CONTRAST = ("condition", "B", "A")


@pytest.fixture(scope="module")
def demo():
    return make_demo_study(n_samples=150, n_genes=120, seed=7, n_sites=4)


def _fit(demo, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fed_de.deseq2(demo.sites, demo.design, contrasts=[CONTRAST], levels=demo.levels,
                             genes=demo.genes, **kw)


@pytest.fixture(scope="module")
def serial(demo):
    return _fit(demo)


def _assert_same_run(a, b) -> None:
    pd.testing.assert_frame_equal(a.results(), b.results(), check_exact=True)
    pd.testing.assert_frame_equal(a.dispersions, b.dispersions, check_exact=True)
    pd.testing.assert_frame_equal(a.coefficients, b.coefficients, check_exact=True)
    for key in ("sequential_steps", "tasks", "bytes_sent_by_site", "payload_bytes_by_site",
                "bytes_received_by_site", "bytes_sent_by_aggregator", "bytes_by_step"):
        assert a.facts[key] == b.facts[key], key


def test_workers_give_the_serial_answer_exactly(demo, serial):
    """Four sites' tasks on two worker processes: same results, steps and bytes to the bit."""
    par = _fit(demo, n_jobs=2)
    _assert_same_run(serial, par)
    assert par.facts["n_jobs"] == 2 and serial.facts["n_jobs"] == 1
    # Cook's side chain ran too (it forks the sites' local states and rejoins)
    assert any(step.startswith("robust_sums") for step in par.facts["bytes_by_step"])


def test_spill_dir_gives_the_same_answer_and_leaves_nothing(demo, serial, tmp_path):
    spilled = _fit(demo, spill_dir=tmp_path / "spill")
    _assert_same_run(serial, spilled)
    assert list((tmp_path / "spill").iterdir()) == []


def test_bytes_are_the_messages_sizes(demo):
    """Payload = the plaintext float64 values of every message a site sent; what is sent
    under secure aggregation is their 3-word fixed-point encoding (fit sums declared narrow: 2
    words; sample counts: packed two to a word), pickled."""
    rounds = {"robust": 2, "refit_mu": 1, "refit_final": 1}
    plain = _fit(demo, secure_aggregation=False, record_messages=True, rounds=rounds)
    masked = _fit(demo, record_messages=True, rounds=rounds)
    packed_keys, narrow_keys, widths, folded_keys = set(), set(), set(), set()
    for site in demo.sites:
        mine = [m for m in plain.facts["messages"] if m["site"] == site]
        values = sum(np.asarray(v).size * 8 for m in mine for v in m["message"].values())
        assert plain.facts["payload_bytes_by_site"][site] == values
        assert plain.facts["bytes_sent_by_site"][site] == sum(m["bytes"] for m in mine)
        # the same messages, masked (the searches may ask for a few more or fewer points:
        # the totals differ in the last bits); on the wire 3 words a value, 2 a narrow sum,
        # a count 4 bytes (1 once the pooled n <= 255 is known), and the pickled total is
        # that plus framing and headers
        key_offer = 32 * 8  # the key round's public key is relayed, not masked
        wire = [m for m in masked.facts["messages"]
                if m["site"] == site and isinstance(m["message"], MaskedMessage)]
        assert len(wire) == len(mine)
        expected, masked_values, unfolded = 0, 0, 0
        for p, w in zip(mine, wire, strict=True):
            folded_keys |= set(w["message"].folded)
            head = w["message"].payload["_secagg"]
            counts, narrow = head["counts"], head["narrow"]["keys"]
            packed_keys |= set(counts)
            widths.add(head["count_bits"])
            narrow_keys.update(narrow)
            for key, v in p["message"].items():
                limbs = w["message"].payload[key].shape[0]
                n = (int(np.prod(counts[key])) if key in counts
                     else w["message"].payload[key].size // limbs)
                if key not in counts:
                    assert limbs == (2 if key in narrow else 3), key
                if w["message"].payload[key].shape[1:] == np.shape(v) or key in counts:
                    assert n == np.asarray(v).size, key  # the same message
                per_word = 64 // head["count_bits"]  # 2, or 64 // N.bit_length() once N known
                size = (8 * -(-n // per_word) if key in counts else 16 * n if key in narrow
                        else 24 * n)
                assert w["message"].payload[key].nbytes == size, key
                expected += size
                masked_values += n
                expand = w["message"].folded.get(key)
                if expand is not None:  # the columns the factor design makes equal or zero
                    assert w["message"].payload[key].shape[-1] == max(expand) + 1
                    n = n // (max(expand) + 1) * len(expand)
                unfolded += n
        assert masked.facts["payload_bytes_by_site"][site] == 8 * masked_values + key_offer
        assert abs(8 * unfolded - values) <= 0.01 * values
        assert masked_values < 0.9 * unfolded  # X'WX: 6 of 10 columns travel
        sent = masked.facts["bytes_sent_by_site"][site] - 32 * 8 * 2  # the offer, ~pickled
        assert expected < sent < 1.05 * expected
    assert {"count_below", "n_zero", "cell_nonzero"} <= packed_keys
    assert widths == {32, 8}, widths  # 150 samples: 8-bit fields once the pooled n is known
    assert {"full.xtwx", "A2", "ll"} <= narrow_keys
    assert {"full.xtwx", "full.xtwx_obs", "A", "A1", "A2", "xtwx", "xtx"} <= folded_keys
    steps = plain.facts["bytes_by_step"]
    assert sum(v["payload"] for v in steps.values()) == max(
        plain.facts["payload_bytes_by_site"].values())


def test_payload_of_a_masked_message_counts_its_values():
    msg = MaskedMessage(kind="x", payload={"a": np.zeros((3, 5, 2), np.uint64),
                                           "b": np.zeros((3,), np.uint64),
                                           "_secagg": {"limbs": 3}})
    assert payload_nbytes(msg) == (10 + 1) * 8
    assert payload_nbytes({"not": "a message"}) == 0


def test_plan_bytes_bound_what_a_run_sends(demo, serial):
    """--plan-only's figures are upper bounds of the measured ones, labelled so."""
    study = fed_de.make_study(demo.design, demo.genes, demo.levels)
    names = list(demo.sites)
    record = record_plan(DESeq2Strategy(study.to_dict(), n_sites=len(names)), names)
    facts = record.facts()
    assert "upper bound" in facts["bytes_note"] and facts["masked"]
    for site in names:
        assert facts["payload_bytes_upper_bound_by_site"][site] >= \
            serial.facts["payload_bytes_by_site"][site]
        assert facts["bytes_upper_bound_by_site"][site] >= \
            serial.facts["bytes_sent_by_site"][site] * 0.95  # pickle framing not counted
        # masked bound: 3 words per masked value, 2 per narrow sum, 4 bytes per sample count;
        # the key offer (32 values) is not masked
        mine = [t for t in record.tasks if t.worker == site and t.message is not None]
        size = lambda t, k: int(np.prod(t.message[k]))  # noqa: E731
        counts = sum(size(t, k) for t in mine for k in t.counts)
        narrow = sum(size(t, k) for t in mine for k in t.narrow)
        assert counts > 0 and narrow > 0
        # X'WX-type columns: a factor design's equal or zero ones do not travel
        cut = sum(size(t, k) // t.folded[k][1] * (t.folded[k][1] - t.folded[k][0])
                  * (16 if k in t.narrow else 24) for t in mine for k in t.folded)
        # ~ batch + condition: x_j x_j = x_j for 3 columns, b2 b3 = 0: 6 of 10 travel
        assert cut > 0 and all(t.folded[k] == (6, 10) for t in mine for k in t.folded)
        assert facts["bytes_upper_bound_by_site"][site] == \
            3 * facts["payload_bytes_upper_bound_by_site"][site] - 2 * 32 * 8 \
            - 3 * 8 * counts + sum(8 * -(-size(t, k) // 2) for t in mine for k in t.counts) \
            - 8 * narrow - cut


# -- the executor itself, with a probe strategy ---------------------------------------------
class Probe(ComputePlanBuilder):
    """Rounds of a site task and an aggregation; checks what the platform holds meanwhile."""

    def __init__(self, plan: str = "rounds", rounds: int = 6):
        super().__init__(plan=plan, rounds=rounds)
        self.plan, self.rounds = plan, rounds
        self.seen: list[int] = []

    def save_local_state(self, path: Path) -> None:
        Path(path).write_bytes(pickle.dumps(None))

    def load_local_state(self, path: Path):
        return self

    @remote_data
    def send(self, data_from_opener, shared_state=None):
        if self.plan == "refuse" and data_from_opener.name == "site1":
            raise DisclosureError("site1 refuses: a cell of 2 samples")
        if self.plan == "crash" and data_from_opener.name == "site2":
            raise KeyError("no such thing")
        return {"big": np.ones(50_000) * data_from_opener.n_samples,
                "round": 0 if shared_state is None else shared_state["round"]}

    @remote
    def total(self, shared_states):
        return {"sum": sum(s["big"] for s in shared_states), "round": shared_states[0]["round"]
                + 1}

    def build_compute_plan(self, train_data_nodes, aggregation_node, evaluation_strategy=None,
                           num_rounds=None, clean_models=True):
        nodes = list(train_data_nodes)
        locals_ = [None] * len(nodes)
        shared = None
        platform = aggregation_node._platform
        for r in range(self.rounds):
            refs = []
            for i, node in enumerate(nodes):
                # "reread": later tasks get no shared state, so each reads its own last message
                op = self.send(data_samples=node.data_sample_keys,
                               shared_state=None if self.plan == "reread" and r else shared)
                locals_[i], ref = node.update_states(op, local_state=locals_[i], round_idx=0,
                                                     authorized_ids=set(), aggregation_id="",
                                                     clean_models=True)
                refs.append(ref)
            del op  # an operation holds the shared state it reads
            shared = aggregation_node.update_states(self.total(shared_states=refs),
                                                    round_idx=0, authorized_ids=set(),
                                                    clean_models=True)
            del refs
            getattr(platform, "seen", []).append(len(platform.sizes))


def _sites(n=3):
    demo = make_demo_study(n_samples=18 * n, n_genes=10, seed=1, n_sites=n)
    return [load_site(a, f"site{i}") for i, a in enumerate(demo.sites.values())]


@pytest.fixture(autouse=False)
def seen(monkeypatch):
    from fed_de.backends import simulation

    log: list = []
    original = simulation._Platform.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.seen = log

    monkeypatch.setattr(simulation._Platform, "__init__", init)
    return log


@pytest.mark.parametrize("options", [{}, {"n_jobs": 2}, {"spill": True}])
def test_outputs_are_freed_once_read(seen, tmp_path, options):
    """After each aggregation the platform holds the sites' last outputs (their local
    states: the next task reads them) and the last aggregate, whatever the round count."""
    spill = tmp_path if options.pop("spill", False) else None
    res = run_strict(Probe(rounds=6), _sites(3), spill_dir=spill, **options)
    assert seen == [3 + 1] * 6
    assert res.ledger.tasks == 6 * 4
    np.testing.assert_array_equal(res.shared_state["sum"], np.full(50_000, 54.0))
    assert res.shared_state["round"] == 6


class StreamProbe(Probe):
    """Probe whose aggregation reads each input once, from the simulation's stream."""

    @remote
    def total(self, shared_states):
        acc, first = 0.0, None
        for s in shared_states.stream():
            acc = acc + s["big"]
            first = s["round"] if first is None else first
        return {"sum": acc, "round": first + 1}


def test_a_serial_aggregation_holds_one_site_message_at_a_time(monkeypatch):
    """Each site task runs when its aggregation reads its message, and the message is freed
    once read: at every read exactly one site message is in memory (all three when the
    round's site tasks ran before the aggregation)."""
    from fed_de.backends import simulation

    held: list[int] = []
    consume = simulation._Platform.consume

    def spy(self, key):
        held.append(sum(1 for k in self.shared if k in self.local_paths))
        consume(self, key)

    monkeypatch.setattr(simulation._Platform, "consume", spy)
    res = run_strict(StreamProbe(rounds=3), _sites(3))
    assert held == [1] * 9
    np.testing.assert_array_equal(res.shared_state["sum"], np.full(50_000, 54.0))
    assert res.shared_state["round"] == 3
    with pytest.raises(FedDEError, match="freed the message"):  # a second reader is refused
        run_strict(StreamProbe("reread", rounds=2), _sites(3))


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_worker_errors_name_the_site_and_keep_their_type(n_jobs):
    with pytest.raises(DisclosureError, match="site1 refuses") as info:
        run_strict(Probe("refuse", rounds=1), _sites(3), n_jobs=n_jobs)
    assert info.value.site == "site1" and info.value.step == "send"
    assert info.value.facts["tasks"] >= 0
    with pytest.raises(SiteTaskError, match="KeyError") as info:
        run_strict(Probe("crash", rounds=1), _sites(3), n_jobs=n_jobs)
    assert info.value.site == "site2"


def test_site_data_is_read_only_in_workers():
    """A worker maps the site's counts read-only, as the in-process executor freezes them."""
    from tests.conftest import read_site_layout
    from tests.test_executor import Probe as ExecutorProbe
    from tests.test_executor import _sites as executor_sites
    from tests.test_executor import _study

    synthetic = read_site_layout("pydeseq2_synthetic")
    with pytest.raises(SiteTaskError, match="read-only") as info:
        run_strict(ExecutorProbe(_study(synthetic), "readonly"), executor_sites(synthetic),
                   n_jobs=2)
    assert info.value.site == "site0"


def test_critical_path_weighs_the_costliest_chain():
    """Two sites' tasks feed each aggregation; a side task forks off the first aggregation
    and rejoins at the last: the path takes the slower site of each round, and the side
    task only where it is the longer way."""
    ledger = RunLedger()
    cpu = {"a1": 2.0, "b1": 5.0, "g1": 1.0, "a2": 3.0, "b2": 1.0, "side": 4.5, "g2": 0.5}
    for key, parents in [("a1", []), ("b1", []), ("g1", ["a1", "b1"]), ("a2", ["g1"]),
                         ("b2", ["g1"]), ("side", ["g1"]), ("g2", ["a2", "b2", "side"])]:
        ledger.declared(key, parents)
        ledger.task_cpu[key] = cpu[key]
    # b1 + g1 + side + g2: the side task (4.5) outweighs the round's slower site (3.0)
    assert ledger.critical_path_cpu == 5.0 + 1.0 + 4.5 + 0.5
    assert ledger.sequential_steps == 4
    ledger.task_cpu["side"] = 0.0  # reused from a checkpoint: weighs nothing
    assert ledger.critical_path_cpu == 5.0 + 1.0 + 3.0 + 0.5


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_run_facts_book_every_task_cpu(demo, serial, n_jobs):
    """Site tasks, aggregations, and the costliest chain: four sites work at once, so the
    chain is below the tasks' total and above any one step."""
    run = serial if n_jobs == 1 else _fit(demo, n_jobs=n_jobs)
    f = run.facts
    sites = sum(f["site_task_cpu_seconds"].values())
    assert sites > 0 and f["aggregator_cpu_seconds"] > 0
    assert max(sites / f["tasks"], f["aggregator_cpu_seconds"] / f["sequential_steps"]) \
        < f["critical_path_cpu_seconds"] < sites + f["aggregator_cpu_seconds"]


def test_n_jobs_conventions():
    assert resolve_jobs(None) == 1 and resolve_jobs(1) == 1 and resolve_jobs(3) == 3
    assert resolve_jobs(-1) >= 1
    with pytest.raises(ValueError, match="simulation backend"):
        check_workers("subprocess", 2, None)
    with pytest.raises(ValueError, match="simulation backend"):
        check_workers("remote", 1, "/tmp")
    with pytest.raises(ValueError, match="integer"):
        check_workers("simulation", "2", None)


# -- substra facts and their printing --------------------------------------------------------
class _Task:
    def __init__(self, key, worker):
        self.key, self.worker = key, worker


class _Client:
    """Lists a plan's tasks and their stored outputs, as substra's local backend does."""

    def __init__(self, files: dict):
        self.files = files  # task key -> (worker, path)

    def list_task(self, filters=None):
        return [_Task(k, w) for k, (w, _) in self.files.items()]

    def list_task_output_assets(self, key):
        import types

        worker, path = self.files[key]
        address = types.SimpleNamespace(storage_address=path)
        return [types.SimpleNamespace(identifier="shared",
                                      asset=types.SimpleNamespace(address=address)),
                types.SimpleNamespace(identifier="local", asset=None)]


def test_substra_bytes_are_measured_from_stored_outputs(tmp_path):
    masked = MaskedMessage(kind="x", payload={"a": np.zeros((3, 100), np.uint64),
                                              "_secagg": {"limbs": 3}})
    files = {}
    for i, (worker, value) in enumerate([("org-a", masked), ("org-b", masked),
                                         ("agg", {"state": np.zeros(10)})]):
        path = tmp_path / f"out{i}"
        path.write_bytes(pickle.dumps(value))
        files[f"t{i}"] = (worker, str(path))
    measured = measure_outputs(_Client(files), "cp", "agg")
    assert measured["payload_bytes_by_site"] == {"org-a": 800, "org-b": 800}
    assert measured["bytes_sent_by_site"]["org-a"] == (tmp_path / "out0").stat().st_size
    assert measured["bytes_sent_by_aggregator"] == (tmp_path / "out2").stat().st_size
    # a remote network's outputs are URLs, and a fake client lists nothing: no measurement
    files["t0"] = ("org-a", "https://node/model/abc")
    assert measure_outputs(_Client(files), "cp", "agg") is None
    assert measure_outputs(object(), "cp", "agg") is None


def test_unmeasured_substra_facts_are_labelled_and_print(demo, capsys):
    study = fed_de.make_study(demo.design, demo.genes, demo.levels)
    plan = record_plan(DESeq2Strategy(study.to_dict(), n_sites=2), ["o1", "o2"], "agg")
    facts = run_facts(plan, None, {"o1": "hospital_a", "o2": "hospital_b"})
    assert facts["bytes_measured"] is False and facts["bytes_sent_by_aggregator"] is None
    assert set(facts["bytes_sent_by_site"]) == {"hospital_a", "hospital_b"}
    assert "upper bound" in facts["bytes_note"]
    print_facts(facts)  # issue 14: a KeyError here lost a 20-minute run's results
    out = capsys.readouterr().out
    assert "declared upper bound" in out and "n/a" in out
    print_facts({"sequential_steps": 3})  # a remote run may report little
    assert "n/a" in capsys.readouterr().out


# -- CLI and screens ---------------------------------------------------------------------------
def test_cli_workers_and_spill_write_the_serial_results(demo, tmp_path):
    from fed_de.cli import app

    paths = make_demo_study(n_samples=150, n_genes=120, seed=7, n_sites=4).write(tmp_path / "d")
    sites = [a for name, p in paths.items() for a in ("--site", f"{name}={p}")]
    base = ["run", *sites, "--design", demo.design, "--contrast", *CONTRAST,
            "--levels", "batch=b1,b2,b3", "--levels", "condition=A,B"]
    one = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "two"), "--workers", "2",
                                   "--spill-dir", str(tmp_path / "spill")])
    assert two.exit_code == 0, two.output
    for name in ("results.csv", "dispersions.csv"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
    assert "worker processes" in two.output


@pytest.mark.parametrize("backed", [False, True])
def test_screen_workers_give_the_serial_answer(tmp_path, backed):
    """In-memory sites travel to workers as read-only maps; backed ones as their file."""
    from fed_de.screening.data import make_screen

    scr = make_screen(n_cells=1500, n_genes=40, n_perturbations=3, seed=4)
    sites = scr.write(tmp_path) if backed else scr.sites
    kw = dict(perturbation_column="perturbation", control="non-targeting", backed=backed)
    a = fed_de.screen(sites, **kw)
    b = fed_de.screen(sites, **kw, n_jobs=2)
    for p in a:
        pd.testing.assert_frame_equal(a[p], b[p], check_exact=True)
    assert a.facts["bytes_sent_by_site"] == b.facts["bytes_sent_by_site"]


def test_a_held_message_weighs_its_pickle_as_a_file_would_hold_it():
    """A site's message kept in memory is booked at the exact size of the pickle a worker or
    a spill file would hold, read-only arrays included (they pickle a few bytes smaller): the
    byte facts are the same in every mode."""
    from fed_de.backends.simulation import _dumps, _Held

    value = {"x": np.arange(50_000.0), "f": np.ones((3, 4), order="F"), "t": [1, "a"],
             "strided": np.ones((4, 6))[:, ::2], "z": np.zeros(0), "s": np.float64(2.5)}
    assert _Held.of(value, "task").n_bytes == len(_dumps(value, "task"))
    frozen = dict(value, x=value["x"].copy())
    frozen["x"].flags.writeable = False
    assert len(_dumps(frozen, "task")) != len(_dumps(value, "task"))
    assert _Held.of(frozen, "task").n_bytes == len(_dumps(frozen, "task"))
