"""The strict in-process executor reproduces real substra semantics."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from substrafl.compute_plan_builder import ComputePlanBuilder
from substrafl.remote import remote, remote_data

from fed_de.backends.simulation import run_strict
from fed_de.design import make_study
from fed_de.errors import SiteTaskError
from fed_de.site import load_site
from tests.conftest import split_sites


def _sites(synthetic, n=3):
    counts, meta = synthetic
    return [load_site(a, name) for name, a in split_sites(counts, meta, n).items()]


def _study(synthetic):
    counts, _ = synthetic
    return make_study("~ condition", list(counts.columns), {"condition": ["A", "B"]}).to_dict()


class _Plan:
    """Submits a probe's tasks: one local task per site, or one aggregation."""

    def __init__(self, train_data_nodes, aggregation_node, clean_models: bool):
        self.nodes, self.agg, self.clean = list(train_data_nodes), aggregation_node, clean_models
        self.local_states = [None] * len(self.nodes)
        self.shared, self.round_idx = None, 0

    def local(self, method, **params) -> list:
        refs = []
        for i, node in enumerate(self.nodes):
            op = method(data_samples=node.data_sample_keys, shared_state=self.shared, **params)
            self.local_states[i], ref = node.update_states(
                op, local_state=self.local_states[i], round_idx=self.round_idx,
                authorized_ids={node.organization_id},
                aggregation_id=self.agg.organization_id, clean_models=self.clean)
            refs.append(ref)
        self.round_idx += 1
        return refs

    def aggregate(self, method, refs: list):
        self.shared = self.agg.update_states(
            method(shared_states=refs), round_idx=self.round_idx,
            authorized_ids={n.organization_id for n in self.nodes}
            | {self.agg.organization_id}, clean_models=self.clean)
        self.round_idx += 1
        return self.shared


class Probe(ComputePlanBuilder):
    """Tiny strategy exercising the executor (its own remote methods, a dict local state);
    each test picks a plan."""

    def __init__(self, study: dict, plan: str = "attribute"):
        super().__init__(study=study, plan=plan)
        self.options = {"plan": plan}
        self.local = {}

    def save_local_state(self, path: Path) -> None:
        with Path(path).open("wb") as fh:
            pickle.dump(self.local, fh)

    def load_local_state(self, path: Path):
        with Path(path).open("rb") as fh:
            self.local = pickle.load(fh)
        return self

    @remote_data
    def set_attribute(self, data_from_opener, shared_state=None):
        self.scratch = 42  # not written by save_local_state
        self.local["kept"] = 7
        return {"n": float(data_from_opener.n_samples)}

    @remote_data
    def read_attribute(self, data_from_opener, shared_state=None):
        return {"has_scratch": hasattr(self, "scratch"), "kept": self.local.get("kept"),
                "shared": shared_state}

    @remote
    def broadcast(self, shared_states):
        return {"values": np.arange(3.0), "n_sites": len(shared_states)}

    @remote_data
    def mutate_shared(self, data_from_opener, shared_state=None):
        before = shared_state["values"].copy()
        shared_state["values"][:] = -1.0  # a site scribbling on what it received
        return {"before": before}

    @remote_data
    def write_counts(self, data_from_opener, shared_state=None):
        data_from_opener.counts[0, 0] = 1.0
        return {}

    @remote
    def collect(self, shared_states):
        return {"states": shared_states}

    @remote_data
    def with_param(self, data_from_opener, shared_state=None, scale=None):
        return {}

    def build_compute_plan(self, train_data_nodes, aggregation_node, evaluation_strategy=None,
                           num_rounds=None, clean_models=True):
        plan = _Plan(train_data_nodes, aggregation_node, clean_models)
        kind = self.options["plan"]
        if kind == "attribute":
            plan.local(self.set_attribute)
            plan.aggregate(self.collect, plan.local(self.read_attribute))
        elif kind == "aliasing":
            plan.aggregate(self.broadcast, plan.local(self.set_attribute))
            plan.aggregate(self.collect, plan.local(self.mutate_shared))
        elif kind == "readonly":
            plan.local(self.write_counts)
        elif kind == "array_param":
            plan.local(self.with_param, scale=np.ones(2))


def test_attribute_not_saved_is_gone_next_task(synthetic):
    res = run_strict(Probe(_study(synthetic), "attribute"), _sites(synthetic))
    for state in res.shared_state["states"]:
        assert state["has_scratch"] is False
        assert state["kept"] == 7
        # no shared state given after a non-initial task: substrafl feeds the parent's output
        assert state["shared"]["n"] > 0
    assert res.ledger.tasks == 7
    assert res.ledger.sequential_steps == 3


def test_mutating_received_shared_state_is_invisible_to_other_sites(synthetic):
    res = run_strict(Probe(_study(synthetic), "aliasing"), _sites(synthetic))
    for state in res.shared_state["states"]:
        np.testing.assert_array_equal(state["before"], np.arange(3.0))


def test_writing_into_opener_data_raises(synthetic):
    with pytest.raises(SiteTaskError, match="read-only") as info:
        run_strict(Probe(_study(synthetic), "readonly"), _sites(synthetic))
    assert info.value.site == "site0"
    assert info.value.step == "write_counts"


def test_numpy_method_parameter_is_rejected(synthetic):
    with pytest.raises(TypeError, match="method parameter 'scale'"):
        run_strict(Probe(_study(synthetic), "array_param"), _sites(synthetic))


def test_attribute_set_outside_constructor_is_lost(synthetic):
    strategy = Probe(_study(synthetic), "attribute")
    strategy.extra = "set after construction"  # would be lost on a real node too
    rebuilt = Probe(*strategy.args, **strategy.kwargs)
    assert not hasattr(rebuilt, "extra")


def test_bytes_are_counted_per_site(synthetic):
    res = run_strict(Probe(_study(synthetic), "attribute"), _sites(synthetic))
    facts = res.ledger.facts()
    assert set(facts["bytes_sent_by_site"]) == {"site0", "site1", "site2"}
    assert all(b > 0 for b in facts["bytes_sent_by_site"].values())
    assert facts["bytes_sent_by_aggregator"] > 0
