"""The non-finite loss guard and the launch checks."""

import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from training.common import read_json
from training.engine.checkpoints import TRAINER_STATE, StageCheckpoints
from training.engine.context import NonFiniteLoss, RunContext
from training.engine.launch import check_launch, resolve_precision
from training.engine.sources import load_data_and_pretrained
from training.engine.stage import StageRun
from training.recipe_file import load_recipe
from training.stages import RecipeError


def test_nonfinite_steps_are_skipped_then_stop_the_run_with_a_checkpoint(quick_recipe, cache_dir, tmp_path):
    recipe = dataclasses.replace(load_recipe(quick_recipe), nonfinite_patience=3)
    ctx = RunContext(recipe=recipe, output_dir=tmp_path, cache_dir=cache_dir, accelerator=Accelerator(), max_steps=12)
    load_data_and_pretrained(ctx)
    run = StageRun(ctx, "asr")
    run.setup()
    model = ctx.accelerator.unwrap_model(run.model)
    forward, calls, snapshots = model.forward, itertools.count(), {}
    poisoned = {3, 4} | set(range(8, 100))  # forward calls 3-4: skipped steps; from 8 on: 3 in a row stop it

    def patched(**inputs):
        call = next(calls)
        if call in (3, 5):  # before the first poisoned step, and after the two skipped ones
            snapshots[call] = [p.detach().clone() for p in model.adapter.parameters()]
        out = forward(**inputs)
        if call in poisoned:
            out["row_loss_sum"] = out["row_loss_sum"] * float("nan")
        return out

    model.forward = patched
    with pytest.raises(NonFiniteLoss, match="3 steps in a row had a non-finite loss"):
        run.train()
    state = run.state
    assert state["step"] == 6 and state["skipped_steps"] == 5 and state["batches_in_epoch"] == 11
    assert all(torch.isfinite(torch.tensor(state["losses"])))
    # skipped steps applied no update (their data was consumed, nothing else)
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[5]))
    latest = StageCheckpoints(run.dir, recipe.keep_last).latest()
    assert read_json(latest / TRAINER_STATE)["step"] == 6


@pytest.mark.parametrize(
    ("cuda", "bf16", "auto"),
    [(False, False, "no"), (True, True, "bf16"), (True, False, "no")],
    ids=["cpu", "bf16-gpu", "gpu-without-bf16"],
)
def test_precision_policy_follows_the_hardware(monkeypatch, cuda, bf16, auto):
    """Precision "auto" is bf16 where a GPU has it, fp32 (Accelerate's "no") elsewhere; a named one
    is kept. Every branch runs on any machine: the CUDA queries answer what each case sets."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert resolve_precision("auto") == auto
    assert resolve_precision("fp32") == "no"
    assert resolve_precision("bf16") == "bf16"


def test_precision_policy_on_this_machine():
    """Unpatched: a CPU-only machine trains in fp32, a GPU from Ampere on (compute capability 8+,
    every card the MFU table names) in bf16, an older one (bf16 only emulated) in fp32."""
    native = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    assert resolve_precision("auto") == ("bf16" if native else "no")


def test_launch_checks_name_the_knob(quick_recipe):
    recipe = load_recipe(quick_recipe)  # global batch 16
    three = SimpleNamespace(num_processes=3, distributed_type=DistributedType.MULTI_CPU)
    with pytest.raises(RecipeError, match="batch_size 16 .* must divide by the 3 processes"):
        check_launch(three, recipe)
    config = {"gradient_clipping": 0.5}
    deepspeed = SimpleNamespace(
        num_processes=2,
        distributed_type=DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config, zero_stage=3)),
    )
    with pytest.raises(RecipeError, match="gradient_clipping 0.5, the recipe max_grad_norm 1.0"):
        check_launch(deepspeed, recipe)
    config["gradient_clipping"] = "auto"
    check_launch(deepspeed, recipe)
    assert config["gradient_clipping"] == recipe.max_grad_norm
    # compiled layers under ZeRO-3 recompile until torch gives up: refused, ZeRO-2 allowed
    compiled = dataclasses.replace(recipe, torch_compile=True)
    with pytest.raises(RecipeError, match="torch_compile does not work with ZeRO-3"):
        check_launch(deepspeed, compiled)
    deepspeed.state.deepspeed_plugin.zero_stage = 2
    check_launch(deepspeed, compiled)
