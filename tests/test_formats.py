"""A user's own data, first try: every format `--dataset` reads trains with no other data flag.

The corpora are written here from the embedded synthesized speech (quick scale), at mixed sample
rates and in WAV, FLAC, OGG and MP3, in the layouts the field writes: an audiofolder, NeMo JSON-lines
manifests (with a long recording cut by offset/duration), a Common Voice folder, a folder of
per-split manifests, one CSV file (one split: held-out and dev slices are carved from it), and
Parquet files in a hub repository's layout (read by the same `datasets.load_dataset` call as a hub id).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import soxr

from training.demo import demo_speech
from training.run import main
from training.speech.audio import decode_audio

# (suffix, soundfile format, sample rate) cycled over the rows: mixed rates and containers.
CONTAINERS = [(".wav", "WAV", 22050), (".flac", "FLAC", 16000), (".ogg", "OGG", 24000), (".mp3", "MP3", 16000)]
N_TRAIN, N_TEST = 44, 8  # the demo recipe's global batch is 32


@pytest.fixture(scope="module")
def utterances(cache_dir) -> dict[str, list[tuple[np.ndarray, int, str]]]:
    """(samples, rate, transcript) per split, from the quick embedded corpus."""
    corpus = demo_speech(cache_dir, "quick", lambda message: None)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        rows = corpus["train" if split == "train" else "heldout"].select(range(n))
        out[split] = [(*decode_audio(row["audio"]), row["text"]) for row in rows]
    return out


def _write_audio(path: Path, samples: np.ndarray, rate: int, i: int) -> Path:
    suffix, fmt, target = CONTAINERS[i % len(CONTAINERS)]
    path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, soxr.resample(samples, rate, target) if target != rate else samples, target, format=fmt)
    return path


def audiofolder(root: Path, utterances) -> Path:
    """train/ with metadata.csv and nested clip folders; test/ with metadata.jsonl."""
    for split, rows in utterances.items():
        lines = []
        for i, (samples, rate, text) in enumerate(rows):
            audio = _write_audio(root / split / "clips" / f"spk{i % 3}" / f"{i:03d}", samples, rate, i)
            lines.append({"file_name": str(audio.relative_to(root / split)), "transcription": text})
        if split == "train":
            with (root / split / "metadata.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, ["file_name", "transcription"])
                writer.writeheader()
                writer.writerows(lines)
        else:
            (root / split / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def nemo_manifests(root: Path, utterances) -> Path:
    """train_manifest.json / test_manifest.json (JSON lines); three training utterances live in
    one long recording and are given by offset and duration."""
    for split, rows in utterances.items():
        lines = []
        for i, (samples, rate, text) in enumerate(rows[3:] if split == "train" else rows):
            audio = _write_audio(root / "audio" / split / f"{i:03d}", samples, rate, i)
            line = {"audio_filepath": str(audio.relative_to(root)), "text": text, "duration": len(samples) / rate}
            lines.append(line)
        if split == "train":
            rate = rows[0][1]
            gap = np.zeros(rate // 2, dtype=np.float32)
            parts, offset = [], 0.0
            for samples, _, text in rows[:3]:
                lines.append(
                    {
                        "audio_filepath": "audio/long.flac",
                        "text": text,
                        "offset": offset,
                        "duration": len(samples) / rate,
                    }
                )
                parts += [samples, gap]
                offset += (len(samples) + len(gap)) / rate
            sf.write(root / "audio" / "long.flac", np.concatenate(parts), rate, format="FLAC")
        (root / f"{split}_manifest.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def common_voice(root: Path, utterances) -> Path:
    """clips/*.mp3 and train/dev/test TSVs (unquoted) beside TSVs a run never needs."""
    header = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accents", "locale"]
    split_rows = {"train": utterances["train"][:-4], "dev": utterances["train"][-4:], "test": utterances["test"]}
    for split, rows in split_rows.items():
        lines = ["\t".join(header)]
        for i, (samples, rate, text) in enumerate(rows):
            name = f"common_voice_xx_{split}_{i}.mp3"
            (root / "clips").mkdir(parents=True, exist_ok=True)
            sf.write(root / "clips" / name, soxr.resample(samples, rate, 32000), 32000, format="MP3")
            lines.append("\t".join(["c0ffee", name, text, "2", "0", "", "", "", "xx"]))
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    (root / "reported.tsv").write_text('sentence_id\tsentence\tlocale\treason\n1\t"odd" one\txx\toffensive\n')
    (root / "validated.tsv").write_text((root / "train.tsv").read_text())
    return root


def split_manifests(root: Path, utterances) -> Path:
    """train.jsonl and validation.csv: a folder of per-split manifests, paths relative to it."""
    root.mkdir(parents=True)
    for split, rows in utterances.items():
        entries = []
        for i, (samples, rate, text) in enumerate(rows):
            audio = _write_audio(root / "wav" / f"{split}{i:03d}", samples, rate, i)
            entries.append({"path": str(audio.relative_to(root)), "sentence": text})
        if split == "train":
            (root / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
        else:
            with (root / "validation.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, ["path", "sentence"])
                writer.writeheader()
                writer.writerows(entries)
    return root


def one_csv(root: Path, utterances) -> Path:
    """One CSV file (file, transcript): one split only."""
    entries = []
    for i, (samples, rate, text) in enumerate(utterances["train"] + utterances["test"]):
        audio = _write_audio(root / "a" / f"{i:03d}", samples, rate, i)
        entries.append({"file": str(audio.relative_to(root)), "transcript": text})
    with (root / "all.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "transcript"])
        writer.writeheader()
        writer.writerows(entries)
    return root / "all.csv"


def parquet_repo(root: Path, utterances) -> Path:
    """README.md + data/<split>-00000-of-00001.parquet, audio embedded as bytes: a hub repo's layout."""
    features = datasets.Features(
        {
            "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
            "text": datasets.Value("string"),
        }
    )
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("# a speech dataset\n")
    for split, rows in utterances.items():
        items = []
        for i, (samples, rate, text) in enumerate(rows):
            audio = _write_audio(root / "tmp" / f"{i}", samples, rate, i)
            items.append({"audio": {"bytes": audio.read_bytes(), "path": audio.name}, "text": text})
        ds = datasets.Dataset.from_list(items, features=features).cast_column("audio", datasets.Audio(decode=False))
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    for f in (root / "tmp").iterdir():
        f.unlink()
    (root / "tmp").rmdir()
    return root


FORMATS: dict[str, tuple[Callable[[Path, dict], Path], str]] = {
    # format -> (writer, the line the run prints about what it chose)
    "audiofolder": (
        audiofolder,
        "(audiofolder): train 'train' 42 rows, held-out 'test' 8 rows, dev 'train-dev' 2 rows",
    ),
    "nemo": (nemo_manifests, "(JSON lines manifests): train 'train' 42 rows, held-out 'test' 8 rows, dev 'train-dev'"),
    "common_voice": (common_voice, "(TSV manifests): train 'train' 40 rows, held-out 'test' 8 rows, dev 'dev' 4 rows"),
    "split_manifests": (split_manifests, "train 'train' 42 rows, held-out 'validation' 8 rows, dev 'train-dev'"),
    "one_csv": (one_csv, "(CSV manifest): train 'train' 47 rows, held-out 'train-heldout' 3 rows, dev 'train-dev'"),
    "parquet_repo": (
        parquet_repo,
        "(data files (datasets.load_dataset)): train 'train' 42 rows, held-out 'test' 8 rows",
    ),
}


def _digest(root: Path) -> str:
    """Every file's path, size and content under root: the user's data is never written to."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def _run(tmp_path, tiny_checkpoints, dataset: Path, *extra: str) -> int:
    enc, llm = tiny_checkpoints
    return main(
        [
            *("--encoder", enc, "--llm", llm),
            *("--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")),
            *("--dataset", str(dataset)),
            *extra,
        ]
    )


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_validates_and_trains_with_only_dataset(tmp_path, tiny_checkpoints, utterances, capsys, fmt):
    write, chosen = FORMATS[fmt]
    dataset = write(tmp_path / fmt, utterances)
    root = tmp_path / fmt
    before = _digest(root)

    assert _run(tmp_path, tiny_checkpoints, dataset, "--validate-data") == 0
    out = capsys.readouterr().out
    assert chosen in out, out
    assert "no bad rows" in out and "resampled to 16000 Hz" in out, out

    # Two steps of the demo recipe's asr stage: trained, exported, scored, and stopped by its WER gate.
    code = _run(tmp_path, tiny_checkpoints, dataset, "--stage", "asr", "--max-steps", "2")
    out = capsys.readouterr().out
    assert code == 3 and "above the stage's gate" in out, out
    record = json.loads((tmp_path / "out" / "run_record.json").read_text())
    assert record["stages"]["asr"]["steps"] == 2, out
    assert _digest(root) == before
