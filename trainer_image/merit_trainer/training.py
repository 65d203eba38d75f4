"""Training one partition from the base model, in isolation, into a merge-ready artifact.

MERIT trains every partition independently from theta0 (seed = base seed + partition index)
and merges the final weights once, weighted by the supervised tokens each partition trained
on. So this stage must (1) count exactly the tokens it feeds, (2) keep Adam's final second
moments for the OTA merge, (3) be resumable, since a partition may run for hours at a site we
do not control, and (4) publish the artifact so that the manifest's presence means the artifact
is complete. It runs as one process or as every rank of a torchrun gang (one per GPU, over one
or more nodes): the engine (engine.py, FSDP2) shards the model, shares.py splits the data,
checkpoint.py resumes, export.py gathers; here is only the order of those steps, and rank 0
alone writes files. Schedule: linear warm-up over ceil(warmup_ratio * steps) steps, then linear
or cosine decay to a small non-zero learning rate at the last step. The merge itself lives in
the merger image.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from meritrun.artifacts import PartitionManifest, TokenCounts, base_fingerprint, hash_tree
from meritrun.errors import DataError
from meritrun.stages import TrainParams
from meritrun.storage import Storage, fetch_path
from meritrun.textenc import Encoded

from .checkpoint import (
    Progress,
    checkpoint_identity,
    checkpoint_root,
    load_checkpoint,
    lr_factor,
    plan_steps,
    remove_checkpoints,
    save_checkpoint,
)
from .checkpoint_mirror import open_mirror
from .dist import Dist, all_gather, node_leader_first, start, stop
from .engine import choose_precision, make_optimizer, prepare_model, set_tf32, train_step
from .export import base_dtype, max_shard_bytes
from .publishing import ProgressFile, publish_artifact, write_artifact
from .shares import build_catalogue, encode_share, micro_batches, step_rows
from .tokenizing import default_workers

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]
DEFAULT_CHECKPOINT_STEPS = 200


def encode_examples(tokenizer, examples: list, *, max_len: int) -> tuple[list[Encoded], int]:
    """Encoded examples with at least one supervised token, and how many were skipped: the
    train stage's rule (shares.py) as one process applies it."""
    share = encode_share(tokenizer, dict(enumerate(examples)), max_len=max_len)
    kept = [e for e in share.values() if e.supervised > 0]
    return kept, len(share) - len(kept)


def _configure_threads() -> None:
    threads = os.environ.get("MERITRUN_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def _progress_bar(total: int, initial: int, desc: str, *, main: bool):
    from tqdm.auto import tqdm

    forced = os.environ.get("MERITRUN_PROGRESS")
    disable = (forced == "0") if forced in ("0", "1") else not sys.stderr.isatty()
    disable = disable or not main
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
    shard_bytes: int | None = None,
    checkpoint_storage: Storage | None = None,
) -> PartitionManifest:
    """Train one partition, write and upload its artifact; return the uploaded manifest.

    Run by every rank of a torchrun gang, or by one process. Resumes from the latest
    checkpoint of this very partition and configuration (any attempt) under
    `workdir/checkpoints/` or, when `params.checkpoints` names a prefix, in storage
    (`checkpoint_storage`, default the run's; a pull site passes its granted one).
    `checkpoint_every` defaults to $MERITRUN_CHECKPOINT_STEPS (else 200; 0: none between
    epochs); checkpoints are also written at every epoch end and after the last step, and
    removed once the artifact is published. `shard_bytes` caps each weights file (default
    $MERITRUN_MAX_SHARD_BYTES, else 5 GB). `progress(step, total_steps, loss)` is
    called after every step.
    """
    dist = start()
    try:
        return _train(params, dist=dist, workdir=Path(workdir), progress=progress,
                      checkpoint_every=checkpoint_every, shard_bytes=shard_bytes,
                      checkpoint_storage=checkpoint_storage)
    finally:
        stop(dist)


def _fetch_data(params: TrainParams, cache: Path, *, dist: Dist,
                where: dict) -> dict[Path, list[str]]:
    """The partition's data files -> their sources, fetched once per node (by its first
    rank: a shared cache would race) and known to every rank of the node."""
    from .sources import fetch_partition_files

    mine = None
    if dist.local_rank == 0:
        mine = {str(path): names for path, names in fetch_partition_files(
            params.data, params.sources, cache, **where).items()}
    leader = all_gather(dist, mine)[dist.rank - dist.local_rank]
    return {Path(path): names for path, names in leader.items()}


def _train(params: TrainParams, *, dist: Dist, workdir: Path, progress: ProgressFn | None,
           checkpoint_every: int | None, shard_bytes: int | None,
           checkpoint_storage: Storage | None) -> PartitionManifest:
    from transformers import AutoTokenizer

    from .sources import count_examples, read_share

    spec, started = params.training, time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    _configure_threads()
    every = checkpoint_every if checkpoint_every is not None else int(
        os.environ.get("MERITRUN_CHECKPOINT_STEPS", DEFAULT_CHECKPOINT_STEPS))
    cache, where = workdir / "cache", {"endpoint": params.storage.endpoint,
                                       "region": params.storage.region}
    node_cache = cache / f"node-{dist.rank // dist.local_world}"  # a shared PVC: no races
    base_dir = node_leader_first(dist, lambda: fetch_path(params.base_model, node_cache, **where))
    data_files = _fetch_data(params, node_cache, dist=dist, where=where)
    counts = count_examples(data_files, params.sources, source_field=params.data.source_field)
    try:
        fingerprint = base_fingerprint(base_dir)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as e:  # no weights, no tokenizer, unreadable config
        raise DataError(f"base model {params.base_model} is not a usable HF directory: {e}") from e
    share = encode_share(
        tokenizer, read_share(data_files, counts, source_field=params.data.source_field,
                              rank=dist.rank, world=dist.world),
        max_len=spec.max_seq_len, workers=default_workers(dist.local_world))
    catalogue = build_catalogue(dist, share)
    share = {i: e for i, e in share.items() if e.supervised > 0}
    if not len(catalogue):
        raise DataError(f"partition {params.partition}: no example keeps a supervised token "
                        f"within maxSeqLen={spec.max_seq_len}")
    if catalogue.skipped:
        log.warning("skipped %d examples with no supervised token after truncation",
                    catalogue.skipped)

    seed = spec.seed + params.index
    random.seed(seed)
    torch.manual_seed(seed)
    precision = choose_precision(spec.precision, dist.device)
    set_tf32(dist.device, precision)
    model = prepare_model(build_model(base_dir, params, seed=seed), spec=spec, dist=dist,
                          precision=precision)
    model.train()
    optimizer = make_optimizer(model, spec)
    plan = plan_steps(len(catalogue), batch_size=spec.batch_size, epochs=spec.epochs,
                      max_steps=spec.max_steps, warmup_ratio=spec.warmup_ratio,
                      schedule=spec.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan))
    identity = checkpoint_identity({  # no attempt: a retry of the partition resumes
        "run": params.run, "run_uid": params.run_uid, "partition": params.partition,
        "index": params.index,
        "sources": params.sources, "base": fingerprint, "examples": len(catalogue),
        "training": spec.model_dump(mode="json"),
    })
    root = checkpoint_root(workdir, identity)
    mirror = open_mirror(params, identity=identity, storage=checkpoint_storage)
    state = load_checkpoint(root, identity=identity, dist=dist, model=model,
                            optimizer=optimizer, scheduler=scheduler, mirror=mirror) or Progress()
    micro = spec.micro_batch_size or spec.batch_size
    log.info("partition %s: %d examples (%d skipped), %d steps (%d per epoch), seed %d, %s on "
             "%d process(es), %s, %s", params.partition, len(catalogue), catalogue.skipped,
             plan.total_steps, plan.steps_per_epoch, seed, spec.method, dist.world,
             dist.device, precision.compute)

    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    reporter = ProgressFile(params, enabled=dist.main)
    bar = _progress_bar(plan.total_steps, state.step, params.partition, main=dist.main)
    log_every = max(1, plan.total_steps // 10)
    try:
        while state.step < plan.total_steps:
            rows = step_rows(catalogue, state.step, dist=dist, batch_size=spec.batch_size,
                             micro_batch_size=micro, seed=seed)
            batches = micro_batches([share[i] for i in rows.mine], count=rows.micro_steps,
                                    size=micro, pad_id=pad_id)
            state.lrs.append(scheduler.get_last_lr()[0])
            loss = train_step(model, optimizer, batches, step_supervised=rows.supervised,
                              pad_id=pad_id, dist=dist, precision=precision,
                              max_grad_norm=spec.max_grad_norm)
            scheduler.step()
            state.step += 1
            state.losses.append(loss)
            state.supervised += rows.supervised
            state.total += rows.total
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if dist.main and (state.step % log_every == 0 or state.step == plan.total_steps):
                log.info("step %d/%d loss %.4f", state.step, plan.total_steps, loss)
            if ((every > 0 and state.step % every == 0) or state.step == plan.total_steps
                    or state.step % plan.steps_per_epoch == 0):
                save_checkpoint(root, identity=identity, dist=dist, model=model,
                                optimizer=optimizer, scheduler=scheduler, progress=state,
                                mirror=mirror)
            reporter.update(state.step, plan.total_steps, loss)
            if progress is not None:
                progress(state.step, plan.total_steps, loss)
    finally:
        bar.close()

    artifact_dir = workdir / "artifact"
    moments = write_artifact(
        artifact_dir, model=model, tokenizer=tokenizer, optimizer=optimizer, dist=dist,
        kind=spec.second_moments, lora=spec.method == "lora", dtype=base_dtype(base_dir),
        shard_bytes=shard_bytes or max_shard_bytes(),
        log_data={"loss": state.losses, "lr": state.lrs, "steps": state.step,
                  "skippedExamples": catalogue.skipped, "processes": dist.world,
                  "seconds": round(time.monotonic() - started, 3)},
    )
    manifest = None
    if dist.main:
        manifest = PartitionManifest(
            run=params.run, run_uid=params.run_uid, partition=params.partition,
            attempt=params.attempt,
            site=params.site, sources=list(counts), base=fingerprint,
            tokens=TokenCounts(supervised=state.supervised, total=state.total),
            weights="lora" if spec.method == "lora" else "full", model_dir="model",
            training={**spec.model_dump(mode="json", by_alias=True), "seed": seed,
                      "steps": plan.total_steps, "stepsPerEpoch": plan.steps_per_epoch,
                      "warmupSteps": plan.warmup_steps, "schedule": spec.schedule,
                      "optimizer": "AdamW", "betas": [0.9, 0.999],
                      "examples": len(catalogue), "skippedExamples": catalogue.skipped,
                      "processes": dist.world, "precision": str(precision.compute)},
            second_moments=moments, files=hash_tree(artifact_dir),
        )
        publish_artifact(params, artifact_dir, manifest)
    remove_checkpoints(root, dist, mirror)
    return PartitionManifest.model_validate_json(
        all_gather(dist, manifest.model_dump_json() if manifest else None)[0])
