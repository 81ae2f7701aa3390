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

Which reading a folder gets (``data.format`` "auto"): shard and save_to_disk folders name
themselves. Otherwise split-named manifests at the top (``train.jsonl``, ``test_manifest.json``)
and audiofolder metadata at the top or in split folders (``train/metadata.csv``) are explicit
signals; a manifest of another name, or metadata in another subfolder, a weak one. Explicit beats
weak, and the log says what was left unread; two of equal weight are refused, both named, with the
``--format`` that chooses.

A split's fingerprint (what the feature cache and a run's data identity key on) follows its files:
`datasets` hashes a manifest's paths and text, not the audio, so each audio file's size and
modification time are mixed in (one stat() per file). A save_to_disk folder's state.json keeps the
fingerprint the dataset had before its audio was embedded, so its Arrow files' are mixed in too.
Shards and data files need nothing: `datasets` already hashes their files' modification times.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from training.data.checks import AUDIO_STRUCT, SEGMENT_STRUCT, DataError
from training.data.shard import MANIFEST as SHARD_MANIFEST
from training.data.shard import PLAN as SHARD_PLAN
from training.data.shard import is_shard_folder, read_shards
from training.stages import DATA_FORMATS

MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
DATA_FILE_SUFFIXES = (".parquet", ".arrow")
STAT_CHUNK = 4096  # audio files stat()-ed per thread task (fingerprints that follow the files)
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
    notes: list[str] = field(default_factory=list)  # why this reading was chosen, for the log
    _read: dict[str, datasets.Dataset] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, splits: datasets.DatasetDict, name: str, kind: str) -> Source:
        return cls(name, kind, {s: (lambda s=s: splits[s]) for s in splits})

    @property
    def split_names(self) -> list[str]:
        return list(self.readers)

    def split(self, name: str) -> datasets.Dataset:
        if name not in self.readers:
            raise DataError(f"dataset '{self.name}': no split '{name}' ({splits_listed(self)})")
        if name not in self._read:
            self._read[name] = self.readers[name]()
        return self._read[name]


def splits_listed(source: Source) -> str:
    """'it has [...]' for a message; an empty list is said in words, never shown as if it were data."""
    if source.split_names:
        return f"it has {source.split_names}"
    return f"read as {source.kind}, it has no splits at all"


def read_folder(path: Path, name: str, audio_columns: Sequence[str], fmt: str = "auto") -> Source:
    """A local folder in the format `fmt` ("auto": recognized as the module docstring says);
    DataError naming what was found otherwise."""
    if fmt not in DATA_FORMATS:
        raise DataError(f"dataset '{name}': unknown --format '{fmt}'; expected one of {list(DATA_FORMATS)}")
    if fmt in ("auto", "shards") and is_shard_folder(path):
        return Source.of(datasets.DatasetDict(read_shards(path)), name, "shards (memory-mapped)")
    if fmt in ("auto", "shards") and (path / SHARD_PLAN).is_file():
        raise DataError(
            f"dataset '{name}': shards still being written (no {SHARD_MANIFEST} yet: the shard converter "
            "writes it once every shard is done; rerun it to finish)"
        )
    if fmt == "shards":
        raise DataError(f"dataset '{name}': --format shards, but it has no {SHARD_MANIFEST} of training.data.shard")
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if fmt in ("auto", "save_to_disk") and saved:
        return _saved_to_disk(path, name)
    if fmt == "save_to_disk":
        raise DataError(f"dataset '{name}': --format save_to_disk, but it has no dataset_dict.json or state.json")
    if fmt == "data_files":
        return _data_files(path, name, forced=True)
    layout = _Layout.of(path)
    if fmt == "manifests":
        if not layout.manifests:
            raise DataError(f"dataset '{name}': --format manifests, but it has no {'/'.join(MANIFEST_SUFFIXES)} file")
        return _manifests(name, layout.manifests, audio_columns)
    if fmt == "audiofolder":
        metadata = _metadata_under(path)
        if not metadata:
            raise DataError(f"dataset '{name}': --format audiofolder, but it has no {' or '.join(METADATA_FILES)}")
        return _audiofolder(path, name, metadata)
    return _recognized(path, name, layout, audio_columns)


@dataclass
class _Layout:
    """What a folder's top says about how to read it."""

    root: Path
    manifests: list[Path]  # manifest files at the top (metadata.* excluded: an audiofolder's own)
    metadata: list[Path]  # audiofolder metadata at the top and in the folders right below it

    @classmethod
    def of(cls, root: Path) -> _Layout:
        # Only the top and its subfolders are looked at, so that a Common Voice folder (manifests
        # beside a clips/ of a million files) is never walked; subfolder links are followed.
        entries = sorted(root.iterdir())
        manifests = [
            p for p in entries if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES and p.name not in METADATA_FILES
        ]
        near = [d / m for d in (root, *(c for c in entries if c.is_dir())) for m in METADATA_FILES]
        return cls(root, manifests, [p for p in near if p.is_file()])

    @property
    def split_manifests(self) -> list[Path]:
        return [p for p in self.manifests if _split_of(p).lower() in SPLIT_FOLDER_NAMES]

    @property
    def split_metadata(self) -> list[Path]:
        return [p for p in self.metadata if p.parent == self.root or p.parent.name.lower() in SPLIT_FOLDER_NAMES]

    def shown(self, paths: Sequence[Path]) -> str:
        names = [str(p.relative_to(self.root)) for p in paths]
        return ", ".join(names[:4]) + (f", ... ({len(names)} files)" if len(names) > 4 else "")


def _recognized(path: Path, name: str, layout: _Layout, audio_columns: Sequence[str]) -> Source:
    """Manifests or an audiofolder by their signals (explicit beats weak; a tie is refused), else
    metadata further down, else data files."""
    explicit_manifests, explicit_metadata = layout.split_manifests, layout.split_metadata
    if layout.manifests and layout.metadata and bool(explicit_manifests) == bool(explicit_metadata):
        why = "both name splits" if explicit_manifests else "neither names a split"
        raise DataError(
            f"dataset '{name}': two readings fit equally well ({why}): {_manifest_kind(layout.manifests)} "
            f"manifests ({layout.shown(layout.manifests)}) or an audiofolder ({layout.shown(layout.metadata)}); "
            f"choose one with --format manifests or --format audiofolder (recipe: data.format)"
        )
    if layout.manifests and (explicit_manifests or not layout.metadata):
        source = _manifests(name, layout.manifests, audio_columns)
        if layout.metadata:
            source.notes.append(
                f"dataset '{name}': read as {source.kind}, since manifests at its top name the splits "
                f"({layout.shown(explicit_manifests)}); the audiofolder metadata below it "
                f"({layout.shown(layout.metadata)}) is not read (--format audiofolder reads it instead)"
            )
        return source
    if layout.metadata:
        source = _audiofolder(path, name, _metadata_under(path))
        if layout.manifests:
            source.notes.append(
                f"dataset '{name}': read as an audiofolder, since its metadata names the splits "
                f"({layout.shown(explicit_metadata)}); the files at its top ({layout.shown(layout.manifests)}) "
                "are not read as manifests (--format manifests reads them instead)"
            )
        return source
    deep = _metadata_under(path)
    if deep:  # metadata further down (e.g. one per speaker folder)
        return _audiofolder(path, name, deep)
    files = [p for p in path.rglob("*") if p.is_file()]
    if any(p.suffix.lower() in DATA_FILE_SUFFIXES for p in files):
        return _data_files(path, name, forced=False)
    found = sorted(str(p.relative_to(path)) for p in files)
    hint = ""
    if any(p.rsplit(".", 1)[-1].lower() in ("wav", "flac", "ogg", "mp3") for p in found):
        hint = " (audio files but no metadata.csv/metadata.jsonl: the transcripts are missing)"
    shown = ", ".join(found[:8]) + (f", ... ({len(found)} files)" if len(found) > 8 else "") if found else "nothing"
    raise DataError(f"dataset '{name}': unknown format{hint}; found {shown}; expected {ACCEPTED}")


def _metadata_under(root: Path) -> list[Path]:
    """Every audiofolder metadata file: at the top, and anywhere under each subfolder (a linked
    subfolder followed: rglob from the top would skip it and find no splits)."""
    found = [root / m for m in METADATA_FILES if (root / m).is_file()]
    for child in sorted(c for c in root.iterdir() if c.is_dir()):
        found += sorted(p for p in child.rglob("metadata.*") if p.name in METADATA_FILES and p.is_file())
    return found


def _manifests(name: str, manifests: list[Path], audio_columns: Sequence[str]) -> Source:
    by_split: dict[str, list[Path]] = {}
    for p in manifests:
        by_split.setdefault(_split_of(p), []).append(p)
    for split, paths in by_split.items():
        if len(paths) > 1:
            raise DataError(
                f"dataset '{name}': {' and '.join(p.name for p in paths)} would both be split '{split}'; keep one"
            )
    return Source(
        name,
        f"{_manifest_kind(manifests)} manifests",
        {split: (lambda p=paths[0]: read_manifest(p, audio_columns)) for split, paths in by_split.items()},
    )


def _saved_to_disk(path: Path, name: str) -> Source:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.Dataset):
        _following_files(loaded, sorted(path.glob("*.arrow")))
        loaded = datasets.DatasetDict({"train": loaded})
    else:
        for split, ds in loaded.items():
            _following_files(ds, sorted((path / split).glob("*.arrow")))
    return Source.of(loaded, name, "save_to_disk folder")


def _data_files(path: Path, name: str, forced: bool) -> Source:
    try:
        loaded = datasets.load_dataset(str(path))
    except Exception as err:  # noqa: BLE001 - whatever load_dataset finds wrong: one message
        if not forced:
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"dataset '{name}': --format data_files, but datasets.load_dataset cannot read it ({reason})"
        ) from err
    return Source.of(loaded, name, "data files (datasets.load_dataset)")


def _following_files(ds: datasets.Dataset, paths: Iterable[str | Path]) -> datasets.Dataset:
    """`ds`, its fingerprint changed to follow each file's size and modification time too: one
    stat() per file (100k files in well under a second on a local disk), in chunks on threads, as
    a network file system answers each in a round trip."""
    unique = list(dict.fromkeys(str(p) for p in paths))
    chunks = [unique[i : i + STAT_CHUNK] for i in range(0, len(unique), STAT_CHUNK)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        stamped = list(pool.map(_stat_lines, chunks))
    digest = hashlib.sha256(ds._fingerprint.encode())
    for lines in stamped:
        digest.update("".join(lines).encode())
    ds._fingerprint = digest.hexdigest()[:16]
    return ds


def _stat_lines(paths: list[str]) -> list[str]:
    lines = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:  # missing now: the row checks name it; its arrival changes the fingerprint
            lines.append(f"{path}\tmissing\n")
            continue
        lines.append(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n")
    return lines


def read_file(path: Path, name: str, audio_columns: Sequence[str], fmt: str = "auto") -> Source:
    """One manifest file: its rows are one split, named by the file when it is a split name."""
    if fmt not in ("auto", "manifests"):
        raise DataError(f"dataset '{name}': --format {fmt} reads a folder; a manifest file is read as manifests")
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
    return _following_files(ds, (audio["path"] for column in present for audio in columns[column]))


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
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    return _following_files(ds, (audio["path"] for audio in columns["audio"]))
