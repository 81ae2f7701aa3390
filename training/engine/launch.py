"""The Accelerator for a launch, built from the recipe, and the checks that the launch and the recipe
agree (batch sizes, DeepSpeed's clipping)."""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
)

from training.stages import Recipe, RecipeError


def resolve_precision(precision: str) -> str:
    """The recipe's precision policy as Accelerate's mixed_precision: bf16 where the GPU computes
    it natively (Ampere on; torch counts older cards' emulation as support unless told not to),
    fp32 elsewhere, CPU included (bf16 matmuls there are slow and the demo is small)."""
    if precision == "auto":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        precision = "bf16" if native else "fp32"
    return "no" if precision == "fp32" else precision


def make_accelerator(recipe: Recipe, report_to: str = "none", project_dir: Path | None = None) -> Accelerator:
    """The Accelerator for this launch.

    - split_batches: the recipe's batch_size is the GLOBAL batch; each of N processes gets 1/N of
      every batch, so a run is the same computation on 1 GPU or 8 (see engine/step.py).
    - On CPU, several processes or DeepSpeed need the gloo backend (without it ranks fail or each
      acts as main); GPUs get NCCL by default.
    - Precision comes from the recipe, not the launch config (one source of truth)."""
    # DeepSpeed 0.19 still calls torch.distributed's old collective names; torch warns on every call.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    on_cpu = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or deepspeed
    timeout = timedelta(minutes=recipe.dist_timeout_minutes)
    group = (
        InitProcessGroupKwargs(backend="gloo", timeout=timeout) if on_cpu else InitProcessGroupKwargs(timeout=timeout)
    )
    handlers = [group] if distributed else []
    # One optimizer step is always exactly grad_accum micro-batches, across epoch boundaries too.
    accumulation = GradientAccumulationPlugin(num_steps=recipe.grad_accum, sync_with_dataloader=False)
    # cpu=True turns a torchrun launch on a GPU-less machine into gloo DDP (without it each rank
    # runs alone: doubled work, no gradient averaging); DeepSpeed handles CPU itself and must not get it.
    trackers = [t for t in report_to.split(",") if t and t != "none"]
    return Accelerator(
        cpu=on_cpu and not deepspeed,
        gradient_accumulation_plugin=accumulation,
        log_with=trackers or None,
        project_dir=project_dir,
        mixed_precision=resolve_precision(recipe.precision),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=handlers,
    )


def check_launch(acc: Accelerator, recipe: Recipe) -> None:
    """Fail early, naming the knob, where the launch and the recipe disagree."""
    if recipe.batch_size % acc.num_processes or recipe.eval_batch_size % acc.num_processes:
        raise RecipeError(
            f"recipe '{recipe.name}': batch_size {recipe.batch_size} and eval_batch_size "
            f"{recipe.eval_batch_size} are global and must divide by the {acc.num_processes} processes"
        )
    plugin = acc.state.deepspeed_plugin if acc.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is not None:
        # The recipe owns clipping; a DeepSpeed JSON with "auto" takes it from here (Accelerate
        # would otherwise fill in 1.0), a JSON with a different number is refused.
        clip = plugin.deepspeed_config.get("gradient_clipping", "auto")
        if clip == "auto":
            plugin.deepspeed_config["gradient_clipping"] = recipe.max_grad_norm
        elif float(clip) != recipe.max_grad_norm:
            raise RecipeError(
                f"DeepSpeed config sets gradient_clipping {clip}, the recipe max_grad_norm "
                f'{recipe.max_grad_norm}: set it to "auto" in the JSON'
            )
        if recipe.compile_backend and plugin.zero_stage == 3:
            # measured on 2 CPU processes: ZeRO-3's gather/partition hooks around each layer recompile
            # it until torch gives up (recompile_limit), and the layers then run uncompiled anyway
            raise RecipeError(
                f"recipe '{recipe.name}': torch_compile does not work with ZeRO-3 (its parameter hooks recompile "
                "every layer); use a ZeRO-2 or DDP profile, or set torch_compile: false"
            )
