"""--dry-run: the real recipe sized from the shipped published configs, on the meta device."""

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import TINY_WHISPER, tiny_model
from training.data.batching import SpeechTextCollator
from training.model import model_inputs, parameter_summary, set_trainable
from training.model.dry_run import (
    DryRun,
    DryRunError,
    build_meta_model,
    config_folder,
    dry_run,
    format_data_cost,
    format_dry_run,
)
from training.stages import MINI_OMNI, STAGE_NAMES

ROOT = Path(__file__).resolve().parent.parent
QWEN2_05B = 494_032_768  # published Qwen2-0.5B size (embedding and output layer tied)
WHISPER_SMALL_ENCODER = 88_154_112
HIDDEN = 896


@pytest.fixture(scope="module")
def real() -> DryRun:
    return dry_run(MINI_OMNI, STAGE_NAMES, gpus_per_node=8, nodes=1)


def test_counts_match_published_sizes(real):
    assert real.llm_pretrained == QWEN2_05B
    # growth adds (181,120 - 151,936) rows of width 896, once: the output layer is the same tensor
    assert real.llm_grown == QWEN2_05B + (181_120 - 151_936) * HIDDEN == 520_181_632
    for rep in real.stages:
        assert rep.modules["encoder"] == (WHISPER_SMALL_ENCODER, 0, 0)
        assert rep.modules["llm"][0] == real.llm_grown
    # Mini-Omni's adapter: fc_1, fc_2 (768 -> 4864) and proj (4864 -> 896), no biases
    adapter = 2 * 768 * 4864 + 4864 * HIDDEN
    asr, second, final = real.stages
    assert asr.modules["adapter"] == (adapter, adapter, adapter)
    # asr: 64 text-special rows train; the whole (tied) embedding tensor reaches the optimizer
    assert asr.modules["llm"][1:] == (64 * HIDDEN, 181_120 * HIDDEN)
    assert second.modules["adapter"] == (adapter, 0, 0) and second.modules["llm"][1] == real.llm_grown
    assert final.modules["adapter"][1] == adapter and final.modules["llm"][1] == real.llm_grown


def test_memory_per_gpu_for_8_gpus(real):
    for rep in real.stages:
        mem = {m.profile: m for m in rep.memory}
        assert mem["zero3"].gpu_total < mem["zero2"].gpu_total < mem["ddp (no ZeRO)"].gpu_total
        assert mem["zero3+offload"].gpu_total < mem["zero3"].gpu_total
    final = {m.profile: m for m in real.stages[2].memory}
    trainable = real.stages[2].in_optimizer
    frozen = WHISPER_SMALL_ENCODER
    # DeepSpeed's ZeRO-2 byte counts: 2 per parameter on every GPU + 18 per trainable one / N
    assert final["zero2"].gpu_total == 2 * (trainable + frozen) + int(18 * trainable / 8)
    # ZeRO-3 gathers the largest layer: the 181,120 x 896 embedding, 4 bytes per parameter
    assert final["zero3"].gathered == 4 * 181_120 * HIDDEN


def test_tokens_per_step(real):
    # 10 s -> 501 encoder frames (int(ms / 20) + 1), frame_stack 1, + 3 prompt + 30 text + eot
    assert real.seq_len == 501 + 3 + 30 + 1
    assert real.tokens_per_step == MINI_OMNI.batch_size * MINI_OMNI.grad_accum * real.seq_len


def test_meta_counts_equal_a_real_build(tiny_checkpoints):
    """Local folders: the config is read from there, and the meta model counts exactly what
    build_model loads for real, stage by stage."""
    encoder, llm = tiny_checkpoints
    recipe = dataclasses.replace(MINI_OMNI, encoder=encoder, llm=llm, adapter_hidden=None)
    meta_model, _ = build_meta_model(Path(encoder), Path(llm), 1, None, encoder)
    assert all(p.device.type == "meta" for p in meta_model.parameters())  # nothing allocated
    result = dry_run(recipe, STAGE_NAMES, gpus_per_node=2, nodes=2)
    assert all("local folder" in line for line in result.sources)
    model, _, _ = tiny_model(tiny_checkpoints, frame_stack=1, seed=None)  # counts only: no seeding needed
    for rep in result.stages:
        set_trainable(model, rep.stage.trainable, rep.stage.train_text_specials)
        assert {m: v[:2] for m, v in rep.modules.items()} == parameter_summary(model)


def test_unknown_hub_id_is_named():
    with pytest.raises(DryRunError, match="some-org/some-model"):
        config_folder("some-org/some-model", "llm")


def test_cli_exits_0_quickly_without_a_launcher():
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "training/run.py", "--recipe", "mini-omni", "--dry-run", "--gpus", "8", "--nodes", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    assert "shipped config configs/qwen2-0.5b/" in out.stdout
    assert "494,032,768" in out.stdout and "zero3+offload" in out.stdout
    assert seconds < 60
    bad = subprocess.run(
        [
            sys.executable,
            "training/run.py",
            "--recipe",
            "mini-omni",
            "--dry-run",
            "--encoder",
            "x/y",
            "--llm",
            "Qwen/Qwen2-0.5B",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "x/y" in bad.stderr


def test_feature_cache_size_and_encoder_share_for_the_recipes_hours():
    """Mini-Omni's ASR data (~8,600 h): whisper-small's 50 frames/s x 768 floats cost 553 MB per hour
    in fp32, half that in bf16 (the cache's default); the encoder's forward over its 1,500-position
    window: 12 layers of 4 x 768^2 + 2 x 768 x 3,072 weights, the convolutions (80 x 768 x 3 over
    3,000 mel frames, 768 x 768 x 3 over 1,500 positions) and attention (4 x 12 x 768 x 1,500^2)."""
    result = dry_run(MINI_OMNI, STAGE_NAMES, gpus_per_node=8, nodes=1, speech_hours=8_600)
    lines = format_data_cost(result)
    assert lines[0].startswith("data: 8,600 h of speech (--speech-hours) = 1,548,000,000 encoder frames of 768")
    assert lines[1].endswith(
        "feature cache on disk (data.encoder_states 'cache'): 2,377.7 GB in bf16 (data.feature_cache_dtype, "
        "the default; 276 MB per hour), 4,755.5 GB in fp32"
    )
    weights = 12 * (4 * 768**2 + 2 * 768 * 3072) + 2 * 80 * 768 * 3 + 768 * 768 * 3
    encoder = 2 * weights * 1500 + 4 * 12 * 768 * 1500**2
    assert f"({encoder / 1e9:,.0f} GFLOP of" in lines[2]  # 344 GFLOP a row
    shares = [int(line.split(" would be ")[1].split("%")[0]) for line in lines[2:]]
    assert len(shares) == 3 and all(15 < s < 35 for s in shares) and shares[0] > shares[2]  # asr trains least


def test_data_cost_is_the_mfu_count_of_a_real_row(tiny_checkpoints):
    """On tiny local checkpoints, per stage: the FLOPs of a row of the dry run's shape and of the
    encoder's forward are what torch's FLOP counter sees in the real model (the count the MFU uses,
    tests/test_mfu.py), so the encoder share printed is theirs."""
    encoder, llm = tiny_checkpoints
    recipe = dataclasses.replace(MINI_OMNI, encoder=encoder, llm=llm, adapter_hidden=None)
    result = dry_run(recipe, STAGE_NAMES, gpus_per_node=1, speech_seconds=2.0, text_tokens=5)
    model, _, _ = tiny_model(tiny_checkpoints, frame_stack=recipe.frame_stack, seed=0)
    model.llm.set_attn_implementation("eager")  # attention as matmuls the counter sees
    model.encoder.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        model.encode(torch.zeros(1, model.encoder.config.num_mel_bins, model.n_mel_frames))
    encoder_flops = counter.get_total_flops()
    frames = int(2.0 * 1000 / 20) + 1  # Whisper: a state per 20 ms, plus one
    states = np.zeros((frames, TINY_WHISPER["d_model"]), "float32")
    row = {"n_frames": frames, "encoder_states": states, "text_ids": np.arange(10, 15), "text": ""}
    batch = model_inputs(SpeechTextCollator(model.layout, recipe.frame_stack)([row]))
    assert int(batch["attention_mask"].sum()) == result.seq_len
    for rep, line in zip(result.stages, format_data_cost(result)[2:]):
        set_trainable(model, rep.stage.trainable, rep.stage.train_text_specials)
        with FlopCounterMode(display=False) as counter:
            model(**batch)["loss"].backward()
        model.zero_grad()
        step_flops = counter.get_total_flops()
        assert f"would be {encoder_flops / (encoder_flops + step_flops):.0%} of its FLOPs" in line
        assert result.row_flops(rep.flops) == step_flops and result.encoder_flops == encoder_flops


def test_token_budgets_per_profile(real):
    """Less model state per GPU leaves room for more positions; a frozen LLM (asr) keeps less for
    backward than a training one; a smaller GPU holds fewer."""
    asr, second, final = real.stages
    for rep in real.stages:
        budgets = dict(zip([m.profile for m in rep.memory], rep.budgets))
        assert 0 < budgets["ddp (no ZeRO)"] <= budgets["zero2"] <= budgets["zero3"] <= budgets["zero3+offload"]
    assert asr.activations.per_position() < 0.8 * final.activations.per_position()
    assert asr.budgets[1] > final.budgets[1]
    smaller = dry_run(MINI_OMNI, ["final"], gpus_per_node=8, nodes=1, gpu_memory_gib=40)
    assert 0 < smaller.stages[0].budgets[1] < final.budgets[1] / 2  # the states' share stays
    text = format_dry_run(real)
    assert "tokens_per_micro_batch" in text and f"{final.budgets[1]:>23,}" in text
    assert "activations: " in text and "MiB per position" in text


def test_tokens_per_step_under_a_token_budget(real):
    """With tokens_per_micro_batch the step's size comes from the budget, not batch_size rows."""
    fixed = dry_run(dataclasses.replace(MINI_OMNI, tokens_per_micro_batch=8192), ["final"], gpus_per_node=8)
    assert fixed.tokens_per_step == 8192 * 8 * MINI_OMNI.grad_accum
    text = format_dry_run(fixed)
    assert f"= {fixed.tokens_per_step:,} (batch_size is not used" in text
    assert f"up to {fixed.tokens_per_step * 60_000 / 1e9:.2f} B tokens" in text
    auto = dry_run(dataclasses.replace(MINI_OMNI, tokens_per_micro_batch="auto"), ["final"], gpus_per_node=8)
    per_profile = auto.stage_tokens_per_step(auto.stages[0])
    assert per_profile == [b * 8 * MINI_OMNI.grad_accum for b in real.stages[2].budgets]
    text = format_dry_run(auto)
    assert "chosen at launch from the GPU's memory" in text
    low, high = min(per_profile) * 60_000 / 1e9, max(per_profile) * 60_000 / 1e9
    assert f"up to {low:.2f}-{high:.2f} B (by profile) tokens" in text
