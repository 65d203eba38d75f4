"""Training one partition from the base model, in isolation, into a merge-ready artifact.

MERIT trains every partition independently from theta0 (seed = base seed + partition index)
and merges the final weights once, weighted by the supervised tokens each partition trained
on. So this stage must (1) count exactly the tokens it feeds, (2) keep Adam's final second
moments for the OTA merge, (3) be resumable, since a partition may run for hours at a site we
do not control, and (4) publish the artifact so that the manifest's presence means the artifact
is complete. Schedule: linear warm-up over ceil(warmup_ratio * steps) steps, then linear decay
to a small non-zero learning rate at the last step. The merge itself lives in the merger image.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from meritrun.artifacts import (
    MANIFEST_NAME,
    OPTIMIZER_V_NAME,
    PartitionManifest,
    SecondMoments,
    TokenCounts,
    base_fingerprint,
    hash_tree,
    write_manifest,
)
from meritrun.errors import DataError, StageFailed
from meritrun.stages import TrainParams
from meritrun.storage import fetch_path, open_storage
from meritrun.textenc import Encoded, collate, encode_example, token_losses

from .checkpoint import (
    Progress,
    batch_indices,
    checkpoint_identity,
    load_checkpoint,
    lr_factor,
    plan_steps,
    save_checkpoint,
)
from .moments import optimizer_second_moments, save_second_moments

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]
DEFAULT_CHECKPOINT_STEPS = 200
SCHEDULE = "linear warm-up, then linear decay"


def encode_examples(tokenizer, examples: list, *, max_len: int) -> tuple[list[Encoded], int]:
    """Encoded examples with at least one supervised token, and how many were skipped."""
    encoded = [encode_example(tokenizer, ex, max_len=max_len) for ex in examples]
    kept = [e for e in encoded if e.supervised > 0]
    return kept, len(encoded) - len(kept)


def _configure_threads() -> None:
    threads = os.environ.get("MERITRUN_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def _device() -> torch.device:
    wanted = os.environ.get("MERITRUN_DEVICE")
    return torch.device(wanted or ("cuda" if torch.cuda.is_available() else "cpu"))


def _progress_bar(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    forced = os.environ.get("MERITRUN_PROGRESS")
    disable = (forced == "0") if forced in ("0", "1") else not sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                disable=disable, dynamic_ncols=True)


def build_model(base_dir: Path, params: TrainParams, *, seed: int) -> torch.nn.Module:
    """The base in fp32, wrapped in a peft LoRA model when training.method is lora."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if params.training.method != "lora":
        return model
    from peft import LoraConfig, get_peft_model

    from meritrun.api import LoraSpec

    spec = params.training.lora or LoraSpec()
    targets = spec.target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"]
    torch.manual_seed(seed)  # LoRA A matrices are initialised randomly
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules="all-linear" if targets == ["all-linear"] else targets,
    )
    return get_peft_model(model, config)


def train_partition(
    params: TrainParams,
    *,
    workdir: Path,
    progress: ProgressFn | None = None,
    checkpoint_every: int | None = None,
) -> PartitionManifest:
    """Train one partition, write and upload its artifact; return the uploaded manifest.

    Resumes from `workdir/checkpoint` when it holds a checkpoint of this very run, partition,
    attempt and configuration. `checkpoint_every` defaults to $MERITRUN_CHECKPOINT_STEPS
    (else 200; 0: none between epochs); checkpoints are also written at every epoch end and
    after the last step. `progress(step, total_steps, loss)` is called after every step.
    """
    from transformers import AutoTokenizer

    from .sources import load_partition_examples

    workdir, spec, started = Path(workdir), params.training, time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    _configure_threads()
    every = checkpoint_every if checkpoint_every is not None else int(
        os.environ.get("MERITRUN_CHECKPOINT_STEPS", DEFAULT_CHECKPOINT_STEPS))
    cache, where = workdir / "cache", {"endpoint": params.storage.endpoint,
                                       "region": params.storage.region}
    base_dir = fetch_path(params.base_model, cache, **where)
    try:
        fingerprint = base_fingerprint(base_dir)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as e:  # no weights, no tokenizer, unreadable config
        raise DataError(f"base model {params.base_model} is not a usable HF directory: {e}") from e
    per_source = load_partition_examples(params.data, params.sources, cache, **where)
    examples = [ex for exs in per_source.values() for ex in exs]
    encoded, skipped = encode_examples(tokenizer, examples, max_len=spec.max_seq_len)
    if not encoded:
        raise DataError(f"partition {params.partition}: no example keeps a supervised token "
                        f"within maxSeqLen={spec.max_seq_len}")
    if skipped:
        log.warning("skipped %d examples with no supervised token after truncation", skipped)

    seed = spec.seed + params.index
    random.seed(seed)
    torch.manual_seed(seed)
    device = _device()
    model = build_model(base_dir, params, seed=seed).to(device)
    model.train()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(named.values()), lr=spec.learning_rate,
                                  weight_decay=spec.weight_decay, betas=(0.9, 0.999))
    plan = plan_steps(len(encoded), batch_size=spec.batch_size, epochs=spec.epochs,
                      max_steps=spec.max_steps, warmup_ratio=spec.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan))
    identity = checkpoint_identity({
        "run": params.run, "partition": params.partition, "attempt": params.attempt,
        "index": params.index, "sources": params.sources, "base": fingerprint,
        "training": spec.model_dump(mode="json"), "examples": len(encoded),
    })
    ckpt_dir = workdir / "checkpoint"
    state = load_checkpoint(ckpt_dir, identity=identity, model=model, optimizer=optimizer,
                            scheduler=scheduler) or Progress()
    log.info("partition %s: %d examples (%d skipped), %d steps (%d per epoch), seed %d, %s on %s",
             params.partition, len(encoded), skipped, plan.total_steps, plan.steps_per_epoch,
             seed, spec.method, device)

    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    bar = _progress_bar(plan.total_steps, state.step, params.partition)
    log_every = max(1, plan.total_steps // 10)
    try:
        while state.step < plan.total_steps:
            rows = [encoded[i] for i in batch_indices(
                state.step, n=len(encoded), batch_size=spec.batch_size, seed=seed)]
            batch = {k: t.to(device) for k, t in collate(rows, pad_id=pad_id).items()}
            summed, counts = token_losses(model, batch)
            loss = summed.sum() / counts.sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            state.step += 1
            state.losses.append(loss.detach().item())
            state.supervised += sum(e.supervised for e in rows)
            state.total += sum(len(e.input_ids) for e in rows)
            bar.update(1)
            bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
            if state.step % log_every == 0 or state.step == plan.total_steps:
                log.info("step %d/%d loss %.4f", state.step, plan.total_steps, state.losses[-1])
            if ((every > 0 and state.step % every == 0) or state.step == plan.total_steps
                    or state.step % plan.steps_per_epoch == 0):
                save_checkpoint(ckpt_dir, identity=identity, model=model, optimizer=optimizer,
                                scheduler=scheduler, progress=state)
            if progress is not None:
                progress(state.step, plan.total_steps, state.losses[-1])
    finally:
        bar.close()

    artifact_dir = workdir / "artifact"
    moments = write_artifact(
        artifact_dir, model=model, tokenizer=tokenizer, optimizer=optimizer, named=named,
        kind=spec.second_moments, lora=spec.method == "lora",
        log_data={"loss": state.losses, "lr": state.lrs, "steps": state.step,
                  "skippedExamples": skipped, "seconds": round(time.monotonic() - started, 3)},
    )
    manifest = PartitionManifest(
        run=params.run, partition=params.partition, attempt=params.attempt, site=params.site,
        sources=list(per_source), base=fingerprint,
        tokens=TokenCounts(supervised=state.supervised, total=state.total),
        weights="lora" if spec.method == "lora" else "full", model_dir="model",
        training={**spec.model_dump(mode="json", by_alias=True), "seed": seed,
                  "steps": plan.total_steps, "stepsPerEpoch": plan.steps_per_epoch,
                  "warmupSteps": plan.warmup_steps, "schedule": SCHEDULE, "optimizer": "AdamW",
                  "betas": [0.9, 0.999], "examples": len(encoded), "skippedExamples": skipped},
        second_moments=moments, files=hash_tree(artifact_dir),
    )
    publish_artifact(params, artifact_dir, manifest)
    return manifest


def publish_artifact(params: TrainParams, artifact_dir: Path, manifest: PartitionManifest) -> None:
    """Upload the artifact files, then the manifest last: its presence means "complete".

    A manifest left by an earlier try of this attempt is deleted first, so it never vouches
    for files that are being replaced.
    """
    storage = open_storage(params.storage.uri, endpoint=params.storage.endpoint,
                           region=params.storage.region)
    manifest_key = f"{params.output}/{MANIFEST_NAME}"
    storage.delete_prefix(manifest_key)
    storage.upload_dir(artifact_dir, params.output)
    storage.put_file(manifest_key, write_manifest(artifact_dir, manifest))
    log.info("partition %s attempt %d published to %s (%d supervised tokens)", params.partition,
             params.attempt, storage.uri_for(params.output), manifest.tokens.supervised)


def write_artifact(
    artifact_dir: Path, *, model: torch.nn.Module, tokenizer, optimizer: torch.optim.Optimizer,
    named: dict[str, torch.nn.Parameter], kind: str, lora: bool, log_data: dict,
) -> SecondMoments | None:
    """model/ (HF dir or peft adapter + tokenizer), optimizer_v, train_log.json, loss.png.

    The directory is rebuilt from scratch, so a retried attempt never keeps stale files.
    """
    import shutil

    shutil.rmtree(artifact_dir, ignore_errors=True)
    model_dir = artifact_dir / "model"
    model_dir.mkdir(parents=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (artifact_dir / "train_log.json").write_text(json.dumps(log_data, indent=1))
    plot_loss(artifact_dir / "loss.png", log_data["loss"])
    if kind == "none":
        return None
    named_v, beta2, step = optimizer_second_moments(optimizer, named)
    # Keys must be the names in the saved weights file (peft drops the adapter name).
    adapter = ".default." if lora else None
    named_v = {(n.replace(adapter, ".") if adapter else n): v for n, v in named_v.items()}
    missing = sorted(set(named_v) - saved_tensor_names(model_dir))
    if missing:
        raise StageFailed(f"second moments name tensors the saved model lacks: {missing[:3]}")
    save_second_moments(artifact_dir / OPTIMIZER_V_NAME, named_v, kind=kind, beta2=beta2,
                        step=step)
    return SecondMoments(kind=kind, beta2=beta2, step=step)


def saved_tensor_names(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names


def plot_loss(path: Path, losses: list[float]) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state to fight over

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("supervised loss (nats/token)")
    ax.set_title("partition training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
