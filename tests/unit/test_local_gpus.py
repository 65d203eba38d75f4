"""The local runner's use of local GPUs: torchrun for the train stage when there are several."""

from __future__ import annotations

from meritrun.local import local_gpus, with_torchrun
from meritrun.stages import stage_command


def test_train_uses_every_local_gpu_through_torchrun():
    argv = stage_command("train", "p.json", python="py") + ["--workdir", "w"]
    assert with_torchrun(argv, "train", 4) == [
        "py", "-m", "merit_trainer.launch", "--standalone", "--nproc_per_node", "4",
        "-m", "merit_trainer.stage", "train", "--params", "p.json", "--workdir", "w"]
    assert with_torchrun(argv, "train", 1) == argv  # one device: one plain process
    profile = stage_command("profile", "p.json", python="py")
    assert with_torchrun(profile, "profile", 8) == profile  # other stages stay one process


def test_gpu_count_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert local_gpus() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_gpus() == 0
