"""The Whisper encoder stand-in: featurized speech, VTLP augmentation, character-CTC training.

A frozen encoder only helps the recipe when it was trained to recognize speech (hence CTC), and
frequency-warp augmentation (VTLP) is what lets it carry over to unseen voices.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import save_file
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

from training.common import LogFn
from training.demo.standins.config import StandinConfig
from training.demo.standins.optim import bf16_autocast, lr_at, set_lr
from training.speech.audio import load_waveform

__all__ = ["CTC_ALPHABET", "CTC_HEAD_FILE", "train_encoder"]

# CTC output classes: index 0 is the blank, then these characters.
CTC_ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"
# The trained CTC head is saved beside the encoder (the recipe does not load it).
CTC_HEAD_FILE = "ctc_head.safetensors"


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


@dataclass
class _Speech:
    features: torch.Tensor  # [N, mel bins, frames] float16 (half the memory of fp32; ample precision)
    frames: torch.Tensor  # [N] encoder frames that carry speech: int(duration_ms / 20) + 1
    targets: list[torch.Tensor]  # character ids (1-based; 0 is the CTC blank)
    texts: list[str]


def _feature_extractor(config: StandinConfig) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(
        feature_size=config.num_mel_bins,
        sampling_rate=config.sampling_rate,
        hop_length=config.hop_length,
        chunk_length=config.chunk_length,
    )


def _prepare_speech(
    data: Dataset, rows: Sequence[int], config: StandinConfig, extractor: WhisperFeatureExtractor, what: str, log: LogFn
) -> _Speech:
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
        log(
            f"stand-in encoder: skipped {skipped_long} clips longer than the {config.chunk_length} s window and "
            f"{skipped_text} with no usable transcript in {what}"
        )
    if not waves:
        raise ValueError(f"{what}: no usable utterances for the stand-in encoder")
    chunks = []
    for start in range(0, len(waves), 64):
        batch = extractor(waves[start : start + 64], sampling_rate=config.sampling_rate, return_tensors="pt")
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
def _ctc_evaluate(
    encoder: nn.Module, head: nn.Module, speech: _Speech, bf16: bool, batch_size: int = 32
) -> tuple[float, list[str]]:
    encoder.eval()
    head.eval()
    hypotheses: list[str] = []
    for start in range(0, len(speech.texts), batch_size):
        feats = speech.features[start : start + batch_size].float()
        with bf16_autocast(bf16):
            hidden = encoder(feats).last_hidden_state
        log_probs = head(hidden.float()).log_softmax(-1)
        hypotheses += _ctc_decode(log_probs, speech.frames[start : start + batch_size])
    errors = sum(_edit_distance(h, r) for h, r in zip(hypotheses, speech.texts))
    return errors / max(1, sum(len(r) for r in speech.texts)), hypotheses


def _whisper_config(config: StandinConfig) -> WhisperConfig:
    return WhisperConfig(
        vocab_size=config.decoder_vocab_size,
        num_mel_bins=config.num_mel_bins,
        d_model=config.d_model,
        encoder_layers=config.encoder_layers,
        encoder_attention_heads=config.encoder_heads,
        encoder_ffn_dim=config.encoder_ffn_dim,
        max_source_positions=config.max_source_positions,
        decoder_layers=config.decoder_layers,
        decoder_attention_heads=config.decoder_heads,
        decoder_ffn_dim=config.decoder_ffn_dim,
        max_target_positions=config.decoder_max_positions,
        # Whisper's defaults point at ids of its 51k vocabulary; keep every id inside the tiny one.
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        decoder_start_token_id=0,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )


def train_encoder(
    train: Dataset, rows: list[int], heldback: list[int], out_dir: Path, config: StandinConfig, log: LogFn
) -> dict[str, float]:
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
    log(
        f"stand-in encoder: {n_params / 1e6:.2f} M parameters, {config.ctc_steps} steps of batch "
        f"{config.ctc_batch_size}, peak LR {config.ctc_lr:g}"
    )

    order = torch.randperm(len(speech.texts), generator=generator)
    cursor = 0
    recent: list[float] = []
    t0 = time.perf_counter()
    encoder.train()
    head.train()
    for step in range(config.ctc_steps):
        if cursor + config.ctc_batch_size > len(order):  # epoch-wise shuffling: every clip seen equally
            order, cursor = torch.randperm(len(speech.texts), generator=generator), 0
        index = order[cursor : cursor + config.ctc_batch_size]
        cursor += config.ctc_batch_size
        feats = _vtlp(speech.features[index].float(), centers, config.vtlp_warp, generator)
        frames = speech.frames[index]
        targets = [speech.targets[i] for i in index.tolist()]
        set_lr(optimizer, lr_at(step, config.ctc_steps, config.ctc_warmup_steps, config.ctc_lr, config.lr_floor_ratio))
        with bf16_autocast(config.bf16):
            hidden = encoder(feats).last_hidden_state
        # Score only the frames that carry the clip (the recipe cuts the encoder output the same way).
        log_probs = head(hidden.float()).log_softmax(-1).transpose(0, 1)  # [T, B, classes]
        loss = F.ctc_loss(
            log_probs,
            torch.cat(targets),
            frames,
            torch.tensor([len(t) for t in targets]),
            blank=0,
            reduction="mean",
            zero_infinity=True,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.ctc_grad_clip)
        optimizer.step()
        recent.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.ctc_steps:
            log(
                f"stand-in encoder: step {step + 1}/{config.ctc_steps} ctc loss {np.mean(recent):.3f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
            recent = []
    train_seconds = time.perf_counter() - t0

    cer, hypotheses = _ctc_evaluate(encoder, head, check, config.bf16)
    log(
        f"stand-in encoder: held-back CER {cer:.3f} on {len(check.texts)} utterances (unseen sentences); "
        f"e.g. {check.texts[0]!r} -> {hypotheses[0]!r}"
    )

    model.save_pretrained(out_dir)
    extractor.save_pretrained(out_dir)
    save_file(
        {k: v.contiguous() for k, v in head.state_dict().items()},
        str(out_dir / CTC_HEAD_FILE),
        metadata={"alphabet": CTC_ALPHABET, "blank": "0"},
    )
    return {
        "encoder_train_seconds": train_seconds,
        "encoder_total_seconds": time.perf_counter() - started,
        "encoder_heldback_cer": cer,
        "encoder_params": float(n_params),
    }
