"""The training splits read row by row, with the frozen encoder run inside the training step.

For data too large to encode up front (the feature cache costs ~553 MB per hour of speech in fp32
for whisper-small): each row is read when the loader asks for it (a shard folder is memory-mapped,
so memory does not grow with the data), decoded, resampled and turned into log-mel features in the
loader's workers; the model computes the encoder states in its forward, without gradients. Nothing
is computed before the first step but the lengths the sampler groups by, read from the shards'
`seconds` column (or estimated from the transcript's length where a source has none).

Spoken-QA rows (QAEncodeInStep) come the same way, so a stage that mixes tasks streams too: the
question's log-mel is made by the loader, the answer's codes parsed from answer_snac (or encoded
from the answer audio by the codec, in the worker). Their grouping lengths are estimated from the
texts and the answer_snac frame count, read in chunks before the stage.

The sampler and the data position in a checkpoint are the same as for cached features, so resume
is as exact as there; the global order does not depend on the number of processes.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch

from training.data.checks import DataError, read_qa_row, read_row
from training.data.features import answer_codes_reader
from training.data.sources import has_answer_speech
from training.speech.layout import N_AUDIO_LAYERS, n_adapter_frames, n_encoder_frames
from training.speech.snac_codes import SNAC_24KHZ_CONFIG, samples_per_frame
from training.stages import DataSpec

CHARS_PER_TOKEN = 4  # a transcript's length in tokens, estimated for grouping only
SECONDS_PER_CHAR = 0.07  # speech length estimated from a transcript where a source has no seconds
CODE_FRAMES_PER_SECOND = SNAC_24KHZ_CONFIG["sampling_rate"] / samples_per_frame()
LENGTH_CHUNK = 10_000  # rows per read when the grouping lengths are estimated
MAX_BAD_ROWS_IN_A_ROW = 100  # with --skip-bad-rows, more consecutive bad rows than this stop the run


def _log_mel(feature_extractor: Any, wave: np.ndarray) -> np.ndarray:
    features = feature_extractor(
        [wave], sampling_rate=feature_extractor.sampling_rate, return_tensors="np", padding="max_length"
    ).input_features[0]
    return features.astype(np.float32)


def _snac_frames(snac: str) -> int:
    """Frames in an answer_snac string ("# c1 ... c7 # ...", a closing "#" allowed), unparsed."""
    return snac.count("#") - snac.rstrip().endswith("#")


class _MadeOnDemand(torch.utils.data.Dataset):
    """What both kinds of streamed rows share: the source rows, where they come from (for error
    messages), and the loader-side work of log-mel, token ids and encoder frame counts."""

    def __init__(
        self,
        ds: datasets.Dataset,
        where: str,
        spec: DataSpec,
        feature_extractor: Any,
        tokenizer: Any,
        n_mel_frames: int,
    ) -> None:
        self.ds, self.where, self.spec = ds, where, spec
        self.feature_extractor, self.tokenizer = feature_extractor, tokenizer
        self.n_mel_frames = n_mel_frames
        self.sampling_rate = feature_extractor.sampling_rate

    def __len__(self) -> int:
        return len(self.ds)

    def frames(self, n_samples: int) -> int:
        """Encoder frames a clip of n_samples fills, as the cached path records them."""
        return n_encoder_frames(int(n_samples), self.sampling_rate, self.n_mel_frames // 2)

    def token_ids(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int64)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Row i made by make_row; a bad row stops the run with its name, or with --skip-bad-rows is
        replaced by the next readable row (the sampler already chose the index, so the batch keeps
        its size and a resumed run reads the same rows)."""
        for k in range(MAX_BAD_ROWS_IN_A_ROW + 1):
            j = (int(i) + k) % len(self.ds)
            try:
                return self.make_row(j)
            except DataError as err:
                if not self.spec.skip_bad_rows:
                    raise
                print(f"skipped (--skip-bad-rows): {err}; the next readable row is read in its place", flush=True)
        raise DataError(f"{self.where}: {MAX_BAD_ROWS_IN_A_ROW + 1} bad rows in a row from row {i}")

    def make_row(self, i: int) -> dict[str, Any]:
        raise NotImplementedError


class EncodeInStep(_MadeOnDemand):
    """ASR rows as (input_features [mels, frames], n_frames, text_ids, text), made on demand."""

    def __init__(self, ds: datasets.Dataset, where: str, spec: DataSpec, *encoding: Any) -> None:
        super().__init__(ds.select_columns([spec.audio_column, spec.text_column]), where, spec, *encoding)
        texts = ds[spec.text_column]  # one column read: the grouping lengths, no audio decoded
        self.text_tokens = np.array([len(t or "") // CHARS_PER_TOKEN + 1 for t in texts])
        if "seconds" in ds.column_names:
            seconds = np.asarray(ds["seconds"], dtype=np.float64)
        else:
            seconds = np.array([len(t or "") * SECONDS_PER_CHAR for t in texts])
        # encoder frames per row (the sampler groups by these)
        self.n_frames = np.array([self.frames(n) for n in (seconds * self.sampling_rate).astype(np.int64)])

    def lengths(self, frame_stack: int) -> np.ndarray:
        """Approximate positions per row (speech + transcript), for a task mixture's grouping."""
        return np.array([n_adapter_frames(int(f), frame_stack) for f in self.n_frames]) + self.text_tokens

    def make_row(self, i: int) -> dict[str, Any]:
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
        return {
            "input_features": _log_mel(self.feature_extractor, wave),
            "n_frames": self.frames(len(wave)),
            "text_ids": self.token_ids(text),
            "text": text,
        }


class QAEncodeInStep(_MadeOnDemand):
    """Spoken-QA rows as the cached ones (question_ids, answer_ids, codes, n_codes, question, answer)
    with the question's log-mel (input_features) in place of its encoder states, made on demand."""

    def __init__(self, ds: datasets.Dataset, where: str, spec: DataSpec, *encoding: Any) -> None:
        super().__init__(ds, where, spec, *encoding)
        self.speech_out = has_answer_speech(ds, spec)
        self.answer_codes = answer_codes_reader(spec)
        self.estimates = self._estimates()

    def _estimates(self) -> dict[str, np.ndarray]:
        """Per row, for grouping only: encoder frames of the question, question and answer tokens,
        answer code frames (counted in answer_snac, else estimated from the answer's length)."""
        spec = self.spec
        snac = spec.answer_snac_column in self.ds.column_names
        columns = [spec.question_column, spec.answer_column] + ([spec.answer_snac_column] if snac else [])
        out: dict[str, list] = {"n_frames": [], "question_tokens": [], "answer_tokens": [], "n_codes": []}
        for chunk in self.ds.select_columns(columns).iter(batch_size=LENGTH_CHUNK):
            questions, answers = chunk[spec.question_column], chunk[spec.answer_column]
            seconds = np.array([len(q or "") * SECONDS_PER_CHAR for q in questions])
            out["n_frames"] += [self.frames(n) for n in (seconds * self.sampling_rate).astype(np.int64)]
            out["question_tokens"] += [len(q or "") // CHARS_PER_TOKEN + 1 for q in questions]
            out["answer_tokens"] += [len(a or "") // CHARS_PER_TOKEN + 1 for a in answers]
            if snac:
                out["n_codes"] += [_snac_frames(c or "") for c in chunk[spec.answer_snac_column]]
            elif self.speech_out:
                out["n_codes"] += [int(len(a or "") * SECONDS_PER_CHAR * CODE_FRAMES_PER_SECOND) + 1 for a in answers]
            else:
                out["n_codes"] += [0] * len(answers)
        return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}

    def answers(self) -> list[str]:
        """The answer texts (for the majority-answer floor), read from one column."""
        return [(a or "").strip() for a in self.ds[self.spec.answer_column]]

    def make_row(self, i: int) -> dict[str, Any]:
        name = f"{self.where}, row {i}"
        row = self.ds[int(i)]
        spec = self.spec
        parsed = read_qa_row(row, name, spec, self.sampling_rate, self.feature_extractor.n_samples)
        codes = self.answer_codes(row, parsed, name) if self.speech_out else np.zeros((0, N_AUDIO_LAYERS))
        question, answer = parsed[spec.question_column], parsed[spec.answer_column]
        return {
            "input_features": _log_mel(self.feature_extractor, parsed["wave"]),
            "n_frames": self.frames(len(parsed["wave"])),
            "question_ids": self.token_ids(question),
            "answer_ids": self.token_ids(answer),
            "codes": codes.reshape(-1).astype(np.int16),
            "n_codes": int(codes.shape[0]),
            "question": question,
            "answer": answer,
        }
