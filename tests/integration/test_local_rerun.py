"""Re-running `meritrun run --local` in a used workdir, as a user would: the workdir answers
only for its own run and spec; a failed run stays failed until `--fresh`.

The run here fails in its first stage (unreadable data, no retries), so every case is quick;
the resumed, succeeding and SIGKILLed runs are in test_local_e2e.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "meritrun.yaml"
ENV = {**os.environ, "MERITRUN_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meritrun.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def write_spec(path: Path, *, name: str = "broken", data: Path, **spec) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    assets = EXAMPLE.parent / "assets"
    doc["metadata"]["name"] = name
    doc["spec"]["baseModel"]["uri"] = str(assets / "base")
    doc["spec"]["data"] = {"uri": str(data)}
    doc["spec"]["backoffLimit"] = 0
    doc["spec"].update(spec)
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def failed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("rerun")
    bad = tmp / "bad.jsonl"
    bad.write_text("this is not JSON\n")
    spec = write_spec(tmp / "broken.yaml", data=bad)
    workdir = tmp / "work"
    first = run_cli("run", str(spec), "--local", "--workdir", str(workdir))
    return {"tmp": tmp, "bad": bad, "spec": spec, "workdir": workdir, "first": first}


def uid(workdir: Path) -> str:
    return json.loads((workdir / "status.json").read_text())["runUid"]


def test_the_first_run_fails_and_records_its_identity(failed):
    assert failed["first"].returncode == 1, failed["first"].stderr[-2000:]
    record = json.loads((failed["workdir"] / "run.json").read_text())
    assert record["name"] == "broken" and record["run_uid"] == uid(failed["workdir"])
    assert "already failed" not in failed["first"].stderr


def test_the_same_spec_again_still_fails_and_points_at_fresh(failed):
    again = run_cli("run", str(failed["spec"]), "--local", "--workdir", str(failed["workdir"]))
    assert again.returncode == 1
    assert "phase: Failed" in again.stdout
    assert "already failed in this workdir" in again.stderr and "--fresh" in again.stderr


def test_a_fixed_spec_is_refused_naming_what_changed(failed):
    good = ROOT / "examples" / "assets" / "data" / "train.jsonl"
    fixed = write_spec(failed["tmp"] / "fixed.yaml", data=good,
                       training={"learningRate": 0.001, "epochs": 1, "batchSize": 16,
                                 "maxSeqLen": 64, "secondMoments": "rank1"})
    before = uid(failed["workdir"])
    done = run_cli("run", str(fixed), "--local", "--workdir", str(failed["workdir"]))
    assert done.returncode == 2, done.stderr
    assert f'spec.data.uri: "{failed["bad"]}" -> "{good}"' in done.stderr
    assert "spec.training.learningRate: 0.002 -> 0.001" in done.stderr
    assert "--fresh" in done.stderr
    assert uid(failed["workdir"]) == before  # nothing was touched


def test_another_run_is_refused(failed):
    other = write_spec(failed["tmp"] / "other.yaml", name="other", data=failed["bad"])
    done = run_cli("run", str(other), "--local", "--workdir", str(failed["workdir"]))
    assert done.returncode == 2
    assert "holds run 'broken'" in done.stderr and "not 'other'" in done.stderr


def test_a_live_editable_field_is_taken_over_without_fresh(failed):
    edited = write_spec(failed["tmp"] / "retries.yaml", data=failed["bad"], backoffLimit=3)
    done = run_cli("run", str(edited), "--local", "--workdir", str(failed["workdir"]))
    assert done.returncode == 1  # still the failed run: a terminal run is not revived
    assert "taken over by the running run: spec.backoffLimit: 0 -> 3" in done.stderr
    record = json.loads((failed["workdir"] / "run.json").read_text())
    assert record["spec"]["backoffLimit"] == 3


def test_fresh_starts_a_new_run_with_a_new_uid(failed):
    workdir = failed["workdir"]
    before = uid(workdir)
    done = run_cli("run", str(failed["spec"]), "--local", "--workdir", str(workdir), "--fresh")
    assert done.returncode == 1  # the data is still bad: it fails again, as a new run
    assert "already failed" not in done.stderr
    assert uid(workdir) != before
    assert json.loads((workdir / "previous" / "status.json").read_text())["runUid"] == before
