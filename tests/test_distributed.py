"""Hardware profiles are config files: 2-process DDP, ZeRO-2 and ZeRO-3 on CPU (gloo) compute the
same training as 1 process, resume after SIGKILL, evaluate every utterance once and export
weights that reload in a single process.

Tolerance: the runs do the same fp32 arithmetic in a different order (each rank sums its half of
the batch, gloo then sums the halves; ZeRO shards the Adam update). That moves a loss by ~1e-7
per step, and Adam can amplify such differences a little over steps; 1e-4 absolute over 10 steps
is two orders above the ~1e-6 seen and far below the loss change per step (~0.1-0.5).
"""

import json
import signal
import time

import pytest
import torch
from accelerate import Accelerator

from tests.helpers import ROOT, STEPS, assert_same_losses, launched, launched_processes, profile_command, run_profile
from training.data import batching as data_lib
from training.engine.checkpoints import StageCheckpoints
from training.engine.context import RunContext
from training.engine.prepare import prepared_splits
from training.engine.sources import load_data_and_pretrained
from training.evaluation.scores import evaluate_wer, heldout_loss
from training.model import build_model, load_omni, row_tables
from training.recipe_file import load_recipe

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def recipe(distributed_recipe) -> str:
    return distributed_recipe


@pytest.fixture(scope="module")
def single(single_process_run) -> dict:
    return single_process_run


@pytest.fixture(scope="module")
def zero3(recipe, cache_dir, tmp_path_factory) -> dict:
    return run_profile("cpu_zero3.yaml", recipe, cache_dir, tmp_path_factory.mktemp("zero3"), STEPS)


def _assert_same_losses(run: dict, reference: dict) -> float:
    return assert_same_losses(run["losses"], reference["losses"], STEPS, TOLERANCE)


@pytest.mark.parametrize("profile", ["cpu_ddp.yaml", "cpu_zero2.yaml"])
def test_two_processes_match_one(profile, recipe, cache_dir, tmp_path, single):
    run = run_profile(profile, recipe, cache_dir, tmp_path, STEPS)
    assert "2 processes" in run["output"]
    _assert_same_losses(run, single)


def test_zero3_matches_one_process_and_keeps_frozen_weights(zero3, single, recipe, cache_dir):
    assert "2 processes" in zero3["output"] and "DEEPSPEED" in zero3["output"]
    _assert_same_losses(zero3, single)
    # asr under ZeRO-3: encoder and every LLM row but the text specials are the pretrained ones
    ctx = RunContext(
        recipe=load_recipe(recipe), output_dir=zero3["dir"], cache_dir=cache_dir, accelerator=Accelerator()
    )
    load_data_and_pretrained(ctx)
    start, _, _ = build_model(*ctx.pretrained, frame_stack=ctx.recipe.frame_stack)
    trained, _, _ = load_omni(zero3["dir"] / "asr" / "final")
    layout = start.layout
    for before, after in zip(row_tables(start.llm), row_tables(trained.llm)):
        assert torch.equal(before[: layout.text_vocab], after[: layout.text_vocab])
        assert torch.equal(before[layout.text_size :], after[layout.text_size :])
        specials = slice(layout.text_vocab, layout.text_size)
        assert not torch.equal(before[specials], after[specials])
    assert all(
        torch.equal(a, b) for a, b in zip(start.encoder.state_dict().values(), trained.encoder.state_dict().values())
    )


def test_zero3_export_reloads_in_one_process_with_same_wer_and_loss(zero3, recipe, cache_dir):
    """The consolidated ZeRO-3 export, evaluated by a single process, gives the held-out loss and
    WER the 2-process ZeRO-3 run measured on its sharded weights, over every utterance once."""
    acc = Accelerator()
    ctx = RunContext(recipe=load_recipe(recipe), output_dir=zero3["dir"], cache_dir=cache_dir, accelerator=acc)
    load_data_and_pretrained(ctx)
    model, tokenizer, feature_extractor = load_omni(zero3["dir"] / "asr" / "final")
    heldout = prepared_splits(ctx, model, feature_extractor, tokenizer)["heldout"]
    loader = data_lib.eval_loader(heldout, model.layout, ctx.recipe.frame_stack, ctx.recipe.eval_batch_size)
    scores, _ = evaluate_wer(acc, model, loader, tokenizer, ctx.recipe.max_new_tokens)
    sharded = zero3["record"]["wer"]["heldout"]
    assert sharded["utterances"] == scores["utterances"] == len(heldout) == 40
    assert sharded["words"] == scores["words"]
    assert sharded["wer"] == pytest.approx(scores["wer"], abs=1e-9)
    assert zero3["record"]["heldout_loss"] == pytest.approx(heldout_loss(acc, model, loader), abs=1e-5)


def test_zero3_resume_after_sigkill_gives_same_losses(zero3, recipe, cache_dir, tmp_path):
    with launched(profile_command("cpu_zero3.yaml", recipe, cache_dir, tmp_path, STEPS), cwd=ROOT) as proc:
        metrics = tmp_path / "asr" / "metrics.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
                # the launcher and both ranks (the elastic agent starts ranks in sessions of their own)
                for p in launched_processes(proc.mark):
                    p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.communicate(timeout=120)
    saved = StageCheckpoints(tmp_path / "asr", keep_last=2).latest()
    assert saved is not None and json.loads((saved / "trainer_state.json").read_text())["step"] == 5
    resumed = run_profile("cpu_zero3.yaml", recipe, cache_dir, tmp_path, STEPS)
    assert f"resumed from {saved} at step 5" in resumed["output"]
    assert resumed["losses"] == pytest.approx(zero3["losses"], abs=1e-6)
