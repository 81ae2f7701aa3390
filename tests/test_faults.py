"""Faults end cleanly: a cold start under two processes never deadlocks, a hung or crashed rank ends
the whole job promptly with every stack and a non-zero exit, a damaged checkpoint is set aside, a
full disk is one clear message. Every launch is stopped whole when its test ends (tests/helpers.py)."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import asr_losses, launched, launched_processes, recipe_variant, run_into, with_arg
from training.engine.faults import CRASH_EXIT_CODE
from training.run import main

ROOT = Path(__file__).resolve().parent.parent


def _accelerate(profile: str, *args: str) -> list[str]:
    config = str(ROOT / "accelerate_configs" / profile)
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        str(ROOT / "training" / "run.py"),
        *args,
    ]


def _timed_output(proc: subprocess.Popen, timeout: float) -> list[tuple[float, str]]:
    """(seconds since start, line) of everything the launch prints, until it exits or `timeout`."""
    lines: list[tuple[float, str]] = []
    start = time.time()
    reader = threading.Thread(target=lambda: lines.extend((time.time() - start, ln) for ln in proc.stdout), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launch did not end within {timeout} s:\n" + "".join(ln for _, ln in lines)[-4000:])
    reader.join(timeout=30)
    return lines


@pytest.mark.parametrize("profile", ["cpu_zero3.yaml", "cpu_ddp.yaml"])
def test_a_launch_on_an_empty_cache_completes(profile, tmp_path, quick_recipe):
    """Corpus synthesis and stand-in training (rank 0 alone, the other rank waiting) on a fresh
    machine, then a few steps: under ZeRO-3 this once deadlocked in the stand-ins' generate."""
    cold = {"name": "cold", "standin_scale": "tiny", "data": {"qa_dataset": "none"}}
    recipe = recipe_variant(quick_recipe, tmp_path / "cold.json", **cold)
    args = ["--stage", "asr", "--recipe", recipe, "--max-steps", "3", "--report-to", "none"]
    args += ["--cache-dir", str(tmp_path / "empty-cache"), "--output-dir", str(tmp_path / "out")]
    with launched(_accelerate(profile, *args), cwd=ROOT) as proc:
        output = "".join(line for _, line in _timed_output(proc, timeout=900))
    record = json.loads((tmp_path / "out" / "run_record.json").read_text())
    assert record["stages"]["asr"]["complete"], output[-4000:]
    assert "stand-ins: ready" in output and "corpus: " in output  # built here, from nothing


# -- a hung or crashed rank --------------------------------------------------------------------


TIMEOUT_MINUTES = 0.5


@pytest.mark.parametrize("fault", ["hang", "crash"])
def test_a_hung_or_crashed_rank_ends_the_job(fault, small_run, tmp_path):
    args = [*small_run, "--max-steps", "8", "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
    args += ["--dist-timeout-minutes", str(TIMEOUT_MINUTES)]
    env = {"OMNI_STAGE_FAULT": f"{fault}@1:3"}
    with launched(_accelerate("cpu_ddp.yaml", *args), env=env, cwd=ROOT) as proc:
        lines = _timed_output(proc, timeout=600)
        output = "".join(line for _, line in lines)
        assert proc.returncode != 0, output[-4000:]
        onset = next(t for t, line in lines if f"injected fault '{fault}'" in line)
        ended = lines[-1][0]
    if fault == "hang":
        assert "error: rank 0 of 2 failed in phase 'stage asr: step 3'" in output, output[-6000:]
        assert ended - onset <= TIMEOUT_MINUTES * 60 + 60, output[-4000:]
        assert "a collective waited longer than the process group's timeout (0.5 min" in output
        assert "Timeout (0:00:45)!" in output  # the hung rank's own stack, from its watchdog
        assert "in inject_fault" in output  # where the hung rank was
    else:
        assert ended - onset < 60, output[-4000:]
        assert "error: rank 1 of 2 failed in phase 'stage asr: step 3': InjectedFault" in output
        assert f"exitcode  : {CRASH_EXIT_CODE}" in output  # torchrun's failure summary
        assert "(most recent call first)" in output  # the failed rank's stacks
        assert output.count("(most recent call first)") >= 2  # stacks of both ranks


def test_a_wer_gate_ends_every_rank_together_with_its_code(small_run, tmp_path):
    """A WER-gate stop under two processes: both ranks exit 3, after rank 0 has written the record
    and report; none is left for the launcher to SIGTERM (exit -15) when the first one leaves."""
    recipe = small_run[small_run.index("--recipe") + 1]
    gated = recipe_variant(recipe, tmp_path / "gated.json", stages={"asr": {"max_wer": 0.01}})
    out = tmp_path / "out"
    args = [*with_arg(small_run, "--recipe", gated), "--max-steps", "4", "--output-dir", str(out)]
    with launched(_accelerate("cpu_ddp.yaml", *args, "--cache-dir", str(tmp_path / "c")), cwd=ROOT) as proc:
        output = "".join(line for _, line in _timed_output(proc, timeout=600))
    assert "is above the stage's gate 0.010" in output, output[-4000:]
    codes = re.findall(r"exitcode\s+:\s+(-?\d+)", output)  # torchrun's summary: each failed rank
    assert sorted(codes) == ["3", "3"], output[-4000:]
    assert json.loads((out / "run_record.json").read_text())["stages"]["asr"]["complete"]
    assert (out / "report.md").is_file()


def test_nothing_outlives_a_launch(small_run, tmp_path):
    """A launch its test stops mid-run (here: on purpose) leaves no process behind, ranks included."""
    args = [*small_run, "--max-steps", "400", "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
    with launched(_accelerate("cpu_ddp.yaml", *args), cwd=ROOT) as proc:
        metrics = tmp_path / "out" / "asr" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not metrics.exists():
            time.sleep(0.2)
        assert len(launched_processes(proc.mark)) >= 3  # the launcher and two ranks, at least
    assert launched_processes(proc.mark) == []


# -- damaged checkpoints, a full disk -------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(small_run, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(run_into(small_run, out, 12)) == 0
    return asr_losses(out)


def _interrupted_at_10(small_run, out: Path, monkeypatch) -> None:
    """Stopped by a crash after step 10: checkpoints step-4 and step-8 are on disk."""
    from training.engine.faults import InjectedFault

    monkeypatch.setenv("OMNI_STAGE_FAULT", "crash@0:10")
    with pytest.raises(InjectedFault):
        main(run_into(small_run, out, 12))
    monkeypatch.delenv("OMNI_STAGE_FAULT")
    names = sorted(p.name for p in (out / "asr" / "checkpoints").glob("step-*"))
    assert names == ["step-0000004", "step-0000008"]


@pytest.mark.parametrize("damage", ["truncated", "checksum", "missing"])
def test_a_damaged_checkpoint_is_set_aside_and_the_intact_one_used(
    damage, small_run, uninterrupted, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    _interrupted_at_10(small_run, out, monkeypatch)
    weights = out / "asr" / "checkpoints" / "step-0000008" / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "checksum":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # same size, one bit pattern changed
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    capsys.readouterr()
    assert main(run_into(small_run, out, 12)) == 0
    log = capsys.readouterr().out
    problem = {
        "truncated": "model.safetensors is 1,000 bytes",
        "checksum": "model.safetensors does not match its checksum",
        "missing": "model.safetensors is missing",
    }[damage]
    assert f"checkpoint step-0000008 is damaged ({problem}" in log, log
    assert "resumed from" in log and "step-0000004 at step 4" in log
    assert (out / "asr" / "checkpoints" / "damaged-step-0000008" / "trainer_state.json").is_file()  # kept
    assert asr_losses(out) == pytest.approx(uninterrupted, abs=1e-6)


def test_no_intact_checkpoint_is_exit_2(small_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupted_at_10(small_run, out, monkeypatch)
    for step in ("step-0000004", "step-0000008"):
        (out / "asr" / "checkpoints" / step / "model.safetensors").write_bytes(b"x" * 10)
    capsys.readouterr()
    assert main(run_into(small_run, out, 12)) == 2
    log = capsys.readouterr().out
    assert "every checkpoint in" in log and "is damaged (step-0000008, step-0000004" in log


def test_resume_from_a_given_checkpoint(small_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupted_at_10(small_run, out, monkeypatch)
    given = out / "asr" / "checkpoints" / "step-0000004"
    capsys.readouterr()
    args = run_into(small_run, out, 12)
    assert main([*args, "--resume", str(given)]) == 0
    assert f"resumed from {given} at step 4" in capsys.readouterr().out


def test_a_full_disk_is_one_clear_message_and_nothing_is_lost(small_run, uninterrupted, tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator

    out = tmp_path / "run"
    args = run_into(small_run, out, 12)
    real_save, saves = Accelerator.save_state, []

    def save_state(self, output_dir, *a, **kw):
        saves.append(output_dir)
        if len(saves) == 2:  # step 8's save: the disk fills half way through
            real_save(self, output_dir, *a, **kw)
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return real_save(self, output_dir, *a, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    assert main(args) == 74
    log = capsys.readouterr().out
    assert "saving checkpoint step-0000008 in" in log and "failed: the file system is full" in log
    assert "the last good checkpoint, step-0000004, is kept" in log and "MB are free" in log
    assert "Traceback" not in log
    assert not list((out / "asr" / "checkpoints").glob(".step-*"))  # the partial save is cleaned up
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert main(args) == 0
    assert "step-0000004 at step 4" in capsys.readouterr().out
    assert asr_losses(out) == pytest.approx(uninterrupted, abs=1e-6)
