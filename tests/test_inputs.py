"""Bad input gets an error that names the thing that is wrong."""

import io
import json

import datasets
import numpy as np
import pytest
import soundfile as sf

from training.run import main
from training.speech.audio import wav_bytes


def _wav(seconds: float = 1.0, sr: int = 16000) -> bytes:
    return wav_bytes((0.1 * np.sin(np.arange(int(sr * seconds)) / 7)).astype("float32"), sr)


def _dataset(tmp_path, rows: list[dict], name: str = "ds"):
    """A small user dataset saved with save_to_disk, with train/heldout/dev splits."""
    # Built as plain structs, then cast: encoding through Audio would import torchcodec (FFmpeg).
    features = datasets.Features(
        {
            "speech": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
            "sentence": datasets.Value("string"),
        }
    )

    def build(items):
        return datasets.Dataset.from_list(items, features=features).cast_column("speech", datasets.Audio(decode=False))

    split = build(rows)
    good = build([{"speech": {"bytes": _wav(), "path": None}, "sentence": "a cat"}] * 2)
    path = tmp_path / name
    datasets.DatasetDict({"train": split, "heldout": good, "dev": good}).save_to_disk(str(path))
    return str(path)


def _run(tmp_path, tiny_checkpoints, *extra: str) -> int:
    enc, llm = tiny_checkpoints
    return main(
        [
            "--stage",
            "asr",
            "--encoder",
            enc,
            "--llm",
            llm,
            "--output-dir",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--max-steps",
            "2",
            *extra,
        ]
    )


def test_user_dataset_trains_with_named_columns(tmp_path, tiny_checkpoints, capsys):
    rows = [{"speech": {"bytes": _wav(1.0 + i / 10), "path": None}, "sentence": "the cat sat"} for i in range(8)]
    path = _dataset(tmp_path, rows)
    code = _run(
        tmp_path,
        tiny_checkpoints,
        "--dataset",
        path,
        "--audio-column",
        "speech",
        "--text-column",
        "sentence",
        "--recipe",
        _recipe(tmp_path, batch_size=4, stages={"asr": {"max_wer": None}}),
    )
    assert code == 0, capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "run_record.json").read_text())
    assert record["stages"]["asr"]["steps"] == 2


def _recipe(tmp_path, **fields) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"base": "demo", **fields}))
    return str(path)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_column", "split 'train': no column 'sentence'"),
        ("empty_transcript", "split 'train', row 1, column 'sentence': empty or missing transcript"),
        ("unreadable_audio", "split 'train', row 2, column 'speech': cannot read audio"),
        ("too_long", "split 'train', row 0, column 'speech': audio is 6.0 s, longer than the encoder's 4 s window"),
    ],
)
def test_bad_rows_are_named(tmp_path, tiny_checkpoints, capsys, case, expected):
    good = {"speech": {"bytes": _wav(), "path": None}, "sentence": "the cat"}
    rows = [dict(good) for _ in range(4)]
    if case == "empty_transcript":
        rows[1]["sentence"] = "   "
    if case == "unreadable_audio":
        rows[2]["speech"] = {"bytes": b"not a wav file at all", "path": None}
    if case == "too_long":
        rows[0]["speech"] = {"bytes": _wav(6.0), "path": None}
    path = _dataset(tmp_path, rows)
    text_column = "transcript" if case == "missing_column" else "sentence"
    if case == "missing_column":
        expected = "split 'train': no column 'transcript'"
    code = _run(tmp_path, tiny_checkpoints, "--dataset", path, "--audio-column", "speech", "--text-column", text_column)
    out = capsys.readouterr()
    assert code == 2
    assert f"dataset '{path}'" in out.out and expected in out.out


def test_unknown_stage_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--stage", "warmup"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'warmup'" in capsys.readouterr().err


def test_recipe_value_of_wrong_type(tmp_path, capsys):
    code = main(["--stage", "asr", "--recipe", _recipe(tmp_path, stages={"asr": {"max_steps": "many"}})])
    assert code == 2
    assert "stages.asr.max_steps: expected an integer, got str 'many'" in capsys.readouterr().err


# Input -> the message it must produce (through validation, before any encoding).
BAD_INPUTS = [
    ("text column of numbers", "column 'sentence': expected a string column, got Value('int64')"),
    ("audio column of plain strings", "column 'speech': expected an Audio column (or {bytes, path})"),
    (
        "transcript that normalizes to nothing",
        "row 1, column 'sentence': transcript '[noise]' is empty after normalization",
    ),
    ("audio with no samples", "row 3, column 'speech': cannot read audio (the audio is empty)"),
    (
        "audio with NaN samples",
        "row 0, column 'speech': cannot read audio (the audio contains NaN or infinite samples)",
    ),
]


def _bad_dataset(tmp_path, case: str) -> str:
    good = {"speech": {"bytes": _wav(), "path": None}, "sentence": "the cat"}
    rows = [dict(good) for _ in range(4)]
    if case == "text column of numbers":
        ds = datasets.Dataset.from_list([{"speech": r["speech"], "sentence": i} for i, r in enumerate(rows)])
        path = tmp_path / "ds"
        datasets.DatasetDict({"train": ds, "heldout": ds, "dev": ds}).save_to_disk(str(path))
        return str(path)
    if case == "audio column of plain strings":
        ds = datasets.Dataset.from_list([{"speech": "a.wav", "sentence": "the cat"}] * 4)
        path = tmp_path / "ds"
        datasets.DatasetDict({"train": ds, "heldout": ds, "dev": ds}).save_to_disk(str(path))
        return str(path)
    if case == "transcript that normalizes to nothing":
        rows[1]["sentence"] = "[noise]"
    if case == "audio with no samples":
        buffer = io.BytesIO()
        sf.write(buffer, np.zeros(0, dtype="float32"), 16000, format="WAV", subtype="PCM_16")
        rows[3]["speech"] = {"bytes": buffer.getvalue(), "path": None}
    if case == "audio with NaN samples":
        nan = np.full(16000, np.nan, dtype="float32")
        buffer = io.BytesIO()
        sf.write(buffer, nan, 16000, format="WAV", subtype="FLOAT")
        rows[0]["speech"] = {"bytes": buffer.getvalue(), "path": None}
    return _dataset(tmp_path, rows)


@pytest.mark.parametrize("case, expected", BAD_INPUTS)
def test_validate_data_names_each_bad_input(tmp_path, tiny_checkpoints, capsys, case, expected):
    path = _bad_dataset(tmp_path, case)
    code = _run(
        tmp_path,
        tiny_checkpoints,
        "--dataset",
        path,
        "--audio-column",
        "speech",
        "--text-column",
        "sentence",
        "--validate-data",
    )
    out = capsys.readouterr().out
    assert code == 2, out
    assert f"dataset '{path}', split 'train'" in out and expected in out


def test_validation_logs_resampling_and_skip_bad_rows_trains_on_the_rest(tmp_path, tiny_checkpoints, capsys):
    rows = [
        {"speech": {"bytes": _wav(1.0 + i / 10, sr=44100 if i % 2 else 16000), "path": None}, "sentence": "the cat sat"}
        for i in range(10)
    ]
    rows[2]["sentence"] = ""
    rows[5]["speech"] = {"bytes": b"garbage", "path": None}
    path = _dataset(tmp_path, rows)
    args = ("--dataset", path, "--audio-column", "speech", "--text-column", "sentence")
    assert _run(tmp_path, tiny_checkpoints, *args, "--validate-data") == 2
    out = capsys.readouterr().out
    assert "2 bad rows in" in out and "row 2, column 'sentence'" in out and "row 5, column 'speech'" in out

    assert _run(tmp_path, tiny_checkpoints, *args, "--validate-data", "--skip-bad-rows") == 0
    out = capsys.readouterr().out
    assert "checked all 10 rows: 2 bad; sample rates 16000 Hz x 4, 44100 Hz x 4 (4 resampled to 16000 Hz)" in out
    assert "2 bad rows would be left out" in out

    recipe = _recipe(tmp_path, batch_size=4, stages={"asr": {"max_wer": None}})
    code = _run(tmp_path, tiny_checkpoints, *args, "--skip-bad-rows", "--recipe", recipe)
    assert code == 0, capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "run_record.json").read_text())
    assert record["stages"]["asr"]["steps"] == 2 and record["stages"]["asr"]["skipped_rows"] == {"train": 2}


def test_bad_row_read_in_the_step(tmp_path, tiny_checkpoints, capfd):
    """A bad row the validation sample missed, met by a loader worker while training with the encoder
    in the step: one line naming it (exit 2), or with --skip-bad-rows the next readable row instead."""
    # capfd: the worker process writes to the file descriptors
    rows = [{"speech": {"bytes": _wav(1.0 + i / 10), "path": None}, "sentence": "the cat sat"} for i in range(8)]
    rows[3]["speech"] = {"bytes": b"garbage", "path": None}
    path = _dataset(tmp_path, rows)
    # validate_rows 2 checks rows 0 and 7 only; the step reads every row in two steps of 4
    recipe = _recipe(
        tmp_path,
        batch_size=4,
        num_workers=1,
        data={"encoder_states": "step", "validate_rows": 2},
        stages={"asr": {"max_wer": None}},
    )
    args = ("--dataset", path, "--audio-column", "speech", "--text-column", "sentence", "--recipe", recipe)
    assert _run(tmp_path, tiny_checkpoints, *args) == 2
    out = capfd.readouterr()
    assert f"error: dataset '{path}', split 'train', row 3, column 'speech': cannot read audio" in out.out
    assert "Traceback" not in out.out + out.err and "DataLoader worker" not in out.out + out.err

    assert _run(tmp_path, tiny_checkpoints, *args, "--skip-bad-rows", "--output-dir", str(tmp_path / "out2")) == 0
    out = capfd.readouterr().out
    assert "skipped (--skip-bad-rows):" in out and "row 3, column 'speech'" in out
    record = json.loads((tmp_path / "out2" / "run_record.json").read_text())
    assert record["stages"]["asr"]["steps"] == 2


def _qa_dataset(tmp_path, answer_snac: list[str]) -> str:
    """A user QA dataset in VoiceAssistant-400K's schema (question, question_audio, answer, answer_snac)."""
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "question_audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
            "answer": datasets.Value("string"),
            "answer_snac": datasets.Value("string"),
        }
    )
    rows = [
        {
            "question": "what is the opposite of hot",
            "question_audio": {"bytes": _wav(), "path": None},
            "answer": "cold",
            "answer_snac": snac,
        }
        for snac in answer_snac
    ]
    split = datasets.Dataset.from_list(rows, features=features)
    split = split.cast_column("question_audio", datasets.Audio(decode=False))
    path = tmp_path / "qa"
    datasets.DatasetDict({"train": split, "heldout": split}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize(
    "snac, expected",
    [
        ("# 1 2 3 4 5 6 7 # 8 9 10", "frame 1 has 3 codes, expected 7"),
        ("# 1 2 3 4 5 6 x", "'x' is not an integer code"),
        ("# 1 2 3 4 5 6 4096", "code 4096 outside [0, 4096)"),
    ],
)
def test_bad_answer_snac_is_named(tmp_path, tiny_checkpoints, capsys, snac, expected):
    asr = _dataset(tmp_path, [{"speech": {"bytes": _wav(), "path": None}, "sentence": "the cat"}] * 2)
    qa = _qa_dataset(tmp_path, ["# 1 2 3 4 5 6 7", snac])
    code = _run(
        tmp_path,
        tiny_checkpoints,
        "--dataset",
        asr,
        "--audio-column",
        "speech",
        "--text-column",
        "sentence",
        "--qa-dataset",
        qa,
        "--validate-data",
    )
    out = capsys.readouterr().out
    assert code == 2, out
    assert f"dataset '{qa}', split 'train', row 1, column 'answer_snac'" in out and expected in out


def test_prepare_encodes_once_and_stages_reuse_it(tmp_path, tiny_checkpoints, capsys):
    """--prepare fills the feature cache and exits; the stage that follows encodes nothing again."""
    rows = [{"speech": {"bytes": _wav(1.0 + i / 10), "path": None}, "sentence": "the cat sat"} for i in range(8)]
    path = _dataset(tmp_path, rows)
    enc, llm = tiny_checkpoints
    data = [
        "--dataset",
        path,
        "--audio-column",
        "speech",
        "--text-column",
        "sentence",
        "--recipe",
        # a given encoder would stream the training split ("auto"); this test is about the cache
        _recipe(tmp_path, batch_size=4, data={"encoder_states": "cache"}, stages={"asr": {"max_wer": None}}),
    ]
    code = main(
        [
            "--prepare",
            "--encoder",
            enc,
            "--llm",
            llm,
            "--output-dir",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "cache"),
            *data,
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.out
    assert "prepared: train 8 rows, heldout 2 rows, dev 2 rows" in captured.out
    assert "encoding dataset" in captured.err  # datasets.map's progress bar
    assert not (tmp_path / "out" / "asr").exists()  # nothing trained
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "features").glob("prepared-*.arrow")}
    assert len(cached) == 3
    assert _run(tmp_path, tiny_checkpoints, *data) == 0
    assert "encoding dataset" not in capsys.readouterr().err  # the map's progress bar never started
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "features").glob("prepared-*.arrow")}
    assert after == cached


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("/nonexistent/asr-set", "dataset '/nonexistent/asr-set': no such folder or file"),
        ("./not-here", "dataset './not-here': no such folder or file"),
        (
            "someone/no-such-dataset",
            "dataset 'someone/no-such-dataset': no such local folder or file, and loading it as a hub",
        ),
    ],
)
def test_missing_dataset_is_one_clear_error(tmp_path, tiny_checkpoints, capsys, monkeypatch, dataset, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id must fail fast and be named, never be fetched
    code = _run(tmp_path, tiny_checkpoints, "--dataset", dataset)
    out = capsys.readouterr()
    assert code == 2
    assert expected in out.out + out.err
    assert "Traceback" not in out.out + out.err
