"""Whisper encoder + gated-MLP adapter + Qwen2 LLM with Mini-Omni's 8-stream vocabulary.

The pretrained parts load by local path or hub id through transformers, the same way for the
real checkpoints (openai/whisper-small, Qwen/Qwen2-0.5B) and for the demo's tiny stand-ins.
A stage-final export (``save_omni``) reloads with ``load_omni``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2ForCausalLM, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from training.layout import IGNORE, N_AUDIO_LAYERS, TEXT_ROW, VocabLayout

OMNI_CONFIG = "omni_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


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

    def embed(self, input_ids: torch.Tensor, audio_mask: torch.Tensor, encoder_states: torch.Tensor | None,
              encoder_lengths: torch.Tensor | None) -> torch.Tensor:
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

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                audio_mask: torch.Tensor, encoder_states: torch.Tensor | None = None,
                encoder_lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss = mean over streams (that have labels) of each stream's token-mean CE.

        Also returns per-row, per-stream CE sums and label counts ([B, 8]), so a caller can
        normalize by the token count of the whole global batch (identical losses on 1 or N
        processes) and score each evaluation row exactly once.

        Logits are computed only at labelled positions: the other ~90 % of a speech batch never
        needs the 181k-wide output projection.
        """
        x = self.embed(input_ids, audio_mask, encoder_states, encoder_lengths)
        hidden = self.llm.model(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, :, 1:].permute(0, 2, 1)  # [B, T-1, 8]: position t predicts t+1
        scored = (targets != IGNORE).any(dim=-1)
        rows = scored.nonzero()[:, 0]  # batch row of each scored position
        hidden = hidden[:, :-1][scored]  # [N, d]
        targets = targets[scored]  # [N, 8]
        n_streams = N_AUDIO_LAYERS + 1
        row_sums = hidden.new_zeros(labels.shape[0], n_streams, dtype=torch.float32)
        row_counts = hidden.new_zeros(labels.shape[0], n_streams, dtype=torch.float32)
        # greedy accuracy, for audio streams on SNAC code positions only (not pads and eoa)
        row_correct = hidden.new_zeros(labels.shape[0], n_streams, dtype=torch.float32)
        row_judged = hidden.new_zeros(labels.shape[0], n_streams, dtype=torch.float32)
        for stream, (start, end) in enumerate(self.layout.stream_slices()):
            keep = targets[:, stream] != IGNORE
            if bool(keep.any()):
                logits = self.stream_logits(hidden[keep], start, end).float()
                target = targets[keep, stream] - start
                ce = F.cross_entropy(logits, target, reduction="none")
                row_sums[:, stream] = row_sums[:, stream].index_add(0, rows[keep], ce)
                row_counts[:, stream] = row_counts[:, stream].index_add(0, rows[keep], torch.ones_like(ce))
                judged = (target < self.layout.audio_codes) if stream != TEXT_ROW else torch.ones_like(target, dtype=torch.bool)
                hit = ((logits.detach().argmax(-1) == target) & judged).float()
                row_correct[:, stream] = row_correct[:, stream].index_add(0, rows[keep], hit)
                row_judged[:, stream] = row_judged[:, stream].index_add(0, rows[keep], judged.float())
        sums, counts = row_sums.sum(0), row_counts.sum(0)
        present = counts > 0
        loss = (sums[present] / counts[present]).mean() if bool(present.any()) else hidden.sum() * 0.0
        return {"loss": loss, "row_loss_sum": row_sums, "row_count": row_counts, "row_correct": row_correct,
                "row_judged": row_judged}

    def stream_logits(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Logits over one stream's slice of the vocabulary. Multiplying by just that slice of the
        output rows is up to 28x cheaper than the full 181k-wide projection; a ZeRO-3-partitioned
        weight is only whole inside the module's own forward, so there it projects fully."""
        head = self.llm.lm_head
        if hasattr(head.weight, "ds_id"):
            return head(hidden)[..., start:end]
        return F.linear(hidden, head.weight[start:end], None if head.bias is None else head.bias[start:end])


# ---------------------------------------------------------------------------------------------
# Loading and saving


@contextmanager
def outside_zero3_init() -> Iterator[None]:
    """Load whole weights even under a ZeRO-3 launch (no deepspeed.zero.Init): Whisper's weight
    init computes its sinusoidal positions from the parameter's shape, which is empty once
    partitioned, and growing the vocabulary reads the pretrained rows. Whisper-small and
    Qwen2-0.5B fit any host; accelerator.prepare() then shards them across ranks."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_encoder(path: str) -> tuple[WhisperEncoder, WhisperFeatureExtractor]:
    """A Whisper encoder and its feature extractor from a checkpoint folder or hub id."""
    whisper = WhisperModel.from_pretrained(path)
    encoder = whisper.get_encoder()
    del whisper.decoder
    return encoder, WhisperFeatureExtractor.from_pretrained(path)


def row_tables(llm: Qwen2ForCausalLM) -> list[torch.Tensor]:
    """The input embedding and output projection weights, once each (Qwen2-0.5B ties them)."""
    weights = (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight)
    return list({id(w): w for w in weights}.values())


def grow_vocabulary(llm: Qwen2ForCausalLM, layout: VocabLayout) -> None:
    """Grow the LLM's embedding and output rows to Mini-Omni's vocabulary. New rows start at the
    mean of the pretrained rows: a neutral point that keeps the first steps' logits sane."""
    old = llm.get_input_embeddings().weight.shape[0]
    if old == layout.total:
        return
    if old != layout.text_vocab:
        raise ValueError(f"LLM has {old} embedding rows; expected {layout.text_vocab} (text) or {layout.total} (grown)")
    llm.resize_token_embeddings(layout.total, mean_resizing=False)
    with torch.no_grad():
        for weight in row_tables(llm):
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)


def build_model(encoder_path: str, llm_path: str, frame_stack: int, adapter_hidden: int | None = None,
                ) -> tuple[OmniModel, PreTrainedTokenizerBase, WhisperFeatureExtractor]:
    """The untrained pipeline: pretrained encoder and LLM (grown vocab), fresh adapter."""
    with outside_zero3_init():
        encoder, feature_extractor = load_encoder(encoder_path)
        llm = Qwen2ForCausalLM.from_pretrained(llm_path)
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    text_vocab = llm.config.vocab_size
    layout = VocabLayout(text_vocab=text_vocab)
    grow_vocabulary(llm, layout)
    width = llm.config.hidden_size
    config = OmniConfig(
        encoder=str(encoder_path), text_vocab=text_vocab, frame_stack=frame_stack,
        adapter_in=encoder.config.d_model * frame_stack, adapter_hidden=adapter_hidden or 4 * width, adapter_out=width,
    )
    return OmniModel(encoder, llm, config), tokenizer, feature_extractor


def save_omni(model: OmniModel, path: Path, tokenizer: PreTrainedTokenizerBase,
              feature_extractor: WhisperFeatureExtractor, llm_state: dict | None = None,
              adapter_state: dict | None = None) -> None:
    """Hugging Face-style export: llm/ (grown vocab) + tokenizer, adapter weights, the encoder's
    reference and feature extractor, and omni_config.json describing the whole model.
    llm_state/adapter_state: whole weights gathered from a sharded (ZeRO-3) model."""
    path.mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(path / "llm", state_dict=llm_state)
    tokenizer.save_pretrained(path / "llm")
    feature_extractor.save_pretrained(path)
    adapter_state = model.adapter.state_dict() if adapter_state is None else adapter_state
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state.items()}, path / ADAPTER_WEIGHTS)
    (path / OMNI_CONFIG).write_text(json.dumps(asdict(model.config), indent=2))


def is_omni_export(path: str | Path) -> bool:
    return (Path(path) / OMNI_CONFIG).is_file()


def load_omni(path: str | Path) -> tuple[OmniModel, PreTrainedTokenizerBase, WhisperFeatureExtractor]:
    """Reload a stage-final export (model, tokenizer, feature extractor)."""
    path = Path(path)
    if not is_omni_export(path):
        raise FileNotFoundError(f"{path}: not a stage export (no {OMNI_CONFIG})")
    config = OmniConfig(**json.loads((path / OMNI_CONFIG).read_text()))
    with outside_zero3_init():
        encoder, _ = load_encoder(config.encoder)
        llm = Qwen2ForCausalLM.from_pretrained(path / "llm")
    model = OmniModel(encoder, llm, config)
    model.adapter.load_state_dict(load_file(path / ADAPTER_WEIGHTS))
    return model, AutoTokenizer.from_pretrained(path / "llm"), WhisperFeatureExtractor.from_pretrained(path)


def set_trainable(model: OmniModel, modules: Iterable[str], train_text_specials: bool = False) -> None:
    """requires_grad per module; the encoder is frozen in every stage.

    train_text_specials (with the LLM frozen): the embedding and output rows of the 64 new text
    specials train too; a gradient mask zeroes every other row's gradient, and with no weight decay
    on embeddings (see optimizer_groups) Adam leaves those rows bit-identical.
    """
    modules = set(modules)
    model.encoder.requires_grad_(False)
    model.adapter.requires_grad_("adapter" in modules)
    model.llm.requires_grad_("llm" in modules)
    if train_text_specials and "llm" not in modules:
        layout = model.layout
        for weight in row_tables(model.llm):
            mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
            mask[layout.text_vocab : layout.text_size] = 1
            weight.requires_grad_(True)
            weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))
    model.special_rows_only = train_text_specials and "llm" not in modules


def parameter_summary(model: OmniModel) -> dict[str, tuple[int, int]]:
    """module -> (total, trainable) parameter counts (masked rows do not count as trainable)."""
    out = {}
    for name in ("encoder", "adapter", "llm"):
        params = list(getattr(model, name).parameters())
        out[name] = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
    if getattr(model, "special_rows_only", False):
        rows = model.layout.text_size - model.layout.text_vocab
        out["llm"] = (out["llm"][0], sum(rows * w.shape[1] for w in row_tables(model.llm)))
    return out