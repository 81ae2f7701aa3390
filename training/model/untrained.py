"""Random-weight Whisper and Qwen2 checkpoints of given shapes, for tests and benchmarks.

They are saved with `save_pretrained` so the model code loads them by path exactly like the
published checkpoints; nothing is trained (the demo's trained stand-ins are training.demo.standins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

__all__ = ["save_untrained_checkpoints"]

# The saved WhisperModel needs a decoder that nothing uses: keep it token-sized.
_UNUSED_DECODER = {
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 64,
    "vocab_size": 64,
    "max_target_positions": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
}


def save_untrained_checkpoints(
    root: str | Path,
    whisper: dict[str, Any],
    qwen2: dict[str, Any],
    feature_extractor: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[str, str]:
    """Random-weight Whisper (encoder fields in `whisper`) and Qwen2 checkpoints with a small BPE
    tokenizer, saved with save_pretrained so they load by path like real ones. No training. The
    weights depend on `seed` only (not on whatever used the global RNG before)."""
    enc, llm = Path(root) / "whisper", Path(root) / "qwen2"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        whisper_model = WhisperModel(WhisperConfig(**whisper, **_UNUSED_DECODER))
        qwen2_model = Qwen2ForCausalLM(Qwen2Config(**qwen2))
    whisper_model.save_pretrained(enc)
    WhisperFeatureExtractor(**(feature_extractor or {})).save_pretrained(enc)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["the cat sat on the mat", "a dog ran"] * 20,
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(llm)
    qwen2_model.save_pretrained(llm)
    return str(enc), str(llm)
