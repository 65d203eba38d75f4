"""The pull-site half of the state machine: offer, wait, verify, accept or refuse, give up.

Pure like `pipeline` (it is called from `decide`): the clock comes in the observations, and
what must happen outside (write an assignment and hand the site a grant, revoke the grant,
run a verify Job) comes out as actions the backends carry out idempotently.

A pull partition: Pending -> AwaitingContribution (offer attempt n) -> Verifying (the
manifest arrived: revoke the grant so the artifact can no longer change, run the verify Job)
-> Succeeded, or refused -> AwaitingContribution again as attempt n+1 with a new grant (until
the retry budget or the site's deadline runs out) -> Failed. The deadline counts from the
first offer, so re-submissions do not extend it. Sketches (sites[].sketches) are the same
offer/wait/revoke cycle, before profiling, without verification: they carry no weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from . import jobs
from .access import grant_expiry
from .api import PartitionStatus, SiteSketchStatus, SiteSpec
from .assignment import (
    Assignment,
    build_sketch_assignment,
    build_train_assignment,
    find_site,
    sketch_output_prefix,
)
from .conditions import from_rfc3339, to_rfc3339

if TYPE_CHECKING:
    from .pipeline import _Round


@dataclass(frozen=True)
class OfferAssignment:
    """Write the assignment and give its site a grant (same attempt: same grant name)."""

    assignment: Assignment
    grant: str  # the grant's name: a Secret (operator) or a file under the workdir (local)
    expires: datetime


@dataclass(frozen=True)
class RevokeGrant:
    """The site may no longer read or write with this grant (idempotent)."""

    assignment: Assignment
    grant: str


def grant_name(run: str, name: str, site: str) -> str:
    """One grant per partition (or per site's sketches); a new attempt replaces it."""
    return f"{run}-{name}-grant" if name != "sketch" else f"{run}-sketch-{site}-grant"


def sketch_sites(spec) -> list[SiteSpec]:
    return [s for s in spec.sites or [] if s.mode == "pull" and s.sketches]


def _deadline_passed(r: _Round, site: SiteSpec, start_time: str | None) -> bool:
    if not site.deadline_seconds or not start_time:
        return False
    return (r.obs.now - from_rfc3339(start_time)).total_seconds() > site.deadline_seconds


def _offer(r: _Round, assignment: Assignment, start_time: str) -> OfferAssignment:
    expires = grant_expiry(r.spec, assignment.site, start=from_rfc3339(start_time))
    return OfferAssignment(assignment, grant_name(r.obs.run, assignment.name, assignment.site),
                           expires)


def _revoke_action(run: str, assignment: Assignment) -> RevokeGrant:
    return RevokeGrant(assignment, grant_name(run, assignment.name, assignment.site))


def _revoke(r: _Round, assignment: Assignment) -> None:
    r.actions.append(_revoke_action(r.obs.run, assignment))


# --- sketches before profiling --------------------------------------------------------------


def sketches_ready(r: _Round) -> dict[str, str] | None:
    """site -> sketch prefix once every sketch site has delivered; None while waiting/failed."""
    sites = sketch_sites(r.spec)
    if not sites:
        return {}
    st = r.status
    if st.sketches is None:
        st.sketches = [SiteSketchStatus(site=s.name, start_time=to_rfc3339(r.obs.now))
                       for s in sites]
        for sk in st.sketches:
            sk.grant = grant_name(r.obs.run, "sketch", sk.site)
            r.event("AwaitingSketches", f"site {sk.site}: gradient sketches of its sources "
                    f"requested (grant {sk.grant})")
    for sk in st.sketches:
        if sk.state != "AwaitingContribution":
            continue
        uri, assignment = r.obs.sketches.get(sk.site), _sketch_assignment(r.obs.run, r.spec, sk)
        if uri is not None:
            sk.state, sk.uri, sk.completion_time = "Succeeded", uri, to_rfc3339(r.obs.now)
            _revoke(r, assignment)
            r.event("SketchesReceived", f"site {sk.site}: sketches at {uri}")
        elif _deadline_passed(r, find_site(r.spec, sk.site), sk.start_time):
            sk.state = "Failed"
            sk.message = f"site {sk.site} sent no sketches by its deadline"
            _revoke(r, assignment)
        else:  # level-based, as for partitions
            r.actions.append(_offer(r, assignment, sk.start_time or ""))
    failed = [sk for sk in st.sketches if sk.state == "Failed"]
    if failed:
        r.fail("SketchesMissing", "; ".join(sk.message or sk.site for sk in failed))
        return None
    if any(sk.state != "Succeeded" for sk in st.sketches):
        return None
    return {sk.site: sketch_output_prefix(r.obs.run, sk.site, sk.attempt) for sk in st.sketches}


def _sketch_assignment(run: str, spec, sk: SiteSketchStatus) -> Assignment:
    site = find_site(spec, sk.site)
    deadline = None
    if site.deadline_seconds and sk.start_time:
        deadline = from_rfc3339(sk.start_time) + timedelta(seconds=site.deadline_seconds)
    return build_sketch_assignment(run, spec, sk.site, attempt=sk.attempt, deadline=deadline)


# --- pull partitions -------------------------------------------------------------------------


def pull_partition(r: _Round, part: PartitionStatus) -> None:
    """Advance one pull-site partition by one round."""
    obs = r.obs
    site = find_site(r.spec, part.site)
    if part.state == "Pending":
        _await(r, part, attempt=1)
    elif part.state == "AwaitingContribution":
        result = obs.partition_results.get(part.name)
        if result is not None:
            _revoke(r, build_train_assignment(obs.run, r.spec, part))
            part.state, part.tokens, part.artifact = "Verifying", result.tokens, result.artifact
            job = jobs.verify_job(obs.run, r.spec, part, part.attempt)
            part.job = job.name
            r.actions.append(job)
            r.event("ContributionReceived", f"partition {part.name} attempt {part.attempt} "
                    f"from site {part.site}: verifying")
        elif _deadline_passed(r, site, part.start_time):
            _revoke(r, build_train_assignment(obs.run, r.spec, part))
            _give_up(r, part, f"site {site.name} missed its deadline ({site.deadline_seconds}s)",
                     reason="SiteDeadlineExceeded")
    elif part.state == "Verifying":
        _verifying(r, part, site)
    if part.state == "AwaitingContribution":
        # Level-based: offered every round; backends skip a grant that already exists, so a
        # lost action (a crash between deciding and acting) is made good the next round.
        r.actions.append(_offer(r, build_train_assignment(obs.run, r.spec, part),
                                part.start_time or to_rfc3339(obs.now)))


def _await(r: _Round, part: PartitionStatus, *, attempt: int) -> None:
    part.state, part.attempt, part.job = "AwaitingContribution", attempt, None
    part.start_time = part.start_time or to_rfc3339(r.obs.now)
    part.grant = grant_name(r.obs.run, part.name, part.site or "")
    r.event("AwaitingContribution", f"partition {part.name} attempt {attempt} waits for site "
            f"{part.site} (grant {part.grant})")


def _verifying(r: _Round, part: PartitionStatus, site: SiteSpec) -> None:
    obs = r.obs
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
        if part.attempt > r.spec.backoff_limit or _deadline_passed(r, site, part.start_time):
            _give_up(r, part, refusal, reason="ContributionRefused", event=False)
        else:
            part.message = refusal + "; the site may contribute again as the next attempt"
            _await(r, part, attempt=part.attempt + 1)
    elif job is None:
        r.actions.append(jobs.verify_job(obs.run, r.spec, part, part.attempt))  # vanished
    elif job.state in ("Failed", "Succeeded"):
        why = job.message or "it wrote no verdict"
        _give_up(r, part, f"verification of attempt {part.attempt} failed: {why}",
                 reason="VerificationFailed")


def _give_up(r: _Round, part: PartitionStatus, message: str, *, reason: str,
             event: bool = True) -> None:
    part.state, part.message = "Failed", message
    part.completion_time = to_rfc3339(r.obs.now)
    if event:
        r.event(reason, f"partition {part.name}: {message}", warning=True)


def grants_to_revoke(run: str, spec, status) -> list[RevokeGrant]:
    """Every grant a site could still use (waiting partitions and sketches)."""
    out = [_revoke_action(run, build_train_assignment(run, spec, part))
           for part in status.partitions
           if part.state == "AwaitingContribution" and site_mode(spec, part.site) == "pull"]
    return out + [_revoke_action(run, _sketch_assignment(run, spec, sk))
                  for sk in status.sketches or []
                  if sk.state == "AwaitingContribution" and site_mode(spec, sk.site) == "pull"]


def site_mode(spec, site: str | None) -> str | None:
    """The mode of a partition's site; None for this cluster (or an unknown site)."""
    return next((s.mode for s in spec.sites or [] if s.name == site), None)


def outstanding_grants(r: _Round) -> None:
    """On a failed run: revoke every grant a site could still use."""
    r.actions.extend(grants_to_revoke(r.obs.run, r.spec, r.status))
