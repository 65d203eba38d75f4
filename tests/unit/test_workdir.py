"""One workdir, one run: the record, the spec diff, --fresh, the lock and leftover stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from meritrun.api import MeritRun
from meritrun.errors import WorkdirError
from meritrun.workdir import (
    STAGE_OF_ENV,
    admit,
    kill_leftover_stages,
    leftover_stages,
    resumable,
    spec_changes,
    stage_environment,
    workdir_lock,
)


def make_run(name: str = "mix", **spec) -> MeritRun:
    body = {"baseModel": {"uri": "/m/base"}, "data": {"uri": "/d/mix.jsonl"},
            "training": {"learningRate": 0.002}, "merge": {"method": "tokenWeighted"}}
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return MeritRun.model_validate({"apiVersion": "merit.run/v1alpha1", "kind": "MeritRun",
                                    "metadata": {"name": name}, "spec": body})


def test_a_new_workdir_records_the_run_and_resumes_it(tmp_path):
    first, changes = admit(tmp_path, make_run())
    assert changes == [] and first.name == "mix" and len(first.uid) == 12
    record = json.loads((tmp_path / "run.json").read_text())
    assert (record["name"], record["run_uid"]) == ("mix", first.uid)
    assert len(record["spec_sha256"]) == 64
    again, _ = admit(tmp_path, make_run())
    assert again == first  # same run, same spec: the same uid, so its results are found


def test_another_run_name_is_refused_naming_both(tmp_path):
    held, _ = admit(tmp_path, make_run("mix"))
    with pytest.raises(WorkdirError) as e:
        admit(tmp_path, make_run("other"))
    assert f"holds run 'mix' (uid {held.uid}), not 'other'" in str(e.value)
    assert "--fresh" in str(e.value)


def test_a_changed_spec_is_refused_with_every_difference(tmp_path):
    admit(tmp_path, make_run())
    edited = make_run(training={"learningRate": 0.001}, merge={"method": "ota"})
    with pytest.raises(WorkdirError) as e:
        admit(tmp_path, edited)
    message = str(e.value)
    assert "spec.training.learningRate: 0.002 -> 0.001" in message
    assert 'spec.merge.method: "tokenWeighted" -> "ota"' in message
    assert "--fresh" in message and "suspend, activeDeadlineSeconds, backoffLimit" in message


def test_the_crds_immutable_fields_decide_what_needs_fresh():
    from meritrun.workdir import Change

    assert not Change("spec.merge.method", "ota", "tokenWeighted").mutable
    assert not Change("spec.data.sources[0].uri", "a", "b").mutable
    assert not Change("spec.training.learningRate", 1, 2).mutable
    assert not Change("spec.merge.quorum", 1.0, 0.5).mutable  # as the CRD's CEL rule says
    assert Change("spec.backoffLimit", 1, 2).mutable
    assert Change("spec.deleteArtifacts", False, True).mutable


def test_live_editable_fields_are_taken_over(tmp_path):
    held, _ = admit(tmp_path, make_run())
    run_id, changes = admit(tmp_path, make_run(backoffLimit=5, suspend=True,
                                               activeDeadlineSeconds=60))
    assert run_id == held
    assert sorted(str(c) for c in changes) == [
        "spec.activeDeadlineSeconds: null -> 60", "spec.backoffLimit: 2 -> 5",
        "spec.suspend: false -> true"]
    assert json.loads((tmp_path / "run.json").read_text())["spec"]["backoffLimit"] == 5
    assert admit(tmp_path, make_run(backoffLimit=5, suspend=True,
                                    activeDeadlineSeconds=60))[1] == []


def test_fresh_starts_a_new_run_and_moves_the_old_one_aside(tmp_path):
    held, _ = admit(tmp_path, make_run())
    (tmp_path / "status.json").write_text(json.dumps({"phase": "Failed", "runUid": held.uid}))
    (tmp_path / "jobs" / "mix-profile-a1").mkdir(parents=True)
    new, _ = admit(tmp_path, make_run("other", training={"learningRate": 0.1}), fresh=True)
    assert new.name == "other" and new.uid != held.uid
    previous = tmp_path / "previous"
    assert json.loads((previous / "run.json").read_text())["run_uid"] == held.uid
    assert (previous / "status.json").exists() and (previous / "jobs").is_dir()
    assert not (tmp_path / "status.json").exists() and not (tmp_path / "jobs").exists()


def test_a_status_without_a_record_or_of_another_uid_is_refused(tmp_path):
    (tmp_path / "status.json").write_text(json.dumps({"phase": "Succeeded"}))
    with pytest.raises(WorkdirError, match="older meritrun"):
        admit(tmp_path, make_run())
    held, _ = admit(tmp_path, make_run(), fresh=True)
    (tmp_path / "status.json").write_text(json.dumps({"phase": "Training", "runUid": "zzz"}))
    with pytest.raises(WorkdirError, match="'zzz'"):
        admit(tmp_path, make_run())


def test_resumable_is_same_run_same_spec_not_failed(tmp_path):
    assert not resumable(tmp_path, make_run())
    held, _ = admit(tmp_path, make_run())
    assert resumable(tmp_path, make_run()) and resumable(tmp_path, make_run(suspend=True))
    assert not resumable(tmp_path, make_run("other"))
    assert not resumable(tmp_path, make_run(training={"learningRate": 0.1}))
    for phase, expected in (("Succeeded", True), ("Training", True), ("Failed", False)):
        (tmp_path / "status.json").write_text(json.dumps({"phase": phase, "runUid": held.uid}))
        assert resumable(tmp_path, make_run()) is expected


def test_spec_changes_name_list_elements_and_unset_fields():
    old = {"data": {"sources": [{"name": "a"}, {"name": "b"}]}, "x": 1}
    new = {"data": {"sources": [{"name": "a"}, {"name": "c"}]}, "y": 2}
    assert [str(c) for c in spec_changes(old, new)] == [
        'spec.data.sources[1].name: "b" -> "c"', "spec.x: 1 -> (unset)",
        "spec.y: (unset) -> 2"]


def test_a_second_runner_is_kept_out_naming_the_holder(tmp_path):
    with workdir_lock(tmp_path):
        with pytest.raises(WorkdirError, match=f"in use by another meritrun runner "
                                               f"\\(pid {os.getpid()}\\)"):
            with workdir_lock(tmp_path):
                pass
    with workdir_lock(tmp_path):  # released when the holder is done
        pass


def test_leftover_stages_of_this_workdir_are_found_and_killed(tmp_path):
    other = tmp_path / "other"
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    mine = subprocess.Popen(sleep, env={**os.environ, **stage_environment(tmp_path)})
    theirs = subprocess.Popen(sleep, env={**os.environ, STAGE_OF_ENV: str(other)})
    try:
        assert leftover_stages(tmp_path) == [mine.pid]
        assert kill_leftover_stages(tmp_path) == [mine.pid]
        assert mine.wait(timeout=10) == -9
        assert theirs.poll() is None  # another workdir's stage is not ours to stop
        assert leftover_stages(tmp_path) == []
    finally:
        for p in (mine, theirs):
            p.kill()
            p.wait()


def test_cli_run_has_fresh(capsys):
    from meritrun.cli import build_parser

    args = build_parser().parse_args(["run", "x.yaml", "--local", "--fresh"])
    assert args.fresh is True
