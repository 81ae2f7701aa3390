"""What a run folder keeps can be trusted: a rollback stays rolled back, a --resume PATH is never
silently ignored, a folder that holds another run's stage (other data, recipe or starting weights)
is refused rather than mixed in, and a checkpoint damaged twice is set aside twice. Short runs of
the tiny checkpoints on tone clips (conftest.py's `small_run`), in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import asr_losses, recipe_variant, run_into, with_arg
from training.engine.faults import InjectedFault
from training.run import main


def _crash(args: list[str], after_step: int, monkeypatch) -> None:
    monkeypatch.setenv("OMNI_STAGE_FAULT", f"crash@0:{after_step}")
    with pytest.raises(InjectedFault):
        main(args)
    monkeypatch.delenv("OMNI_STAGE_FAULT")


def _names(folder: Path, pattern: str = "step-*") -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


@pytest.fixture(scope="module")
def keep_three(small_run, tmp_path_factory) -> list[str]:
    """small_run keeping 3 step checkpoints (4, 8 and 12 are all on disk at step 13)."""
    recipe = small_run[small_run.index("--recipe") + 1]
    variant = recipe_variant(recipe, tmp_path_factory.mktemp("keep3") / "recipe.json", keep_last=3)
    return with_arg(small_run, "--recipe", variant)


@pytest.fixture(scope="module")
def uninterrupted_16(keep_three, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("straight16")
    assert main(run_into(keep_three, out, 16)) == 0
    return asr_losses(out)


def test_a_rollback_stays_rolled_back(keep_three, uninterrupted_16, tmp_path, monkeypatch, capsys):
    """Saved 4, 8, 12, crashed at 13; --resume step-4 crashes at 10; the next plain run resumes the
    new trajectory's step 8 (not the abandoned 12) and ends equal to an uninterrupted run."""
    out = tmp_path / "run"
    ckpts = out / "asr" / "checkpoints"
    _crash(run_into(keep_three, out, 16), 13, monkeypatch)
    assert _names(ckpts) == ["step-0000004", "step-0000008", "step-0000012"]
    capsys.readouterr()
    _crash([*run_into(keep_three, out, 16), "--resume", str(ckpts / "step-0000004")], 10, monkeypatch)
    log = capsys.readouterr().out
    assert "rolling back to step-0000004" in log, log[-3000:]
    assert "set aside as abandoned-step-0000008, abandoned-step-0000012" in log
    # the chosen checkpoint and the new trajectory's step 8; the abandoned ones kept beside them
    assert _names(ckpts) == ["step-0000004", "step-0000008"]
    assert _names(ckpts, "abandoned-*") == ["abandoned-step-0000008", "abandoned-step-0000012"]
    assert (ckpts / "latest").read_text() == "step-0000008"
    assert main(run_into(keep_three, out, 16)) == 0
    log = capsys.readouterr().out
    assert "step-0000008 at step 8" in log, log[-3000:]
    assert (ckpts / "abandoned-step-0000012" / "trainer_state.json").is_file()
    assert asr_losses(out) == pytest.approx(uninterrupted_16, abs=1e-6)


def test_a_resume_path_that_would_be_ignored_is_refused(small_run, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other"
    _crash(run_into(small_run, other, 8), 5, monkeypatch)
    theirs = other / "asr" / "checkpoints" / "step-0000004"
    # another run's checkpoint: exit 2, nothing trained, and the way to start from its weights
    out = tmp_path / "run"
    assert main([*run_into(small_run, out, 8), "--resume", str(theirs)]) == 2
    log = capsys.readouterr().out
    assert f"--resume {theirs}: it is not a step checkpoint in --output-dir {out}" in log, log[-3000:]
    assert "--init-from <run>/<stage>/final" in log
    assert not (out / "asr").exists()
    # a checkpoint of a stage this command does not run
    second = with_arg(run_into(small_run, other, 8), "--stage", "second")
    assert main([*second, "--resume", str(theirs)]) == 2
    assert "it is a checkpoint of stage 'asr', which this command does not run" in capsys.readouterr().out


def test_a_checkpoint_damaged_twice_is_set_aside_twice(small_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    ckpts = out / "asr" / "checkpoints"
    for _ in range(2):  # each time: step-8 saved, then found damaged by the next run, which redoes it
        _crash(run_into(small_run, out, 12), 10, monkeypatch)
        (ckpts / "step-0000008" / "model.safetensors").write_bytes(b"x" * 10)
    assert main(run_into(small_run, out, 12)) == 0
    assert _names(ckpts, "damaged-*") == ["damaged-step-0000008", "damaged-step-0000008.2"]
    assert "set aside as" in capsys.readouterr().out
    straight = tmp_path / "straight"
    assert main(run_into(small_run, straight, 12)) == 0
    assert asr_losses(out) == pytest.approx(asr_losses(straight), abs=1e-6)


# -- a folder reused by another run --------------------------------------------------------------


def test_a_folder_of_another_dataset_is_refused(quick_recipe, cache_dir, small_run, tmp_path, capsys):
    """A finished asr on the embedded corpus; the same command with another --dataset into the same
    --output-dir skips nothing as complete: exit 2 naming the difference, the record untouched."""
    out = tmp_path / "run"
    args = ["--recipe", quick_recipe, "--output-dir", str(out), "--cache-dir", str(cache_dir), "--max-steps", "2"]
    assert main(["--stage", "asr", *args, "--report-to", "none"]) == 0
    record = json.loads((out / "run_record.json").read_text())
    assert record["stages"]["asr"]["data"]["dataset"] == "embedded corpus"
    capsys.readouterr()
    dataset = small_run[small_run.index("--dataset") + 1]
    assert main(["--stage", "all", *args, "--report-to", "none", "--dataset", dataset]) == 2
    log = capsys.readouterr().out
    assert "already complete" not in log
    assert f"[asr] {out / 'asr'} holds a finished 'asr' stage of another run" in log, log[-3000:]
    assert f"data.dataset: None -> '{dataset}'" in log and "data: dataset: 'embedded corpus' -> " in log
    assert "new --output-dir" in log and f"--init-from {out / 'asr' / 'final'}" in log
    assert json.loads((out / "run_record.json").read_text()) == record  # nothing of the refused run
    assert not (out / "second").exists()


def test_a_finished_stage_is_reused_only_for_the_same_recipe_data_and_start(
    small_run, tiny_checkpoints, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "data"
    shutil.copytree(Path(small_run[small_run.index("--dataset") + 1]), data)
    out = tmp_path / "run"
    args = with_arg(run_into(small_run, out, 4), "--dataset", str(data))
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0  # the same command: the finished stage is reused
    assert "[asr] already complete" in capsys.readouterr().out

    # the recipe changed
    recipe = recipe_variant(args[args.index("--recipe") + 1], tmp_path / "smaller.json", batch_size=4)
    assert main(with_arg(args, "--recipe", recipe)) == 2
    assert "batch_size: 8 -> 4" in capsys.readouterr().out

    # one clip edited in place: the same paths and transcripts, other audio
    sf.write(data / "3.wav", (0.1 * np.sin(np.arange(15000) / 3.0)).astype("float32"), 16000)
    assert main(args) == 2
    log = capsys.readouterr().out
    assert "data: splits.train.fingerprint: " in log, log[-3000:]

    # the stage before was trained again (a rollback): the later stage, trained from its old
    # export, is not reused, nor are its checkpoints resumed
    fresh = tmp_path / "fresh"
    first = with_arg(args, "--output-dir", str(fresh))
    assert main(first) == 0
    assert main(with_arg(first, "--stage", "second")) == 0
    rollback = str(fresh / "asr" / "checkpoints" / "step-0000004")
    capsys.readouterr()
    assert main([*with_arg(first, "--stage", "all"), "--resume", rollback]) == 2
    log = capsys.readouterr().out
    assert "[asr] resumed from" in log and "[second] " in log
    assert "starts_from: 'asr-step4-" in log, log[-3000:]
