"""Checks of a split's rows before anything is encoded: columns, audio, rates, lengths, text.

Every failure is a `DataError` whose message names the dataset, split, row and column, and says
what was expected. `validate_split` runs a row check over all rows or an even sample of them.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from training.speech.audio import decode_audio, resample
from training.speech.snac_codes import parse_answer_snac
from training.speech.text import normalize
from training.stages import DataSpec


class DataError(ValueError):
    """Bad input data; the message names the dataset, split, row and field."""

    def __str__(self) -> str:
        text = super().__str__()
        # raised in a DataLoader worker, it is re-raised here with the worker's traceback in its
        # message (torch's ExceptionWrapper); the message itself is the traceback's last line
        if text.startswith("Caught DataError in DataLoader worker"):
            return text.rstrip().rsplit("DataError: ", 1)[-1]
        return text


# An undecoded audio value as every reader stores it: the file's bytes and/or its path, plus, for a
# segment of a longer recording, its offset and duration in seconds (speech/audio.decode_audio).
AUDIO_STRUCT = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
SEGMENT_STRUCT = {**AUDIO_STRUCT, "offset": datasets.Value("float64"), "duration": datasets.Value("float64")}


def check_column_types(ds: datasets.Dataset, where: str, spec: DataSpec) -> None:
    """The audio column holds Audio (or its undecoded {bytes, path} struct); the text column strings."""
    audio, text = ds.features[spec.audio_column], ds.features[spec.text_column]
    is_struct = isinstance(audio, dict) and {"bytes", "path"} <= set(audio)
    if not isinstance(audio, datasets.Audio) and not is_struct:
        raise DataError(
            f"{where}, column '{spec.audio_column}': expected an Audio column (or {{bytes, path}}), got {audio}"
        )
    if not (isinstance(text, datasets.Value) and text.dtype in ("string", "large_string")):
        raise DataError(f"{where}, column '{spec.text_column}': expected a string column, got {text}")


def read_row(
    audio: Any,
    text: Any,
    row: str,
    spec: DataSpec,
    sampling_rate: int,
    max_samples: int,
) -> tuple[np.ndarray, str, int]:
    """(samples at sampling_rate, stripped transcript, source rate), or DataError naming row and field."""
    where = f"{row}, column '{spec.audio_column}'"
    try:
        mono, source_rate = decode_audio(audio, where)
        wave = resample(mono, source_rate, sampling_rate, where)
    except ValueError as err:
        raise DataError(str(err)) from err
    if len(wave) > max_samples:
        raise DataError(
            f"{where}: audio is {len(wave) / sampling_rate:.1f} s, longer than the encoder's "
            f"{max_samples / sampling_rate:.0f} s window (trim or split long clips, or pass --skip-bad-rows)"
        )
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{row}, column '{spec.text_column}': empty or missing transcript {text!r}")
    if not normalize(text):
        raise DataError(f"{row}, column '{spec.text_column}': transcript {text!r} is empty after normalization")
    return wave, text.strip(), source_rate


def read_qa_row(row: dict, name: str, spec: DataSpec, sampling_rate: int, max_samples: int) -> dict[str, Any]:
    """Question speech (at sampling_rate), question and answer text, and answer codes [n, 7]
    (parsed from answer_snac, or None when the row has answer audio to encode instead)."""
    out = {}
    for column in (spec.question_column, spec.answer_column):
        text = row.get(column)
        if not isinstance(text, str) or not normalize(text):
            raise DataError(f"{name}, column '{column}': empty or missing text {text!r}")
        out[column] = text.strip()
    wave, _, source_rate = read_row(
        row[spec.question_audio_column],
        out[spec.question_column],
        name,
        dataclasses.replace(spec, audio_column=spec.question_audio_column, text_column=spec.question_column),
        sampling_rate,
        max_samples,
    )
    out["wave"], out["source_rate"], out["codes"] = wave, source_rate, None
    snac = row.get(spec.answer_snac_column)
    if snac is not None:
        try:
            out["codes"] = parse_answer_snac(snac, f"{name}, column '{spec.answer_snac_column}'")
        except ValueError as err:
            raise DataError(str(err)) from err
    return out


@dataclass
class ValidationReport:
    """What the checks found in one split (or in a sample of it)."""

    where: str
    rows: int  # rows in the split
    checked: int
    bad: list[str] = dataclasses.field(default_factory=list)  # one message per bad row
    source_rates: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: list[float] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0  # wall-clock seconds the check took

    def summary(self, sampling_rate: int) -> str:
        rates = ", ".join(f"{r} Hz x {n}" for r, n in sorted(self.source_rates.items()))
        resampled = sum(n for r, n in self.source_rates.items() if r != sampling_rate)
        lengths = f", {min(self.seconds):.1f}-{max(self.seconds):.1f} s" if self.seconds else ""
        scope = f"all {self.rows:,}" if self.checked == self.rows else f"a sample of {self.checked:,} of {self.rows:,}"
        return (
            f"{self.where}: checked {scope} rows: {len(self.bad)} bad; sample rates {rates or '-'}"
            f" ({resampled} resampled to {sampling_rate} Hz){lengths}; {self.elapsed:.1f} s"
        )


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


def validate_split(
    ds: datasets.Dataset, where: str, check: RowCheck, max_rows: int | None = None, workers: int | None = None
) -> ValidationReport:
    """Decode and check rows (all, or max_rows spread evenly over the split) without encoding them,
    on `workers` threads (soundfile and soxr release the GIL while they decode and resample)."""
    n = len(ds)
    sample = max_rows is not None and n > max_rows
    indices = np.linspace(0, n - 1, max_rows).astype(int).tolist() if sample else list(range(n))
    report = ValidationReport(where=where, rows=n, checked=len(indices))
    started = time.perf_counter()

    def one(item: tuple[int, dict]) -> tuple[float, int] | str:
        i, row = item
        try:
            return check(row, f"{where}, row {i}")
        except DataError as err:
            return str(err)

    workers = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(indices), desc=f"checking {where}", unit="rows", disable=len(indices) < 2_000)
    with ThreadPoolExecutor(workers) as pool, bar:
        for start in range(0, len(indices), 512):
            chunk = indices[start : start + 512]
            if not sample:  # a slice reads just its rows
                columns = ds[chunk[0] : chunk[-1] + 1]
                rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
            else:  # a sample, row by row: gathering rows spread over memory-mapped shards in one
                # call reads far more of the files than the rows themselves (measured: 0.7 GB for 512)
                rows = [ds[i] for i in chunk]
            for result in pool.map(one, zip(chunk, rows)):
                if isinstance(result, str):
                    report.bad.append(result)
                else:
                    report.seconds.append(result[0])
                    report.source_rates[result[1]] += 1
            bar.update(len(chunk))
    report.elapsed = time.perf_counter() - started
    return report
