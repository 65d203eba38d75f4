"""Bad input the train stage refuses before training: GPUs on a CPU image, a gang without a
shared work directory."""

from __future__ import annotations

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
