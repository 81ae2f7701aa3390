"""The model's FLOPs: one training step of the LLM side, and the frozen encoder's forward.

The one count behind the training log's MFU (engine/mfu.py) and the dry run's data cost
(dry_run.py). Counted are the matrix products, multiply-add = 2 FLOPs, as torch's FLOP counter
counts them; norms, biases, activation functions and the embedding lookup are elementwise or
lookups and left out.

A step, per real (attended) position of the LLM:
- the transformer body's weight matrices: forward 2N, backward through the activations 2N, and 2N
  more for the weight gradients of the part that trains (a frozen LLM, as in `asr`, costs 4N, not 6N);
- attention scores and their weighted sum: 4 x layers x width x the length of the position's own
  sample forward (a step's total: each sample's length squared, summed, since packed samples attend
  only within themselves), three times that in training;
- the output projection at labelled positions only, over each stream's slice of the vocabulary
  (that is all the loss computes), 4 or 6 FLOPs per weight as above;
- the adapter on speech positions: forward, and where it trains its weight gradients and the input
  gradient of its last layer (its own input, the frozen encoder's states, needs none).
Padding and the frozen encoder are not part of a step's useful work.

The encoder's forward runs over its whole window (every clip is padded to it): its two
convolutions (the first over the mel frames, twice as many as its positions), its layers' weight
matrices and their attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from training.model.build import row_tables
from training.model.omni import OmniModel


def _matrices(module: torch.nn.Module) -> list[torch.Tensor]:
    """The weights that enter matrix products (2-D and up): not norms, not biases."""
    return [p for p in module.parameters() if p.ndim >= 2]


@dataclass(frozen=True)
class StepFlops:
    body: int  # LLM weight matrices outside the embedding and output tables
    body_trainable: int
    layers: int
    attention_width: int  # heads x head size: the width of the scores' and weighted sum's products
    hidden: int
    head_trainable: bool
    stream_widths: tuple[int, ...]  # vocabulary slice per stream, in label-row order
    adapter: int
    adapter_out: int  # the adapter's last layer
    adapter_trainable: bool

    @classmethod
    def of(cls, model: OmniModel) -> StepFlops:
        """From the whole model as this stage trains it (before a ZeRO-3 prepare partitions its weights)."""
        tables = {id(t) for t in row_tables(model.llm)}
        body = [p for p in _matrices(model.llm) if id(p) not in tables]
        config = model.llm.config
        head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            body=sum(p.numel() for p in body),
            body_trainable=sum(p.numel() for p in body if p.requires_grad),
            layers=config.num_hidden_layers,
            attention_width=config.num_attention_heads * head_size,
            hidden=config.hidden_size,
            head_trainable=model.llm.get_output_embeddings().weight.requires_grad,
            stream_widths=tuple(end - start for start, end in model.layout.stream_slices()),
            adapter=sum(p.numel() for p in _matrices(model.adapter)),
            adapter_out=sum(p.numel() for p in _matrices(model.adapter.down)),
            adapter_trainable=any(p.requires_grad for p in model.adapter.parameters()),
        )

    def of_step(
        self, *, positions: float, squared_lengths: float, stream_tokens: list[float], speech_positions: float
    ) -> float:
        """FLOPs of one optimizer step (all ranks) over `positions` real positions of samples whose
        lengths squared sum to `squared_lengths` (squared_sample_lengths)."""
        body = (4 * self.body + 2 * self.body_trainable) * positions
        attention = 3 * 4 * self.layers * self.attention_width * squared_lengths
        per_weight = 6 if self.head_trainable else 4
        head = sum(per_weight * self.hidden * w * n for w, n in zip(self.stream_widths, stream_tokens))
        adapter_backward = 2 * self.adapter + 2 * self.adapter_out if self.adapter_trainable else 0
        adapter = (2 * self.adapter + adapter_backward) * speech_positions
        return body + attention + head + adapter


def squared_sample_lengths(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each sample's real length squared, summed over a micro-batch's model inputs ([1], float):
    a padded row is one sample of its attended positions; a packed row holds one sample per run of
    position ids 0..L-1 (data/packing.py), whose (2 x id + 1) sum to L squared: no search for the
    runs, so no host-device sync in the step."""
    position_ids, attention = inputs.get("position_ids"), inputs["attention_mask"]
    if position_ids is None:
        return (attention.sum(-1).double() ** 2).sum().float()[None]
    return ((2 * position_ids + 1) * attention).sum().float()[None]


def encoder_forward_flops(encoder: WhisperEncoder) -> int:
    """FLOPs of the Whisper encoder's forward over one clip padded to its whole window."""
    positions = encoder.config.max_source_positions
    convolutions = 2 * encoder.conv1.weight.numel() + encoder.conv2.weight.numel()  # conv1: 2 mel frames a position
    layers = sum(p.numel() for p in _matrices(encoder.layers))
    attention = 4 * encoder.config.encoder_layers * encoder.config.d_model * positions**2
    return 2 * (convolutions + layers) * positions + attention
