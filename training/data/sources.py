"""Data sources: where a run's splits come from, behind one interface.

A source is a `datasets.DatasetDict` and a name for messages. A user's source is a folder written
by ``save_to_disk``, an audiofolder, or a hub id (`load_source`); the demo's synthesized corpora
are sources too (built in training/demo, handed in by the engine). `asr_splits` and `qa_splits`
then take from any source the splits the recipe names, check their columns, and leave the audio
columns undecoded (soundfile decodes them later: no FFmpeg needed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets

from training.data.checks import DataError, check_column_types
from training.stages import DataSpec

EMBEDDED = "embedded corpus"
EMBEDDED_QA = "embedded QA corpus"


def load_source(where: str) -> datasets.DatasetDict:
    """A user's dataset: a save_to_disk folder, an audiofolder, or a hub id."""
    path = Path(where).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        return datasets.load_dataset("audiofolder", data_dir=str(path))
    if path.exists():
        raise DataError(f"dataset '{where}': expected a folder (save_to_disk or audiofolder) or a hub id")
    if path.is_absolute() or where.startswith((".", "~")):
        raise DataError(f"dataset '{where}': no such folder")
    try:
        return datasets.load_dataset(where)
    except Exception as err:  # noqa: BLE001 - an unknown id, no network, a broken repo: all one message
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"dataset '{where}': no such local folder, and loading it as a hub dataset failed "
            f"({type(err).__name__}: {reason})"
        ) from err


def asr_splits(source: datasets.DatasetDict, name: str, spec: DataSpec) -> dict[str, datasets.Dataset]:
    """The training split and the evaluation splits (audio + transcript), audio column undecoded."""
    splits = {}
    for split, where, ds in _required_splits(
        source, name, (spec.train_split, spec.heldout_split, spec.dev_split), (spec.audio_column, spec.text_column)
    ):
        check_column_types(ds, where, spec)
        splits[split] = _undecoded_and_cut(ds, split, spec, (spec.audio_column,))
    return splits


def qa_splits(source: datasets.DatasetDict, name: str, spec: DataSpec) -> dict[str, datasets.Dataset]:
    """Spoken question answering splits, our schema or VoiceAssistant-400K's; answer speech as
    answer_snac strings or as answer audio."""
    splits = {}
    for split, where, ds in _required_splits(
        source,
        name,
        (spec.train_split, spec.heldout_split),
        (spec.question_column, spec.question_audio_column, spec.answer_column),
    ):
        check_column_types(
            ds,
            where,
            dataclasses.replace(spec, audio_column=spec.question_audio_column, text_column=spec.question_column),
        )
        for column in (spec.answer_column, spec.answer_snac_column):
            feature = ds.features.get(column)
            if feature is not None and not (isinstance(feature, datasets.Value) and "string" in feature.dtype):
                raise DataError(f"{where}, column '{column}': expected a string column, got {feature}")
        splits[split] = _undecoded_and_cut(ds, split, spec, (spec.question_audio_column, spec.answer_audio_column))
    return splits


def has_answer_speech(ds: datasets.Dataset, spec: DataSpec) -> bool:
    return spec.answer_snac_column in ds.column_names or spec.answer_audio_column in ds.column_names


def _required_splits(
    source: datasets.DatasetDict, name: str, split_names: Sequence[str | None], columns: Sequence[str]
) -> Iterator[tuple[str, str, datasets.Dataset]]:
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


def _undecoded_and_cut(
    ds: datasets.Dataset, split: str, spec: DataSpec, audio_columns: Sequence[str]
) -> datasets.Dataset:
    """Audio columns left undecoded (we decode ourselves: no FFmpeg needed); evaluation splits cut
    to spec.max_eval_examples."""
    for column in audio_columns:
        feature = ds.features.get(column)
        if isinstance(feature, datasets.Audio) and feature.decode:
            ds = ds.cast_column(column, datasets.Audio(decode=False))
    if spec.max_eval_examples is not None and split != spec.train_split and len(ds) > spec.max_eval_examples:
        ds = ds.select(range(spec.max_eval_examples))
    return ds
