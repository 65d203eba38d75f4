"""The one round every backend runs: act, then write the status last; no swallowed errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.decide import RUN, T0, make_spec

from meritrun.api import MeritRun
from meritrun.driver import ActionsFailed, run_round
from meritrun.errors import SpecError, TransientError
from meritrun.local import run_local
from meritrun.pipeline import GrantRef, JobObservation, Observed, Policy


class Recorder:
    """A backend that records calls; `broken` names the calls that fail."""

    def __init__(self, *, broken: frozenset[str] = frozenset(), **observed) -> None:
        self.calls: list[str] = []
        self.broken, self.observed = broken, observed

    def observe(self, spec, status, now):
        return Observed(run=RUN, now=now, **self.observed)

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if what in self.broken:
            raise TransientError(f"{what} failed")

    def create_job(self, action):
        self._call(f"create {action.name}")

    def delete_job(self, name, cluster):
        self._call(f"delete {name}@{cluster}")

    def offer_grant(self, action):
        self._call(f"offer {action.grant}")

    def revoke_grant(self, action):
        self._call(f"revoke {action.grant}")

    def post_event(self, event):
        self.calls.append(f"event {event.reason}")

    def write_status(self, status):
        self.calls.append(f"status {status.phase}")


def test_actions_then_events_then_the_status_last():
    backend = Recorder()
    d = run_round(backend, make_spec(), None, now=T0, policy=Policy())
    assert backend.calls == ["create r-profile-a1", "event Started", "event JobCreated",
                             "status Profiling"]
    assert d.status.phase == "Profiling"


def test_a_failed_action_does_not_stop_the_others_and_is_raised_after_the_status():
    grant = GrantRef("r", "west", "p1", 1)
    backend = Recorder(broken=frozenset({"revoke r-p1-grant"}), spec_error="spec: bad",
                       grants={grant.grant: grant},
                       jobs={"r-p0-a1": JobObservation("Active", cluster="east")})
    with pytest.raises(ActionsFailed, match="RevokeGrant r-p1-grant: revoke r-p1-grant failed"):
        run_round(backend, None, None, now=T0, policy=Policy())
    assert backend.calls[-1] == "status Failed"
    assert "delete r-p0-a1@east" in backend.calls and "revoke r-p1-grant" in backend.calls


def test_the_local_runner_refuses_kubeconfig_sites(tmp_path: Path):
    spec = make_spec(sites=[{"name": "east", "mode": "kubeconfig",
                             "secretRef": {"name": "kc"}}])
    run = MeritRun.model_validate({"apiVersion": "merit.run/v1alpha1", "kind": "MeritRun",
                                   "metadata": {"name": "r"},
                                   "spec": spec.model_dump(by_alias=True, exclude_none=True)})
    with pytest.raises(SpecError, match=r"spec.sites\[0\].mode: site 'east' is a kubeconfig"):
        run_local(run, workdir=tmp_path / "w", run_uid="u1")
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_grant_candidates_are_pull_partitions_and_sketch_sites_only():
    from meritrun.api import MeritRunStatus, PartitionStatus
    from meritrun.observe import grant_candidates
    from meritrun.stages import Plan, PlannedPartition

    spec = make_spec(sites=[{"name": "east", "mode": "kubeconfig", "secretRef": {"name": "k"}},
                            {"name": "west", "mode": "pull"}])
    st = MeritRunStatus(partitions=[
        PartitionStatus(name="p0", index=0, sources=["a"], site="east"),
        PartitionStatus(name="p1", index=1, sources=["b"], site="west", grant="r-p1-grant")])
    lost = Plan(strategy="bySite", partitions=[  # a plan the status never recorded
        PlannedPartition(name="p2", index=2, sources=["c"], tokens=1, site="west")])
    assert grant_candidates(spec, st, lost) == [("west", "p1"), ("west", "p2")]
    assert grant_candidates(None, st) == [("west", "p1")]  # an invalid spec: the status says
    assert grant_candidates(make_spec(), None) == []  # no pull site: the store is never asked
