"""`tokens_per_micro_batch: auto`: the most positions per micro-batch this process's memory holds.

The same estimate as the dry run (model/memory.py), made for the run at hand: the model as this
stage trains it, the ZeRO stage and process count of the launch, the recipe's attention kernel,
checkpointing, packing and loss chunk, and the GPU's own memory (or `device_memory_gib`). Every
process measures the same activations on the CPU and so chooses the same number.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch
from accelerate import Accelerator

from training.model import OmniModel
from training.model.dry_run import longest_row
from training.model.memory import (
    BUDGET_MULTIPLE,
    GIB,
    Activations,
    Memory,
    count,
    largest_budget,
    largest_layer,
    measure_activations,
    memory_per_gpu,
    usable_bytes,
)
from training.stages import Recipe, RecipeError


def zero_profile(acc: Accelerator) -> str:
    """The model-state profile (model/memory.py's names) of this launch."""
    plugin = acc.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage < 2:  # ZeRO-0/1 keep whole gradients: DDP's count is the closer
        return "ddp (no ZeRO)"
    if plugin.zero_stage == 2:
        return "zero2"
    offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
    return "zero3+offload" if offload in ("cpu", "nvme") else "zero3"


def device_capacity(acc: Accelerator, recipe: Recipe) -> tuple[int, str]:
    """Bytes the budget may fill, and where the figure comes from."""
    if recipe.device_memory_gib is not None:
        return int(recipe.device_memory_gib * GIB), f"device_memory_gib {recipe.device_memory_gib:g}"
    if acc.device.type != "cuda":
        raise RecipeError(
            "tokens_per_micro_batch 'auto' sizes micro-batches to a GPU's memory, and this process runs on "
            f"{acc.device.type}: give device_memory_gib (GiB it may fill) or a number of positions"
        )
    total = torch.cuda.get_device_properties(acc.device).total_memory
    name = torch.cuda.get_device_name(acc.device)
    return usable_bytes(total), f"{name}: {total / GIB:.1f} GiB, 90 % less 1 GiB"


def step_estimate(acc: Accelerator, recipe: Recipe, model: OmniModel) -> tuple[Memory, Activations]:
    """This process's model states under the launch's profile, and the activations of the model as
    this stage trains it with the recipe's knobs (before accelerate.prepare)."""
    trainable = count(p for p in model.parameters() if p.requires_grad)
    frozen = count(model.parameters()) - trainable
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
    nodes = max(1, acc.num_processes // per_node)
    states = {m.profile: m for m in memory_per_gpu(trainable, frozen, largest_layer(model), per_node, nodes)}
    activations = measure_activations(
        model.llm.config,
        recipe.attn_implementation,
        recipe.activation_checkpointing,
        layers_train=any(p.requires_grad for p in model.llm.model.layers.parameters()),
        packed=recipe.packing,
        dtype=torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float32,
        loss_chunk_mb=recipe.loss_chunk_mb,
        text_width=model.layout.stream_slices()[0][1],
        head_trains=model.llm.lm_head.weight.requires_grad,
    )
    return states[zero_profile(acc)], activations


def resolve_token_budget(acc: Accelerator, recipe: Recipe, model: OmniModel, log: Callable[[str], None]) -> Recipe:
    """The recipe with "auto" replaced by the chosen number (any other recipe unchanged)."""
    if recipe.tokens_per_micro_batch != "auto":
        return recipe
    capacity, source = device_capacity(acc, recipe)
    states, activations = step_estimate(acc, recipe, model)
    row = None if recipe.packing else longest_row(model.encoder.config.max_source_positions, model.config.frame_stack)
    budget = largest_budget(capacity, states.gpu_total, activations, row)
    figures = (
        f"{capacity / GIB:.2f} GiB to fill ({source}): model states {states.gpu_total / GIB:.2f} GiB "
        f"({states.profile}, {acc.num_processes} process(es)), activations {activations.per_position() / 2**20:.3f} "
        "MiB per position (measured on this model's layers)"
    )
    if budget == 0:
        raise RecipeError(
            f"tokens_per_micro_batch 'auto': not even {BUDGET_MULTIPLE} positions fit; {figures} + the loss's "
            f"{activations.loss_bytes(2**30) / 2**20:.0f} MiB chunk (lower loss_chunk_mb)"
        )
    used = activations.bytes(budget, budget if row is None else row)
    log(f"tokens_per_micro_batch auto: {budget:,} positions per process ({figures}, {used / GIB:.2f} GiB at it)")
    return dataclasses.replace(recipe, tokens_per_micro_batch=budget)
