"""Model check of `meritrun.pipeline.decide`: seeded random walks through a simulated world.

The world stands in for a cluster, storage, a grant store and pull sites: Jobs are created,
succeed, fail (some permanently), vanish (before or after a round saw them), are seen late;
stages write their outputs; the merge refuses contributions; sites upload; time jumps; status
writes, API calls and grant calls are lost; the spec is edited (suspend, deadline, a site's
mode, a site removed, an invalid spec). Every round checks the invariants in `check_round`;
after a noisy phase the world goes quiet and the run must end, with every Job stopped and
every grant revoked (store and identities).

    python -m bench.pipeline_model --sequences 27000 --workers 2 [--seed 0]

The unit test (tests/unit/test_pipeline_model.py) runs 120 sequences.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import ValidationError

from meritrun.api import ArtifactRef, MeritRunSpec, MeritRunStatus
from meritrun.artifacts import RunId
from meritrun.pipeline import (
    CreateJob,
    DeleteJob,
    GrantRef,
    JobObservation,
    MergeOutcome,
    Observed,
    OfferAssignment,
    PartitionResult,
    Policy,
    RevokeGrant,
    decide,
    failed_for_spec,
)
from meritrun.stages import Plan, PlannedPartition, Verdict

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
POLICY = Policy(backoff_base_seconds=10, backoff_max_seconds=60)
TERMINAL = ("Succeeded", "Failed")


class Violation(AssertionError):
    """An invariant broke; the message says which, at which round, with the seed."""


@dataclass
class SimJob:
    name: str
    key: tuple[str, str | None]  # (stage, partition): one attempt at a time per key
    attempt: int
    cluster: str | None
    params: Any
    state: str = "Active"
    visible: bool = True
    permanent: bool = False
    message: str | None = None


@dataclass
class World:
    rng: random.Random
    body: dict
    generation: int = 1
    now: datetime = T0
    jobs: dict[str, SimJob] = field(default_factory=dict)
    plans: dict[int, Plan] = field(default_factory=dict)
    results: dict[tuple[str, int], PartitionResult] = field(default_factory=dict)
    verdicts: dict[tuple[str, int], Verdict] = field(default_factory=dict)
    merges: dict[int, MergeOutcome] = field(default_factory=dict)
    searches: dict[int, dict[str, float]] = field(default_factory=dict)
    sketches: dict[tuple[str, int], str] = field(default_factory=dict)
    store: dict[str, GrantRef] = field(default_factory=dict)  # the grant store
    identities: set[GrantRef] = field(default_factory=set)  # issued, not yet revoked
    quiet: bool = False
    max_backoff: int = 0

    def chance(self, p: float) -> bool:
        return not self.quiet and self.rng.random() < p

    # --- the spec ---------------------------------------------------------------------------

    def spec(self) -> tuple[MeritRunSpec | None, str | None]:
        try:
            return MeritRunSpec.model_validate(self.body), None
        except (ValidationError, ValueError) as e:
            return None, f"spec: {str(e).splitlines()[0][:200]}"

    def edit_spec(self) -> None:
        body, rng = self.body, self.rng
        sites = body.get("sites") or []
        choice = rng.choice(["suspend", "deadline", "mode", "remove", "invalid", "backoff"])
        if choice == "suspend":
            body["suspend"] = not body.get("suspend", False)
        elif choice == "deadline":
            body["activeDeadlineSeconds"] = rng.choice([None, 500, 5000, 50000])
        elif choice == "backoff":
            body["backoffLimit"] = rng.randint(0, 3)
        elif choice == "mode" and sites:
            site = rng.choice(sites)
            site["mode"] = "kubeconfig" if site["mode"] == "pull" else "pull"
            site["secretRef"] = {"name": "kc"} if site["mode"] == "kubeconfig" else None
        elif choice == "remove" and sites:
            sites.remove(rng.choice(sites))
        elif choice == "invalid":
            body["training"] = {"learningRate": -1 if "training" not in body else 1e-4}
        self.generation += 1

    # --- what a backend would observe ---------------------------------------------------------

    def observe(self, status: MeritRunStatus | None, spec_error: str | None) -> Observed:
        jobs = {n: JobObservation(j.state, j.message, j.permanent, j.cluster)
                for n, j in self.jobs.items() if j.visible}
        kw: dict[str, Any] = {}
        st = status
        if st is not None and st.phase not in TERMINAL:
            if st.plan is None and st.profile.attempt >= 1:
                kw["plan"] = self.plans.get(st.profile.attempt)
                kw["plan_uri"] = f"s3://m/plan/a{st.profile.attempt}" if kw["plan"] else None
            kw["partition_results"] = {
                p.name: r for p in st.partitions
                if p.state in ("Running", "AwaitingContribution") and p.attempt >= 1
                and (r := self.results.get((p.name, p.attempt))) is not None}
            kw["verdicts"] = {p.name: v for p in st.partitions if p.state == "Verifying"
                              and (v := self.verdicts.get((p.name, p.attempt))) is not None}
            kw["sketches"] = {sk.site: u for sk in st.sketches or []
                              if sk.state == "AwaitingContribution"
                              and (u := self.sketches.get((sk.site, sk.attempt)))}
            if st.merge.state == "Running" and st.merge.attempt >= 1:
                kw["merge_outcome"] = self.merges.get(st.merge.attempt)
            if st.search is not None and st.search.state == "Running":
                kw["search_best"] = self.searches.get(st.search.attempt)
        return Observed(run=RunId("r", "model"), now=self.now, generation=self.generation,
                        jobs=jobs, grants=dict(self.store), spec_error=spec_error, **kw)

    # --- carrying out actions, with faults ------------------------------------------------------

    def apply(self, action: Any) -> None:
        if isinstance(action, CreateJob | DeleteJob) and self.chance(0.05):
            return  # an API error: the driver reports it, the next round asks again
        if isinstance(action, CreateJob):
            if action.name not in self.jobs:
                self.jobs[action.name] = SimJob(
                    action.name, (action.stage, action.partition), action.attempt,
                    action.cluster, action.params, visible=not self.chance(0.2))
        elif isinstance(action, DeleteJob):
            job = self.jobs.get(action.name)
            if job is not None and job.cluster == action.cluster:  # wrong cluster: no effect
                del self.jobs[action.name]
        elif isinstance(action, OfferAssignment):
            if self.chance(0.1):
                return  # the IAM call failed: nothing issued
            ref, held = action.ref, self.store.get(action.grant)
            if held is not None and held.attempt == ref.attempt:
                return
            if held is not None:
                self.identities.discard(held)  # the keeper revokes the old one first
            self.identities.add(ref)
            self.store[action.grant] = ref
        elif isinstance(action, RevokeGrant):
            if self.chance(0.15):
                return  # a failed revocation: the bundle stays, so it is seen again
            self.identities.discard(action.ref)
            held = self.store.get(action.grant)
            if held is not None and held.attempt == action.ref.attempt:
                del self.store[action.grant]

    # --- the world moves on ---------------------------------------------------------------------

    def tick(self, spec: MeritRunSpec | None) -> None:
        rng = self.rng
        self.now += timedelta(seconds=rng.choice([1, 5, 20, 70, 400] if self.quiet
                                                 else [0, 1, 5, 20, 70, 400, 3000]))
        for name, job in list(self.jobs.items()):
            if not job.visible and rng.random() < 0.5:
                job.visible = True
            if job.state == "Active" and rng.random() < 0.4:
                self._finish(job)
            elif job.state != "Active" and self.chance(0.1):
                del self.jobs[name]  # the TTL controller
            elif job.state == "Active" and self.chance(0.03):
                del self.jobs[name]  # a user deleted it
        for ref in list(self.store.values()):
            if rng.random() < 0.3:
                self._site_uploads(ref)

    def _site_uploads(self, ref: GrantRef) -> None:
        if ref.name == "sketch":
            self.sketches[(ref.site, ref.attempt)] = f"s3://m/sketches/{ref.site}/{ref.attempt}"
        else:
            self.results[(ref.name, ref.attempt)] = PartitionResult(
                90, ArtifactRef(uri=f"s3://m/{ref.name}/a{ref.attempt}"))

    def _finish(self, job: SimJob) -> None:
        rng, (stage, part) = self.rng, job.key
        if self.chance(0.3):
            job.state, job.message = "Failed", "boom"
            job.permanent = self.chance(0.2)
            if stage == "merge" and self.chance(0.5):
                self._merge_outcome(job, fail=True)
            return
        job.state = "Succeeded"
        if self.chance(0.05):
            return  # succeeded but wrote nothing
        if stage == "profile":
            k = rng.randint(1, 4)
            sites = [s["name"] for s in self.body.get("sites") or []]
            self.plans[job.attempt] = Plan(strategy="bySite", partitions=[
                PlannedPartition(name=f"p{i}", index=i, sources=[f"s{i}"], tokens=10,
                                 site=rng.choice([None, *sites]) if sites else None)
                for i in range(k)])
        elif stage == "train":
            self.results[(part or "", job.attempt)] = PartitionResult(
                90, ArtifactRef(uri=f"s3://m/{part}/a{job.attempt}"))
        elif stage == "verify":
            ok = not self.chance(0.3)
            self.verdicts[(part or "", job.attempt)] = Verdict(
                partition=part or "", attempt=job.attempt, accepted=ok,
                check=None if ok else "sha256", detail=None if ok else "differs")
        elif stage == "merge":
            self._merge_outcome(job, fail=False)
        elif stage == "search":
            self.searches[job.attempt] = {"p0": 1.0}

    def _merge_outcome(self, job: SimJob, *, fail: bool) -> None:
        """The merge stage: refuses some inputs, and (given the plan's numbers) refuses to
        merge below the quorum, as merit_merger.job does."""
        names = [p.name for p in job.params.partitions]
        refused = {n: "sha256: differs" for n in names if self.chance(0.25)}
        needed = job.params.required or 1
        if fail or len(names) - len(refused) < needed:
            job.state, job.message = "Failed", "exit 3"
            self.merges[job.attempt] = MergeOutcome(model_uri=None, refused=refused)
        else:
            self.merges[job.attempt] = MergeOutcome(f"s3://m/merged/a{job.attempt}/model",
                                                    refused)


def random_body(rng: random.Random) -> dict:
    sites, sources = [], [{"name": "a", "uri": "s3://d/a.jsonl"}]
    for name in rng.sample(["east", "west"], rng.randint(0, 2)):
        pull = rng.random() < 0.7
        site: dict[str, Any] = {"name": name, "mode": "pull" if pull else "kubeconfig"}
        if pull:
            site["deadlineSeconds"] = rng.choice([300, 3000, 30000])
            site["sketches"] = rng.random() < 0.3
        else:
            site["secretRef"] = {"name": "kc"}
        sites.append(site)
        sources.append({"name": f"src-{name}", "site": name})
    body: dict[str, Any] = {
        "baseModel": {"uri": "s3://m/base"}, "data": {"sources": sources},
        "storage": {"uri": "s3://merit"}, "partitioning": {"strategy": "bySite", "axes": 1},
        "backoffLimit": rng.randint(0, 3), "merge": {"quorum": rng.choice([0.25, 0.5, 1.0])},
    }
    if sites:
        body["sites"] = sites
    if rng.random() < 0.3:
        body["activeDeadlineSeconds"] = rng.choice([2000, 20000])
    if rng.random() < 0.2:
        body["mixtureSearch"] = {"enabled": True}
        body["data"]["heldOutUri"] = "s3://d/held.jsonl"
    return body


# --- invariants --------------------------------------------------------------------------------


def _stages(st: MeritRunStatus) -> dict[str, Any]:
    out = {"profile": st.profile, "merge": st.merge, **{p.name: p for p in st.partitions}}
    if st.search is not None:
        out["search"] = st.search
    return out


def check_round(world: World, old: MeritRunStatus | None, spec: MeritRunSpec | None,
                decision: Any, again: Any, where: str) -> None:
    def fail(what: str) -> None:
        raise Violation(f"{where}: {what}")

    new = decision.status
    if (new.to_wire(), decision.actions, decision.events) != (again.status.to_wire(),
                                                              again.actions, again.events):
        fail("same inputs gave different decisions")
    restarted = failed_for_spec(old) and new.phase != "Failed"
    if old is not None and not restarted:
        if old.phase in TERMINAL and new.phase != old.phase:
            fail(f"terminal phase {old.phase} became {new.phase}")
        before = _stages(old)
        for name, stage in _stages(new).items():
            if name in before and stage.attempt < before[name].attempt:
                fail(f"{name}: attempt went back from {before[name].attempt} to {stage.attempt}")
    for name, stage in _stages(new).items():
        if stage.attempt > world.max_backoff + 1:
            fail(f"{name}: attempt {stage.attempt} exceeds backoffLimit + 1")
    if new.phase in TERMINAL:
        if any(isinstance(a, CreateJob | OfferAssignment) for a in decision.actions):
            fail(f"a {new.phase} run created or offered something")
    active = {j.key: j.name for j in world.jobs.values() if j.state == "Active"}
    for a in decision.actions:
        if isinstance(a, CreateJob):
            other = active.get((a.stage, a.partition))
            if other is not None and other != a.name:
                fail(f"{a.name} created while {other} of the same stage is active")
    if new.phase == "Succeeded" and (old is None or old.phase != "Succeeded") and spec:
        usable = [p for p in new.partitions if p.state == "Succeeded"
                  and p.name not in (new.merge.left_out or [])]
        needed = max(1, math.ceil(spec.merge.quorum * len(new.partitions) - 1e-9))
        if len(usable) < needed:
            fail(f"Succeeded with {len(usable)}/{len(new.partitions)} (needs {needed})")


def run_sequence(seed: int, *, noisy_rounds: int = 40, quiet_rounds: int = 300) -> int:
    """One random walk; returns the rounds it took. Raises Violation with the seed."""
    rng = random.Random(seed)
    world = World(rng, random_body(rng))
    world.max_backoff = world.body["backoffLimit"]
    stored: MeritRunStatus | None = None
    rounds, settle = 0, 0
    while True:
        rounds += 1
        world.quiet = rounds > noisy_rounds
        if rounds == noisy_rounds + 1:
            world.body["suspend"] = False  # a quiet world: nobody holds the run back
        if not world.quiet and rng.random() < 0.04:
            world.edit_spec()
            world.max_backoff = max(world.max_backoff, world.body.get("backoffLimit", 2))
        spec, error = world.spec()
        if rounds > 1:
            world.tick(spec)
        obs = world.observe(stored, error)
        where = f"seed {seed} round {rounds}"
        try:
            decision = decide(spec, stored, obs, policy=POLICY)
            again = decide(spec, stored, obs, policy=POLICY)
        except Exception as e:  # noqa: BLE001 - reporting it with the seed is the point
            raise Violation(f"{where}: decide raised {type(e).__name__}: {e}") from e
        check_round(world, stored, spec, decision, again, where)
        for action in decision.actions:
            world.apply(action)
        if not world.chance(0.1):
            stored = decision.status  # else: the status write was lost
        if stored is not None and stored.phase in TERMINAL and world.quiet:
            settle += 1
            if not world.store and not world.identities and not any(
                    j.state == "Active" for j in world.jobs.values()):
                return rounds
            if settle > 30:
                running = [j.name for j in world.jobs.values() if j.state == "Active"]
                raise Violation(f"{where}: ended {stored.phase} but left grants "
                                f"{sorted(world.store)} identities {len(world.identities)} "
                                f"jobs {running}")
        if rounds > noisy_rounds + quiet_rounds:
            raise Violation(f"{where}: the world is quiet but the run never ended "
                            f"(phase {stored.phase if stored else None})")


def _one(seed: int) -> tuple[int, str | None]:
    try:
        return run_sequence(seed), None
    except Violation as e:
        return 0, str(e)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="first seed (seeds are consecutive)")
    p.add_argument("--workers", type=int, default=1, help="processes (sequences are independent)")
    args = p.parse_args(argv)
    started, total, failures = time.monotonic(), 0, []
    seeds = range(args.seed, args.seed + args.sequences)
    if args.workers > 1:
        from multiprocessing import Pool

        with Pool(args.workers) as pool:
            outcomes = pool.map(_one, seeds, chunksize=50)
    else:
        outcomes = map(_one, seeds)
    for rounds, failure in outcomes:
        total += rounds
        if failure:
            failures.append(failure)
            print(f"VIOLATION {failure}", file=sys.stderr)
    seconds = time.monotonic() - started
    print(f"{args.sequences} sequences, {total} rounds, {len(failures)} violations, "
          f"{seconds:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
