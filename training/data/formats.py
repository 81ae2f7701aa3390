"""Readers for the ways speech data is commonly kept on disk, each into `datasets.Dataset` splits.

- a folder of shards written by ``python -m training.data.shard`` (memory-mapped Arrow files);
- a folder written by ``save_to_disk``;
- an audiofolder: audio files with ``metadata.csv`` / ``metadata.jsonl`` (a ``file_name`` column,
  paths relative to the metadata file), at the top or in split folders (``train/``, ``test/``, ...);
- manifests, one row per utterance: JSON lines as NeMo writes them (``audio_filepath``, ``text``,
  ``duration``, ``offset``), CSV, or TSV as Common Voice writes it (``path``, ``sentence``; paths
  resolved against a ``clips/`` folder beside the manifest); one file, or a folder of
  ``<split>.jsonl|json|csv|tsv``;
- Parquet/Arrow data files (a hub dataset's layout), read by `datasets.load_dataset` like a hub id.

Audio always stays undecoded: a ``{bytes, path}`` value per row (plus ``offset``/``duration`` for a
segment of a longer recording), which soundfile decodes later; no FFmpeg or torchcodec needed.
Nothing here writes to the user's folder. Splits are read only when asked for (a Common Voice
folder holds many TSVs the run never needs).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from training.data.checks import AUDIO_STRUCT, SEGMENT_STRUCT, DataError
from training.data.shard import MANIFEST as SHARD_MANIFEST
from training.data.shard import read_shards

MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
DATA_FILE_SUFFIXES = (".parquet", ".arrow")
# Folder names an audiofolder's splits are recognized by (as the `datasets` library does).
SPLIT_FOLDER_NAMES = ("train", "test", "validation", "valid", "dev", "eval", "heldout")

ACCEPTED = (
    "a save_to_disk folder (dataset_dict.json), an audiofolder (audio files with metadata.csv or "
    "metadata.jsonl), a manifest file or a folder of <split>.jsonl/.json/.csv/.tsv manifests, "
    "Parquet/Arrow data files, or a hub id"
)


@dataclass
class Source:
    """A dataset's splits, each read on first use; `name` is how messages call it."""

    name: str
    kind: str  # what it was read as, for the log: "audiofolder", "JSONL manifests", ...
    readers: dict[str, Callable[[], datasets.Dataset]]
    _read: dict[str, datasets.Dataset] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, splits: datasets.DatasetDict, name: str, kind: str) -> Source:
        return cls(name, kind, {s: (lambda s=s: splits[s]) for s in splits})

    @property
    def split_names(self) -> list[str]:
        return list(self.readers)

    def split(self, name: str) -> datasets.Dataset:
        if name not in self.readers:
            raise DataError(f"dataset '{self.name}': no split '{name}' (it has {self.split_names})")
        if name not in self._read:
            self._read[name] = self.readers[name]()
        return self._read[name]


def read_folder(path: Path, name: str, audio_columns: Sequence[str]) -> Source:
    """A local folder in any of the formats above (DataError naming what was found otherwise)."""
    if (path / SHARD_MANIFEST).is_file():
        return Source.of(datasets.DatasetDict(read_shards(path)), name, "shards (memory-mapped)")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({"train": loaded})
        return Source.of(loaded, name, "save_to_disk folder")
    # An audiofolder keeps its metadata at the top or in its split folders; looked for there first,
    # so that a Common Voice folder (manifests beside a clips/ of a million files) is never walked.
    near = [d / m for d in (path, *(c for c in path.iterdir() if c.is_dir())) for m in METADATA_FILES]
    if any(p.is_file() for p in near):
        return _audiofolder(path, name, sorted(p for p in path.rglob("metadata.*") if p.name in METADATA_FILES))
    manifests = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES)
    if manifests:
        return Source(
            name,
            f"{_manifest_kind(manifests)} manifests",
            {_split_of(p): (lambda p=p: read_manifest(p, audio_columns)) for p in manifests},
        )
    deep = sorted(p for p in path.rglob("metadata.*") if p.name in METADATA_FILES)
    if deep:  # metadata further down (e.g. one per speaker folder)
        return _audiofolder(path, name, deep)
    files = [p for p in path.rglob("*") if p.is_file()]
    if any(p.suffix.lower() in DATA_FILE_SUFFIXES for p in files):
        return Source.of(datasets.load_dataset(str(path)), name, "data files (datasets.load_dataset)")
    found = sorted(str(p.relative_to(path)) for p in files)
    hint = ""
    if any(p.rsplit(".", 1)[-1].lower() in ("wav", "flac", "ogg", "mp3") for p in found):
        hint = " (audio files but no metadata.csv/metadata.jsonl: the transcripts are missing)"
    shown = ", ".join(found[:8]) + (f", ... ({len(found)} files)" if len(found) > 8 else "") if found else "nothing"
    raise DataError(f"dataset '{name}': unknown format{hint}; found {shown}; expected {ACCEPTED}")


def read_file(path: Path, name: str, audio_columns: Sequence[str]) -> Source:
    """One manifest file: its rows are one split, named by the file when it is a split name."""
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataError(f"dataset '{name}': unknown format (a '{path.suffix}' file); expected {ACCEPTED}")
    split = _split_of(path)
    split = split if split in SPLIT_FOLDER_NAMES else "train"
    return Source(name, f"{_manifest_kind([path])} manifest", {split: lambda: read_manifest(path, audio_columns)})


def _split_of(manifest: Path) -> str:
    """NeMo's train_manifest.json is split 'train'; Common Voice's dev.tsv is 'dev'."""
    stem = manifest.name[: -len(manifest.suffix)]
    return stem.removesuffix("_manifest").removeprefix("manifest_") or stem


def _manifest_kind(paths: Sequence[Path]) -> str:
    kinds = {"jsonl": "JSON lines", "json": "JSON lines", "csv": "CSV", "tsv": "TSV"}
    return "/".join(sorted({kinds[p.suffix.lower()[1:]] for p in paths}))


def read_manifest(path: Path, audio_columns: Sequence[str]) -> datasets.Dataset:
    """A manifest's rows; every column in `audio_columns` it has becomes undecoded audio (paths
    resolved against the manifest's folder, or its clips/ folder as Common Voice lays it out)."""
    rows = _json_lines(path) if path.suffix.lower() in (".jsonl", ".json") else _delimited(path)
    if not rows:
        raise DataError(f"manifest {path}: no rows")
    columns = _columns(rows)
    present = [c for c in audio_columns if c in columns]
    segments = "offset" in columns
    for column in present:
        base = _audio_base(path.parent, columns[column])
        columns[column] = [
            _audio_value(value, base, row, segments, f"manifest {path}, line {i + 1}, column '{column}'")
            for i, (value, row) in enumerate(zip(columns[column], rows))
        ]
    ds = _dataset(columns, _features(columns, present, segments), f"manifest {path}")
    if not segments:
        for column in present:
            ds = ds.cast_column(column, datasets.Audio(decode=False))
    return ds


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows as columns, every key any row has (None where a row lacks it), in first-seen order."""
    return {key: [row.get(key) for row in rows] for key in dict.fromkeys(k for row in rows for k in row)}


def _json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"manifest {path}, line {number}: not JSON ({err.msg}): {line.strip()[:80]!r}") from err
            if not isinstance(row, dict):
                raise DataError(f"manifest {path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _delimited(path: Path) -> list[dict[str, Any]]:
    tsv = path.suffix.lower() == ".tsv"
    with path.open(encoding="utf-8", newline="") as f:
        # Common Voice writes its TSVs unquoted: quotes inside sentences are text.
        reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        rows = []
        for row in reader:
            if None in row:
                raise DataError(
                    f"manifest {path}, line {reader.line_num}: {len(row) - 1 + len(row[None])} fields, "
                    f"the header has {len(reader.fieldnames or [])}"
                )
            rows.append(row)
    return rows


def _audio_base(folder: Path, values: list[Any]) -> Path:
    """Where relative audio paths start: the manifest's folder, or its clips/ (Common Voice)."""
    first = next((v for v in values if isinstance(v, str) and v), None)
    clips = folder / "clips"
    if first and not Path(first).is_absolute() and not (folder / first).exists() and (clips / first).exists():
        return clips
    return folder


def _audio_value(value: Any, base: Path, row: dict, segments: bool, where: str) -> dict[str, Any]:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: expected an audio file path, got {value!r}")
    audio: dict[str, Any] = {"bytes": None, "path": str(base / value)}
    if segments:
        audio["offset"] = _seconds(row.get("offset"), where, "offset")
        audio["duration"] = _seconds(row.get("duration"), where, "duration")
    return audio


def _seconds(value: Any, where: str, what: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if seconds < 0:
        raise DataError(f"{where}: '{what}' must be a number of seconds >= 0, got {value!r}")
    return seconds


def _dataset(columns: dict[str, list[Any]], features: datasets.Features | None, where: str) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_dict(columns, features=features)
    except (ValueError, TypeError, pa.ArrowException) as err:  # e.g. a column of numbers and strings
        raise DataError(f"{where}: columns of mixed types ({type(err).__name__}: {str(err)[:200]})") from err


def _features(columns: dict[str, list[Any]], audio: Sequence[str], segments: bool) -> datasets.Features | None:
    """Audio columns as undecoded structs; the rest inferred (None when nothing needs fixing)."""
    if not audio:
        return None
    inferred = _dataset({k: v for k, v in columns.items() if k not in audio}, None, "manifest").features
    struct = SEGMENT_STRUCT if segments else AUDIO_STRUCT
    return datasets.Features({k: struct if k in audio else inferred[k] for k in columns})


def _audiofolder(root: Path, name: str, metadata: list[Path]) -> Source:
    """Splits from top-level split folders (train/, test/, ...) or one 'train' split; each split's
    rows are those of every metadata file under it, file_name becoming the 'audio' column."""
    by_split: dict[str, list[Path]] = {}
    for meta in metadata:
        top = meta.relative_to(root).parts[0]
        split = top if len(meta.relative_to(root).parts) > 1 and top.lower() in SPLIT_FOLDER_NAMES else "train"
        by_split.setdefault(split, []).append(meta)
    return Source(name, "audiofolder", {s: (lambda m=m: _audiofolder_split(m)) for s, m in by_split.items()})


def _audiofolder_split(metadata: list[Path]) -> datasets.Dataset:
    rows = []
    for meta in metadata:
        for i, row in enumerate(_json_lines(meta) if meta.suffix == ".jsonl" else _delimited(meta)):
            if "file_name" not in row:
                raise DataError(f"{meta}: no column 'file_name' (columns: {list(row)}); it names each audio file")
            where = f"{meta}, row {i + 1}, column 'file_name'"
            audio = _audio_value(row.pop("file_name"), meta.parent, row, False, where)
            rows.append({"audio": audio, **row})
    columns = _columns(rows)
    ds = _dataset(columns, _features(columns, ["audio"], False), f"metadata {', '.join(map(str, metadata))}")
    return ds.cast_column("audio", datasets.Audio(decode=False))
