"""The training split read row by row, with the frozen encoder run inside the training step.

For data too large to encode up front (the feature cache costs ~553 MB per hour of speech in fp32
for whisper-small): each row is read when the loader asks for it (a shard folder is memory-mapped,
so memory does not grow with the data), decoded, resampled and turned into log-mel features in the
loader's workers; the model computes the encoder states in its forward, without gradients. Nothing
is computed before the first step but the lengths the sampler groups by, read from the shards'
`seconds` column (or estimated from the transcript's length where a source has none).

The sampler and the data position in a checkpoint are the same as for cached features, so resume
is as exact as there; the global order does not depend on the number of processes.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch

from training.data.checks import read_row
from training.speech.layout import n_adapter_frames, n_encoder_frames
from training.stages import DataSpec

CHARS_PER_TOKEN = 4  # a transcript's length in tokens, estimated for grouping only
SECONDS_PER_CHAR = 0.07  # speech length estimated from a transcript where a source has no seconds


class EncodeInStep(torch.utils.data.Dataset):
    """ASR rows as (input_features [mels, frames], n_frames, text_ids, text), made on demand."""

    def __init__(
        self,
        ds: datasets.Dataset,
        where: str,
        spec: DataSpec,
        feature_extractor: Any,
        tokenizer: Any,
        n_mel_frames: int,
    ) -> None:
        self.ds = ds.select_columns([spec.audio_column, spec.text_column])
        self.where, self.spec = where, spec
        self.feature_extractor, self.tokenizer = feature_extractor, tokenizer
        self.n_mel_frames = n_mel_frames
        self.sampling_rate = feature_extractor.sampling_rate
        texts = ds[spec.text_column]  # one column read: the grouping lengths, no audio decoded
        self.text_tokens = np.array([len(t or "") // CHARS_PER_TOKEN + 1 for t in texts])
        if "seconds" in ds.column_names:
            seconds = np.asarray(ds["seconds"], dtype=np.float64)
        else:
            seconds = np.array([len(t or "") * SECONDS_PER_CHAR for t in texts])
        samples = (seconds * self.sampling_rate).astype(np.int64)
        # encoder frames per row, as the cached path would record them (the sampler groups by these)
        self.n_frames = np.array([n_encoder_frames(int(n), self.sampling_rate, n_mel_frames // 2) for n in samples])

    def __len__(self) -> int:
        return len(self.ds)

    def lengths(self, frame_stack: int) -> np.ndarray:
        """Approximate positions per row (speech + transcript), for a task mixture's grouping."""
        return np.array([n_adapter_frames(int(f), frame_stack) for f in self.n_frames]) + self.text_tokens

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.ds[int(i)]
        window = self.feature_extractor.n_samples
        wave, text, _ = read_row(
            row[self.spec.audio_column],
            row[self.spec.text_column],
            f"{self.where}, row {i}",
            self.spec,
            self.sampling_rate,
            window,
        )
        features = self.feature_extractor(
            [wave], sampling_rate=self.sampling_rate, return_tensors="np", padding="max_length"
        ).input_features[0]
        return {
            "input_features": features.astype(np.float32),
            "n_frames": n_encoder_frames(len(wave), self.sampling_rate, self.n_mel_frames // 2),
            "text_ids": np.asarray(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int64),
            "text": text,
        }
