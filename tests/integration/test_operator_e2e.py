"""End to end on the emulated cluster: `kubectl apply` of the S3 example -> a merged model.

The run itself happens once in the session fixture `e2e_run` (tests/support/kube_e2e.py):
the operator as a process, the chart's CRD served, the node running the real stage entry
points against SeaweedFS. These tests check what it left behind.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_run_reaches_succeeded_with_every_partition(e2e_run):
    st = e2e_run.status
    assert st["phase"] == "Succeeded", st.get("message")
    conditions = {c["type"]: c for c in st["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["Merged"]["reason"] == "MergeSucceeded"
    assert all(c["observedGeneration"] == 1 for c in st["conditions"])
    assert [p["state"] for p in st["partitions"]] == ["Succeeded", "Succeeded"]
    assert all(p["tokens"] > 0 and p["artifact"]["bytes"] > 0 for p in st["partitions"])
    assert st["merge"]["included"] == ["p0", "p1"] and "leftOut" not in st["merge"]
    assert st["progress"] == "2/2" and st["plan"]["strategy"] == "random"
    # Stored under the object's uid: a re-created run of the same name starts from nothing.
    assert st["modelUri"].endswith(f"/runs/tiny-s3/{st['runUid']}/merged/attempt-1/model")


def test_merged_model_loads_and_is_finite(e2e_run, tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(e2e_run.model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    merged_state, base_state = merged.state_dict(), base.state_dict()
    assert merged_state.keys() == base_state.keys()
    assert all(torch.isfinite(t).all() for t in merged_state.values())
    # Training moved the weights: the merge is not the base handed back.
    assert any(not torch.equal(merged_state[k], base_state[k]) for k in base_state)


def test_kubectl_get_shows_the_printer_columns(e2e_run):
    header, row = e2e_run.kubectl_get.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "PARTITIONS", "AGE"]
    assert row.split()[:3] == ["tiny-s3", "Succeeded", "2/2"]
    wide_header, wide_row = e2e_run.kubectl_wide.splitlines()[:2]
    assert wide_header.split() == ["NAME", "PHASE", "PARTITIONS", "STRATEGY", "MODEL", "AGE"]
    assert "random" in wide_row.split() and "s3://" in wide_row


def test_every_stage_job_was_created_once_with_owner_and_labels(e2e_run):
    names = {"tiny-s3-profile-a1", "tiny-s3-p0-a1", "tiny-s3-p1-a1", "tiny-s3-merge-a1"}
    assert e2e_run.job_creations == dict.fromkeys(names, 1)
    for job in e2e_run.jobs:
        meta = job["metadata"]
        assert meta["labels"]["merit.run/run"] == "tiny-s3"
        (owner,) = meta["ownerReferences"]
        assert owner["kind"] == "MeritRun" and owner["controller"] is True
        assert job["spec"]["backoffLimit"] == 0
        assert job["spec"]["ttlSecondsAfterFinished"] == 3600


def test_no_credential_reached_a_manifest_status_or_event(e2e_run, seaweed):
    everything = json.dumps([e2e_run.jobs, e2e_run.status, e2e_run.events])
    assert seaweed.secret_key not in everything
    assert seaweed.access_key not in everything
    assert seaweed.secret_key not in e2e_run.operator_log


def test_pipeline_events_were_posted_on_the_run(e2e_run):
    mine = [e for e in e2e_run.events if e["involvedObject"]["name"] == "tiny-s3"]
    reasons = {e["reason"] for e in mine}
    assert {"Started", "JobCreated", "ProfileSucceeded", "Succeeded"} <= reasons
    assert all(e["involvedObject"]["kind"] == "MeritRun" for e in mine)


def test_finalizer_deleted_the_children(e2e_run):
    assert e2e_run.left_after_delete == []


def test_garbage_collector_removed_the_pods_of_the_deleted_jobs(e2e_run):
    assert e2e_run.pods_left_after_gc == []


def test_operator_logged_no_exception(e2e_run):
    assert e2e_run.operator_log and "Traceback" not in e2e_run.operator_log
