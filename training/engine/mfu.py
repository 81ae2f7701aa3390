"""Model FLOPs of a training step, and MFU: those FLOPs per second over the devices' dense bf16 peak.

Counted (multiply-add = 2 FLOPs), per real (attended) position of the LLM:
- the transformer body's weights: forward 2N, backward through the activations 2N, and 2N more for
  the weight gradients of the part that trains (a frozen LLM, as in `asr`, costs 4N, not 6N);
- attention scores and their weighted sum: 4 x layers x hidden x the batch's mean row length forward,
  three times that in training;
- the output projection at labelled positions only, over each stream's slice of the vocabulary
  (that is all the loss computes), 4 or 6 FLOPs per weight as above;
- the adapter on speech positions: forward, weight gradients, and the input gradient of its last
  layer only (its own input, the frozen encoder's states, needs none).
Padding, the embedding lookup and the frozen encoder (cached, or run in the step without gradients)
are not counted: MFU is the useful work. The peak comes from a small table by device name, or from
OMNI_STAGE_PEAK_TFLOPS (TFLOP/s per device) for a device it lacks; without a peak (CPU) only the
achieved TFLOP/s is logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from training.model import OmniModel, row_tables

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s; more specific names first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
PEAK_ENV = "OMNI_STAGE_PEAK_TFLOPS"


def device_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of one device, TFLOP/s; None when unknown (CPU, or a GPU not in the table)."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def throughput(flops: float, seconds: float, processes: int, peak_tflops: float | None) -> dict[str, float]:
    """Model TFLOP/s per device over `seconds`, and MFU where the device's peak is known."""
    tflops = flops / seconds / processes / 1e12
    return {"model_tflops_per_s": tflops, **({"mfu": tflops / peak_tflops} if peak_tflops else {})}


@dataclass(frozen=True)
class StepFlops:
    body: int  # LLM weights outside the embedding and output tables
    body_trainable: int
    layers: int
    hidden: int
    head_trainable: bool
    stream_widths: tuple[int, ...]  # vocabulary slice per stream, in label-row order
    adapter: int
    adapter_out: int  # the adapter's last layer

    @classmethod
    def of(cls, model: OmniModel) -> StepFlops:
        """From the whole model (before a ZeRO-3 prepare partitions its weights)."""
        tables = {id(t) for t in row_tables(model.llm)}
        body = [p for p in model.llm.parameters() if id(p) not in tables]
        config = model.llm.config
        return cls(
            body=sum(p.numel() for p in body),
            body_trainable=sum(p.numel() for p in body if p.requires_grad),
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            head_trainable=model.llm.get_output_embeddings().weight.requires_grad,
            stream_widths=tuple(end - start for start, end in model.layout.stream_slices()),
            adapter=sum(p.numel() for p in model.adapter.parameters()),
            adapter_out=sum(p.numel() for p in model.adapter.down.parameters()),
        )

    def of_step(self, positions: float, rows: float, stream_tokens: list[float], speech_positions: float) -> float:
        """FLOPs of one optimizer step over `positions` real positions in `rows` rows (all ranks)."""
        mean_length = positions / max(rows, 1.0)
        body = (4 * self.body + 2 * self.body_trainable) * positions
        attention = 3 * 4 * self.layers * self.hidden * mean_length * positions
        per_weight = 6 if self.head_trainable else 4
        head = sum(per_weight * self.hidden * w * n for w, n in zip(self.stream_widths, stream_tokens))
        # the adapter trains, but its input (the frozen encoder's states) needs no gradient
        adapter = (4 * self.adapter + 2 * self.adapter_out) * speech_positions
        return body + attention + head + adapter
