"""Speech datasets in, length-grouped 8-stream batches out.

Any Hugging Face `datasets` source works: the embedded synthesized corpus, a folder saved with
``save_to_disk``, an audiofolder, or a hub id; the audio and text columns are named by the recipe.
Audio is read with soundfile and resampled to the encoder's rate, so no ffmpeg is needed.

Preparation (``prepare_split``) runs the frozen encoder once per utterance and caches its states
with ``datasets.map`` (the encoder is frozen in every stage, so recomputing it each step would only
burn time). The cache is keyed by the data, the encoder weights and the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from training.audio import load_waveform
from training.layout import IGNORE, VocabLayout, n_adapter_frames, n_encoder_frames, pad_token_column, speech_to_text_example
from training.stages import DataSpec

EMBEDDED = "embedded corpus"


class DataError(ValueError):
    """Bad input data; the message names the dataset, split, row and field."""


def load_speech_splits(spec: DataSpec, cache_dir: Path, corpus_scale: str = "full", log: Callable[[str], None] = print,
                       ) -> dict[str, datasets.Dataset]:
    """The training split and the evaluation splits, audio column undecoded (we decode ourselves)."""
    if spec.dataset is None:
        from training.corpus import build_corpus

        source, name = build_corpus(cache_dir, corpus_config(corpus_scale), log=log), EMBEDDED
    else:
        name = spec.dataset
        source = _load_user_dataset(spec.dataset)
    splits = {}
    for split in dict.fromkeys(s for s in (spec.train_split, spec.heldout_split, spec.dev_split) if s):
        if split not in source:
            raise DataError(f"dataset '{name}': no split '{split}' (it has {sorted(source)})")
        ds = source[split]
        for column in (spec.audio_column, spec.text_column):
            if column not in ds.column_names:
                raise DataError(f"dataset '{name}', split '{split}': no column '{column}' (columns: {ds.column_names})")
        audio = ds.features[spec.audio_column]
        if isinstance(audio, datasets.Audio) and audio.decode:  # we decode ourselves (no FFmpeg needed)
            ds = ds.cast_column(spec.audio_column, datasets.Audio(decode=False))
        if spec.max_eval_examples is not None and split != spec.train_split and len(ds) > spec.max_eval_examples:
            ds = ds.select(range(spec.max_eval_examples))
        splits[split] = ds
    return splits


def corpus_config(scale: str):
    """The embedded corpus at full size (the demo) or quick size (the tests)."""
    from training.corpus import CorpusConfig

    return CorpusConfig() if scale == "full" else CorpusConfig(n_train=480, n_dev=40, n_heldout=40)


def _load_user_dataset(where: str) -> datasets.DatasetDict:
    path = Path(where)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        return datasets.load_dataset("audiofolder", data_dir=str(path))
    if path.exists():
        raise DataError(f"dataset '{where}': expected a folder (save_to_disk or audiofolder) or a hub id")
    return datasets.load_dataset(where)


# ---------------------------------------------------------------------------------------------
# Preparation: decode, log-mel, frozen encoder states, text ids (cached)


def prepare_split(ds: datasets.Dataset, where: str, spec: DataSpec, feature_extractor, tokenizer,
                  encode: Callable[[torch.Tensor], torch.Tensor], encoder_key: str, n_mel_frames: int,
                  cache_dir: Path, batch_size: int = 32) -> datasets.Dataset:
    """Rows of (encoder_states [n_frames, d], n_frames, text_ids, text), computed once and cached."""
    sr = feature_extractor.sampling_rate
    max_frames = n_mel_frames // 2
    max_seconds = feature_extractor.n_samples / sr
    key = hashlib.sha256(json.dumps(
        [ds._fingerprint, where, spec.audio_column, spec.text_column, encoder_key, tokenizer.name_or_path,
         len(tokenizer), feature_extractor.to_json_string(), n_mel_frames], sort_keys=True).encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)

    def process(batch: dict, indices: list[int]) -> dict:
        waves, texts = [], []
        for i, audio, text in zip(indices, batch[spec.audio_column], batch[spec.text_column]):
            row = f"{where}, row {i}"
            try:
                wave = load_waveform(audio, sampling_rate=sr, where=f"{row}, column '{spec.audio_column}'")
            except ValueError as err:
                raise DataError(str(err)) from err
            if len(wave) > feature_extractor.n_samples:
                raise DataError(f"{row}, column '{spec.audio_column}': audio is {len(wave) / sr:.1f} s, longer than "
                                f"the encoder's {max_seconds:.0f} s window")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{row}, column '{spec.text_column}': empty or missing transcript {text!r}")
            waves.append(wave)
            texts.append(text.strip())
        features = feature_extractor(waves, sampling_rate=sr, return_tensors="pt", padding="max_length").input_features
        if features.shape[-1] != n_mel_frames:
            raise DataError(f"{where}: feature extractor gives {features.shape[-1]} mel frames, the encoder needs {n_mel_frames}")
        states = encode(features).float().numpy()
        lengths = [n_encoder_frames(len(w), sr, max_frames) for w in waves]
        return {
            "encoder_states": [s[:n] for s, n in zip(states, lengths)],
            "n_frames": lengths,
            "text_ids": [tokenizer(t, add_special_tokens=False).input_ids for t in texts],
            "text": texts,
        }

    prepared = ds.map(
        process, batched=True, batch_size=batch_size, with_indices=True, remove_columns=ds.column_names,
        new_fingerprint=key, cache_file_name=str(cache_dir / f"prepared-{key}.arrow"),
        desc=f"encoding {where}",
    )
    return prepared.with_format("numpy", columns=["encoder_states", "n_frames", "text_ids"], output_all_columns=True)


# ---------------------------------------------------------------------------------------------
# Batching


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices in which each run of `batch_size` has similar lengths (little padding).

    Each epoch draws a permutation from (seed, epoch), cuts it into mega-batches of
    batch_size * group_batches, sorts each by length, and shuffles the order of the batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_batches: int = 32) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = batch_size * group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).numpy()
        batches = []
        for start in range(0, len(perm), self.group):
            chunk = perm[start : start + self.group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield from batches[b].tolist()


@dataclass
class SpeechTextCollator:
    """Lays out each row (ASR: speech prompt + transcript) and pads the batch on the right."""

    layout: VocabLayout
    frame_stack: int

    def __call__(self, rows: list[dict]) -> dict:
        examples = [
            speech_to_text_example(self.layout, n_adapter_frames(int(r["n_frames"]), self.frame_stack), r["text_ids"].tolist())
            for r in rows
        ]
        width = max(e.input_ids.shape[1] for e in examples)
        frames = max(int(r["n_frames"]) for r in rows)
        dim = rows[0]["encoder_states"].shape[-1]
        batch = len(rows)
        input_ids = pad_token_column(self.layout)[None, :, None].repeat(batch, 1, width)
        labels = torch.full((batch, input_ids.shape[1], width), IGNORE, dtype=torch.long)
        attention = torch.zeros(batch, width, dtype=torch.long)
        audio_mask = torch.zeros(batch, width, dtype=torch.bool)
        states = torch.zeros(batch, frames, dim)
        for i, (e, r) in enumerate(zip(examples, rows)):
            t = e.input_ids.shape[1]
            input_ids[i, :, :t] = e.input_ids
            labels[i, :, :t] = e.labels
            attention[i, :t] = 1
            audio_mask[i, :t] = e.audio_mask
            states[i, : int(r["n_frames"])] = torch.from_numpy(np.asarray(r["encoder_states"], dtype=np.float32))
        return {
            "input_ids": input_ids, "labels": labels, "attention_mask": attention, "audio_mask": audio_mask,
            "encoder_states": states, "encoder_lengths": torch.tensor([int(r["n_frames"]) for r in rows]),
            "texts": [str(r["text"]) for r in rows],  # references, for evaluation
        }


def train_loader(prepared: datasets.Dataset, layout: VocabLayout, frame_stack: int, batch_size: int, seed: int,
                 num_workers: int = 0) -> DataLoader:
    lengths = prepared["n_frames"]
    sampler = LengthGroupedSampler(lengths, batch_size, seed)
    return DataLoader(prepared, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                      collate_fn=SpeechTextCollator(layout, frame_stack))


def eval_loader(prepared: datasets.Dataset, layout: VocabLayout, frame_stack: int, batch_size: int) -> DataLoader:
    """In dataset order (no shuffle) so every utterance is scored exactly once."""
    return DataLoader(prepared, batch_size=batch_size, shuffle=False, collate_fn=SpeechTextCollator(layout, frame_stack))
