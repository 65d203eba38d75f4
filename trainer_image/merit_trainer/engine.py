"""The training engine: PyTorch FSDP2 around a Hugging Face model, one optimizer step at a time.

With more than one process the model is fully sharded with `fully_shard` (FSDP2): each
transformer layer is its own unit (the classes the model lists in `_no_split_modules`), then
the root. Parameters and AdamW state stay fp32 (master weights); with bf16 the layers compute
in bf16 and reduce gradients in fp32 (FSDP2's MixedPrecisionPolicy; autocast with one process).
One process needs no wrapper. Gradients are summed across ranks (FSDP2's default mean is
switched off) and every micro-batch's summed token loss is divided by the supervised-token
count of the whole step over all ranks, so the gradient is the single-process gradient
whatever the number of ranks and micro-batches. A per-rank mean would weigh a rank's tokens by
how many its batch happened to hold, which moves Adam's second moments by tens of percent.
This module knows nothing of data files, checkpoints or artifacts.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from meritrun.api import TrainingSpec
from meritrun.textenc import Encoded, collate, token_losses

from .dist import Dist, all_sum

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """What the forward and backward compute in (master weights are always fp32)."""

    compute: torch.dtype

    @property
    def mixed(self) -> bool:
        return self.compute != torch.float32


def choose_precision(setting: str, device: torch.device) -> Precision:
    """auto: bf16 on GPUs, fp32 on CPUs (bf16 matmuls on most CPUs are slower, not faster)."""
    if setting == "bf16" or (setting == "auto" and device.type == "cuda"):
        return Precision(torch.bfloat16)
    return Precision(torch.float32)


def set_tf32(device: torch.device, precision: Precision) -> None:
    """TF32 matmuls on GPUs for mixed precision only: `precision: fp32` asks for IEEE fp32
    (TF32 keeps 10 mantissa bits), and gets the same arithmetic as on a CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision.mixed
        torch.backends.cudnn.allow_tf32 = precision.mixed


def layer_classes(model: torch.nn.Module) -> set[type]:
    """The transformer-layer classes to wrap: those the model declares unsplittable."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def prepare_model(model: torch.nn.Module, *, spec: TrainingSpec, dist: Dist,
                  precision: Precision) -> torch.nn.Module:
    """Gradient checkpointing, then FSDP2 sharding when there is more than one process."""
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # LoRA: frozen embeddings still need a grad path
    model.to(dist.device)
    if not dist.sharded:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=torch.float32)
    wrapped = layer_classes(model)
    if not wrapped:
        log.warning("%s declares no transformer-layer classes; sharding it as one unit",
                    type(model).__name__)
    for module in list(model.modules()):
        if type(module) in wrapped:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not mean: see the module docstring
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def make_optimizer(model: torch.nn.Module, spec: TrainingSpec) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay,
                             betas=(0.9, 0.999))


def _autocast(dist: Dist, precision: Precision):
    if dist.sharded or not precision.mixed:  # FSDP2's policy already casts the layers
        return contextlib.nullcontext()
    return torch.autocast(dist.device.type, dtype=precision.compute)


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro: list[list[Encoded]], *,
    step_supervised: int, pad_id: int, dist: Dist, precision: Precision,
    max_grad_norm: float | None,
) -> float:
    """Forward/backward every micro-batch, clip, step; return the step's global mean loss.

    `step_supervised` is the supervised-token count of the whole step over all ranks: the
    divisor of every micro-batch's summed loss.
    """
    optimizer.zero_grad(set_to_none=True)
    denominator = float(max(1, step_supervised))
    summed = torch.zeros((), dtype=torch.float64)
    for rows in micro:
        batch = {k: t.to(dist.device) for k, t in collate(rows, pad_id=pad_id).items()}
        with _autocast(dist, precision):
            losses, _ = token_losses(model, batch)
        loss = losses.sum()
        (loss / denominator).backward()
        summed += loss.detach().to(torch.float64).cpu()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       max_grad_norm)
    optimizer.step()
    return float(all_sum(dist, summed)) / denominator
