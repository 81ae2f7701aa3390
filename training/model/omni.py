"""Whisper encoder + gated-MLP adapter + Qwen2 LLM with Mini-Omni's 8-stream vocabulary: the
architecture, its loss, and the batch keys its forward takes. Building, loading and saving it:
training/model/build.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2ForCausalLM
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from training.model.loss import chunk_positions, stream_cross_entropy
from training.speech.layout import IGNORE, N_AUDIO_LAYERS, TEXT_ROW, VocabLayout


class GatedAdapter(nn.Module):
    """SwiGLU-style MLP from (stacked) encoder frames to the LLM width."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(in_dim, hidden, bias=False)
        self.up = nn.Linear(in_dim, hidden, bias=False)
        self.down = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


@dataclass(frozen=True)
class OmniConfig:
    """What a stage-final export needs to rebuild the whole model."""

    encoder: str  # path or hub id of the (frozen, never modified) Whisper checkpoint
    text_vocab: int  # the LLM's text vocabulary before Mini-Omni's growth
    frame_stack: int
    adapter_in: int
    adapter_hidden: int
    adapter_out: int

    @classmethod
    def for_parts(
        cls,
        encoder: str,
        encoder_width: int,
        text_vocab: int,
        llm_width: int,
        frame_stack: int,
        adapter_hidden: int | None,
    ) -> OmniConfig:
        """The one place an OmniConfig is made from its parts: the adapter maps frame_stack stacked
        encoder frames to the LLM width, 4 x that width wide unless given."""
        return cls(
            encoder=encoder,
            text_vocab=text_vocab,
            frame_stack=frame_stack,
            adapter_in=encoder_width * frame_stack,
            adapter_hidden=adapter_hidden or 4 * llm_width,
            adapter_out=llm_width,
        )

    @property
    def hidden_size(self) -> int:
        """The LLM width; DeepSpeed's "auto" bucket sizes are derived from it."""
        return self.adapter_out


class OmniModel(nn.Module):
    def __init__(self, encoder: WhisperEncoder, llm: Qwen2ForCausalLM, config: OmniConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.llm = llm
        self.config = config
        self.layout = VocabLayout(text_vocab=config.text_vocab)
        self.adapter = GatedAdapter(config.adapter_in, config.adapter_hidden, config.adapter_out)
        self.encoder.requires_grad_(False)
        self.loss_chunk_mb = 0.0  # all at once, unless the run sets the recipe's (model/loss.py)

    # -- speech side -------------------------------------------------------------------------

    @property
    def n_mel_frames(self) -> int:
        """Mel frames the encoder expects (it only accepts full windows)."""
        return 2 * self.encoder.config.max_source_positions

    @torch.no_grad()
    def encode(self, input_features: torch.Tensor) -> torch.Tensor:
        """Frozen encoder states [B, max_source_positions, d]; callers cut each row to its length."""
        self.encoder.eval()
        return self.encoder(input_features=input_features).last_hidden_state

    def _adapter_frames(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Stack frame_stack frames per adapter input, run the adapter; return valid frames [N, d]."""
        k = self.config.frame_stack
        b, f, d = states.shape
        pad = (-f) % k
        if pad:
            states = F.pad(states, (0, 0, 0, pad))
        stacked = states.reshape(b, (f + pad) // k, d * k)
        adapter_param = next(self.adapter.parameters())
        out = self.adapter(stacked.to(adapter_param.dtype))
        n_valid = torch.div(lengths + k - 1, k, rounding_mode="floor")  # n_adapter_frames, batched
        valid = torch.arange(out.shape[1], device=out.device)[None, :] < n_valid[:, None]
        return out[valid]

    def embed(
        self,
        input_ids: torch.Tensor,
        audio_mask: torch.Tensor,
        encoder_states: torch.Tensor | None,
        encoder_lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mean of the 8 streams' embeddings; at speech positions the adapter output stands in for
        every audio stream (the text stream keeps its pad_t)."""
        tokens = self.llm.get_input_embeddings()(input_ids)  # [B, 8, T, d]
        x = tokens.mean(dim=1)
        if self.training and not bool(audio_mask.any()) and any(p.requires_grad for p in self.adapter.parameters()):
            # A batch of text-only rows: touch the adapter (zero contribution) so that DDP and
            # ZeRO see every trainable parameter in every step's graph.
            x = x + 0.0 * self.adapter(x.new_zeros(1, 1, self.config.adapter_in)).sum()
        if encoder_states is not None and bool(audio_mask.any()):
            frames = self._adapter_frames(encoder_states, encoder_lengths)
            if frames.shape[0] != int(audio_mask.sum()):
                raise ValueError(f"{frames.shape[0]} adapter frames for {int(audio_mask.sum())} speech positions")
            speech = (N_AUDIO_LAYERS * frames.to(x.dtype) + tokens[:, TEXT_ROW][audio_mask]) / (N_AUDIO_LAYERS + 1)
            x = x.clone()
            x[audio_mask] = speech
        return x

    # -- training ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        audio_mask: torch.Tensor,
        encoder_states: torch.Tensor | None = None,
        encoder_lengths: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sample_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss = mean over streams (that have labels) of each stream's token-mean CE.

        Also returns per-row, per-stream CE sums and label counts ([B, 8]), so a caller can
        normalize by the token count of the whole global batch (identical losses on 1 or N
        processes) and score each evaluation row exactly once.

        Logits are computed only at labelled positions (the other ~90 % of a speech batch never
        needs the 181k-wide output projection), one stream's slice of the vocabulary at a time, and
        at most `loss_chunk_mb` of logits at a time (model/loss.py): the full logits never exist.

        A packed batch (data/packing.py) holds several samples per row: position_ids restart at
        each sample (transformers then keeps attention within a sample, the attention mask left
        out), and sample_index [B, T] names each position's sample; the per-row figures are then
        per sample, in the order of encoder_lengths.
        """
        if encoder_states is None and input_features is not None:
            # the frozen encoder in the step (data/stream.py): log-mel in, states out, no gradients
            with torch.no_grad():
                states = self.encode(input_features.to(next(self.encoder.parameters()).dtype))
                # frames past each clip's end are zero, as in cached states (a stacked group may straddle it)
                frames = torch.arange(states.shape[1], device=states.device)[None, :, None]
                encoder_states = states * (frames < encoder_lengths[:, None, None].to(states.device))
        x = self.embed(input_ids, audio_mask, encoder_states, encoder_lengths)
        packed = position_ids is not None
        hidden = self.llm.model(
            inputs_embeds=x,
            attention_mask=None if packed else attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        targets = labels[:, :, 1:].permute(0, 2, 1)  # [B, T-1, 8]: position t predicts t+1
        scored = (targets != IGNORE).any(dim=-1)
        # the row (or, packed, the sample) of each scored position
        rows = sample_index[:, :-1][scored] if packed else scored.nonzero()[:, 0]
        n_rows = encoder_lengths.shape[0] if packed else labels.shape[0]
        hidden = hidden[:, :-1][scored]  # [N, d]
        targets = targets[scored]  # [N, 8]
        n_streams = N_AUDIO_LAYERS + 1
        row_sums = hidden.new_zeros(n_rows, n_streams, dtype=torch.float32)
        row_counts = hidden.new_zeros(n_rows, n_streams, dtype=torch.float32)
        # greedy accuracy, for audio streams on SNAC code positions only (not pads and eoa)
        row_correct = hidden.new_zeros(n_rows, n_streams, dtype=torch.float32)
        row_judged = hidden.new_zeros(n_rows, n_streams, dtype=torch.float32)
        # A ZeRO-3-sharded output layer gathers its weight in each call of its forward, a collective:
        # every rank must make the same calls, so each stream is projected (once, unchunked) even
        # where this rank has no labels for it
        sharded_head = self.head_is_sharded
        for stream, (start, end) in enumerate(self.layout.stream_slices()):
            keep = targets[:, stream] != IGNORE
            if sharded_head or bool(keep.any()):
                target = targets[keep, stream] - start
                ce, predicted = stream_cross_entropy(
                    lambda h, start=start, end=end: self.stream_logits(h, start, end),
                    hidden[keep],
                    target,
                    0 if sharded_head else chunk_positions(self.loss_chunk_mb, end - start),
                )
                row_sums[:, stream] = row_sums[:, stream].index_add(0, rows[keep], ce)
                row_counts[:, stream] = row_counts[:, stream].index_add(0, rows[keep], torch.ones_like(ce))
                judged = (
                    (target < self.layout.audio_codes)
                    if stream != TEXT_ROW
                    else torch.ones_like(target, dtype=torch.bool)
                )
                hit = ((predicted == target) & judged).float()
                row_correct[:, stream] = row_correct[:, stream].index_add(0, rows[keep], hit)
                row_judged[:, stream] = row_judged[:, stream].index_add(0, rows[keep], judged.float())
        sums, counts = row_sums.sum(0), row_counts.sum(0)
        present = counts > 0
        loss = (sums[present] / counts[present]).mean() if bool(present.any()) else hidden.sum() * 0.0
        return {
            "loss": loss,
            "row_loss_sum": row_sums,
            "row_count": row_counts,
            "row_correct": row_correct,
            "row_judged": row_judged,
        }

    def set_llm_options(
        self, attn_implementation: str, activation_checkpointing: bool, compile_backend: str | None = None
    ) -> None:
        """The LLM's attention kernel ("sdpa", "eager", or "flash_attention_2" where the flash-attn
        package is installed: variable-length attention over packed rows), activation
        checkpointing of its decoder layers (recomputed in backward: less memory, ~1/3 more compute),
        and torch.compile of each decoder layer with `compile_backend` ("inductor": fused kernels;
        shapes marked dynamic, since token-budget micro-batches vary in length). The layers share one
        compiled graph (parameters are graph inputs); the embedding, the loss and the rest stay eager."""
        self.llm.set_attn_implementation(attn_implementation)
        if activation_checkpointing:
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if compile_backend:
            for layer in self.llm.model.layers:
                layer.compile(backend=compile_backend, dynamic=True)

    @property
    def head_is_sharded(self) -> bool:
        """Whether ZeRO-3 partitions the output layer (its weight is whole only inside its forward)."""
        return hasattr(self.llm.lm_head.weight, "ds_id")

    def stream_logits(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Logits over one stream's slice of the vocabulary. Multiplying by just that slice of the
        output rows is up to 28x cheaper than the full 181k-wide projection; a ZeRO-3-partitioned
        weight is only whole inside the module's own forward, so there it projects fully."""
        head = self.llm.lm_head
        if self.head_is_sharded:
            return head(hidden)[..., start:end]
        return F.linear(hidden, head.weight[start:end], None if head.bias is None else head.bias[start:end])


MODEL_KEYS = (
    "input_ids",
    "labels",
    "attention_mask",
    "audio_mask",
    "encoder_states",
    "encoder_lengths",
    "input_features",
    "position_ids",
    "sample_index",
)


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The keys of a collated batch that OmniModel.forward takes (encoder states, or log-mel
    features when the encoder runs in the step)."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}
