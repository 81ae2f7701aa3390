"""What a run keeps of its data can be trusted: shards are never written over the user's data nor
reused for another source or size; the feature cache follows the audio files, not their names;
a folder that reads two ways is read the way it says, or refused naming both."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf

from tests.helpers import tiny_model
from tests.test_formats import _digest
from training.data import shard as converter
from training.data.checks import AUDIO_STRUCT, DataError
from training.data.features import FeatureEncoder, prepare_split
from training.data.formats import Source
from training.data.sources import asr_splits, load_source
from training.data.splits import choose_splits
from training.stages import DataSpec

REPO = Path(__file__).resolve().parents[1]
RATE = 16000


def _wave(path: Path, pitch: float) -> str:
    """One second of a tone: every pitch gives a file of the same size (an in-place edit keeps it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.sin(np.arange(RATE) * pitch / 100)).astype("float32"), RATE, subtype="PCM_16")
    return path.name


def _manifests(root: Path, n_train: int = 12, n_test: int = 4) -> Path:
    """train.jsonl and test.jsonl at the top, their audio in train_audio/ and test_audio/."""
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [
            {"audio_filepath": f"{split}_audio/{_wave(root / f'{split}_audio' / f'{i}.wav', 5 + i)}", "text": "a cat"}
            for i in range(n)
        ]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _metadata(folder: Path, n: int) -> None:
    """An audiofolder split: metadata.csv naming the folder's first n WAVs."""
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["file_name", "transcription"])
        writer.writeheader()
        writer.writerows({"file_name": f"{i}.wav", "transcription": "a cat"} for i in range(n))


def _shard(source: Path, to: Path, *extra: str) -> int:
    return converter.main(["--dataset", str(source), "--to", str(to), "--num-proc", "1", *extra])


# -- shards --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["the source itself", "inside the source", "a folder of the user's"])
def test_shards_never_go_into_the_source_or_a_foreign_folder(tmp_path, capsys, where):
    source = _manifests(tmp_path / "data")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / converter.MANIFEST).write_text('{"mine": true}\n')  # e.g. a manifest of their own: never replaced
    to = {"the source itself": source, "inside the source": source / "shards", "a folder of the user's": theirs}[where]
    before = [_digest(source), _digest(theirs)]

    assert _shard(source, to) == 2
    err = capsys.readouterr().err
    expected = {
        "the source itself": f"error: --to {to} is the dataset itself",
        "inside the source": f"error: --to {to} is inside the dataset {source}",
        "a folder of the user's": f"error: --to {to} is not empty (manifest.json) and is not a shard folder",
    }[where]
    assert err.startswith(expected) and err.strip().count("\n") == 0, err
    assert [_digest(source), _digest(theirs)] == before
    assert not (source / "shards").exists()


def test_a_rerun_for_another_source_or_size_is_refused_not_reused(tmp_path, capsys):
    source = _manifests(tmp_path / "data")
    to = tmp_path / "shards"
    assert _shard(source, to, "--rows-per-shard", "4") == 0
    written = _digest(to)
    capsys.readouterr()

    assert _shard(source, to, "--rows-per-shard", "5") == 2
    err = capsys.readouterr().err
    assert f"error: --to {to} holds shards of another source or settings (rows_per_shard: 4 there, 5 now)" in err

    _wave(source / "test_audio" / "2.wav", 40)  # edited in place: same name, same size, other audio
    assert _shard(source, to, "--rows-per-shard", "4") == 2
    err = capsys.readouterr().err
    assert "(split heldout: 'test' 4 rows, fingerprint " in err and "rows_per_shard" not in err, err
    assert _digest(to) == written  # nothing rewritten, nothing deleted

    # the same mismatch between array tasks: the second task, of another size, writes nothing
    partial = tmp_path / "partial"
    assert _shard(source, partial, "--rows-per-shard", "4", "--task", "0/2") == 0
    assert _shard(source, partial, "--rows-per-shard", "5", "--task", "1/2") == 2
    assert not (partial / converter.MANIFEST).exists()
    assert sorted(p.name for p in (partial / "train").glob("*.arrow")) == ["shard-00000.arrow", "shard-00002.arrow"]

    # what the shards are of is recorded: the plan first, the manifest at the end
    plan, manifest = json.loads((to / converter.PLAN).read_text()), json.loads((to / converter.MANIFEST).read_text())
    assert manifest["rows_per_shard"] == 4 and manifest["splits"]["heldout"]["source_split"] == "test"
    assert manifest["splits"]["heldout"]["fingerprint"] == plan["splits"]["heldout"]["fingerprint"]


def test_array_tasks_started_together_agree_or_one_is_refused(tmp_path):
    """Two tasks on one empty --to at once: the same settings share it, other settings are refused."""
    source = _manifests(tmp_path / "data")

    def together(to: Path, sizes: tuple[str, str]) -> list[int]:
        command = [sys.executable, "-m", "training.data.shard", "--dataset", str(source), "--to", str(to)]
        tasks = [
            subprocess.Popen(
                [*command, "--rows-per-shard", size, "--num-proc", "1", "--task", f"{i}/2"],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, size in enumerate(sizes)
        ]
        errors = [t.communicate(timeout=300)[1] for t in tasks]
        assert all("Traceback" not in e for e in errors), errors
        return [t.returncode for t in tasks]

    assert together(tmp_path / "same", ("4", "4")) == [0, 0]
    shards = converter.read_shards(tmp_path / "same")
    assert {role: len(ds) for role, ds in shards.items()} == {"train": 11, "heldout": 4, "dev": 1}

    codes = together(tmp_path / "other", ("4", "5"))
    assert sorted(codes) == [0, 2], codes
    assert not (tmp_path / "other" / converter.MANIFEST).exists()


# -- the feature cache follows the audio files ----------------------------------------------------


def _as_saved_dataset(root: Path) -> Path:
    """A save_to_disk folder built from file paths: save_to_disk embeds the files' bytes."""
    # Built as plain structs, then cast: encoding through Audio would import torchcodec (FFmpeg).
    features = datasets.Features({"audio": AUDIO_STRUCT, "text": datasets.Value("string")})
    rows = {"audio": [{"bytes": None, "path": str(root / "wav" / f"{i}.wav")} for i in range(6)], "text": ["a cat"] * 6}
    ds = datasets.Dataset.from_dict(rows, features=features).cast_column("audio", datasets.Audio(decode=False))
    ds.save_to_disk(str(root / "saved"))
    return root / "saved"


def _as_manifest(root: Path) -> Path:
    rows = [{"audio_filepath": f"wav/{i}.wav", "text": "a cat"} for i in range(6)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "train.jsonl"


def _as_audiofolder(root: Path) -> Path:
    _metadata(root / "wav", 6)
    return root / "wav"


LAYOUTS = {  # each made from root/wav/0..5.wav: (writer, its audio and transcript columns)
    "manifest": (_as_manifest, ("audio_filepath", "text")),
    "audiofolder": (_as_audiofolder, ("audio", "transcription")),
    "save_to_disk": (_as_saved_dataset, ("audio", "text")),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_an_audio_file_edited_in_place_is_encoded_again(tmp_path, tiny_checkpoints, layout):
    for i in range(6):
        _wave(tmp_path / "wav" / f"{i}.wav", 5 + i)
    make, (audio, text) = LAYOUTS[layout]
    dataset = make(tmp_path)
    model, tokenizer, fe = tiny_model(tiny_checkpoints)
    encoder = FeatureEncoder(fe, tokenizer, model.encode, "tiny", model.n_mel_frames, tmp_path / "cache", "fp32")
    spec = DataSpec(audio_column=audio, text_column=text)

    def prepared() -> tuple[str, list[np.ndarray]]:
        split = load_source(str(dataset)).split("train")
        states = prepare_split(split, "dataset, split 'train'", spec, encoder)["encoder_states"]
        return split._fingerprint, [np.asarray(s) for s in states]

    fingerprint, before = prepared()
    assert prepared()[0] == fingerprint and len(list((tmp_path / "cache").glob("*.arrow"))) == 1  # reused
    _wave(tmp_path / "wav" / "2.wav", 40)  # same name, same size, other audio
    if layout == "save_to_disk":
        _as_saved_dataset(tmp_path)  # saved again: the new bytes embedded
    changed, after = prepared()
    assert not np.array_equal(after[2], before[2])  # encoded again, not the stale states
    assert all(np.array_equal(after[i], before[i]) for i in (0, 1, 3, 4, 5))
    assert changed != fingerprint and len(list((tmp_path / "cache").glob("*.arrow"))) == 2


# -- a folder that reads two ways -----------------------------------------------------------------


@pytest.mark.parametrize("audio_folders", ["subfolders", "linked subfolders"])
def test_split_manifests_at_the_top_are_read_before_audiofolder_splits_below(tmp_path, audio_folders):
    """train.jsonl / test.jsonl beside train_audio/ and test_audio/, each an audiofolder split
    (its own metadata.csv): as when manifests are written next to a downloaded audiofolder."""
    root = _manifests(tmp_path / "data")
    for split, n in (("train", 12), ("test", 4)):
        _metadata(root / f"{split}_audio", n)
        if audio_folders == "linked subfolders":
            (root / f"{split}_audio").rename(tmp_path / f"downloaded_{split}")
            (root / f"{split}_audio").symlink_to(tmp_path / f"downloaded_{split}", target_is_directory=True)

    chosen = asr_splits(load_source(str(root)), DataSpec(), seed=1)
    assert (chosen.spec.train_split, chosen.spec.heldout_split) == ("train", "test")
    assert (len(chosen.splits["train"]) + len(chosen.splits["train-dev"]), len(chosen.splits["test"])) == (12, 4)
    assert chosen.notes[0].startswith(f"dataset '{root}' (JSON lines manifests): train 'train' 11 rows")
    assert chosen.notes[1] == (
        f"dataset '{root}': read as JSON lines manifests, since manifests at its top name the splits "
        "(test.jsonl, train.jsonl); the audiofolder metadata below it (test_audio/metadata.csv, "
        "train_audio/metadata.csv) is not read (--format audiofolder reads it instead)"
    )
    audiofolder = load_source(str(root), fmt="audiofolder")  # the other reading, chosen
    assert audiofolder.kind == "audiofolder" and len(audiofolder.split("train")) == 16


@pytest.mark.parametrize("signals", ["both name splits", "neither names a split"])
def test_two_equally_plausible_readings_are_refused_naming_both(tmp_path, capsys, signals):
    root = tmp_path / "data"
    if signals == "both name splits":  # manifests written next to an audiofolder's train/ and test/
        _manifests(root)
        for split, n in (("train", 12), ("test", 4)):
            (root / f"{split}_audio").rename(root / split)
            _metadata(root / split, n)
            jsonl = root / f"{split}.jsonl"
            jsonl.write_text(jsonl.read_text().replace(f"{split}_audio/", f"{split}/"))
        manifests, metadata = "test.jsonl, train.jsonl", "test/metadata.csv, train/metadata.csv"
    else:  # one manifest of its own name, metadata in a clips/ folder
        _manifests(root, n_test=0)
        (root / "test.jsonl").unlink()
        (root / "train.jsonl").rename(root / "all.jsonl")
        _metadata(root / "train_audio", 12)
        manifests, metadata = "all.jsonl", "train_audio/metadata.csv"
    with pytest.raises(DataError) as err:
        load_source(str(root))
    assert str(err.value) == (
        f"dataset '{root}': two readings fit equally well ({signals}): JSON lines manifests ({manifests}) "
        f"or an audiofolder ({metadata}); choose one with --format manifests or --format audiofolder "
        "(recipe: data.format)"
    )
    assert load_source(str(root), fmt="manifests").kind == "JSON lines manifests"
    assert load_source(str(root), fmt="audiofolder").kind == "audiofolder"
    assert _shard(root, tmp_path / "shards", "--format", "manifests") == 0, capsys.readouterr().err


def test_no_message_shows_an_empty_list_of_splits_as_the_data():
    empty = Source("/data/x", "audiofolder", {})
    for ask in (
        lambda: choose_splits(empty, None, None, None, 1, 0.05, 500),
        lambda: choose_splits(empty, "train", None, None, 1, 0.05, 500),
        lambda: empty.split("train"),
    ):
        with pytest.raises(DataError) as err:
            ask()
        assert "[]" not in str(err.value) and "read as audiofolder, it has no splits at all" in str(err.value)


def test_a_nemo_manifest_named_manifest_json_is_not_taken_for_shards(tmp_path):
    root = _manifests(tmp_path / "data", n_test=0)
    (root / "test.jsonl").unlink()
    (root / "train.jsonl").rename(root / converter.MANIFEST)
    source = load_source(str(root))
    assert (source.kind, source.split_names, len(source.split("manifest"))) == (
        "JSON lines manifests",
        ["manifest"],
        12,
    )


def test_two_manifests_of_one_split_are_refused_not_one_dropped(tmp_path):
    root = _manifests(tmp_path / "data", n_test=0)
    (root / "test.jsonl").unlink()
    (root / "train.csv").write_text("path,sentence\ntrain_audio/0.wav,a dog\n")
    with pytest.raises(DataError, match=r"train\.csv and train\.jsonl would both be split 'train'; keep one"):
        load_source(str(root))
