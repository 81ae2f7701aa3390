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

from training.data.formats import Source
from training.data.splits import choose_splits
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
    assert not (tmp_path / "out" / "run_record.json").exists()  # --validate-data writes nothing

    # Two steps of the demo recipe's asr stage: trained, exported, scored, and stopped by its WER gate.
    code = _run(tmp_path, tiny_checkpoints, dataset, "--stage", "asr", "--max-steps", "2")
    out = capsys.readouterr().out
    assert code == 3 and "above the stage's gate" in out, out
    record = json.loads((tmp_path / "out" / "run_record.json").read_text())
    assert record["stages"]["asr"]["steps"] == 2, out
    assert _digest(root) == before


# -- splits ------------------------------------------------------------------------------------


def _source(**sizes: int) -> Source:
    return Source.of(
        datasets.DatasetDict({name: datasets.Dataset.from_dict({"i": list(range(n))}) for name, n in sizes.items()}),
        "toy",
        "test",
    )


@pytest.mark.parametrize(
    "sizes, given, expected",
    [
        (dict(train=40, validation=5, test=6), {}, ("train", "test", "validation")),
        (dict(train=40, dev=5, test=6), {}, ("train", "test", "dev")),
        (dict(train=40, dev=5, heldout=6), {}, ("train", "heldout", "dev")),
        (dict(train=40, validation=5), {}, ("train", "validation", "train-dev")),
        (dict(all=40), {}, ("all", "all-heldout", "all-dev")),
        (dict(a=40, b=5, c=6), dict(train="a", heldout="c", dev="b"), ("a", "c", "b")),
        (dict(train=40, test=6), dict(dev="none"), ("train", "test", None)),
    ],
)
def test_splits_are_recognized_or_carved_from_train(sizes, given, expected):
    choice = choose_splits(_source(**sizes), given.get("train"), given.get("heldout"), given.get("dev"), 7, 0.05, 500)
    assert (choice.train, choice.heldout, choice.dev) == expected
    rows = {name: set(ds["i"]) for name, ds in choice.splits.items()}
    carved = [name for name in rows if name.startswith(f"{choice.train}-")]
    for name in carved:  # a carved slice is taken out of train: never trained on
        assert rows[name] and not rows[name] & rows[choice.train]
    if carved:
        assert sum(len(rows[n]) for n in [choice.train, *carved]) == sizes[choice.train]
        again = choose_splits(_source(**sizes), *(given.get(k) for k in ("train", "heldout", "dev")), 7, 0.05, 500)
        assert {n: ds["i"] for n, ds in again.splits.items()} == {n: ds["i"] for n, ds in choice.splits.items()}


# -- bad input: one clear message, exit code 2, no traceback ------------------------------------


def _tone(path: Path, seconds: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.sin(np.arange(int(16000 * seconds)) / 7)).astype("float32"), 16000)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _good_rows(root: Path, n: int = 4) -> list[dict]:
    return [{"audio_filepath": _tone(root / f"{i}.wav").name, "text": "the cat sat"} for i in range(n)]


def _bad_input(root: Path, case: str) -> tuple[Path, list[str], str]:
    """(dataset, extra flags, the message expected) for each kind of bad input."""
    if case == "unknown format":
        (root / "notes.txt").parent.mkdir(parents=True)
        (root / "notes.txt").write_text("hello")
        return root, [], f"dataset '{root}': unknown format; found notes.txt; expected a save_to_disk folder"
    if case == "audio without transcripts":
        _tone(root / "a.wav")
        return root, [], "unknown format (audio files but no metadata.csv/metadata.jsonl: the transcripts are missing)"
    if case == "unknown file type":
        (root / "x.zip").parent.mkdir(parents=True)
        (root / "x.zip").write_bytes(b"PK")
        return root / "x.zip", [], "unknown format (a '.zip' file)"
    if case == "missing split":
        _jsonl(root / "train.jsonl", _good_rows(root))
        _jsonl(root / "test.jsonl", _good_rows(root))
        return root, ["--heldout-split", "eval"], "no split 'eval' (--heldout-split); it has ['test', 'train']"
    if case == "missing column":
        rows = [{"path": r["audio_filepath"], "transcription": r["text"]} for r in _good_rows(root)]
        return (
            _jsonl(root / "train.jsonl", rows),
            ["--text-column", "transcripton"],
            ("no column 'transcripton' (columns: ['path', 'transcription']); did you mean 'transcription'?"),
        )
    if case == "no recognizable column":
        rows = [{"wav": r["audio_filepath"], "text": r["text"]} for r in _good_rows(root)]
        return _jsonl(root / "train.jsonl", rows), [], "no audio column: none of ['audio', 'audio_filepath', 'path'"
    if case == "ambiguous columns":
        rows = [{**r, "sentence": "a dog"} for r in _good_rows(root)]
        return (
            _jsonl(root / "train.jsonl", rows),
            [],
            ("more than one column could be the transcript (['text', 'sentence']); name one with --text-column"),
        )
    if case == "unreadable audio file":
        rows = _good_rows(root)
        rows[2]["audio_filepath"] = "missing.wav"
        return _jsonl(root / "train.jsonl", rows), [], f"no file at path '{root / 'missing.wav'}'"
    if case == "empty transcript":
        rows = _good_rows(root)
        rows[1]["text"] = ""
        return (
            _jsonl(root / "train.jsonl", rows),
            [],
            "split 'train', row 1, column 'text': empty or missing transcript",
        )
    if case == "manifest line not JSON":
        path = _jsonl(root / "train.jsonl", _good_rows(root))
        path.write_text(path.read_text() + '{"audio_filepath": "0.wav", "text": }\n')
        return path, [], f"manifest {path}, line 5: not JSON (Expecting value)"
    if case == "metadata without file_name":
        _tone(root / "a.wav")
        (root / "metadata.csv").write_text("file,transcription\na.wav,a cat\n")
        return root, [], f"{root / 'metadata.csv'}: no column 'file_name' (columns: ['file', 'transcription'])"
    raise AssertionError(case)


BAD_CASES = [
    "unknown format",
    "audio without transcripts",
    "unknown file type",
    "missing split",
    "missing column",
    "no recognizable column",
    "ambiguous columns",
    "unreadable audio file",
    "empty transcript",
    "manifest line not JSON",
    "metadata without file_name",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_clear_message(tmp_path, tiny_checkpoints, capsys, case):
    dataset, extra, expected = _bad_input(tmp_path / "data", case)
    code = _run(tmp_path, tiny_checkpoints, dataset, "--validate-data", *extra)
    out = capsys.readouterr()
    assert code == 2, out.out
    assert expected in out.out, out.out
    assert "Traceback" not in out.out + out.err


def test_a_split_smaller_than_a_batch_is_named(tmp_path, tiny_checkpoints, capsys):
    dataset = _jsonl(tmp_path / "data" / "train.jsonl", _good_rows(tmp_path / "data", 12))
    code = _run(tmp_path, tiny_checkpoints, dataset, "--stage", "asr", "--max-steps", "2")
    out = capsys.readouterr().out
    assert code == 2, out
    assert "split 'train' has 10 training items, fewer than one global batch (32)" in out


def test_early_stopping_reads_the_dev_slice_never_the_heldout_split(tmp_path, tiny_checkpoints, capsys):
    rows = [{"audio_filepath": _tone(tmp_path / "d" / f"{i}.wav", 1 + i / 40).name, "text": "a cat"} for i in range(40)]
    _jsonl(tmp_path / "d" / "train.jsonl", rows)
    _jsonl(tmp_path / "d" / "test.jsonl", rows[:4])
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"batch_size": 8, "stages": {"asr": {"eval_every": 1, "max_wer": None}}}))
    code = _run(
        tmp_path, tiny_checkpoints, tmp_path / "d", "--stage", "asr", "--max-steps", "2", "--recipe", str(recipe)
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "no dev split: holding out 2 of 40 rows of 'train' as 'train-dev'" in out
    assert "[asr] step 1: train-dev loss" in out and "[asr] step 2: train-dev loss" in out
    assert "step 1: test loss" not in out and "step 2: test loss" not in out
    record = json.loads((tmp_path / "out" / "run_record.json").read_text())
    assert record["data"] == {
        "dataset": str(tmp_path / "d"),
        "train_split": "train",
        "heldout_split": "test",
        "dev_split": "train-dev",
        "audio_column": "audio_filepath",
        "text_column": "text",
    }


def test_several_datasets_mix_by_weight(tmp_path, tiny_checkpoints, utterances, capsys):
    """An audiofolder and NeMo manifests (other columns, audio with offsets) in one run, 1 : 0.5."""
    folder = audiofolder(tmp_path / "af", utterances)
    manifests = nemo_manifests(tmp_path / "nemo", utterances)
    before = [_digest(folder), _digest(manifests)]
    mixed = ("--dataset", str(folder), "--dataset", f"{manifests}:0.5")
    enc, llm = tiny_checkpoints
    common = ["--encoder", enc, "--llm", llm, "--cache-dir", str(tmp_path / "cache"), *mixed]
    assert main([*common, "--validate-data", "--output-dir", str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    # 84 training rows in all (42 + 42), shared 2 : 1
    assert f"mixing 2 datasets: {folder}: 56 training rows per epoch (weight 1, 42 rows); " in out, out
    assert f"{manifests}: 28 training rows per epoch (weight 0.5, 42 rows)" in out
    assert "mixed: train 84 rows, held-out 16 rows, dev 4 rows" in out
    assert f"dataset '{manifests}', split 'train': checked all 44 rows: 0 bad" in out

    code = main([*common, "--stage", "asr", "--max-steps", "2", "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 3, out  # trained two steps, then the stage's WER gate
    assert json.loads((tmp_path / "out" / "run_record.json").read_text())["stages"]["asr"]["steps"] == 2
    assert [_digest(folder), _digest(manifests)] == before


def test_spoken_qa_from_a_jsonl_manifest(tmp_path, tiny_checkpoints, capsys):
    """--qa-dataset reads the same formats: question audio by path, answer speech as SNAC codes;
    its one split gets a carved held-out slice, named as the ASR run's held-out split."""
    asr = [{"audio_filepath": _tone(tmp_path / "asr" / f"{i}.wav").name, "text": "a cat"} for i in range(4)]
    _jsonl(tmp_path / "asr" / "train.jsonl", asr)
    _jsonl(tmp_path / "asr" / "test.jsonl", asr)
    qa = [
        {
            "question_audio": _tone(tmp_path / "qa" / f"q{i}.wav", 1 + i / 20).name,
            "question": "what is the opposite of hot",
            "answer": "cold",
            "answer_snac": "# 1 2 3 4 5 6 7 # 8 9 10 11 12 13 14",
        }
        for i in range(20)
    ]
    _jsonl(tmp_path / "qa" / "qa.jsonl", qa)
    code = _run(tmp_path, tiny_checkpoints, tmp_path / "asr", "--qa-dataset", str(tmp_path / "qa"), "--validate-data")
    out = capsys.readouterr().out
    assert code == 0, out
    assert (
        f"QA dataset '{tmp_path / 'qa'}' (JSON lines manifests): train 'qa' 19 rows, held-out 'qa-heldout' 1 rows"
        in out
    )
    assert f"dataset '{tmp_path / 'qa'}', split 'qa': checked all 20 rows: 0 bad" in out
