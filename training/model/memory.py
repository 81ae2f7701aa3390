"""Memory per GPU for one training step, and the largest micro-batch that fits.

Model states (weights, gradients, optimizer state) per hardware profile: DeepSpeed's own
estimators (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`) assume
every parameter trains; they are applied to the parameters that reach the optimizer, and the frozen
ones are added as bf16 weights (replicated under ZeRO-2, partitioned under ZeRO-3, on the CPU
under ZeRO-3 + offload). Byte counts per trainable parameter, as DeepSpeed's estimators state
them: ZeRO-2 2 (bf16 weights, every GPU) + 18 / N (bf16 + fp32 gradients, fp32 master weights,
Adam moments); ZeRO-3 4 x the largest layer (gathered bf16 weights + gradients) + 18 / N. Plain
DDP (no ZeRO, fp32 weights under bf16 autocast) keeps 4 bytes per parameter plus 12 per
trainable one (fp32 gradient, Adam's two moments) on every GPU.

Activations are measured, not modelled: one and two decoder layers of the LLM's own config (its
widths, heads, attention kernel, activation checkpointing, frozen or training) run forward on the
CPU at three lengths, and every tensor autograd keeps for backward is counted once (parameters
excluded). Two layers minus one is a layer's share; a least-squares fit over the lengths splits it
into a part per position and a part per squared row length (eager attention's probabilities; the
block mask sdpa gets for padded or packed rows). Backward needs one layer's activations again as
workspace (twice under checkpointing: recomputed, then their gradients), and the loss holds one
chunk of fp32 logits, their gradient and the bf16 projection (every position labelled, at worst),
and the output slice's weight gradient. What is not counted: the CUDA context and the allocator's
fragmentation (the `usable` allowance below), and the frozen encoder run in the step
(`data.encoder_states: step`; inference only, freed before the LLM runs). Against real steps
(benchmarks/activation_memory.py on the CPU, benchmarks/stage_steps.py on a GPU) the estimate is
1.2-1.3x the measured peak.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass

import numpy as np
import torch

from training.model.loss import chunk_positions

GIB = 1024**3
MEASURE_LENGTHS = (64, 128, 192)
# Of a device's memory, what the estimate may fill: the CUDA context (~0.5-1 GiB, outside
# PyTorch's allocator) and fragmentation of the caching allocator take the rest.
USABLE_SHARE, RESERVED_BYTES = 0.90, GIB
BUDGET_MULTIPLE = 64  # budgets are rounded down to this many positions
# sdpa runs here (the CPU) instead: it keeps the same per-position tensors as flash, and no mask
FLASH_STAND_IN = "sdpa"


# ---------------------------------------------------------------------------------------------
# Model states


@dataclass(frozen=True)
class Memory:
    """Bytes of model states under one profile."""

    profile: str
    weights: int  # per GPU
    grads_optim: int  # per GPU: gradients + fp32 master weights + Adam moments
    gathered: int  # per GPU: ZeRO-3's largest layer gathered whole
    cpu_per_node: int

    @property
    def gpu_total(self) -> int:
        return self.weights + self.grads_optim + self.gathered


def count(params) -> int:
    """Parameters counted once each (a tied embedding/output weight is one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def largest_layer(model: torch.nn.Module) -> int:
    """Most parameters any one module owns directly: what ZeRO-3 gathers at once (here the
    181,120-row embedding)."""
    return max(count(m.parameters(recurse=False)) for m in model.modules())


def memory_per_gpu(trainable: int, frozen: int, largest: int, gpus_per_node: int, nodes: int) -> list[Memory]:
    """Model-state memory per profile; see the module docstring for the byte counts."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world = gpus_per_node * nodes
    out = [Memory("ddp (no ZeRO)", 4 * (trainable + frozen), 12 * trainable, 0, 0)]
    cpu2, gpu2 = estimate_zero2_model_states_mem_needs(trainable, gpus_per_node, nodes, cpu_offload=False)
    out.append(Memory("zero2", 2 * (trainable + frozen), gpu2 - 2 * trainable, 0, cpu2))
    # zero_init=False: the loop loads whole weights and lets prepare() shard them (outside_zero3_init)
    cpu3, gpu3, gathered = estimate_zero3_model_states_mem_needs(
        trainable, largest, gpus_per_node, nodes, cpu_offload=False, cpu_offload_params=False, zero_init=False
    )
    shard = gpu3 - gathered  # DeepSpeed's 18 bytes / N per trainable parameter
    out.append(
        Memory("zero3", 2 * frozen // world + 2 * trainable // world, shard - 2 * trainable // world, gathered, cpu3)
    )
    cpu_off, gpu_off, gathered_off = estimate_zero3_model_states_mem_needs(
        trainable, largest, gpus_per_node, nodes, cpu_offload=True, cpu_offload_params=True, zero_init=False
    )
    out.append(Memory("zero3+offload", 0, gpu_off - gathered_off, gathered_off, cpu_off + 2 * frozen // nodes))
    return out


# ---------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class Activations:
    """Bytes a micro-batch's forward keeps until backward, per position and per squared row length."""

    n_layers: int
    kept: tuple[float, float]  # one layer: (bytes per position, bytes per squared row length)
    whole: tuple[float, float]  # one layer's activations without checkpointing (backward's workspace)
    outside: tuple[float, float]  # outside the layers: rotary tables, final norm, the attention mask
    checkpointing: bool
    loss_width: int  # the widest vocabulary slice the loss projects onto (the text stream's)
    loss_chunk: int  # positions per loss chunk; 0 = all at once
    # the output slice's weight gradient, made whole before it is added to the layer's (width x
    # hidden values of the training dtype); 0 where the output layer is frozen
    head_gradient: int = 0

    def bytes(self, positions: int, row_length: int) -> int:
        """Peak activation bytes for `positions` in rows of at most `row_length` (packed: one row):
        what the forward keeps, backward's workspace, and the loss's chunk."""
        workspace = (2 if self.checkpointing else 1) * self._of(self.whole, positions, row_length)
        return int(self.kept_bytes(positions, row_length) + workspace + self.loss_bytes(positions))

    def kept_bytes(self, positions: int, row_length: int) -> int:
        """What the forward keeps for backward alone."""
        kept = self.n_layers * self._of(self.kept, positions, row_length)
        return int(kept + self._of(self.outside, positions, row_length))

    @staticmethod
    def _of(part: tuple[float, float], positions: int, row_length: int) -> float:
        squares = positions * min(row_length, positions)  # the sum of squared row lengths, at most
        return part[0] * positions + part[1] * squares

    def loss_bytes(self, positions: int) -> int:
        """The loss's largest transient: one chunk's fp32 logits, their gradient and the
        projection's bf16 output (2.5 x the chunk's logits), every position labelled at worst, and
        the output slice's weight gradient."""
        chunk = min(self.loss_chunk or positions, positions)
        return int(2.5 * 4 * self.loss_width * chunk) + self.head_gradient

    def per_position(self) -> float:
        """Bytes per position, the linear part only (what the log and the dry run print)."""
        return self.n_layers * self.kept[0] + (2 if self.checkpointing else 1) * self.whole[0] + self.outside[0]


def measure_activations(
    llm_config,
    attn_implementation: str = "sdpa",
    checkpointing: bool = False,
    layers_train: bool = True,
    packed: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    loss_chunk_mb: float = 256.0,
    text_width: int | None = None,
    head_trains: bool = True,
) -> Activations:
    """Activations of this LLM's decoder layers, measured on the CPU (see the module docstring).
    `text_width`: the text stream's vocabulary slice (the widest the loss projects onto);
    `head_trains`: whether the output layer gets gradients (it does with train_text_specials too)."""
    key = json.dumps(llm_config.to_dict(), sort_keys=True, default=str)
    attn = FLASH_STAND_IN if attn_implementation == "flash_attention_2" else attn_implementation
    kept = _layer_bytes(key, attn, checkpointing, layers_train, packed, str(dtype))
    whole = _layer_bytes(key, attn, False, layers_train, packed, str(dtype)) if checkpointing else kept
    if attn_implementation == "flash_attention_2":  # varlen kernels: no mask, nothing quadratic
        kept, whole = _linear_only(kept), _linear_only(whole)
    width = text_width if text_width is not None else llm_config.vocab_size
    return Activations(
        n_layers=llm_config.num_hidden_layers,
        kept=kept[1],
        whole=whole[1],
        outside=kept[0],
        checkpointing=checkpointing,
        loss_width=width,
        loss_chunk=chunk_positions(loss_chunk_mb, width),
        head_gradient=width * llm_config.hidden_size * dtype.itemsize if head_trains else 0,
    )


@functools.lru_cache(maxsize=32)
def _layer_bytes(
    config_json: str, attn: str, checkpointing: bool, layers_train: bool, packed: bool, dtype: str
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(outside the layers, one layer): each (bytes per position, bytes per squared row length)."""
    raw = json.loads(config_json)
    kept = np.array(
        [
            [_kept_bytes(raw, attn, checkpointing, layers_train, packed, dtype, length, n) for n in (1, 2)]
            for length in MEASURE_LENGTHS
        ],
        dtype=np.float64,
    )
    lengths = np.array(MEASURE_LENGTHS, dtype=np.float64)
    design = np.stack([lengths, lengths**2], axis=1)

    def fit(values: np.ndarray) -> tuple[float, float]:
        (linear, square), *_ = np.linalg.lstsq(design, values, rcond=None)
        return float(linear), max(0.0, float(square))

    one_layer = kept[:, 1] - kept[:, 0]
    return fit(kept[:, 0] - one_layer), fit(one_layer)


def _linear_only(parts: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
    return tuple((part[0], 0.0) for part in parts)


def _kept_bytes(
    raw: dict, attn: str, checkpointing: bool, layers_train: bool, packed: bool, dtype: str, length: int, layers: int
) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = copy.deepcopy(raw)
    raw.pop("layer_types", None)  # one per layer: rebuilt for the depth measured
    config = AutoConfig.for_model(**(raw | {"num_hidden_layers": layers}))
    config.vocab_size = 64  # the embedding plays no part: the input comes as embeddings
    torch_dtype = getattr(torch, dtype.removeprefix("torch."))
    generator_state = torch.random.get_rng_state()
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch_dtype)
    finally:
        torch.random.set_rng_state(generator_state)  # measuring must not move the run's random stream
    model.requires_grad_(layers_train)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            kept[storage._cdata] = storage.nbytes()
        return tensor

    # the adapter's output trains in every stage, so backward always runs through the layers
    x = torch.zeros(1, length, config.hidden_size, dtype=torch_dtype, requires_grad=True)
    half = length // 2
    if packed:  # two samples in one row: position ids restart, attention stays within each
        inputs = {"position_ids": torch.cat([torch.arange(half), torch.arange(length - half)])[None]}
    else:  # a padded row: the mask with its padding, as the padded batches give it
        inputs = {"attention_mask": torch.cat([torch.ones(length - 1), torch.zeros(1)]).long()[None]}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(inputs_embeds=x, use_cache=False, **inputs)
    return sum(kept.values())


# ---------------------------------------------------------------------------------------------
# The budget


def usable_bytes(device_bytes: int) -> int:
    """What the estimate may fill of a device's memory (see USABLE_SHARE)."""
    return max(0, int(USABLE_SHARE * device_bytes) - RESERVED_BYTES)


def largest_budget(capacity: int, states: int, activations: Activations, row_length: int | None) -> int:
    """The most positions per micro-batch (a multiple of BUDGET_MULTIPLE) whose model states and
    activations fit `capacity` bytes; row_length None = packed (one row of them all). 0: none fits."""

    def fits(positions: int) -> bool:
        row = positions if row_length is None else row_length
        return states + activations.bytes(positions, row) <= capacity

    low, high = 0, BUDGET_MULTIPLE
    while fits(high):
        low, high = high, 2 * high
        if high > 2**26:  # 64 M positions: beyond any real budget (a tiny model on a large device)
            return low
    while high - low > BUDGET_MULTIPLE:
        middle = (low + high) // 2 // BUDGET_MULTIPLE * BUDGET_MULTIPLE
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
