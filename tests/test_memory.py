"""model/memory.py: activations measured from the LLM's own layers, and the largest token budget
that fits; `tokens_per_micro_batch: auto` choosing it in a run."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import Qwen2Config

from benchmarks.activation_memory import estimate, in_a_fresh_process, qwen2_05b_layers
from tests.helpers import asr_run_args, recipe_variant
from training.engine.budget import device_capacity
from training.model.memory import (
    BUDGET_MULTIPLE,
    GIB,
    MEASURE_LENGTHS,
    _kept_bytes,
    largest_budget,
    measure_activations,
    usable_bytes,
)
from training.recipe_file import load_recipe
from training.run import main
from training.stages import RecipeError

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


# A real step's shape: (LLM config, rows, positions per row, output rows, the most the estimate may
# exceed its measured peak by). Measured (2 cores, torch 2.13): 1.14 for SMALL; 2.2 for Qwen2-0.5B's
# layers, whose per-position estimate runs high (with its whole 152,000-row output it is 1.3).
REAL_STEPS = {
    "small": (SMALL.to_dict(), 8, 512, SMALL.vocab_size, 1.5),
    "qwen2-0.5b-2-layers": (qwen2_05b_layers(2), 4, 256, 4096, 2.5),
}


@pytest.mark.parametrize("shape", REAL_STEPS)
def test_estimate_bounds_a_real_steps_peak(shape):
    """A real training step in a fresh process (benchmarks/activation_memory.py: forward through the
    layers and the chunked loss, then backward): the resident high-water mark above the built model
    and inputs, less the gradients, is no more than the estimate, and the estimate no more than
    `factor` times it."""
    raw, rows, row_length, text_width, factor = REAL_STEPS[shape]
    measured = in_a_fresh_process("measure", raw, rows, row_length, False, text_width)
    estimated, _ = estimate(raw, rows, row_length, False, text_width)
    assert measured <= estimated <= factor * measured, f"estimated / measured: {estimated / measured:.2f}"


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


def test_auto_budget_without_a_memory_figure_fills_a_gpu_and_is_refused_on_cpu(
    tmp_path, quick_recipe, cache_dir, capsys, monkeypatch
):
    """Without device_memory_gib, "auto" sizes micro-batches to the GPU's own memory, and a process
    on the CPU is refused. Both branches run on any machine (the GPU's queries answer what is set
    here); the whole run then shows this machine's: refused on a CPU-only one, under way on a GPU."""
    recipe = recipe_variant(quick_recipe, tmp_path / "auto.json", tokens_per_micro_batch="auto")
    with pytest.raises(RecipeError, match="sizes micro-batches to a GPU's memory.*device_memory_gib"):
        device_capacity(SimpleNamespace(device=torch.device("cpu")), load_recipe(recipe))
    with monkeypatch.context() as gpu:
        gpu.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GIB))
        gpu.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
        capacity, source = device_capacity(SimpleNamespace(device=torch.device("cuda", 0)), load_recipe(recipe))
    assert capacity == usable_bytes(80 * GIB) and source.startswith("NVIDIA H100 80GB HBM3: 80.0 GiB")
    code = main(asr_run_args(recipe, cache_dir, tmp_path / "out", 2))
    err = "".join(capsys.readouterr())  # the run's log or stderr, wherever the process sends it
    if torch.cuda.is_available():
        assert code == 0 and f"({torch.cuda.get_device_name()}: " in err
    else:
        assert code == 2 and "sizes micro-batches to a GPU's memory" in err and "device_memory_gib" in err
    assert "Traceback" not in err
    bad = recipe_variant(quick_recipe, tmp_path / "bad.json", tokens_per_micro_batch="lots")
    assert main(asr_run_args(bad, cache_dir, tmp_path / "bad", 2)) == 2
    assert (
        "tokens_per_micro_batch is a number of positions >= 1, \"auto\" or null; got 'lots'" in capsys.readouterr().err
    )
