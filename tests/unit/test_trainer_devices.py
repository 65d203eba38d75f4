"""Bad input the train stage refuses before training: GPUs on a CPU image, a gang without a
shared work directory; how a rank of a gang exits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from merit_trainer.dist import GPU_FIELD, choose_device
from merit_trainer.stage import main
from meritrun.errors import SpecError


def test_gpus_requested_on_an_image_without_cuda_name_the_field(monkeypatch):
    monkeypatch.delenv("MERITRUN_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only image
    monkeypatch.setenv("MERITRUN_GPUS", "2")
    with pytest.raises(SpecError) as refused:
        choose_device(0)
    assert refused.value.path == GPU_FIELD and "2 GPU(s) requested" in str(refused.value)
    monkeypatch.setenv("MERITRUN_GPUS", "0")
    assert choose_device(0) == torch.device("cpu")


def test_a_gang_without_a_work_directory_is_refused(tmp_path, monkeypatch, capfd):
    (tmp_path / "p.json").write_text("{}")
    monkeypatch.delenv("MERITRUN_WORKDIR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--params", str(tmp_path / "p.json")]) != 0
    assert "--workdir" in capfd.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("world, code, teardown", [("2", 0, False), ("2", 3, True),
                                                   ("1", 0, True)])
def test_a_gang_rank_that_succeeded_exits_with_flushed_logs_but_no_teardown(world, code,
                                                                           teardown):
    """A rank that is done skips Python's teardown (where gloo's threads once aborted a
    finished gang); a failed rank and a single process still run it. Either way the code and
    the last log line come out."""
    program = ("import atexit, logging, sys\n"
               "from merit_trainer.stage import exit_process\n"
               "logging.basicConfig(stream=sys.stderr)\n"
               "atexit.register(lambda: print('teardown ran', file=sys.stderr))\n"
               "logging.getLogger('t').warning('published')\n"
               f"exit_process({code})\n")
    done = subprocess.run([sys.executable, "-c", program], env={**os.environ, "WORLD_SIZE": world},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == code
    assert "published" in done.stderr
    assert ("teardown ran" in done.stderr) is teardown
