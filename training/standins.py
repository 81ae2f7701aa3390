"""Tiny stand-ins for the pretrained checkpoints (Whisper encoder, Qwen2 LLM).

No hub is reachable, so the demo trains its own small "pretrained" parts on the training split
and saves them with `save_pretrained`. The three-stage recipe then loads them by path, exactly as
it loads openai/whisper-small and Qwen/Qwen2-0.5B:

  encoder_dir  WhisperModel (trained encoder, token-sized decoder) + WhisperFeatureExtractor,
               plus the CTC head used to train it (ctc_head.safetensors, for diagnostics)
  llm_dir      Qwen2ForCausalLM + its tokenizer (byte-level BPE trained on the training text)

Two findings from a prototype shape the recipe: a frozen encoder only helps when it was trained
to recognize speech (character CTC), and frequency-warp augmentation (VTLP) is what lets it carry
over to unseen voices; an adapter-only alignment stage only learns when the LLM can repeat a
prefix it is given, hence the copy task mixed into the LM training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import (AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, WhisperConfig,
                          WhisperFeatureExtractor, WhisperModel)

from training.audio import load_waveform

__all__ = [
    "CTC_ALPHABET",
    "StandinConfig",
    "build_standins",
    "ctc_cer",
    "standins_dir",
]

LogFn = Callable[[str], None]
QAPair = tuple[str, str]  # (question, answer) text

# CTC output classes: index 0 is the blank, then these characters.
CTC_ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"
CTC_HEAD_FILE = "ctc_head.safetensors"
SUMMARY_FILE = "standins.json"
# Bump when the training recipe changes in a way the config does not capture, so caches rebuild.
RECIPE_VERSION = 2

# Qwen2's pre-tokenizer split. transformers 5 loads any tokenizer saved next to a qwen2 config as
# Qwen2Tokenizer, which rebuilds the pipeline around this regex from vocab + merges; training
# with the very same pipeline keeps the ids identical however the folder is loaded.
_QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                      r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


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
            raise ValueError(f"chunk_length={self.chunk_length} s gives {self.n_mel_frames} mel frames, but the "
                             f"encoder needs 2 x max_source_positions = {2 * self.max_source_positions}")
        if self.d_model % self.encoder_heads or self.llm_hidden % self.llm_heads:
            raise ValueError("d_model / llm_hidden must be divisible by their head counts")
        if self.llm_heads % self.llm_kv_heads:
            raise ValueError(f"llm_heads={self.llm_heads} is not a multiple of llm_kv_heads={self.llm_kv_heads}")
        if self.copy_fraction + self.qa_fraction > 1.0:
            raise ValueError(f"copy_fraction + qa_fraction must be at most 1, got {self.copy_fraction + self.qa_fraction}")
        for name in ("copy_fraction", "copy_shuffle_fraction", "qa_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.vtlp_warp < 1.0:
            raise ValueError(f"vtlp_warp must lie in [0, 1), got {self.vtlp_warp}")
        if min(self.ctc_steps, self.lm_steps, self.ctc_batch_size, self.lm_batch_size) < 1:
            raise ValueError("step counts and batch sizes must be positive")


# ----------------------------------------------------------------------------------------------
# Cache


# For the test suite: the same stand-ins, trained briefly (good enough to show learning, not for WER).
QUICK_STANDINS = StandinConfig(ctc_steps=150, lm_steps=300)


def _data_fingerprint(train: Dataset) -> str:
    """Identifies the training data: datasets' own fingerprint (content-derived, stable across
    `load_from_disk`) plus the transcripts, in case a caller hands in a dataset without one."""
    hasher = hashlib.sha256()
    hasher.update(str(getattr(train, "_fingerprint", "")).encode())
    hasher.update(str(len(train)).encode())
    for text in train["text"]:
        hasher.update(text.encode())
        hasher.update(b"\n")
    return hasher.hexdigest()


def _cache_key(config: StandinConfig, train: Dataset, extra_texts: Sequence[str] = (),
               qa_pairs: Sequence[QAPair] = ()) -> str:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("cache_key", True)}
    extra = hashlib.sha256(json.dumps([list(extra_texts), [list(p) for p in qa_pairs]]).encode()).hexdigest()
    payload = json.dumps({"recipe": RECIPE_VERSION, "config": fields, "data": _data_fingerprint(train), "extra": extra},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def standins_dir(cache_dir: str | Path, train: Dataset, config: StandinConfig = StandinConfig(),
                 extra_texts: Sequence[str] = (), qa_pairs: Sequence[QAPair] = ()) -> Path:
    """Where `build_standins` keeps (or will keep) the stand-ins for this config and data."""
    return Path(cache_dir) / f"standins-{_cache_key(config, train, extra_texts, qa_pairs)}"


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _lr_at(step: int, total: int, warmup: int, peak: float, floor_ratio: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor_ratio * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _autocast(enabled: bool) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _normalize_for_ctc(text: str) -> str:
    kept = "".join(c for c in text.lower() if c in CTC_ALPHABET)
    return " ".join(kept.split())


def _split_indices(n: int, heldback: int, seed: int) -> tuple[list[int], list[int]]:
    if n < 2:
        raise ValueError(f"stand-in training needs at least 2 utterances, got {n}")
    heldback = max(1, min(heldback, n // 10))
    order = np.random.default_rng(seed).permutation(n).tolist()
    return sorted(order[heldback:]), sorted(order[:heldback])


# ----------------------------------------------------------------------------------------------
# Encoder: features, VTLP, CTC


@dataclass
class _Speech:
    features: torch.Tensor  # [N, mel bins, frames] float16 (half the memory of fp32; ample precision)
    frames: torch.Tensor  # [N] encoder frames that carry speech: int(duration_ms / 20) + 1
    targets: list[torch.Tensor]  # character ids (1-based; 0 is the CTC blank)
    texts: list[str]


def _feature_extractor(config: StandinConfig) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=config.sampling_rate,
                                   hop_length=config.hop_length, chunk_length=config.chunk_length)


def _prepare_speech(data: Dataset, rows: Sequence[int], config: StandinConfig,
                    extractor: WhisperFeatureExtractor, what: str, log: LogFn) -> _Speech:
    """Decode, featurize (once, not every step) and label the given rows."""
    window = config.chunk_length * config.sampling_rate
    audio_column = data.select_columns(["audio", "text"])
    waves: list[np.ndarray] = []
    frames: list[int] = []
    targets: list[torch.Tensor] = []
    texts: list[str] = []
    skipped_long = skipped_text = 0
    for row in rows:
        item = audio_column[row]
        wave = load_waveform(item["audio"], config.sampling_rate, where=f"{what}, row {row}, column 'audio'")
        text = _normalize_for_ctc(item["text"])
        if len(wave) > window:
            skipped_long += 1  # the window would cut off part of what the transcript says
            continue
        if not text:
            skipped_text += 1
            continue
        waves.append(wave)
        duration_ms = len(wave) * 1000 / config.sampling_rate
        frames.append(min(int(duration_ms / 20) + 1, config.max_source_positions))
        targets.append(torch.tensor([CTC_ALPHABET.index(c) + 1 for c in text], dtype=torch.long))
        texts.append(text)
    if skipped_long or skipped_text:
        log(f"stand-in encoder: skipped {skipped_long} clips longer than the {config.chunk_length} s window and "
            f"{skipped_text} with no usable transcript in {what}")
    if not waves:
        raise ValueError(f"{what}: no usable utterances for the stand-in encoder")
    chunks = []
    for start in range(0, len(waves), 64):
        batch = extractor(waves[start:start + 64], sampling_rate=config.sampling_rate, return_tensors="pt")
        chunks.append(batch.input_features.to(torch.float16))
    features = torch.cat(chunks)
    if features.shape[-1] != config.n_mel_frames:
        raise RuntimeError(f"feature extractor gave {features.shape[-1]} frames, expected {config.n_mel_frames}")
    return _Speech(features, torch.tensor(frames, dtype=torch.long), targets, texts)


def _mel_centers(extractor: WhisperFeatureExtractor, config: StandinConfig) -> np.ndarray:
    """Centre frequency (Hz) of each mel filter, from the extractor's own filter bank."""
    filters = np.asarray(extractor.mel_filters)  # [frequency bins, mel bins]
    hz = np.linspace(0, config.sampling_rate / 2, filters.shape[0])
    return (filters * hz[:, None]).sum(0) / np.maximum(filters.sum(0), 1e-12)


def _vtlp(features: torch.Tensor, centers: np.ndarray, warp: float, generator: torch.Generator) -> torch.Tensor:
    """Vocal-tract-length perturbation on log-mel features.

    A longer or shorter vocal tract scales formant frequencies by a factor alpha; output bin k
    takes the value found at frequency f_k / alpha in the input (linear interpolation across bins).
    """
    batch, bins, _ = features.shape
    alpha = 1.0 + (torch.rand(batch, generator=generator) * 2 - 1) * warp
    source_hz = torch.from_numpy(centers).float()[None, :] / alpha[:, None]  # [B, bins]
    position = torch.from_numpy(np.interp(source_hz.numpy(), centers, np.arange(bins))).float()
    low = position.floor().long().clamp(0, bins - 1)
    high = (low + 1).clamp(max=bins - 1)
    frac = (position - low.float())[:, :, None]
    low_rows = torch.gather(features, 1, low[:, :, None].expand_as(features))
    high_rows = torch.gather(features, 1, high[:, :, None].expand_as(features))
    return low_rows * (1 - frac) + high_rows * frac


def _ctc_decode(log_probs: torch.Tensor, frames: torch.Tensor) -> list[str]:
    """Greedy CTC: best class per frame, collapse repeats, drop blanks."""
    best = log_probs.argmax(-1)
    texts = []
    for row, n in zip(best.tolist(), frames.tolist()):
        chars, previous = [], 0
        for k in row[:n]:
            if k != previous and k != 0:
                chars.append(CTC_ALPHABET[k - 1])
            previous = k
        texts.append(" ".join("".join(chars).split()))
    return texts


@torch.no_grad()
def _ctc_evaluate(encoder: nn.Module, head: nn.Module, speech: _Speech, bf16: bool, batch_size: int = 32
                  ) -> tuple[float, list[str]]:
    encoder.eval()
    head.eval()
    hypotheses: list[str] = []
    for start in range(0, len(speech.texts), batch_size):
        feats = speech.features[start:start + batch_size].float()
        with _autocast(bf16):
            hidden = encoder(feats).last_hidden_state
        log_probs = head(hidden.float()).log_softmax(-1)
        hypotheses += _ctc_decode(log_probs, speech.frames[start:start + batch_size])
    errors = sum(_edit_distance(h, r) for h, r in zip(hypotheses, speech.texts))
    return errors / max(1, sum(len(r) for r in speech.texts)), hypotheses


def _whisper_config(config: StandinConfig) -> WhisperConfig:
    return WhisperConfig(
        vocab_size=config.decoder_vocab_size, num_mel_bins=config.num_mel_bins, d_model=config.d_model,
        encoder_layers=config.encoder_layers, encoder_attention_heads=config.encoder_heads,
        encoder_ffn_dim=config.encoder_ffn_dim, max_source_positions=config.max_source_positions,
        decoder_layers=config.decoder_layers, decoder_attention_heads=config.decoder_heads,
        decoder_ffn_dim=config.decoder_ffn_dim, max_target_positions=config.decoder_max_positions,
        # Whisper's defaults point at ids of its 51k vocabulary; keep every id inside the tiny one.
        bos_token_id=0, eos_token_id=1, pad_token_id=1, decoder_start_token_id=0,
        suppress_tokens=None, begin_suppress_tokens=None,
    )


def _train_encoder(train: Dataset, rows: list[int], heldback: list[int], out_dir: Path, config: StandinConfig,
                   log: LogFn) -> dict[str, float]:
    started = time.perf_counter()
    extractor = _feature_extractor(config)
    speech = _prepare_speech(train, rows, config, extractor, "stand-in training data", log)
    check = _prepare_speech(train, heldback, config, extractor, "stand-in held-back data", log)
    log(f"stand-in encoder: {len(speech.texts)} training clips featurized in {time.perf_counter() - started:.1f} s")

    torch.manual_seed(config.seed)
    model = WhisperModel(_whisper_config(config))
    encoder = model.encoder
    head = nn.Linear(config.d_model, len(CTC_ALPHABET) + 1)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.ctc_lr, betas=(0.9, 0.98), weight_decay=config.ctc_weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    centers = _mel_centers(extractor, config)
    n_params = sum(p.numel() for p in encoder.parameters())
    log(f"stand-in encoder: {n_params / 1e6:.2f} M parameters, {config.ctc_steps} steps of batch "
        f"{config.ctc_batch_size}, peak LR {config.ctc_lr:g}")

    order = torch.randperm(len(speech.texts), generator=generator)
    cursor = 0
    recent: list[float] = []
    t0 = time.perf_counter()
    encoder.train()
    head.train()
    for step in range(config.ctc_steps):
        if cursor + config.ctc_batch_size > len(order):  # epoch-wise shuffling: every clip seen equally
            order, cursor = torch.randperm(len(speech.texts), generator=generator), 0
        index = order[cursor:cursor + config.ctc_batch_size]
        cursor += config.ctc_batch_size
        feats = _vtlp(speech.features[index].float(), centers, config.vtlp_warp, generator)
        frames = speech.frames[index]
        targets = [speech.targets[i] for i in index.tolist()]
        _set_lr(optimizer, _lr_at(step, config.ctc_steps, config.ctc_warmup_steps, config.ctc_lr,
                                  config.lr_floor_ratio))
        with _autocast(config.bf16):
            hidden = encoder(feats).last_hidden_state
        # Score only the frames that carry the clip (the recipe cuts the encoder output the same way).
        log_probs = head(hidden.float()).log_softmax(-1).transpose(0, 1)  # [T, B, classes]
        loss = F.ctc_loss(log_probs, torch.cat(targets), frames, torch.tensor([len(t) for t in targets]),
                          blank=0, reduction="mean", zero_infinity=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.ctc_grad_clip)
        optimizer.step()
        recent.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.ctc_steps:
            log(f"stand-in encoder: step {step + 1}/{config.ctc_steps} ctc loss {np.mean(recent):.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
            recent = []
    train_seconds = time.perf_counter() - t0

    cer, hypotheses = _ctc_evaluate(encoder, head, check, config.bf16)
    log(f"stand-in encoder: held-back CER {cer:.3f} on {len(check.texts)} utterances (unseen sentences); "
        f"e.g. {check.texts[0]!r} -> {hypotheses[0]!r}")

    model.save_pretrained(out_dir)
    extractor.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out_dir / CTC_HEAD_FILE),
              metadata={"alphabet": CTC_ALPHABET, "blank": "0"})
    return {"encoder_train_seconds": train_seconds, "encoder_total_seconds": time.perf_counter() - started,
            "encoder_heldback_cer": cer, "encoder_params": float(n_params)}


def ctc_cer(encoder_dir: str | Path, data: Dataset, limit: int | None = None, log: LogFn = print) -> float:
    """Greedy CTC character error rate of a saved stand-in encoder on `data` (columns "audio", "text").

    A diagnostic for the stand-in itself (e.g. on the held-out voices); the training recipe never uses it.
    """
    encoder_dir = Path(encoder_dir)
    if not (encoder_dir / CTC_HEAD_FILE).is_file():
        raise FileNotFoundError(f"{encoder_dir} has no {CTC_HEAD_FILE}; it was not built by build_standins")
    extractor = WhisperFeatureExtractor.from_pretrained(encoder_dir)
    model = WhisperModel.from_pretrained(encoder_dir)
    sampling_rate = extractor.sampling_rate
    config = StandinConfig(sampling_rate=sampling_rate, num_mel_bins=extractor.feature_size,
                           chunk_length=extractor.chunk_length, hop_length=extractor.hop_length,
                           max_source_positions=model.config.max_source_positions)
    head = nn.Linear(model.config.d_model, len(CTC_ALPHABET) + 1)
    head.load_state_dict(load_file(str(encoder_dir / CTC_HEAD_FILE)))
    rows = list(range(len(data) if limit is None else min(limit, len(data))))
    speech = _prepare_speech(data, rows, config, extractor, "CER data", log)
    return _ctc_evaluate(model.encoder, head, speech, bf16=config.bf16)[0]


# ----------------------------------------------------------------------------------------------
# LLM: tokenizer, LM + copy task


def _train_tokenizer(texts: list[str], config: StandinConfig) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    specials = [config.eos_token, config.bos_token, config.pad_token, config.sep_token, config.answer_token]
    trainer = trainers.BpeTrainer(vocab_size=config.tokenizer_vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=config.bos_token,
                                   eos_token=config.eos_token, pad_token=config.pad_token,
                                   sep_token=config.sep_token)


def _lm_example(ids: list[int], copy: bool, bos: int, eos: int, sep: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 = not scored) for one LM or copy-task sequence."""
    if copy:
        tokens = [bos, *ids, sep, *ids, eos]
        labels = [-100] * (len(ids) + 2) + [*ids, eos]
    else:
        tokens = [bos, *ids, eos]
        labels = [-100, *ids, eos]
    return tokens, labels


def _qa_example(question: list[int], answer: list[int], bos: int, eos: int, marker: int) -> tuple[list[int], list[int]]:
    """bos + question + marker + answer + eos, scored on the answer and its eos."""
    return [bos, *question, marker, *answer, eos], [-100] * (len(question) + 2) + [*answer, eos]


def _lm_batch(examples: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(tokens) for tokens, _ in examples)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (tokens, target) in enumerate(examples):
        input_ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, :len(target)] = torch.tensor(target)
        mask[row, :len(tokens)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _token_losses(model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> torch.Tensor:
    """Per-sequence mean next-token loss over the scored positions."""
    with _autocast(bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    scored = (labels != -100).float()
    return (losses * scored).sum(1) / scored.sum(1).clamp(min=1)


@torch.no_grad()
def _exact_continuations(model: Qwen2ForCausalLM, cases: list[tuple[list[int], list[int]]], eos: int, pad: int) -> float:
    """Share of (prompt, target) cases whose greedy continuation of the prompt is exactly target + eos."""
    model.eval()
    correct = 0
    for prompt_ids, target in cases:
        prompt = torch.tensor([prompt_ids])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(target) + 1,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad)
        correct += out[0, prompt.shape[1]:].tolist() == [*target, eos]
    return correct / max(1, len(cases))


def _train_llm(texts: list[str], heldback_texts: list[str], out_dir: Path, config: StandinConfig,
               log: LogFn, qa_pairs: Sequence[QAPair] = (), qa_heldback: Sequence[QAPair] = ()) -> dict[str, float]:
    started = time.perf_counter()
    tokenizer = _train_tokenizer(texts + [t for pair in qa_pairs for t in pair], config)
    bos, eos, pad, sep, marker = (tokenizer.convert_tokens_to_ids(t) for t in
                                  (config.bos_token, config.eos_token, config.pad_token, config.sep_token,
                                   config.answer_token))
    for sample in texts[:200]:
        # NFC-normalized text must come back unchanged (the normalizer rewrites anything else).
        if unicodedata.normalize("NFC", sample) == sample and tokenizer.decode(tokenizer.encode(sample)) != sample:
            raise RuntimeError(f"the trained tokenizer does not round-trip {sample!r}")
    vocab_size = -(-len(tokenizer) // config.vocab_multiple) * config.vocab_multiple
    encoded = [tokenizer.encode(t) for t in texts]
    words = [t.split(" ") for t in texts]
    encoded_check = [tokenizer.encode(t) for t in heldback_texts]
    encode_pairs = lambda pairs: [(tokenizer.encode(q), tokenizer.encode(a)) for q, a in pairs]  # noqa: E731
    encoded_qa, encoded_qa_check = encode_pairs(qa_pairs), encode_pairs(qa_heldback)
    longest = max(2 * len(ids) + 3 for ids in encoded)
    if longest > config.max_position_embeddings:
        raise ValueError(f"a copy-task sequence has {longest} tokens, over max_position_embeddings="
                         f"{config.max_position_embeddings}")

    torch.manual_seed(config.seed)
    model_config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=config.llm_hidden, num_hidden_layers=config.llm_layers,
        num_attention_heads=config.llm_heads, num_key_value_heads=config.llm_kv_heads,
        intermediate_size=config.llm_intermediate, max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )
    model = Qwen2ForCausalLM(model_config)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = bos, eos
    model.generation_config.pad_token_id = pad
    n_params = sum(p.numel() for p in model.parameters())
    n_copy = round(config.lm_batch_size * config.copy_fraction)
    n_qa = round(config.lm_batch_size * config.qa_fraction) if encoded_qa else 0
    log(f"stand-in LLM: tokenizer {len(tokenizer)} tokens (vocab_size {vocab_size}), {n_params / 1e6:.2f} M "
        f"parameters, {config.lm_steps} steps of batch {config.lm_batch_size} ({n_copy} copy task, "
        f"{n_qa} question answering over {len(encoded_qa)} pairs), peak LR {config.lm_lr:g}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lm_lr, betas=(0.9, 0.98),
                                  weight_decay=config.lm_weight_decay)
    rng = np.random.default_rng(config.seed)
    recent_lm: list[float] = []
    recent_copy: list[float] = []
    recent_qa: list[float] = []
    final: dict[str, float] = {}
    t0 = time.perf_counter()
    model.train()
    for step in range(config.lm_steps):
        # rows in batch order: copy task, question answering, plain LM
        examples = []
        for i in rng.integers(0, len(encoded), size=n_copy).tolist():
            ids = encoded[i]
            if rng.random() < config.copy_shuffle_fraction:
                ids = tokenizer.encode(" ".join(rng.permutation(words[i]).tolist()))
            examples.append(_lm_example(ids, True, bos, eos, sep))
        examples += [_qa_example(*encoded_qa[i], bos, eos, marker) for i in rng.integers(0, len(encoded_qa) or 1, size=n_qa)]
        examples += [_lm_example(encoded[i], False, bos, eos, sep)
                     for i in rng.integers(0, len(encoded), size=config.lm_batch_size - n_copy - n_qa)]
        batch = _lm_batch(examples, pad)
        _set_lr(optimizer, _lr_at(step, config.lm_steps, config.lm_warmup_steps, config.lm_lr, config.lr_floor_ratio))
        per_sequence = _token_losses(model, batch, config.bf16)
        loss = per_sequence.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.lm_grad_clip)
        optimizer.step()
        for recent, rows in ((recent_copy, per_sequence[:n_copy]), (recent_qa, per_sequence[n_copy:n_copy + n_qa]),
                             (recent_lm, per_sequence[n_copy + n_qa:])):
            if len(rows):
                recent.append(rows.mean().item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.lm_steps:
            mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
            final = {"lm_train_loss": mean(recent_lm), "copy_train_loss": mean(recent_copy),
                     "qa_train_loss": mean(recent_qa)}
            log(f"stand-in LLM: step {step + 1}/{config.lm_steps} lm loss {final['lm_train_loss']:.3f} "
                f"copy loss {final['copy_train_loss']:.3f} qa loss {final['qa_train_loss']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
            recent_lm, recent_copy, recent_qa = [], [], []
    train_seconds = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        check_lm = _lm_batch([_lm_example(ids, False, bos, eos, sep) for ids in encoded_check], pad)
        check_copy = _lm_batch([_lm_example(ids, True, bos, eos, sep) for ids in encoded_check], pad)
        lm_loss = _token_losses(model, check_lm, config.bf16).mean().item()
        copy_loss = _token_losses(model, check_copy, config.bf16).mean().item()
    accuracy = _exact_continuations(model, [([bos, *ids, sep], ids) for ids in encoded_check], eos, pad)
    qa_accuracy = (_exact_continuations(model, [([bos, *q, marker], a) for q, a in encoded_qa_check], eos, pad)
                   if encoded_qa_check else float("nan"))
    log(f"stand-in LLM: held-back lm loss {lm_loss:.3f}, copy loss {copy_loss:.3f}, exact copies "
        f"{accuracy:.0%} of {len(encoded_check)} unseen sentences"
        + (f", right answers to {qa_accuracy:.0%} of {len(encoded_qa_check)} unseen questions" if encoded_qa_check else ""))

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 loads a tokenizer that sits next to a qwen2 config as Qwen2Tokenizer; make sure
    # that reload tokenizes exactly like the tokenizer the model was trained with.
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    for sample in [*texts[:50], *heldback_texts[:10]]:
        if reloaded.encode(sample) != tokenizer.encode(sample):
            raise RuntimeError(f"the saved tokenizer reloads as {type(reloaded).__name__} with different ids for "
                               f"{sample!r}")
    return {"llm_train_seconds": train_seconds, "llm_total_seconds": time.perf_counter() - started,
            "llm_params": float(n_params), "tokenizer_size": float(len(tokenizer)), "llm_vocab_size": float(vocab_size),
            **final, "lm_heldback_loss": lm_loss, "copy_heldback_loss": copy_loss, "copy_heldback_exact": accuracy,
            "qa_heldback_exact": qa_accuracy}


# ----------------------------------------------------------------------------------------------
# Untrained checkpoints of given shapes (tests and benchmarks)

# The saved WhisperModel needs a decoder that nothing uses: keep it token-sized.
_UNUSED_DECODER = dict(decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=64,
                       max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       decoder_start_token_id=1)


def save_untrained_checkpoints(root: str | Path, whisper: dict[str, Any], qwen2: dict[str, Any],
                               feature_extractor: dict[str, Any] | None = None, seed: int = 0) -> tuple[str, str]:
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
    bpe.train_from_iterator(["the cat sat on the mat", "a dog ran"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(llm)
    qwen2_model.save_pretrained(llm)
    return str(enc), str(llm)


# ----------------------------------------------------------------------------------------------
# Entry point


def build_standins(train: Dataset, cache_dir: str | Path, config: StandinConfig = StandinConfig(),
                   log: LogFn = print, extra_texts: Sequence[str] = (), qa_pairs: Sequence[QAPair] = (),
                   qa_heldback: Sequence[QAPair] = ()) -> tuple[Path, Path]:
    """Train (once) the stand-in encoder and LLM on `train`; returns (encoder_dir, llm_dir).

    `train` is a `datasets.Dataset` with "audio" (`Audio(decode=False)` values) and "text".
    `extra_texts` are text-only sentences the LLM (and its tokenizer) also learn from, as a real
    LLM has read far more text than any speech corpus holds. `qa_pairs` are (question, answer)
    texts it learns to answer, as a real LLM knows the facts a spoken question asks for;
    `qa_heldback` are other pairs, only scored (exact answers, in the build's summary).
    The result lives in `cache_dir/standins-<hash of config and data>/{encoder,llm}`; it is
    written to a temporary folder and renamed into place, so a crash never leaves a partial
    build that a later call would return.
    """
    config.validate()
    for column in ("audio", "text"):
        if column not in train.column_names:
            raise ValueError(f"stand-in training data needs columns 'audio' and 'text'; has {train.column_names}")
    target = standins_dir(cache_dir, train, config, extra_texts, [*qa_pairs, *qa_heldback])
    encoder_dir, llm_dir = target / "encoder", target / "llm"
    if target.is_dir():
        return encoder_dir, llm_dir

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "encoder").mkdir(parents=True)
        (tmp / "llm").mkdir()
        started = time.perf_counter()
        rows, heldback = _split_indices(len(train), config.heldback, config.seed)
        log(f"stand-ins: training on {len(rows)} utterances, {len(heldback)} held back for checks, "
            f"{torch.get_num_threads()} threads")
        summary: dict[str, Any] = {}
        summary.update(_train_encoder(train, rows, heldback, tmp / "encoder", config, log))
        all_texts = list(train["text"])
        summary.update(_train_llm([all_texts[i] for i in rows] + list(extra_texts), [all_texts[i] for i in heldback],
                                  tmp / "llm", config, log, qa_pairs=qa_pairs, qa_heldback=qa_heldback))
        summary["total_seconds"] = time.perf_counter() - started
        (tmp / SUMMARY_FILE).write_text(json.dumps({"config": dataclasses.asdict(config), "results": summary},
                                                   indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same build first; its copy is as good and already in use.
            if not target.is_dir():
                raise
            log(f"stand-ins: {target} appeared while building; using that copy")
        log(f"stand-ins: ready in {summary['total_seconds']:.0f} s at {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(previous_threads)
    return encoder_dir, llm_dir
