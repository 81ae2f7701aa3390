"""What a stand-in build trains: `StandinConfig` (every field but the runtime ones is in the cache key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FULL_STANDINS", "QUICK_STANDINS", "StandinConfig"]


def _runtime() -> Any:
    """Marks config fields that change how a build runs, not what it produces (kept out of the cache key)."""
    return {"cache_key": False}


@dataclass(frozen=True)
class StandinConfig:
    seed: int = 0
    sampling_rate: int = 16000
    # Whisper encoder stand-in (whisper-small: d_model 768, 12 layers, 12 heads, ffn 3072, 1500 positions).
    d_model: int = 128
    encoder_layers: int = 4
    encoder_heads: int = 4
    encoder_ffn_dim: int = 512
    num_mel_bins: int = 80
    max_source_positions: int = 200  # = 400 mel frames at 100 frames/s = a 4 s window
    chunk_length: int = 4  # seconds; WhisperFeatureExtractor pads/cuts every clip to this
    hop_length: int = 160
    # The saved WhisperModel needs a decoder; it is never used, so it is as small as it can be.
    decoder_layers: int = 1
    decoder_heads: int = 1
    decoder_ffn_dim: int = 64
    decoder_vocab_size: int = 8
    decoder_max_positions: int = 8
    # Encoder training: character CTC on the training split.
    ctc_steps: int = 450
    ctc_batch_size: int = 32
    ctc_lr: float = 4e-3
    ctc_warmup_steps: int = 50
    ctc_weight_decay: float = 0.01
    ctc_grad_clip: float = 1.0
    vtlp_warp: float = 0.2  # frequency axis scaled by a factor drawn from [1 - w, 1 + w] per clip
    # bf16 autocast (losses stay fp32). Off by default: on CPUs without native bf16 (AVX2 only, as
    # measured here) it made a CTC step ~10x slower; turn it on for CPUs/GPUs with bf16 units.
    bf16: bool = False
    # Utterances kept out of both trainings and used to report CER / copy accuracy at the end.
    heldback: int = 64
    # Qwen2 LLM stand-in (Qwen2-0.5B: hidden 896, 24 layers, 14 heads, 2 KV heads, ffn 4864).
    llm_hidden: int = 128
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 512
    rope_theta: float = 1e6
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    tokenizer_vocab_size: int = 1024  # BPE target; a small corpus saturates below it
    vocab_multiple: int = 64  # the model's vocab_size is len(tokenizer) rounded up to this
    bos_token: str = "<|startoftext|>"
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    sep_token: str = "<|sep|>"  # separates the two copies in the copy task
    answer_token: str = "<|answer|>"  # separates a question from its answer in the QA share
    # LM training: a share of each batch is plain next-token LM, the rest the copy task
    # (bos + s + sep + s + eos, scored on the second copy). Measured on the default corpus: copying
    # only "clicks" after ~500 steps; 1,000 steps at 1e-3 repeat ~78 % of unseen sentences exactly
    # (400 steps at 3e-3: 2 %; peak LRs of 2e-3 and up learned it slower or not at all).
    lm_steps: int = 800
    lm_batch_size: int = 32
    lm_lr: float = 1e-3
    lm_warmup_steps: int = 40
    lm_weight_decay: float = 0.01
    lm_grad_clip: float = 1.0
    copy_fraction: float = 0.5
    # Share of copy-task sentences whose words are shuffled first, so they cannot be recalled from
    # memory. Off by default: at 1,000 steps it slowed learning to copy (64 % vs 78 % exact).
    copy_shuffle_fraction: float = 0.0
    # Share of each batch that is question answering (bos + question + answer_token + answer + eos,
    # scored on the answer) when QA pairs are given: a pretrained LLM already knows the facts a
    # spoken question asks for, and the later stages teach it to hear the question.
    qa_fraction: float = 0.25
    lr_floor_ratio: float = 0.05  # cosine decay ends at this fraction of the peak LR
    log_every: int = field(default=50, metadata=_runtime())
    num_threads: int | None = field(default=None, metadata=_runtime())  # None: all cores

    @property
    def n_mel_frames(self) -> int:
        return self.chunk_length * self.sampling_rate // self.hop_length

    def validate(self) -> None:
        # WhisperEncoder insists on exactly 2 x max_source_positions mel frames (its conv stride is 2).
        if self.n_mel_frames != 2 * self.max_source_positions:
            raise ValueError(
                f"chunk_length={self.chunk_length} s gives {self.n_mel_frames} mel frames, but the "
                f"encoder needs 2 x max_source_positions = {2 * self.max_source_positions}"
            )
        if self.d_model % self.encoder_heads or self.llm_hidden % self.llm_heads:
            raise ValueError("d_model / llm_hidden must be divisible by their head counts")
        if self.llm_heads % self.llm_kv_heads:
            raise ValueError(f"llm_heads={self.llm_heads} is not a multiple of llm_kv_heads={self.llm_kv_heads}")
        if self.copy_fraction + self.qa_fraction > 1.0:
            raise ValueError(
                f"copy_fraction + qa_fraction must be at most 1, got {self.copy_fraction + self.qa_fraction}"
            )
        for name in ("copy_fraction", "copy_shuffle_fraction", "qa_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.vtlp_warp < 1.0:
            raise ValueError(f"vtlp_warp must lie in [0, 1), got {self.vtlp_warp}")
        if min(self.ctc_steps, self.lm_steps, self.ctc_batch_size, self.lm_batch_size) < 1:
            raise ValueError("step counts and batch sizes must be positive")


# The demo's stand-ins.
FULL_STANDINS = StandinConfig()
# For the test suite: the same stand-ins, trained briefly (good enough to show learning, not for WER).
QUICK_STANDINS = StandinConfig(ctc_steps=150, lm_steps=300)
# For launch tests that start from an empty cache: the whole build path, in seconds (learns little).
TINY_STANDINS = StandinConfig(ctc_steps=10, lm_steps=10, heldback=8)
STANDIN_SCALES = {"full": FULL_STANDINS, "quick": QUICK_STANDINS, "tiny": TINY_STANDINS}
