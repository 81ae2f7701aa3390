"""Speech datasets in, length-grouped 8-stream batches out.

Any Hugging Face `datasets` source works: the embedded synthesized corpus, a folder saved with
``save_to_disk``, an audiofolder, or a hub id; the audio and text columns are named by the recipe.
Audio is read with soundfile and resampled to the encoder's rate, so no ffmpeg is needed.

Preparation (``prepare_split``) runs the frozen encoder once per utterance and caches its states
with ``datasets.map`` (the encoder is frozen in every stage, so recomputing it each step would only
burn time). The cache is keyed by the data, the encoder weights and the tokenizer.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from training.audio import decode_audio, resample
from training.layout import (IGNORE, N_AUDIO_LAYERS, SPEECH_IN_TASKS, Example, VocabLayout, n_adapter_frames,
                             n_encoder_frames, pad_token_column, task_example)
from training.snac_codes import parse_answer_snac
from training.stages import TASKS, DataSpec
from training.text import normalize

EMBEDDED = "embedded corpus"
EMBEDDED_QA = "embedded QA corpus"


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
    for split, where, ds in _required_splits(source, name, (spec.train_split, spec.heldout_split, spec.dev_split),
                                             (spec.audio_column, spec.text_column)):
        check_column_types(ds, where, spec)
        splits[split] = _undecoded_and_cut(ds, split, spec, (spec.audio_column,))
    return splits


def _required_splits(source: datasets.DatasetDict, name: str, split_names: Sequence[str | None],
                     columns: Sequence[str]) -> Iterator[tuple[str, str, datasets.Dataset]]:
    """(split, "dataset 'name', split 'split'", dataset) for each named split, which must exist
    and hold `columns`; the error names what is missing and what is there."""
    for split in dict.fromkeys(s for s in split_names if s):
        if split not in source:
            raise DataError(f"dataset '{name}': no split '{split}' (it has {sorted(source)})")
        ds, where = source[split], f"dataset '{name}', split '{split}'"
        for column in columns:
            if column not in ds.column_names:
                raise DataError(f"{where}: no column '{column}' (columns: {ds.column_names})")
        yield split, where, ds


def _undecoded_and_cut(ds: datasets.Dataset, split: str, spec: DataSpec, audio_columns: Sequence[str]) -> datasets.Dataset:
    """Audio columns left undecoded (we decode ourselves: no FFmpeg needed); evaluation splits cut
    to spec.max_eval_examples."""
    for column in audio_columns:
        feature = ds.features.get(column)
        if isinstance(feature, datasets.Audio) and feature.decode:
            ds = ds.cast_column(column, datasets.Audio(decode=False))
    if spec.max_eval_examples is not None and split != spec.train_split and len(ds) > spec.max_eval_examples:
        ds = ds.select(range(spec.max_eval_examples))
    return ds


def load_qa_splits(spec: DataSpec, cache_dir: Path, corpus_scale: str = "full", log: Callable[[str], None] = print,
                   ) -> dict[str, datasets.Dataset]:
    """Spoken question answering splits (empty when spec.qa_dataset is "none"). Accepts our schema
    and VoiceAssistant-400K's; answer speech as answer_snac strings or as answer audio."""
    if spec.qa_dataset == "none":
        return {}
    if spec.qa_dataset is None:
        from training.qa_corpus import build_qa_corpus, qa_corpus_config

        source, name = build_qa_corpus(cache_dir, qa_corpus_config(corpus_scale), log=log), EMBEDDED_QA
    else:
        name = spec.qa_dataset
        source = _load_user_dataset(spec.qa_dataset)
    splits = {}
    for split, where, ds in _required_splits(source, name, (spec.train_split, spec.heldout_split),
                                             (spec.question_column, spec.question_audio_column, spec.answer_column)):
        check_column_types(ds, where, dataclasses.replace(spec, audio_column=spec.question_audio_column,
                                                          text_column=spec.question_column))
        for column in (spec.answer_column, spec.answer_snac_column):
            feature = ds.features.get(column)
            if feature is not None and not (isinstance(feature, datasets.Value) and "string" in feature.dtype):
                raise DataError(f"{where}, column '{column}': expected a string column, got {feature}")
        splits[split] = _undecoded_and_cut(ds, split, spec, (spec.question_audio_column, spec.answer_audio_column))
    return splits


def has_answer_speech(ds: datasets.Dataset, spec: DataSpec) -> bool:
    return spec.answer_snac_column in ds.column_names or spec.answer_audio_column in ds.column_names


def check_column_types(ds: datasets.Dataset, where: str, spec: DataSpec) -> None:
    """The audio column holds Audio (or its undecoded {bytes, path} struct); the text column strings."""
    audio, text = ds.features[spec.audio_column], ds.features[spec.text_column]
    is_struct = isinstance(audio, dict) and {"bytes", "path"} <= set(audio)
    if not isinstance(audio, datasets.Audio) and not is_struct:
        raise DataError(f"{where}, column '{spec.audio_column}': expected an Audio column (or {{bytes, path}}), got {audio}")
    if not (isinstance(text, datasets.Value) and text.dtype in ("string", "large_string")):
        raise DataError(f"{where}, column '{spec.text_column}': expected a string column, got {text}")


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


def read_row(audio: Any, text: Any, row: str, spec: DataSpec, sampling_rate: int, max_samples: int,
             ) -> tuple[np.ndarray, str, int]:
    """(samples at sampling_rate, stripped transcript, source rate), or DataError naming row and field."""
    where = f"{row}, column '{spec.audio_column}'"
    try:
        mono, source_rate = decode_audio(audio, where)
        wave = resample(mono, source_rate, sampling_rate, where)
    except ValueError as err:
        raise DataError(str(err)) from err
    if len(wave) > max_samples:
        raise DataError(f"{where}: audio is {len(wave) / sampling_rate:.1f} s, longer than the encoder's "
                        f"{max_samples / sampling_rate:.0f} s window (trim or split long clips, or pass --skip-bad-rows)")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{row}, column '{spec.text_column}': empty or missing transcript {text!r}")
    if not normalize(text):
        raise DataError(f"{row}, column '{spec.text_column}': transcript {text!r} is empty after normalization")
    return wave, text.strip(), source_rate


@dataclass
class ValidationReport:
    """What the checks found in one split (or in a sample of it)."""

    where: str
    rows: int  # rows in the split
    checked: int
    bad: list[str] = dataclasses.field(default_factory=list)  # one message per bad row
    source_rates: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: list[float] = dataclasses.field(default_factory=list)

    def summary(self, sampling_rate: int) -> str:
        rates = ", ".join(f"{r} Hz x {n}" for r, n in sorted(self.source_rates.items()))
        resampled = sum(n for r, n in self.source_rates.items() if r != sampling_rate)
        lengths = f", {min(self.seconds):.1f}-{max(self.seconds):.1f} s" if self.seconds else ""
        scope = f"all {self.rows:,}" if self.checked == self.rows else f"a sample of {self.checked:,} of {self.rows:,}"
        return (f"{self.where}: checked {scope} rows: {len(self.bad)} bad; sample rates {rates or '-'}"
                f" ({resampled} resampled to {sampling_rate} Hz){lengths}")


RowCheck = Callable[[dict, str], tuple[float, int]]  # (row, name) -> (seconds, source rate), or DataError


def asr_row_check(spec: DataSpec, sampling_rate: int, max_samples: int) -> RowCheck:
    def check(row: dict, name: str) -> tuple[float, int]:
        wave, _, rate = read_row(row[spec.audio_column], row[spec.text_column], name, spec, sampling_rate, max_samples)
        return len(wave) / sampling_rate, rate
    return check


def qa_row_check(spec: DataSpec, sampling_rate: int, max_samples: int) -> RowCheck:
    def check(row: dict, name: str) -> tuple[float, int]:
        parsed = read_qa_row(row, name, spec, sampling_rate, max_samples)
        return len(parsed["wave"]) / sampling_rate, parsed["source_rate"]
    return check


def validate_split(ds: datasets.Dataset, where: str, check: RowCheck, max_rows: int | None = None) -> ValidationReport:
    """Decode and check rows (all, or max_rows spread evenly over the split) without encoding them."""
    n = len(ds)
    indices = list(range(n)) if max_rows is None or n <= max_rows else np.linspace(0, n - 1, max_rows).astype(int).tolist()
    report = ValidationReport(where=where, rows=n, checked=len(indices))
    for i in indices:
        try:
            seconds, source_rate = check(ds[i], f"{where}, row {i}")
        except DataError as err:
            report.bad.append(str(err))
            continue
        report.source_rates[source_rate] += 1
        report.seconds.append(seconds)
    return report


def tokenizer_key(tokenizer) -> str:
    """Identity of a tokenizer by its vocabulary, not its path: every stage export carries a copy
    of the same tokenizer, and the cached features must survive from stage to stage."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def prepare_split(ds: datasets.Dataset, where: str, spec: DataSpec, feature_extractor, tokenizer,
                  encode: Callable[[torch.Tensor], torch.Tensor], encoder_key: str, n_mel_frames: int,
                  cache_dir: Path, batch_size: int = 32) -> datasets.Dataset:
    """Rows of (encoder_states [n_frames, d], n_frames, text_ids, text), computed once and cached.

    A bad row stops preparation with its name, or with spec.skip_bad_rows is left out (the
    caller counts len(ds) - len(result))."""
    sr = feature_extractor.sampling_rate
    max_frames = n_mel_frames // 2
    key = hashlib.sha256(json.dumps(
        [ds._fingerprint, where, spec.audio_column, spec.text_column, spec.skip_bad_rows, encoder_key,
         tokenizer_key(tokenizer), feature_extractor.to_json_string(), n_mel_frames],
        sort_keys=True).encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)

    def process(batch: dict, indices: list[int]) -> dict:
        waves, texts = [], []
        for i, audio, text in zip(indices, batch[spec.audio_column], batch[spec.text_column]):
            try:
                wave, text, _ = read_row(audio, text, f"{where}, row {i}", spec, sr, feature_extractor.n_samples)
            except DataError:
                if spec.skip_bad_rows:
                    continue
                raise
            waves.append(wave)
            texts.append(text)
        if not waves:
            return {"encoder_states": [], "n_frames": [], "text_ids": [], "text": []}
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
    if len(prepared) == 0:
        raise DataError(f"{where}: no usable rows ({len(ds)} rows, all bad)")
    return prepared.with_format("numpy", columns=["encoder_states", "n_frames", "text_ids"], output_all_columns=True)


def read_qa_row(row: dict, name: str, spec: DataSpec, sampling_rate: int, max_samples: int) -> dict[str, Any]:
    """Question speech (at sampling_rate), question and answer text, and answer codes [n, 7]
    (parsed from answer_snac, or None when the row has answer audio to encode instead)."""
    out = {}
    for column in (spec.question_column, spec.answer_column):
        text = row.get(column)
        if not isinstance(text, str) or not normalize(text):
            raise DataError(f"{name}, column '{column}': empty or missing text {text!r}")
        out[column] = text.strip()
    wave, _, source_rate = read_row(row[spec.question_audio_column], out[spec.question_column], name,
                                    dataclasses.replace(spec, audio_column=spec.question_audio_column,
                                                        text_column=spec.question_column),
                                    sampling_rate, max_samples)
    out["wave"], out["source_rate"], out["codes"] = wave, source_rate, None
    snac = row.get(spec.answer_snac_column)
    if snac is not None:
        try:
            out["codes"] = parse_answer_snac(snac, f"{name}, column '{spec.answer_snac_column}'")
        except ValueError as err:
            raise DataError(str(err)) from err
    return out


def prepare_qa_split(ds: datasets.Dataset, where: str, spec: DataSpec, feature_extractor, tokenizer,
                     encode: Callable[[torch.Tensor], torch.Tensor], encoder_key: str, n_mel_frames: int,
                     cache_dir: Path, batch_size: int = 32) -> datasets.Dataset:
    """Rows of (question encoder states, n_frames, question_ids, answer_ids, answer codes flattened
    with n_codes frames, question, answer), computed once with datasets.map and cached."""
    sr = feature_extractor.sampling_rate
    max_frames = n_mel_frames // 2
    speech_out = has_answer_speech(ds, spec)
    key = hashlib.sha256(json.dumps(
        ["qa", ds._fingerprint, where, dataclasses.asdict(spec), encoder_key, tokenizer_key(tokenizer),
         feature_extractor.to_json_string(), n_mel_frames], sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    codec = None

    def answer_codes(row: dict, parsed: dict, name: str) -> np.ndarray:
        nonlocal codec
        if parsed["codes"] is not None:
            return parsed["codes"].numpy()
        audio = row.get(spec.answer_audio_column)
        if audio is None:
            return np.zeros((0, N_AUDIO_LAYERS), dtype=np.int64)
        from training.codec import encode_speech, load_codec

        codec = codec or load_codec(spec.codec)
        try:
            mono, rate = decode_audio(audio, f"{name}, column '{spec.answer_audio_column}'")
        except ValueError as err:
            raise DataError(str(err)) from err
        return encode_speech(codec, mono, rate).numpy()

    def process(batch: dict, indices: list[int]) -> dict:
        columns = list(batch)
        rows = [dict(zip(columns, values)) for values in zip(*batch.values())]
        kept = []
        for i, row in zip(indices, rows):
            name = f"{where}, row {i}"
            try:
                parsed = read_qa_row(row, name, spec, sr, feature_extractor.n_samples)
                parsed["codes"] = answer_codes(row, parsed, name)
            except DataError:
                if spec.skip_bad_rows:
                    continue
                raise
            kept.append(parsed)
        if not kept:
            return {k: [] for k in ("encoder_states", "n_frames", "question_ids", "answer_ids", "codes", "n_codes",
                                    "question", "answer")}
        waves = [p["wave"] for p in kept]
        features = feature_extractor(waves, sampling_rate=sr, return_tensors="pt", padding="max_length").input_features
        states = encode(features).float().numpy()
        lengths = [n_encoder_frames(len(w), sr, max_frames) for w in waves]
        ids = lambda column: [tokenizer(p[column], add_special_tokens=False).input_ids for p in kept]  # noqa: E731
        return {
            "encoder_states": [s[:n] for s, n in zip(states, lengths)],
            "n_frames": lengths,
            "question_ids": ids(spec.question_column),
            "answer_ids": ids(spec.answer_column),
            "codes": [p["codes"].reshape(-1).astype(np.int16) for p in kept],
            "n_codes": [int(p["codes"].shape[0]) if speech_out else 0 for p in kept],
            "question": [p[spec.question_column] for p in kept],
            "answer": [p[spec.answer_column] for p in kept],
        }

    prepared = ds.map(
        process, batched=True, batch_size=batch_size, with_indices=True, remove_columns=ds.column_names,
        new_fingerprint=key, cache_file_name=str(cache_dir / f"prepared-qa-{key}.arrow"), desc=f"encoding {where}",
    )
    if len(prepared) == 0:
        raise DataError(f"{where}: no usable rows ({len(ds)} rows, all bad)")
    return prepared.with_format("numpy", columns=["encoder_states", "n_frames", "question_ids", "answer_ids", "codes",
                                                  "n_codes"], output_all_columns=True)


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


class TaskMixture(torch.utils.data.Dataset):
    """A stage's training items: (task, row) pairs drawn by the stage's task mix.

    The epoch has as many items as the sources have rows; task t gets round(weight_t / total
    weight * size) of them, taken from its source (ASR rows for asr, QA rows for the rest, QA rows
    with answer speech for a1a2/t1a2) in a seeded permutation, cycled when a task needs more items
    than its source has rows. The list is fixed for the stage, so resuming needs only the sampler's
    position; the length-grouped sampler reshuffles it every epoch."""

    def __init__(self, asr: datasets.Dataset, qa: datasets.Dataset | None, task_mix: dict[str, float], seed: int,
                 frame_stack: int) -> None:
        self.sources = {"asr": asr, "qa": qa}
        speech_out = qa is not None and int(np.max(qa["n_codes"])) > 0
        usable = {t: w for t, w in task_mix.items() if w > 0 and (t == "asr" or qa is not None)
                  and (t not in ("a1a2", "t1a2") or speech_out)}
        if not usable:
            raise DataError(f"task mix {dict(task_mix)}: no task has data (QA data: {'yes' if qa is not None else 'none'})")
        self.dropped = sorted(set(t for t, w in task_mix.items() if w > 0) - set(usable))
        size = len(asr) + (len(qa) if qa is not None else 0)
        total = sum(usable.values())
        rng = np.random.default_rng(seed)
        items = []
        for task, weight in usable.items():
            source = "asr" if task == "asr" else "qa"
            n_rows = len(self.sources[source])
            count = max(1, round(weight / total * size))
            rows = np.concatenate([rng.permutation(n_rows) for _ in range(-(-count // n_rows))])[:count]
            items += [(TASKS.index(task), source == "qa", int(r)) for r in rows]
        self.items = np.array(items, dtype=np.int64)
        self.lengths = self._lengths(frame_stack)

    def _lengths(self, frame_stack: int) -> np.ndarray:
        """Approximate positions per item, for grouping similar lengths into a batch."""
        asr, qa = self.sources["asr"], self.sources["qa"]
        asr_len = np.array([n_adapter_frames(int(n), frame_stack) + len(t) for n, t in zip(asr["n_frames"], asr["text_ids"])])
        if qa is not None:
            speech = np.array([n_adapter_frames(int(n), frame_stack) for n in qa["n_frames"]])
            question = np.array([len(q) for q in qa["question_ids"]])
            answer = np.array([len(a) for a in qa["answer_ids"]])
            frames = np.asarray(qa["n_codes"]) + N_AUDIO_LAYERS + 1
        out = []
        for task, is_qa, row in self.items:
            name = TASKS[task]
            if not is_qa:
                out.append(asr_len[row])
                continue
            q = speech[row] if name in SPEECH_IN_TASKS else question[row]
            a = max(frames[row], answer[row] + 1) if name in ("a1a2", "t1a2") else answer[row]
            out.append(q + a)
        return np.asarray(out)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        task, is_qa, row = (int(v) for v in self.items[i])
        return {**self.sources["qa" if is_qa else "asr"][row], "task": TASKS[task]}


@dataclass
class SpeechTextCollator:
    """Lays out each row for its task (see layout.task_example) and pads the batch on the right.

    ASR rows (audio + transcript) serve the asr task; QA rows serve a1t2, t1t2, a1a2 and t1a2.
    `task` forces one task for every row (evaluation loaders); else rows carry their own."""

    layout: VocabLayout
    frame_stack: int
    task: str | None = None

    def _example(self, row: dict) -> tuple[Example, int, str]:
        """(laid-out example, encoder frames it uses, reference answer text)."""
        task = self.task or row.get("task", "asr")
        n_frames = int(row["n_frames"])
        speech_in = task in SPEECH_IN_TASKS
        question: int | list[int] = n_adapter_frames(n_frames, self.frame_stack) if speech_in else row["question_ids"].tolist()
        if "text_ids" in row:  # an ASR row
            if task != "asr":
                raise DataError(f"an ASR row (audio + transcript) cannot serve task '{task}'")
            return task_example(self.layout, task, question, row["text_ids"].tolist()), n_frames, str(row["text"])
        if task == "asr":  # a QA row used for ASR: transcribe the spoken question
            answer = row["question_ids"].tolist()
            return task_example(self.layout, task, question, answer), n_frames, str(row["question"])
        codes = torch.from_numpy(np.asarray(row["codes"], dtype=np.int64).reshape(-1, N_AUDIO_LAYERS))
        example = task_example(self.layout, task, question, row["answer_ids"].tolist(), codes)
        return example, n_frames if speech_in else 0, str(row["answer"])

    def __call__(self, rows: list[dict]) -> dict:
        laid_out = [self._example(r) for r in rows]
        width = max(e.input_ids.shape[1] for e, _, _ in laid_out)
        frames = max(n for _, n, _ in laid_out)
        dim = rows[0]["encoder_states"].shape[-1]
        batch = len(rows)
        input_ids = pad_token_column(self.layout)[None, :, None].repeat(batch, 1, width)
        labels = torch.full((batch, input_ids.shape[1], width), IGNORE, dtype=torch.long)
        attention = torch.zeros(batch, width, dtype=torch.long)
        audio_mask = torch.zeros(batch, width, dtype=torch.bool)
        states = torch.zeros(batch, frames, dim)
        for i, ((e, n, _), r) in enumerate(zip(laid_out, rows)):
            t = e.input_ids.shape[1]
            input_ids[i, :, :t] = e.input_ids
            labels[i, :, :t] = e.labels
            attention[i, :t] = 1
            audio_mask[i, :t] = e.audio_mask
            states[i, :n] = torch.from_numpy(np.asarray(r["encoder_states"], dtype=np.float32)[:n])
        return {
            "input_ids": input_ids, "labels": labels, "attention_mask": attention, "audio_mask": audio_mask,
            "encoder_states": states, "encoder_lengths": torch.tensor([n for _, n, _ in laid_out]),
            "texts": [ref for _, _, ref in laid_out],  # reference answers (transcripts for asr), for evaluation
            "task_ids": torch.tensor([TASKS.index(self.task or r.get("task", "asr")) for r in rows]),
        }


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1/SIGINT to the training process, which checkpoints and
    then shuts them down; a worker killed by the signal would make the loader raise mid-save."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def train_loader(dataset: datasets.Dataset | TaskMixture, layout: VocabLayout, frame_stack: int, batch_size: int,
                 seed: int, num_workers: int = 0) -> DataLoader:
    lengths = dataset.lengths if isinstance(dataset, TaskMixture) else dataset["n_frames"]
    sampler = LengthGroupedSampler(lengths, batch_size, seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                      collate_fn=SpeechTextCollator(layout, frame_stack), worker_init_fn=_ignore_stop_signals)


def eval_loader(prepared: datasets.Dataset, layout: VocabLayout, frame_stack: int, batch_size: int,
                task: str | None = None) -> DataLoader:
    """In dataset order (no shuffle) so every utterance is scored exactly once."""
    return DataLoader(prepared, batch_size=batch_size, shuffle=False, collate_fn=SpeechTextCollator(layout, frame_stack, task))
