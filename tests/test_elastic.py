"""Elastic resume: a run checkpointed on 2 processes goes on on 1, and back on 2, under DDP, ZeRO-2
and ZeRO-3 (DeepSpeed's universal checkpoint), and trains exactly as one uninterrupted process.

Each run crashes (the test-only fault hook) after step 4 on 2 processes, resumes from its step-3
checkpoint on 1 process, crashes after step 7, resumes from step 6 on 2 processes and finishes. The
ten per-step losses then equal the single-process run's: that is the same rows in the same order
(the data position counts global batches), the same weights and Adam moments (re-partitioned), and
the LR by step. Tolerance as in test_distributed.py (1e-4; about 1e-6 is seen): the ranks sum their
halves of a batch in another order than one process does.
"""

import json
import sys

import pytest

from tests.helpers import (
    ROOT,
    STEPS,
    asr_run_args,
    assert_same_losses,
    launched,
    profile_command,
    recipe_variant,
    run_profile,
)
from training.engine.elastic import UNIVERSAL

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def recipe(distributed_recipe, tmp_path_factory) -> str:
    return recipe_variant(distributed_recipe, tmp_path_factory.mktemp("elastic") / "recipe.json", save_every=3)


def _crash_after(step: int, profile: str, processes: int, recipe: str, cache_dir, out) -> str:
    command = profile_command(profile, recipe, cache_dir, out, STEPS, processes)
    with launched(command, env={"OMNI_STAGE_FAULT": f"crash@0:{step}"}, cwd=ROOT) as proc:
        output, _ = proc.communicate(timeout=900)
    assert proc.returncode != 0 and f"injected fault 'crash' after step {step}" in output, output[-4000:]
    return output


@pytest.mark.parametrize("profile", ["cpu_ddp.yaml", "cpu_zero2.yaml", "cpu_zero3.yaml"])
def test_resume_on_another_number_of_processes(profile, recipe, cache_dir, tmp_path, single_process_run):
    zero = profile != "cpu_ddp.yaml"
    _crash_after(4, profile, 2, recipe, cache_dir, tmp_path)
    checkpoints = tmp_path / "asr" / "checkpoints"
    assert json.loads((checkpoints / "step-0000003" / "trainer_state.json").read_text())["num_processes"] == 2

    if profile == "cpu_zero2.yaml":  # a ZeRO checkpoint under a non-DeepSpeed profile: one clear refusal
        plain = [sys.executable, str(ROOT / "training" / "run.py"), *asr_run_args(recipe, cache_dir, tmp_path, STEPS)]
        with launched(plain, cwd=ROOT) as proc:
            output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 2 and "Traceback" not in output, output[-4000:]
        assert "was written by DeepSpeed ZeRO profile and this run uses a non-DeepSpeed one" in output

    output = _crash_after(7, profile, 1, recipe, cache_dir, tmp_path)
    assert "resuming a " + ("ZeRO checkpoint" if zero else "checkpoint") + " of 2 process(es) on 1" in output
    assert f"resumed from {checkpoints / 'step-0000003'} at step 3" in output
    assert (checkpoints / "step-0000003" / UNIVERSAL).is_dir() == zero

    finished = run_profile(profile, recipe, cache_dir, tmp_path, STEPS, processes=2)
    assert "of 1 process(es) on 2" in finished["output"]
    assert f"resumed from {checkpoints / 'step-0000006'} at step 6" in finished["output"]
    if zero:
        assert "model and optimizer state re-partitioned over 2 process(es)" in finished["output"]
    assert_same_losses(finished["losses"], single_process_run["losses"], STEPS, TOLERANCE)


def _tokens_by_step(out) -> dict[int, float]:
    """Each step's real positions (global), the latest run's where a resume re-did a step."""
    lines = (out / "asr" / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["tokens"] for m in map(json.loads, lines)}


def test_token_budget_resume_on_another_number_of_processes(recipe, cache_dir, tmp_path):
    """With a token budget each process reads micro-batches of its own, and the data position counts
    global ones: checkpointed by 1 process after 3 micro-batches and resumed on 2, the two go on
    from the 4th, two per step (not from the 3rd, as a per-process skip of 3 // 2 would). Seen
    through each step's real positions against one uninterrupted process's."""
    budget = recipe_variant(recipe, tmp_path / "budget.json", tokens_per_micro_batch=512, packing=True)
    run_profile("cpu.yaml", budget, cache_dir, tmp_path / "alone", 9)
    one = _tokens_by_step(tmp_path / "alone")  # step k read micro-batch k (counting from 1)
    assert len(set(one.values())) > 3  # micro-batches of different sizes: the comparison can tell them apart
    _crash_after(4, "cpu_ddp.yaml", 1, budget, cache_dir, tmp_path / "elastic")
    resumed = run_profile("cpu_ddp.yaml", budget, cache_dir, tmp_path / "elastic", STEPS, processes=2)
    assert "of 1 process(es) on 2" in resumed["output"] and "at step 3" in resumed["output"]
    after = _tokens_by_step(tmp_path / "elastic")
    assert [after[s] for s in (1, 2, 3)] == [one[1], one[2], one[3]]
    assert [after[s] for s in (4, 5, 6)] == [one[4] + one[5], one[6] + one[7], one[8] + one[9]]
