"""Data sources: where a run's splits come from, behind one interface.

A source (`training.data.formats.Source`) is a dataset's splits, read on demand, and a name for
messages. A user's source is any folder or file `--dataset` accepts, or a hub id (`load_source`);
the demo's synthesized corpora are sources too (built in training/demo, handed in by the engine).
`asr_splits` and `qa_splits` then choose the splits (training/data/splits.py) and columns
(training/data/columns.py), check the columns' types, and leave the audio undecoded (soundfile
decodes it later: no FFmpeg needed). What they chose comes back as a resolved `DataSpec`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import datasets

from training.data.checks import DataError, check_column_types
from training.data.columns import AUDIO_NAMES, TEXT_FALLBACK_NAMES, TEXT_NAMES, pick_column
from training.data.formats import Source, read_file, read_folder
from training.data.splits import SplitChoice, choose_splits
from training.stages import DataSpec

EMBEDDED = "embedded corpus"
EMBEDDED_QA = "embedded QA corpus"


@dataclasses.dataclass
class Chosen:
    """Splits by name, the spec with every split and column name resolved, and what was decided."""

    splits: dict[str, datasets.Dataset]
    spec: DataSpec
    notes: list[str]
    # "dataset 'X', split 'Y'" -> (the source's own split, whole; the spec naming its columns): a
    # carved slice's rows are checked as rows of the split they came from (the user's row numbers)
    checked: dict[str, tuple[datasets.Dataset, DataSpec]]


def load_source(where: str, audio_columns: Sequence[str] = AUDIO_NAMES, fmt: str = "auto") -> Source:
    """A user's dataset: a local folder or manifest file in any format formats.py reads, or a hub
    id. `audio_columns` are the manifest columns that hold audio file paths; `fmt` (data.format)
    how a local folder is read ("auto": recognized)."""
    path = Path(where).expanduser()
    if path.is_dir():
        return read_folder(path, where, audio_columns, fmt)
    if path.is_file():
        return read_file(path, where, audio_columns, fmt)
    if path.is_absolute() or where.startswith((".", "~")):
        raise DataError(f"dataset '{where}': no such folder or file")
    try:
        return Source.of(datasets.load_dataset(where), where, "hub dataset")
    except Exception as err:  # noqa: BLE001 - an unknown id, no network, a broken repo: all one message
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"dataset '{where}': no such local folder or file, and loading it as a hub dataset failed "
            f"({type(err).__name__}: {reason})"
        ) from err


def asr_audio_columns(spec: DataSpec) -> tuple[str, ...]:
    return (spec.audio_column,) if spec.audio_column else AUDIO_NAMES


def asr_splits(source: Source, spec: DataSpec, seed: int) -> Chosen:
    """The training split and the evaluation splits (audio + transcript), audio undecoded."""
    choice = choose_splits(
        source, spec.train_split, spec.heldout_split, spec.dev_split, seed, spec.carve_fraction, spec.carve_max_rows
    )
    train_where = f"dataset '{source.name}', split '{choice.train}'"
    columns = choice.splits[choice.train].column_names
    audio = pick_column(columns, spec.audio_column, "audio", "--audio-column", train_where, AUDIO_NAMES)
    text = pick_column(
        columns, spec.text_column, "transcript", "--text-column", train_where, TEXT_NAMES, TEXT_FALLBACK_NAMES
    )
    spec = dataclasses.replace(
        spec,
        train_split=choice.train,
        heldout_split=choice.heldout,
        dev_split=choice.dev,  # None: no dev split (early stopping off)
        audio_column=audio,
        text_column=text,
    )
    splits = {}
    for split, ds in choice.splits.items():
        where = f"dataset '{source.name}', split '{split}'"
        for column in (audio, text):
            if column not in ds.column_names:
                raise DataError(f"{where}: no column '{column}' (columns: {ds.column_names})")
        check_column_types(ds, where, spec)
        splits[split] = _undecoded_and_cut(ds, split == choice.train, spec, (audio,))
    notes = [f"dataset '{source.name}' ({source.kind}): " + _describe(splits, spec), *source.notes, *choice.notes]
    return Chosen(splits, spec, notes, _whole_splits(source, choice, spec, (audio,)))


def qa_splits(source: Source, spec: DataSpec, seed: int, train_as: str, heldout_as: str) -> Chosen:
    """Spoken question answering splits, our schema or VoiceAssistant-400K's; answer speech as
    answer_snac strings or as answer audio. Chosen like the ASR splits (no dev split), and keyed
    by the ASR run's split names `train_as` and `heldout_as`, which is how the stages look them up."""
    choice = choose_splits(source, None, None, None, seed, spec.carve_fraction, spec.carve_max_rows, with_dev=False)
    splits = {}
    for split, key in ((choice.train, train_as), (choice.heldout, heldout_as)):
        ds, where = choice.splits[split], f"dataset '{source.name}', split '{split}'"
        for column in (spec.question_column, spec.question_audio_column, spec.answer_column):
            if column not in ds.column_names:
                raise DataError(f"{where}: no column '{column}' (columns: {ds.column_names})")
        check_column_types(
            ds,
            where,
            dataclasses.replace(spec, audio_column=spec.question_audio_column, text_column=spec.question_column),
        )
        for column in (spec.answer_column, spec.answer_snac_column):
            feature = ds.features.get(column)
            if feature is not None and not (isinstance(feature, datasets.Value) and "string" in feature.dtype):
                raise DataError(f"{where}, column '{column}': expected a string column, got {feature}")
        splits[key] = _undecoded_and_cut(
            ds, split == choice.train, spec, (spec.question_audio_column, spec.answer_audio_column)
        )
    renamed = "" if (choice.train, choice.heldout) == (train_as, heldout_as) else " (named as the ASR splits)"
    notes = [
        f"QA dataset '{source.name}' ({source.kind}): train '{choice.train}' {len(splits[train_as]):,} rows, "
        f"held-out '{choice.heldout}' {len(splits[heldout_as]):,} rows{renamed}",
        *source.notes,
        *choice.notes,
    ]
    audio = (spec.question_audio_column, spec.answer_audio_column)
    return Chosen(splits, spec, notes, _whole_splits(source, choice, spec, audio))


def has_answer_speech(ds: datasets.Dataset, spec: DataSpec) -> bool:
    return spec.answer_snac_column in ds.column_names or spec.answer_audio_column in ds.column_names


def _whole_splits(
    source: Source, choice: SplitChoice, spec: DataSpec, audio: Sequence[str]
) -> dict[str, tuple[datasets.Dataset, DataSpec]]:
    """The source's splits the choice came from, whole, for the row checks (Chosen.checked)."""
    return {
        f"dataset '{source.name}', split '{n}'": (
            _undecoded_and_cut(source.split(n), n == choice.train, spec, audio),
            spec,
        )
        for n in choice.source_names
    }


def _describe(splits: dict[str, datasets.Dataset], spec: DataSpec) -> str:
    roles = [("train", spec.train_split), ("held-out", spec.heldout_split), ("dev", spec.dev_split)]
    shown = ", ".join(f"{role} '{name}' {len(splits[name]):,} rows" for role, name in roles if name in splits)
    return f"{shown}; audio column '{spec.audio_column}', transcript column '{spec.text_column}'"


def _undecoded_and_cut(
    ds: datasets.Dataset, is_train: bool, spec: DataSpec, audio_columns: Sequence[str]
) -> datasets.Dataset:
    """Audio columns left undecoded (we decode ourselves: no FFmpeg needed); evaluation splits cut
    to spec.max_eval_examples."""
    for column in audio_columns:
        feature = ds.features.get(column)
        if isinstance(feature, datasets.Audio) and feature.decode:
            ds = ds.cast_column(column, datasets.Audio(decode=False))
    if spec.max_eval_examples is not None and not is_train and len(ds) > spec.max_eval_examples:
        ds = ds.select(range(spec.max_eval_examples))
    return ds
