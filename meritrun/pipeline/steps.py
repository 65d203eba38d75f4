"""The stages of a run in order: profile, partitions, merge, mixture search.

Each step advances its stage by one round through the attempt machine (`attempts.step_job`)
or the pull-site machine (`pull`), and fails the run through `Round.fail` when its stage gives
up. The quorum is `quorum.required` over the plan's partitions, checked before the merge and
again after it, because the merge may refuse contributions that trained fine.
"""

from __future__ import annotations

from ..api import ArtifactRef, PartitionStatus, PlanSummary, SearchStatus
from ..conditions import to_rfc3339
from . import jobs, pull, quorum
from .attempts import step_job
from .round import Round


def advance(r: Round) -> None:
    st = r.status
    if st.plan is None:
        st.phase = "Profiling"
        _profile(r)
        if st.plan is None or st.phase == "Failed":
            return
    if not all(p.state in ("Succeeded", "Failed") for p in st.partitions):
        st.phase = "Training"
        for part in st.partitions:
            _partition(r, part)
            if st.phase == "Failed":
                return
        if not all(p.state in ("Succeeded", "Failed") for p in st.partitions):
            return
    if st.merge.state != "Succeeded":
        _merge(r)
        if st.merge.state != "Succeeded" or st.phase == "Failed":
            return
    spec = r.valid_spec
    if spec.mixture_search.enabled and (st.search is None or st.search.state != "Succeeded"):
        _search(r)
        if st.search is None or st.search.state != "Succeeded":
            return
    st.phase = "Succeeded"
    st.completion_time = to_rfc3339(r.obs.now)
    st.message = f"merged model at {st.model_uri}"
    r.condition("Ready", "True", "Succeeded", st.message)
    r.event("Succeeded", st.message)


def _profile(r: Round) -> None:
    st, obs, spec = r.status, r.obs, r.valid_spec
    site_sketches = pull.sketches_ready(r)
    if site_sketches is None:
        return  # waiting for pull sites' sketches, or one of them failed the run
    has_plan = obs.plan is not None and st.profile.state == "Running"
    step_job(r, st.profile, kind="Profile", label="profile", has_result=has_plan,
             make_job=lambda a: jobs.profile_job(r.run, spec, a, site_sketches=site_sketches))
    if st.profile.state == "Failed":
        r.fail("ProfileFailed", st.profile.message or "profile failed")
    elif st.profile.state == "Succeeded" and obs.plan is not None:
        plan = obs.plan
        st.plan = PlanSummary(strategy=plan.strategy, partitions=len(plan.partitions),
                              explained_variance=plan.explained_variance, uri=obs.plan_uri)
        st.profile.artifact = ArtifactRef(uri=obs.plan_uri) if obs.plan_uri else None
        st.partitions = [
            PartitionStatus(name=p.name, index=p.index, sources=p.sources, site=p.site,
                            tokens=p.tokens, planned_tokens=p.tokens)
            for p in plan.partitions
        ]
        r.condition("Profiled", "True", "PlanReady", f"{len(plan.partitions)} partitions "
                    f"({plan.strategy})")


def _partition(r: Round, part: PartitionStatus) -> None:
    obs, spec = r.obs, r.valid_spec
    mode = spec.site_mode(part.site)
    on_pull_path = pull.is_pull(part, spec)
    if part.state not in ("Succeeded", "Failed") and on_pull_path != (mode == "pull"):
        r.fail("SpecChanged", f"spec.sites: site {part.site!r} of partition {part.name} "
               f"changed its mode to {mode or 'none'} while the partition was "
               f"{part.state}; sites cannot change once a plan exists")
        return
    if on_pull_path:
        pull.pull_partition(r, part)
        return
    result = obs.partition_results.get(part.name)
    cluster = part.site if mode == "kubeconfig" else None
    step_job(r, part, kind="Partition", label=f"partition {part.name}",
             has_result=result is not None,
             make_job=lambda a: jobs.train_job(r.run, spec, part, a, cluster=cluster))
    if part.state == "Succeeded" and result is not None:
        part.tokens, part.artifact = result.tokens, result.artifact


def _merge(r: Round) -> None:
    st, obs, spec = r.status, r.obs, r.valid_spec
    planned = len(st.partitions)
    needed = quorum.required(planned, spec.merge.quorum)
    if st.merge.state == "Pending":
        succeeded = [p for p in st.partitions if p.state == "Succeeded"]
        left_out = [p.name for p in st.partitions if p.state != "Succeeded"]
        if not quorum.met(len(succeeded), planned=planned, needed=needed):
            r.fail("QuorumNotMet", quorum.shortfall(len(succeeded), planned=planned,
                   needed=needed, quorum=spec.merge.quorum)
                   + f" (failed: {', '.join(left_out)})")
            return
        st.merge.method, st.merge.included = spec.merge.method, [p.name for p in succeeded]
        st.merge.left_out = left_out or None
        r.condition("Trained", "True", "PartitionsDone",
                    f"{len(succeeded)}/{planned} partitions succeeded")
    st.phase = "Merging"
    included = [p for p in st.partitions if p.name in (st.merge.included or [])]
    outcome = obs.merge_outcome if st.merge.state == "Running" else None
    if outcome is not None and outcome.refused:
        _record_refusals(r, dict(outcome.refused))
    merging = [p for p in included if p.name not in set(st.merge.left_out or [])]
    usable = len(merging)
    if not quorum.met(usable, planned=planned, needed=needed):
        # Refusals are a verdict on the inputs: retrying the same inputs cannot change it,
        # and a model merged from fewer than the plan's quorum does not count.
        refusals = "; ".join(f"{k}: {v}" for k, v in sorted((outcome.refused if outcome
                                                             else {}).items()))
        st.merge.state, st.merge.completion_time = "Failed", to_rfc3339(obs.now)
        st.merge.message = "too few trustworthy contributions: " + (refusals or "none left")
        r.fail("QuorumNotMet", quorum.shortfall(usable, planned=planned, needed=needed,
               quorum=spec.merge.quorum) + f"; {st.merge.message}")
        return
    step_job(r, st.merge, kind="Merge", label="merge",
             has_result=outcome is not None and outcome.model_uri is not None,
             make_job=lambda a: jobs.merge_job(r.run, spec, merging, a, planned=planned))
    if st.merge.state == "Succeeded" and outcome is not None:
        st.model_uri = outcome.model_uri
        st.merge.artifact = ArtifactRef(uri=outcome.model_uri) if outcome.model_uri else None
        r.condition("Merged", "True", "MergeSucceeded", f"model at {outcome.model_uri}")
    elif st.merge.state == "Failed":
        r.fail("MergeFailed", st.merge.message or "merge failed")


def _record_refusals(r: Round, refused: dict[str, str]) -> None:
    st = r.status
    for p in st.partitions:
        if p.name in refused:
            p.message = f"refused by merge: {refused[p.name]}"
    st.merge.left_out = sorted(set(st.merge.left_out or []) | set(refused))


def _search(r: Round) -> None:
    st, obs, spec = r.status, r.obs, r.valid_spec
    st.search = st.search or SearchStatus()
    st.phase = "Searching"
    merged = set(st.merge.included or []) - set(st.merge.left_out or [])
    included = [p for p in st.partitions if p.name in merged]
    step_job(r, st.search, kind="Search", label="search", has_result=obs.search_best is not None,
             make_job=lambda a: jobs.search_job(r.run, spec, included, a))
    if st.search.state == "Succeeded" and obs.search_best is not None:
        st.search.best = dict(obs.search_best)
    elif st.search.state == "Failed":
        r.fail("SearchFailed", st.search.message or "mixture search failed")
