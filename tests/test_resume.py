"""Nothing is lost on a crash: resumed runs equal uninterrupted ones; writes are atomic."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import asr_losses, asr_run_args, launched, recipe_variant, run_into
from training.common import atomic_dir
from training.engine.checkpoints import StageCheckpoints, verify_files
from training.engine.context import REQUEUE_EXIT_CODE
from training.run import main

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24


def _command(recipe: str, cache_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "training" / "run.py"), *asr_run_args(recipe, cache_dir, out, STEPS), *extra]


def _run_until(cmd: list[str], out: Path, step: int, sig: int) -> subprocess.Popen:
    """Start a run and send `sig` once its metrics log has reached `step`."""
    with launched(cmd, cwd=ROOT) as proc:  # stopped whole if the test fails on the way
        metrics = out / "asr" / "metrics.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
                proc.send_signal(sig)
                break
            time.sleep(0.05)
        proc.output, _ = proc.communicate(timeout=600)  # type: ignore[attr-defined]
    return proc


@pytest.fixture(scope="module")
def resume_recipe(tmp_path_factory, quick_recipe) -> str:
    path = tmp_path_factory.mktemp("resume") / "resume.json"
    return recipe_variant(quick_recipe, path, save_every=5, name="demo-resume")


@pytest.fixture(scope="module")
def uninterrupted(resume_recipe, cache_dir, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("straight")
    subprocess.run(_command(resume_recipe, cache_dir, out), check=True, cwd=ROOT, capture_output=True)
    losses = asr_losses(out)
    assert len(losses) == STEPS
    return losses


def test_sigkill_then_resume_gives_identical_losses(resume_recipe, cache_dir, tmp_path, uninterrupted):
    proc = _run_until(_command(resume_recipe, cache_dir, tmp_path), tmp_path, step=13, sig=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    logged = len(asr_losses(tmp_path))
    latest = StageCheckpoints(tmp_path / "asr", keep_last=2).latest()
    saved_step = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert saved_step % 5 == 0 and saved_step < logged  # killed past the last checkpoint: work to redo
    with open(tmp_path / "asr" / "metrics.jsonl", "a") as f:  # as if killed while writing a line
        f.write('{"step": 14, "loss": 6.1')
    resumed = subprocess.run(_command(resume_recipe, cache_dir, tmp_path), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"at step {saved_step}" in resumed.stdout
    assert "metrics.jsonl: dropped 1 unreadable line(s), torn by a kill mid-write" in resumed.stdout
    # CPU, same seed, same data order, restored RNG and optimizer state: bit-for-bit the same
    assert asr_losses(tmp_path) == uninterrupted


def test_sigterm_checkpoints_and_exits_with_requeue_code(resume_recipe, cache_dir, tmp_path, uninterrupted):
    proc = _run_until(_command(resume_recipe, cache_dir, tmp_path), tmp_path, step=7, sig=signal.SIGTERM)
    output = proc.output
    assert proc.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    latest = StageCheckpoints(tmp_path / "asr", keep_last=2).latest()
    stopped_at = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert 7 <= stopped_at < STEPS and f"checkpoint saved at step {stopped_at}" in output
    resumed = subprocess.run(_command(resume_recipe, cache_dir, tmp_path), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert asr_losses(tmp_path) == uninterrupted
    record = json.loads((tmp_path / "run_record.json").read_text())
    assert record["stages"]["asr"]["final_train_loss"] == pytest.approx(sum(uninterrupted[-10:]) / 10)


def test_changed_recipe_is_refused_naming_fields(resume_recipe, cache_dir, tmp_path):
    proc = _run_until(_command(resume_recipe, cache_dir, tmp_path), tmp_path, step=6, sig=signal.SIGTERM)
    assert proc.returncode == REQUEUE_EXIT_CODE
    changed = json.loads(Path(resume_recipe).read_text())
    changed["batch_size"] = 8
    changed["stages"]["asr"]["lr_peak"] = 5e-4
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(changed))
    again = subprocess.run(_command(str(path), cache_dir, tmp_path), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2
    assert "refusing to resume" in again.stdout
    assert "batch_size: 16 -> 8" in again.stdout and "stage.lr_peak: 0.003 -> 0.0005" in again.stdout


# A run that SIGKILLs itself inside a real StageCheckpoints.save of step 8, at one of its writes.
_KILLED_IN_SAVE = """
import os, signal, sys
import training.engine.checkpoints as checkpoints
from training.run import main

point, args = sys.argv[1], sys.argv[2:]
write_json, write_text = checkpoints.write_json_atomic, checkpoints.write_text_atomic
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

def json_then_maybe_die(path, data):
    if path.parent.name == ".step-0000008.tmp" and point == "before trainer_state.json":
        die()  # accelerator.save_state's files are all written
    write_json(path, data)
    if path.parent.name == ".step-0000008.tmp" and point == "before the rename":
        die()

def text_or_die(path, text):
    if text == "step-0000008" and point == "before latest":
        die()  # renamed into place, not yet named latest
    write_text(path, text)

checkpoints.write_json_atomic, checkpoints.write_text_atomic = json_then_maybe_die, text_or_die
main(args)
"""


@pytest.fixture(scope="module")
def small_uninterrupted(small_run, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("small-straight")
    assert main(run_into(small_run, out, 12)) == 0
    return asr_losses(out)


@pytest.mark.parametrize("point", ["before trainer_state.json", "before the rename", "before latest"])
def test_a_save_killed_between_its_writes_keeps_the_previous_checkpoint(
    point, small_run, small_uninterrupted, tmp_path, capsys
):
    """A real save of step 8 killed at each of its writes: step 4 stays `latest` and intact, and
    the resumed run equals an uninterrupted one."""
    args = run_into(small_run, tmp_path, 12)
    killed = subprocess.run([sys.executable, "-c", _KILLED_IN_SAVE, point, *args], cwd=ROOT, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    ckpts = StageCheckpoints(tmp_path / "asr", keep_last=2)
    assert ckpts.latest() == ckpts.dir / "step-0000004" and verify_files(ckpts.latest()) is None
    # the partial save, wherever it stopped, is never mistaken for a checkpoint
    assert (ckpts.dir / "step-0000008" / "trainer_state.json").is_file() == (point == "before latest")
    capsys.readouterr()
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "step-0000004 at step 4" in log, log[-3000:]
    if point == "before latest":
        assert "step-0000008 was saved but never named latest; set aside as abandoned-step-0000008" in log
    assert asr_losses(tmp_path) == pytest.approx(small_uninterrupted, abs=1e-6)


def test_an_export_failing_mid_write_keeps_the_previous_one(tmp_path):
    """An export that fails inside atomic_dir leaves the previous export untouched."""
    final = tmp_path / "asr" / "final"
    final.mkdir(parents=True)
    (final / "omni_config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "omni_config.json").write_text('{"half": true}')
            raise RuntimeError("killed")
    assert (final / "omni_config.json").read_text() == "{}"
