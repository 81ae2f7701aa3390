"""Nothing is lost on a crash: resumed runs equal uninterrupted ones; writes are atomic."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import asr_losses, asr_run_args, launched, recipe_variant
from training.common import atomic_dir
from training.engine.checkpoints import StageCheckpoints
from training.engine.context import REQUEUE_EXIT_CODE

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
    resumed = subprocess.run(_command(resume_recipe, cache_dir, tmp_path), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"at step {saved_step}" in resumed.stdout
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


def test_checkpoint_killed_mid_write_keeps_previous_latest(tmp_path):
    """A save that dies after writing part of its folder never becomes `latest`."""
    stage = tmp_path / "asr"
    ckpts = StageCheckpoints(stage, keep_last=2)
    good = ckpts.dir / "step-0000005"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text(json.dumps({"step": 5}))
    (ckpts.dir / "latest").write_text(good.name)
    # the next save died halfway: its temp folder holds weights but no trainer_state.json
    partial = ckpts.dir / ".step-0000010.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(os.urandom(1024))
    assert ckpts.latest() == good
    # and an export killed inside atomic_dir leaves the previous export untouched
    final = stage / "final"
    final.mkdir()
    (final / "omni_config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "omni_config.json").write_text('{"half": true}')
            raise RuntimeError("killed")
    assert (final / "omni_config.json").read_text() == "{}"
