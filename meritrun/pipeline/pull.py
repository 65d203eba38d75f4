"""The pull-site half of the state machine: offer, wait, verify, accept or refuse, give up.

Pure like the rest of `meritrun.pipeline` (it is called from `decide` on its `Round`): the
clock comes in the observations, and what must happen outside (write an assignment and hand
the site a grant, revoke the grant, run a verify Job) comes out as actions.

A pull partition: Pending -> AwaitingContribution (offer attempt n) -> Verifying (the
manifest arrived: revoke the grant so the artifact can no longer change, run the verify Job)
-> Succeeded, or refused -> AwaitingContribution again as attempt n+1 with a new grant (until
the retry budget or the site's deadline runs out) -> Failed. A verify Job that fails (or
vanishes after it was seen) is a failed attempt like any stage's: BackingOff, then a new
offer. The deadline counts from the first offer, so re-submissions do not extend it.
Sketches (sites[].sketches) are the same offer/wait/revoke cycle, before profiling, without
verification: they carry no weights. Grants still live but no longer wanted are revoked
every round until the grant store no longer holds them (`round.revoke_unwanted`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from ..api import MeritRunSpec, PartitionStatus, SiteSketchStatus, SiteSpec
from ..assignment import (
    Assignment,
    build_sketch_assignment,
    build_train_assignment,
    sketch_output_prefix,
)
from ..conditions import from_rfc3339, to_rfc3339
from . import jobs
from .actions import OfferAssignment, grant_name
from .attempts import VANISHED
from .round import Round, held_grant, revoke, revoke_unwanted

DEFAULT_GRANT_TTL = timedelta(days=7)  # a site with no deadline still loses access one day


def grant_expiry(spec: MeritRunSpec, site: str, *, start: datetime) -> datetime:
    """The site's deadline if it has one (it cannot contribute after it anyway), else 7 days."""
    seconds = spec.site(site).deadline_seconds
    return start + (timedelta(seconds=seconds) if seconds else DEFAULT_GRANT_TTL)


def sketch_sites(spec: MeritRunSpec) -> list[SiteSpec]:
    return [s for s in spec.sites or [] if s.mode == "pull" and s.sketches]


def _deadline_passed(r: Round, site: SiteSpec, start_time: str | None) -> bool:
    if not site.deadline_seconds or not start_time:
        return False
    return (r.obs.now - from_rfc3339(start_time)).total_seconds() > site.deadline_seconds


def _offer(r: Round, assignment: Assignment, start_time: str) -> OfferAssignment:
    expires = grant_expiry(r.valid_spec, assignment.site, start=from_rfc3339(start_time))
    return OfferAssignment(assignment, grant_name(r.run.name, assignment.name, assignment.site),
                           expires)


def _revoke(r: Round, held: PartitionStatus | SiteSketchStatus) -> None:
    ref = held_grant(r.run.name, held)
    if ref is not None:
        revoke(r, ref)


def wanted_grants(r: Round) -> dict[str, int]:
    """grant name -> attempt of every grant a site should hold after this round."""
    held = [*r.status.partitions, *(r.status.sketches or [])]
    return {ref.grant: ref.attempt for h in held if h.state == "AwaitingContribution"
            and (ref := held_grant(r.run.name, h)) is not None}


def settle_grants(r: Round) -> None:
    """Revoke every live grant nobody should hold (level-based, every round)."""
    revoke_unwanted(r, wanted=wanted_grants(r) if r.status.phase != "Failed" else {})


# --- sketches before profiling --------------------------------------------------------------


def sketches_ready(r: Round) -> dict[str, str] | None:
    """site -> sketch prefix once every sketch site has delivered; None while waiting/failed."""
    spec = r.valid_spec
    sites = sketch_sites(spec)
    st = r.status
    if not sites and not st.sketches:
        return {}
    if st.sketches is None:
        st.sketches = [SiteSketchStatus(site=s.name, start_time=to_rfc3339(r.obs.now))
                       for s in sites]
        for sk in st.sketches:
            sk.grant = grant_name(r.run.name, "sketch", sk.site)
            r.event("AwaitingSketches", f"site {sk.site}: gradient sketches of its sources "
                    f"requested (grant {sk.grant})")
    for sk in st.sketches:
        if sk.state != "AwaitingContribution":
            continue
        uri, site = r.obs.sketches.get(sk.site), spec.site(sk.site)
        if uri is not None:
            sk.state, sk.uri, sk.completion_time = "Succeeded", uri, to_rfc3339(r.obs.now)
            _revoke(r, sk)
            r.event("SketchesReceived", f"site {sk.site}: sketches at {uri}")
        elif _deadline_passed(r, site, sk.start_time):
            sk.state = "Failed"
            sk.message = f"site {sk.site} sent no sketches by its deadline"
            _revoke(r, sk)
        else:  # level-based, as for partitions
            r.actions.append(_offer(r, _sketch_assignment(r.run, spec, sk), sk.start_time or ""))
    failed = [sk for sk in st.sketches if sk.state == "Failed"]
    if failed:
        r.fail("SketchesMissing", "; ".join(sk.message or sk.site for sk in failed))
        return None
    if any(sk.state != "Succeeded" for sk in st.sketches):
        return None
    return {sk.site: sketch_output_prefix(r.run, sk.site, sk.attempt) for sk in st.sketches}


def _sketch_assignment(run: str, spec: MeritRunSpec, sk: SiteSketchStatus) -> Assignment:
    site = spec.site(sk.site)
    deadline = None
    if site.deadline_seconds and sk.start_time:
        deadline = from_rfc3339(sk.start_time) + timedelta(seconds=site.deadline_seconds)
    return build_sketch_assignment(run, spec, sk.site, attempt=sk.attempt, deadline=deadline)


# --- pull partitions -------------------------------------------------------------------------


def is_pull(part: PartitionStatus, spec: MeritRunSpec) -> bool:
    """Whether the partition is on the pull path: by what it did, or (not started) its site."""
    if part.state == "Pending":
        return spec.site_mode(part.site) == "pull"
    return part.grant is not None


def pull_partition(r: Round, part: PartitionStatus) -> None:
    """Advance one pull-site partition by one round."""
    obs, spec = r.obs, r.valid_spec
    site = spec.site(part.site)
    if part.state == "Pending":
        _await(r, part, attempt=1)
    elif part.state == "BackingOff":
        if part.retry_after is None or obs.now >= from_rfc3339(part.retry_after):
            _await(r, part, attempt=part.attempt + 1)
    elif part.state == "AwaitingContribution":
        result = obs.partition_results.get(part.name)
        if result is not None:
            _revoke(r, part)
            part.state, part.tokens, part.artifact = "Verifying", result.tokens, result.artifact
            job = jobs.verify_job(r.run, spec, part, part.attempt)
            part.job, part.job_seen = job.name, None
            r.create(job)
            r.event("ContributionReceived", f"partition {part.name} attempt {part.attempt} "
                    f"from site {part.site}: verifying")
        elif _deadline_passed(r, site, part.start_time):
            _revoke(r, part)
            _give_up(r, part, f"site {site.name} missed its deadline ({site.deadline_seconds}s)",
                     reason="SiteDeadlineExceeded")
    elif part.state == "Verifying":
        _verifying(r, part, site)
    if part.state == "AwaitingContribution":
        # Level-based: offered every round; backends skip a grant that already exists, so a
        # lost action (a crash between deciding and acting) is made good the next round.
        r.actions.append(_offer(r, build_train_assignment(r.run, spec, part),
                                part.start_time or to_rfc3339(obs.now)))


def _await(r: Round, part: PartitionStatus, *, attempt: int) -> None:
    part.state, part.attempt, part.job, part.job_seen = "AwaitingContribution", attempt, None, None
    part.retry_after = None
    part.start_time = part.start_time or to_rfc3339(r.obs.now)
    part.grant = grant_name(r.run.name, part.name, part.site or "")
    r.event("AwaitingContribution", f"partition {part.name} attempt {attempt} waits for site "
            f"{part.site} (grant {part.grant})")


def _verifying(r: Round, part: PartitionStatus, site: SiteSpec) -> None:
    obs, spec = r.obs, r.valid_spec
    verdict = obs.verdicts.get(part.name)
    job = obs.jobs.get(part.job or "")
    if verdict is not None and verdict.accepted:
        part.state, part.completion_time, part.message = "Succeeded", to_rfc3339(obs.now), None
        r.event("ContributionAccepted", f"partition {part.name} attempt {part.attempt} from "
                f"site {part.site} passed verification")
    elif verdict is not None:
        refusal = f"attempt {part.attempt} refused ({verdict.check}): {verdict.detail}"
        r.event("ContributionRefused", f"partition {part.name}: {refusal}", warning=True)
        part.tokens = part.artifact = None
        if part.attempt > spec.backoff_limit or _deadline_passed(r, site, part.start_time):
            _give_up(r, part, refusal, reason="ContributionRefused", event=False)
        else:
            part.message = refusal + "; the site may contribute again as the next attempt"
            _await(r, part, attempt=part.attempt + 1)
    elif job is None and not part.job_seen:
        r.create(jobs.verify_job(r.run, spec, part, part.attempt))  # not created yet: again
    elif job is None or job.state in ("Failed", "Succeeded"):
        why = VANISHED if job is None else (job.message or "it wrote no verdict")
        _verify_failed(r, part, site, f"verification of attempt {part.attempt} failed: {why}",
                       permanent=job is not None and job.permanent)
    else:
        part.job_seen = True


def _verify_failed(r: Round, part: PartitionStatus, site: SiteSpec, message: str, *,
                   permanent: bool) -> None:
    """Like any stage's failed attempt: back off, then offer the next attempt; or give up."""
    part.tokens = part.artifact = None
    if (part.attempt > r.valid_spec.backoff_limit or permanent
            or _deadline_passed(r, site, part.start_time)):
        _give_up(r, part, message, reason="VerificationFailed")
        return
    part.state, part.message = "BackingOff", message
    part.retry_after = to_rfc3339(r.obs.now + r.policy.backoff(part.attempt))
    r.event("Retrying", f"partition {part.name} {message}; the site may contribute again "
            f"after {part.retry_after}", warning=True)


def _give_up(r: Round, part: PartitionStatus, message: str, *, reason: str,
             event: bool = True) -> None:
    part.state, part.message = "Failed", message
    part.completion_time = to_rfc3339(r.obs.now)
    if event:
        r.event(reason, f"partition {part.name}: {message}", warning=True)
