"""Which pod speaks for a failed gang: the one the Job controller names, not its peers."""

from __future__ import annotations

from merit_operator.backend import failed_pod, termination_reason

JOB_MESSAGE = ("PodFailurePolicy: Container stage for pod ml/gang-p0-a1-1-x7k2p failed with "
               "exit code 137 matching FailJob rule at index 1")


def pod(name: str, code: int, message: str = "") -> dict:
    return {"metadata": {"name": name}, "status": {"containerStatuses": [
        {"state": {"terminated": {"exitCode": code, "message": message}}}]}}


PEER = pod("gang-p0-a1-0-abcde", 1, "MERITRUN_ERROR: internal error: RuntimeError: "
           "Connection reset by peer")


def test_the_job_condition_names_the_failed_pod():
    assert failed_pod(JOB_MESSAGE) == "gang-p0-a1-1-x7k2p"
    assert failed_pod("BackoffLimitExceeded: Job has reached the specified backoff limit") is None
    assert failed_pod(None) is None


def test_a_killed_pod_silences_the_peer_that_lost_it():
    pods = [PEER, pod("gang-p0-a1-1-x7k2p", 137)]
    reason, code = termination_reason(pods, culprit="gang-p0-a1-1-x7k2p")
    assert reason is None and code in (1, 137)  # the Job's own message (exit 137) stays
    assert termination_reason(pods)[0].startswith("internal error")  # without the name


def test_the_named_pods_own_error_is_kept_and_the_gang_still_decides_the_code():
    bad = pod("gang-p0-a1-1-x7k2p", 4, "MERITRUN_ERROR: no example keeps a supervised token")
    assert termination_reason([PEER, bad], culprit="gang-p0-a1-1-x7k2p") == (
        "no example keeps a supervised token", 4)
    assert termination_reason([bad, PEER], culprit=PEER["metadata"]["name"])[1] == 4


def test_an_unknown_culprit_falls_back_to_every_pod():
    assert termination_reason([PEER], culprit="gone")[0].startswith("internal error")
