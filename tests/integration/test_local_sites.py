"""Pull sites with the local runner: both send gradient sketches first (so profiling covers
their sources without their data), then one contributes (refused once, then accepted as its
next attempt), the other never does, and the quorum merges without it at its deadline.

The runner writes each grant to WORKDIR/grants (0600); the sites are separate
`meritrun contribute` processes with their own data files. Real tiny model, real stages.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.kube import wait_until

from meritrun.api import MeritRun
from meritrun.assignment import parse_grant
from meritrun.data import iter_examples, write_examples
from meritrun.keys import generate_site_key

pytestmark = pytest.mark.slow
RUN = "sites"
# The run cannot merge before the silent site's deadline, which also bounds its sketches: a
# sketch process (torch, the tiny model) took over 40 s once at load 7 on 2 cores.
LATE_DEADLINE_S = 60


def contribute(grant: Path, data: Path, key: Path | None, workdir: Path,
               *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MERITRUN_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "meritrun.cli", "contribute", "--assignment", str(grant),
         "--data", str(data), "--workdir", str(workdir), *extra,
         *(["--key", str(key)] if key else [])],
        capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_base, tiny_mixture):
    from meritrun.local import LOCAL_POLICY
    from meritrun.runner_cli import run_in_workdir

    tmp = tmp_path_factory.mktemp("local-sites")
    train = list(iter_examples(tiny_mixture.train))
    files = {}
    for name, sources in (("hub", ["copy", "upper"]), ("a", ["sort"]), ("b", ["reverse"])):
        files[name] = tmp / f"{name}.jsonl"
        write_examples(files[name], [e for e in train if e.source in sources])
    from merit_trainer.tiny import save_tiny_base

    public = generate_site_key(tmp / "a.key")
    wrong_base = save_tiny_base(tmp / "other-base", seed=1)  # a site that kept an old base
    run = MeritRun.model_validate({
        "apiVersion": "merit.run/v1alpha1", "kind": "MeritRun", "metadata": {"name": RUN},
        "spec": {
            "baseModel": {"uri": str(tiny_base)},
            "data": {"sources": [{"name": "copy", "uri": str(files["hub"])},
                                 {"name": "upper", "uri": str(files["hub"])},
                                 {"name": "sort", "site": "a"},
                                 {"name": "reverse", "site": "b"}]},
            "sites": [{"name": "a", "mode": "pull", "publicKey": public,
                       "deadlineSeconds": 300, "sketches": True},
                      {"name": "b", "mode": "pull", "deadlineSeconds": LATE_DEADLINE_S,
                       "sketches": True}],
            "profiling": {"projectionDim": 256, "calibrationSamples": 8},
            "partitioning": {"strategy": "bySite", "partitions": 3},
            "training": {"method": "full", "batchSize": 8, "maxSeqLen": 64, "maxSteps": 3,
                         "secondMoments": "none"},
            "merge": {"method": "tokenWeighted", "quorum": 0.6},
            "backoffLimit": 1,
        }})
    workdir = tmp / "hub-run"
    out: dict = {"workdir": workdir, "rounds": []}
    grants = workdir / "grants"
    grant = grants / f"{RUN}-p1-grant.json"

    def send_sketches(site: str) -> subprocess.CompletedProcess:
        sketch_grant = grants / f"{RUN}-sketch-{site}-grant.json"
        wait_until(sketch_grant.exists, timeout=120, what=f"site {site}'s sketch grant")
        return contribute(sketch_grant, files[site], None, tmp / f"{site}-sketch",
                          "--sketch-only")

    def site_a() -> None:
        out["sketch_a"] = send_sketches("a")
        wait_until(grant.exists, timeout=120, what="site a's grant")
        out["grant_mode"] = stat.S_IMODE(grant.stat().st_mode)
        out["first"] = contribute(grant, files["a"], tmp / "a.key", tmp / "a-work-1",
                                  "--base", str(wrong_base))
        wait_until(lambda: grant.exists() and parse_grant(grant.read_text()).attempt == 2,
                   timeout=120, what="site a's second grant")
        out["second"] = contribute(grant, files["a"], tmp / "a.key", tmp / "a-work-2")

    site = threading.Thread(target=site_a, name="site-a")
    site.start()
    silent = threading.Thread(target=lambda: out.update(sketch_b=send_sketches("b")),
                              name="site-b")  # sketches, then nothing
    silent.start()
    out["status"] = run_in_workdir(
        run, workdir=workdir, policy=LOCAL_POLICY, poll_seconds=0.3,
        on_round=lambda st, ev: out["rounds"].extend(ev),
        env={"MERITRUN_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1"}).status
    site.join(60)
    silent.join(60)
    return out


def test_sites_sketches_profile_their_sources_without_their_data(finished):
    for site in ("sketch_a", "sketch_b"):
        assert finished[site].returncode == 0, finished[site].stderr[-2000:]
    st = finished["status"]
    assert [(s.site, s.state) for s in st.sketches] == [("a", "Succeeded"), ("b", "Succeeded")]
    plan = json.loads((finished["workdir"] / "store" / "runs" / RUN / st.run_uid / "plan"
                       / "attempt-1" / "plan.json").read_text())
    assert plan["settings"]["site_sketches"] == {"a": ["sort"], "b": ["reverse"]}
    assert plan["settings"]["within_site"] == "conflict"
    assert set(plan["scores"]) == {"copy", "upper", "sort", "reverse"}


def test_silent_site_is_left_out_at_its_deadline_and_the_quorum_merges(finished):
    st = finished["status"]
    assert st.phase == "Succeeded", st.message
    parts = {p.site: p for p in st.partitions}
    assert parts["b"].state == "Failed" and "missed its deadline" in parts["b"].message
    assert st.merge.included == [parts[None].name, parts["a"].name]
    assert st.merge.left_out == [parts["b"].name]
    report = json.loads((Path(st.model_uri.removeprefix("file://")).parent
                         / "merge_report.json").read_text())
    weights = {p["name"]: p["weight"] for p in report["partitions"]}
    assert set(weights) == {parts[None].name, parts["a"].name}
    assert sum(weights.values()) == pytest.approx(1.0)  # renormalized without the site


def test_refused_contribution_is_reported_and_accepted_as_the_next_attempt(finished):
    assert finished["first"].returncode == 0, finished["first"].stderr[-2000:]
    assert finished["second"].returncode == 0, finished["second"].stderr[-2000:]
    a = next(p for p in finished["status"].partitions if p.site == "a")
    assert a.state == "Succeeded" and a.attempt == 2 and a.tokens > 0
    refused = [e for e in finished["rounds"] if e.reason == "ContributionRefused"]
    assert len(refused) == 1 and "attempt 1 refused (base-fingerprint)" in refused[0].message
    assert any(e.reason == "ContributionAccepted" for e in finished["rounds"])


def test_grants_are_private_files_removed_once_used(finished):
    assert finished["grant_mode"] == 0o600
    assert not list((finished["workdir"] / "grants").glob("*.json"))  # all revoked
