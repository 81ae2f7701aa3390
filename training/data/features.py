"""Feature preparation: decode, log-mel, frozen encoder states and token ids, once per row, cached.

The encoder is frozen in every stage, so its states are computed once per utterance with
``datasets.map`` (batched through the encoder) and cached on disk, keyed by the data, the encoder's
weights and the tokenizer's vocabulary: all three stages share one encoding, and a rerun encodes
nothing. States are stored in bf16 by default (half of fp32's ~553 MB per hour of speech for
whisper-small; a bf16 run computes them in bf16 anyway). Arrow has no bf16 type, so the bits are
stored as uint16 and widened back to fp32 when a batch is made (`widened`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from training.data.checks import DataError, read_qa_row, read_row
from training.data.sources import has_answer_speech
from training.speech.audio import decode_audio
from training.speech.layout import N_AUDIO_LAYERS, n_encoder_frames
from training.stages import DataSpec


def tokenizer_key(tokenizer) -> str:
    """Identity of a tokenizer by its vocabulary, not its path: every stage export carries a copy
    of the same tokenizer, and the cached features must survive from stage to stage."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FeatureEncoder:
    """What turns decoded rows into cached features: the frozen encoder, its feature extractor and
    the tokenizer, and the folder their outputs are cached in."""

    feature_extractor: Any
    tokenizer: Any
    encode: Callable[[torch.Tensor], torch.Tensor]  # log-mel [B, mels, frames] -> states [B, F, d]
    encoder_key: str  # identity of the encoder's weights (part of every cache key)
    n_mel_frames: int
    cache_dir: Path
    cache_dtype: str = "bf16"  # "bf16" (stored as uint16 bits) or "fp32"

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    def states(self, waves: list[np.ndarray], where: str) -> tuple[list[np.ndarray], list[int]]:
        """Each wave's encoder states, cut to the frames that carry it, and those frame counts."""
        sr = self.sampling_rate
        features = self.feature_extractor(
            waves, sampling_rate=sr, return_tensors="pt", padding="max_length"
        ).input_features
        if features.shape[-1] != self.n_mel_frames:
            raise DataError(
                f"{where}: feature extractor gives {features.shape[-1]} mel frames, "
                f"the encoder needs {self.n_mel_frames}"
            )
        states = self.encode(features).float()
        if self.cache_dtype == "bf16":
            states = states.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        else:
            states = states.numpy()
        lengths = [n_encoder_frames(len(w), sr, self.n_mel_frames // 2) for w in waves]
        return [s[:n] for s, n in zip(states, lengths)], lengths

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]

    def key(self, *parts: Any) -> str:
        """Cache key of a split's features: the given parts plus the encoder and tokenizer identity."""
        payload = [
            *parts,
            self.encoder_key,
            tokenizer_key(self.tokenizer),
            self.feature_extractor.to_json_string(),
            self.n_mel_frames,
            self.cache_dtype,
        ]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def cached_map(
        self, ds: datasets.Dataset, process: Callable, key: str, prefix: str, where: str, batch_size: int
    ) -> datasets.Dataset:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        prepared = ds.map(
            process,
            batched=True,
            batch_size=batch_size,
            with_indices=True,
            remove_columns=ds.column_names,
            new_fingerprint=key,
            cache_file_name=str(self.cache_dir / f"{prefix}-{key}.arrow"),
            desc=f"encoding {where}",
        )
        if len(prepared) == 0:
            raise DataError(f"{where}: no usable rows ({len(ds)} rows, all bad)")
        return prepared


def widened(states: np.ndarray) -> torch.Tensor:
    """Cached encoder states as fp32: bf16 bits widened exactly (stored as uint16; datasets' numpy
    format hands integers over as int64), fp32 as it is."""
    states = np.asarray(states)
    if states.dtype.kind in "iu":
        return torch.from_numpy(states.astype(np.uint16).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.asarray(states, dtype=np.float32))


def _kept_rows(rows: list[tuple[int, Any]], read: Callable[[int, Any], Any], skip_bad_rows: bool) -> list[Any]:
    """read(i, row) for each row; a bad row (DataError) stops, or with skip_bad_rows is left out."""
    kept = []
    for i, row in rows:
        try:
            kept.append(read(i, row))
        except DataError:
            if not skip_bad_rows:
                raise
    return kept


def prepare_split(
    ds: datasets.Dataset, where: str, spec: DataSpec, encoder: FeatureEncoder, batch_size: int = 32
) -> datasets.Dataset:
    """ASR rows of (encoder_states [n_frames, d], n_frames, text_ids, text), computed once and cached.

    A bad row stops preparation with its name, or with spec.skip_bad_rows is left out (the
    caller counts len(ds) - len(result))."""
    sr, window = encoder.sampling_rate, encoder.feature_extractor.n_samples
    key = encoder.key(ds._fingerprint, where, spec.audio_column, spec.text_column, spec.skip_bad_rows)

    def process(batch: dict, indices: list[int]) -> dict:
        rows = list(zip(indices, zip(batch[spec.audio_column], batch[spec.text_column])))
        read = lambda i, row: read_row(*row, f"{where}, row {i}", spec, sr, window)[:2]  # noqa: E731
        kept = _kept_rows(rows, read, spec.skip_bad_rows)
        if not kept:
            return {"encoder_states": [], "n_frames": [], "text_ids": [], "text": []}
        waves, texts = [w for w, _ in kept], [t for _, t in kept]
        states, lengths = encoder.states(waves, where)
        return {"encoder_states": states, "n_frames": lengths, "text_ids": encoder.token_ids(texts), "text": texts}

    prepared = encoder.cached_map(ds, process, key, "prepared", where, batch_size)
    return prepared.with_format("numpy", columns=["encoder_states", "n_frames", "text_ids"], output_all_columns=True)


def prepare_qa_split(
    ds: datasets.Dataset, where: str, spec: DataSpec, encoder: FeatureEncoder, batch_size: int = 32
) -> datasets.Dataset:
    """QA rows of (question encoder states, n_frames, question_ids, answer_ids, answer codes flattened
    with n_codes frames, question, answer), computed once with datasets.map and cached."""
    sr, window = encoder.sampling_rate, encoder.feature_extractor.n_samples
    speech_out = has_answer_speech(ds, spec)
    key = encoder.key("qa", ds._fingerprint, where, dataclasses.asdict(spec))
    answer_codes = answer_codes_reader(spec)

    def read(i: int, row: dict) -> dict:
        name = f"{where}, row {i}"
        parsed = read_qa_row(row, name, spec, sr, window)
        parsed["codes"] = answer_codes(row, parsed, name)
        return parsed

    def process(batch: dict, indices: list[int]) -> dict:
        columns = list(batch)
        kept = _kept_rows(
            list(zip(indices, (dict(zip(columns, v)) for v in zip(*batch.values())))), read, spec.skip_bad_rows
        )
        if not kept:
            return {
                k: []
                for k in (
                    "encoder_states",
                    "n_frames",
                    "question_ids",
                    "answer_ids",
                    "codes",
                    "n_codes",
                    "question",
                    "answer",
                )
            }
        states, lengths = encoder.states([p["wave"] for p in kept], where)
        return {
            "encoder_states": states,
            "n_frames": lengths,
            "question_ids": encoder.token_ids([p[spec.question_column] for p in kept]),
            "answer_ids": encoder.token_ids([p[spec.answer_column] for p in kept]),
            "codes": [p["codes"].reshape(-1).astype(np.int16) for p in kept],
            "n_codes": [int(p["codes"].shape[0]) if speech_out else 0 for p in kept],
            "question": [p[spec.question_column] for p in kept],
            "answer": [p[spec.answer_column] for p in kept],
        }

    prepared = encoder.cached_map(ds, process, key, "prepared-qa", where, batch_size)
    return prepared.with_format(
        "numpy",
        columns=["encoder_states", "n_frames", "question_ids", "answer_ids", "codes", "n_codes"],
        output_all_columns=True,
    )


def answer_codes_reader(spec: DataSpec) -> Callable[[dict, dict, str], np.ndarray]:
    """Answer speech as SNAC codes [n, 7]: parsed from answer_snac, else the answer audio encoded by
    the codec (loaded on first use), else none."""
    codec = None

    def answer_codes(row: dict, parsed: dict, name: str) -> np.ndarray:
        nonlocal codec
        if parsed["codes"] is not None:
            return parsed["codes"].numpy()
        audio = row.get(spec.answer_audio_column)
        if audio is None:
            return np.zeros((0, N_AUDIO_LAYERS), dtype=np.int64)
        from training.speech.codec import encode_speech, load_codec

        codec = codec or load_codec(spec.codec)
        try:
            mono, rate = decode_audio(audio, f"{name}, column '{spec.answer_audio_column}'")
        except ValueError as err:
            raise DataError(str(err)) from err
        return encode_speech(codec, mono, rate).numpy()

    return answer_codes
