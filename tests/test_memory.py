"""model/memory.py: activations measured from the LLM's own layers, and the largest token budget
that fits; `tokens_per_micro_batch: auto` choosing it in a run."""

import json

import numpy as np
import pytest
from transformers import Qwen2Config

from tests.helpers import asr_run_args, recipe_variant
from training.model.memory import (
    BUDGET_MULTIPLE,
    MEASURE_LENGTHS,
    _kept_bytes,
    largest_budget,
    measure_activations,
)
from training.run import main

HIDDEN = 64
SMALL = Qwen2Config(
    hidden_size=HIDDEN,
    intermediate_size=176,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=500,
    max_position_embeddings=4096,
)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"packed": True},
        {"attn_implementation": "eager"},
        {"checkpointing": True},
        {"layers_train": False},
        {"dtype": "float32"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_the_fit_predicts_another_length_and_depth(options):
    """Fitted on 1 and 2 layers at 64/128/192 positions, the estimate gives what 3 layers keep at
    320 positions (beyond every measured length; eager's probabilities grow with its square)."""
    import torch

    dtype = getattr(torch, options.pop("dtype", "bfloat16"))
    activations = measure_activations(SMALL, dtype=dtype, **options)
    raw = SMALL.to_dict()
    measured = _kept_bytes(
        raw,
        options.get("attn_implementation", "sdpa"),
        options.get("checkpointing", False),
        options.get("layers_train", True),
        options.get("packed", False),
        str(dtype),
        320,
        3,
    )
    assert activations.kept_bytes(320, 320) == pytest.approx(measured, rel=0.01)
    assert 320 > max(MEASURE_LENGTHS)


def test_what_the_layers_keep_depends_on_how_they_train():
    default = measure_activations(SMALL)
    frozen = measure_activations(SMALL, layers_train=False)
    checkpointed = measure_activations(SMALL, checkpointing=True)
    eager = measure_activations(SMALL, attn_implementation="eager")
    flash = measure_activations(SMALL, attn_implementation="flash_attention_2", packed=True)
    # a frozen Linear needs its weight for the input gradient, not its input
    assert frozen.kept[0] < 0.8 * default.kept[0]
    # checkpointed, a layer keeps only its input: `hidden` bf16 values per position
    assert checkpointed.kept[0] == pytest.approx(2 * HIDDEN)
    assert checkpointed.whole == default.kept  # recomputed in backward: the whole layer as workspace
    # eager keeps its attention probabilities: at least heads x L^2 bf16 values per layer
    assert eager.kept[1] >= 2 * SMALL.num_attention_heads > 3 * default.kept[1]
    assert flash.kept[1] == flash.outside[1] == 0.0  # varlen kernels: no mask
    for a in (default, frozen, checkpointed, eager):
        assert a.bytes(4096, 512) > a.kept_bytes(4096, 512)  # backward's workspace and the loss come on top


def test_the_budget_is_the_largest_that_fits():
    activations = measure_activations(SMALL, loss_chunk_mb=1.0, text_width=SMALL.vocab_size)
    states = 3 * 2**20
    for capacity in (8 * 2**20, 64 * 2**20, 512 * 2**20):
        for row in (None, 256):
            budget = largest_budget(capacity, states, activations, row)
            assert budget > 0 and budget % BUDGET_MULTIPLE == 0

            def need(positions, row=row):
                return states + activations.bytes(positions, positions if row is None else row)

            assert need(budget) <= capacity < need(budget + BUDGET_MULTIPLE)
    assert largest_budget(states, states, activations, 256) == 0  # nothing left beside the states
    # a packed row's block mask grows with its square: fewer positions than rows of 256
    assert largest_budget(512 * 2**20, states, activations, None) < largest_budget(
        512 * 2**20, states, activations, 256
    )


def test_estimate_against_a_real_peak_is_conservative():
    """The measured saved tensors are what the process holds: a real forward at the estimate's
    positions keeps no more than it says (what backward adds on top is the workspace)."""
    import torch
    from transformers import AutoModelForCausalLM

    activations = measure_activations(SMALL, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(SMALL, dtype=torch.float32)
    x = torch.randn(2, 256, HIDDEN, requires_grad=True)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(inputs_embeds=x, attention_mask=torch.ones(2, 256, dtype=torch.long)).last_hidden_state.sum()
    params = sum(p.untyped_storage().nbytes() for p in model.parameters())
    held = sum(kept.values()) - params
    assert held <= activations.kept_bytes(512, 256) * 1.02
    assert held >= activations.kept_bytes(512, 256) * 0.5  # the same order: not a vacuous bound


def test_auto_budget_run_prints_its_choice_and_keeps_to_it(tmp_path, quick_recipe, cache_dir, capsys):
    recipe = recipe_variant(quick_recipe, tmp_path / "auto.json", tokens_per_micro_batch="auto", device_memory_gib=0.2)
    assert main(asr_run_args(recipe, cache_dir, tmp_path / "out", 4)) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "tokens_per_micro_batch auto:" in x)
    budget = int(line.split("auto: ")[1].split(" positions")[0].replace(",", ""))
    assert "0.20 GiB to fill (device_memory_gib 0.2)" in line and "ddp (no ZeRO)" in line
    assert f"micro-batches of up to {budget:,} positions per process" in out
    metrics = [json.loads(x) for x in (tmp_path / "out" / "asr" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(m["tokens"] <= budget for m in metrics)
    assert np.all(np.isfinite([m["loss"] for m in metrics]))
    # twice the memory, a larger choice
    bigger = recipe_variant(quick_recipe, tmp_path / "auto2.json", tokens_per_micro_batch="auto", device_memory_gib=0.4)
    assert main(asr_run_args(bigger, cache_dir, tmp_path / "out2", 1)) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "tokens_per_micro_batch auto:" in x)
    assert int(line.split("auto: ")[1].split(" positions")[0].replace(",", "")) > budget


def test_auto_budget_on_cpu_without_a_memory_figure_is_refused(tmp_path, quick_recipe, cache_dir, capsys):
    recipe = recipe_variant(quick_recipe, tmp_path / "auto.json", tokens_per_micro_batch="auto")
    assert main(asr_run_args(recipe, cache_dir, tmp_path / "out", 2)) == 2
    err = "".join(capsys.readouterr())  # the run's log or stderr, wherever the process sends it
    assert "sizes micro-batches to a GPU's memory" in err and "device_memory_gib" in err
    assert "Traceback" not in err
    bad = recipe_variant(quick_recipe, tmp_path / "bad.json", tokens_per_micro_batch="lots")
    assert main(asr_run_args(bad, cache_dir, tmp_path / "bad", 2)) == 2
    assert (
        "tokens_per_micro_batch is a number of positions >= 1, \"auto\" or null; got 'lots'" in capsys.readouterr().err
    )
