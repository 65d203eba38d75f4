"""Test support: tiny expert artifacts (a base + K partitions with manifests) for merge tests.

Artifacts follow the contract in meritrun.artifacts exactly: `model/` (HF weights, one file or
sharded with an index; or a peft adapter), optional `optimizer_v.safetensors` written by the
trainer's own writer (merit_trainer.moments), and manifest.json with every file's sha256.
The weights are written with safetensors' reference writer, independent of merit_merger.io,
so the merger's reader is tested against files it did not produce.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from meritrun.artifacts import (
    OPTIMIZER_V_NAME,
    PartitionManifest,
    SecondMoments,
    TokenCounts,
    base_fingerprint,
    hash_tree,
    read_manifest,
    write_manifest,
)

WEIGHT_SUFFIXES = (".safetensors", ".index.json")


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF model dir (all shards)."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


def save_state(model_dir: Path, state: dict[str, torch.Tensor], *,
               shard_bytes: int | None = None) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when shard_bytes is set."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for old in model_dir.iterdir():
        if old.name.endswith(WEIGHT_SUFFIXES):
            old.unlink()
    if shard_bytes is None:
        save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        return [model_dir / "model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(model_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        files.append(model_dir / fname)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return files


def copy_config(base_dir: Path, model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(base_dir).iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(path, model_dir / path.name)


def perturbed(state: dict[str, torch.Tensor], *, seed: int, scale: float = 0.01
              ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype)
            if t.is_floating_point() else t.clone() for n, t in state.items()}


def random_moments(state: dict[str, torch.Tensor], *, seed: int) -> dict[str, torch.Tensor]:
    """Positive fp32 'exp_avg_sq' per tensor, spread over orders of magnitude like real ones."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.exp(torch.randn(t.shape, generator=g) * 2 - 12)
            for n, t in state.items() if t.is_floating_point()}


def write_partition(
    root: Path, name: str, *, base_dir: Path, state: dict[str, torch.Tensor] | None = None,
    tokens: int = 1000, moments: dict[str, torch.Tensor] | None = None,
    moments_kind: str = "rank1", shard_bytes: int | None = None, adapter_dir: Path | None = None,
) -> Path:
    """A partition artifact dir (full weights, or a copied peft adapter) with its manifest."""
    from merit_trainer.moments import save_second_moments

    artifact = Path(root) / name
    model_dir = artifact / "model"
    if adapter_dir is not None:
        shutil.copytree(adapter_dir, model_dir)
    else:
        copy_config(base_dir, model_dir)
        save_state(model_dir, state, shard_bytes=shard_bytes)
    second = None
    if moments is not None:
        save_second_moments(artifact / OPTIMIZER_V_NAME, moments, kind=moments_kind,
                            beta2=0.999, step=10)
        second = SecondMoments(kind=moments_kind, beta2=0.999, step=10)
    manifest = PartitionManifest(
        run="test", partition=name, attempt=1, sources=[f"src-{name}"],
        tokens=TokenCounts(supervised=tokens, total=2 * tokens), base=base_fingerprint(base_dir),
        weights="lora" if adapter_dir is not None else "full", second_moments=second,
        files=hash_tree(artifact),
    )
    write_manifest(artifact, manifest)
    return artifact


def refresh_manifest(artifact: Path, **updates: object) -> None:
    """Re-hash the files (after a deliberate change) and apply manifest field updates."""
    manifest = read_manifest(artifact)
    data = manifest.model_dump() | {"files": hash_tree(artifact)} | updates
    write_manifest(artifact, PartitionManifest.model_validate(data))


def edit_state(artifact: Path, fn) -> None:
    """Change the weights in place through fn(state), then re-hash (the site signs its edit)."""
    model = Path(artifact) / "model"
    state = load_state(model)
    fn(state)
    save_state(model, state)
    refresh_manifest(artifact)


@dataclass
class Experts:
    base_dir: Path
    artifacts: list[Path]
    states: list[dict[str, torch.Tensor]]
    moments: list[dict[str, torch.Tensor]] | None
    tokens: list[int]


def make_experts(
    root: Path, base_dir: Path, k: int = 3, *, tokens: list[int] | None = None,
    moments_kind: str | None = "rank1", shard_bytes: int | None = None, scale: float = 0.01,
    seed: int = 0,
) -> Experts:
    """K perturbed copies of the base as partition artifacts p0..p{k-1}."""
    base = load_state(base_dir)
    tokens = tokens or [1000 * (i + 1) for i in range(k)]
    states, moments, artifacts = [], [], []
    for i in range(k):
        state = perturbed(base, seed=seed + 100 + i, scale=scale)
        v = random_moments(base, seed=seed + 200 + i) if moments_kind else None
        artifacts.append(write_partition(
            root, f"p{i}", base_dir=base_dir, state=state, tokens=tokens[i], moments=v,
            moments_kind=moments_kind or "rank1", shard_bytes=shard_bytes))
        states.append(state)
        moments.append(v)
    return Experts(base_dir, artifacts, states, moments if moments_kind else None, tokens)


def make_lora_adapter(out_dir: Path, base_dir: Path, *, seed: int = 0, r: int = 4,
                      alpha: float = 8.0, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                      modules_to_save: list[str] | None = None) -> Path:
    """A peft LoRA adapter on the base with random (non-zero) A and B, saved offline."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def cast_model(src_dir: Path, out_dir: Path, dtype: torch.dtype, *,
               shard_bytes: int | None = None) -> Path:
    """A copy of an HF model dir with floating weights cast to dtype (config copied as is)."""
    copy_config(src_dir, out_dir)
    state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in load_state(src_dir).items()}
    save_state(out_dir, state, shard_bytes=shard_bytes)
    return out_dir


def upload_to_bucket(bucket, base_dir: Path, artifacts: list[Path], prefix, monkeypatch):
    """The stage's credentials pointed at `bucket` (a test S3 bucket), the base uploaded to
    models/base and each artifact to `prefix(artifact.name)`; the bucket's storage."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", bucket.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bucket.secret_key)
    storage = bucket.open()
    storage.upload_dir(base_dir, "models/base")
    for a in artifacts:
        storage.upload_dir(a, prefix(a.name))
    return storage


def verify_artifacts(parts: list[Path], base: Path, method: str = "token-weighted",
                     **kwargs: object):
    """Load and verify partition artifacts as the merge does: (every refusal, the result)."""
    from merit_merger.checks import load_partition
    from merit_merger.methods import get_method
    from merit_merger.verification import verify_partitions
    from meritrun.errors import ContributionRejected

    sources, refused = [], []
    for p in parts:
        try:
            sources.append(load_partition(p, p.name))
        except ContributionRejected as r:
            refused.append(r)
    result = verify_partitions(sources, base_dir=base, method=get_method(method), **kwargs)
    return refused + result.refused, result
