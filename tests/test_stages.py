"""The stage table is the seed's, the LR schedule is right at its boundaries, recipes are typed."""

import json
import math

import pytest

from training.recipe_file import load_recipe
from training.stages import DEMO, MINI_OMNI, SEED_STAGES, RecipeError, lr_at


def test_seed_table_matches_published_recipe():
    table = {s.name: (s.min_steps, s.max_steps, s.lr_init, s.lr_peak) for s in SEED_STAGES}
    assert table == {
        "asr": (10_000, 20_000, 4e-6, 1e-3),
        "second": (20_000, 30_000, 4e-6, 4e-4),
        "final": (50_000, 60_000, 4e-6, 4e-4),
    }
    assert MINI_OMNI.stages == SEED_STAGES


def test_stage_trainable_modules():
    assert {s.name: s.trainable for s in SEED_STAGES} == {
        "asr": ("adapter",),
        "second": ("llm",),
        "final": ("adapter", "llm"),
    }


def test_demo_scales_only_steps():
    for seed, demo in zip(SEED_STAGES, DEMO.stages):
        assert (demo.min_steps, demo.max_steps) == (seed.min_steps // 50, seed.max_steps // 50)
        assert (demo.lr_init, demo.lr_peak, demo.lr_floor) == (seed.lr_init, seed.lr_peak, seed.lr_floor)
        assert demo.trainable == seed.trainable and dict(demo.task_mix) == dict(seed.task_mix)


@pytest.mark.parametrize("spec", SEED_STAGES, ids=lambda s: s.name)
def test_lr_schedule_boundaries(spec):
    assert lr_at(spec, 0) == pytest.approx(spec.lr_init)
    half_warmup = spec.lr_init + 0.5 * (spec.lr_peak - spec.lr_init)
    assert lr_at(spec, spec.warmup_steps // 2) == pytest.approx(half_warmup)
    assert lr_at(spec, spec.warmup_steps) == pytest.approx(spec.lr_peak)
    mid = spec.warmup_steps + (spec.max_steps - spec.warmup_steps) // 2
    assert lr_at(spec, mid) == pytest.approx((spec.lr_peak + spec.lr_floor) / 2)
    assert lr_at(spec, spec.max_steps) == pytest.approx(spec.lr_floor)
    assert lr_at(spec, spec.max_steps + 100) == pytest.approx(spec.lr_floor)
    quarter = spec.warmup_steps + (spec.max_steps - spec.warmup_steps) // 4
    expected = spec.lr_floor + 0.5 * (spec.lr_peak - spec.lr_floor) * (1 + math.cos(math.pi / 4))
    assert lr_at(spec, quarter) == pytest.approx(expected)
    values = [lr_at(spec, s) for s in range(spec.warmup_steps, spec.max_steps + 1, 97)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_recipe_file_overrides_and_types(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps({"base": "demo", "batch_size": 8, "stages": {"asr": {"max_steps": 50, "min_steps": 10}}})
    )
    recipe = load_recipe(str(path))
    assert recipe.batch_size == 8 and recipe.stage("asr").max_steps == 50
    assert recipe.stage("asr").lr_peak == 1e-3  # untouched fields stay the seed's

    cases = [
        ({"batch_size": "8"}, "batch_size: expected an integer"),
        ({"stages": {"asr": {"lr_peak": "high"}}}, "stages.asr.lr_peak: expected a number"),
        ({"stages": {"warmup": {}}}, "unknown stage 'warmup'"),
        ({"batch_sise": 8}, "unknown field 'batch_sise'"),
        ({"data": {"audio_column": 3}}, "data.audio_column: expected str"),
        ({"stages": {"second": {"trainable": ["encoder"]}}}, "trainable must be"),
        ({"tokens_per_micro_batch": "lots"}, "tokens_per_micro_batch is a number of positions >= 1"),
        ({"tokens_per_micro_batch": 0}, "tokens_per_micro_batch is a number of positions >= 1"),
        ({"device_memory_gib": 0}, "device_memory_gib must be > 0"),
        ({"torch_compile": 3}, "torch_compile"),
    ]
    for raw, message in cases:
        path.write_text(json.dumps(raw))
        with pytest.raises(RecipeError, match=message.replace(".", r"\.").replace("(", r"\(")):
            load_recipe(str(path))


def test_speed_knobs_read_from_a_file(tmp_path):
    path = tmp_path / "r.json"
    for raw, budget, backend in (
        ({}, None, None),
        ({"tokens_per_micro_batch": "auto", "torch_compile": True}, "auto", "inductor"),
        ({"tokens_per_micro_batch": 4096, "torch_compile": "aot_eager"}, 4096, "aot_eager"),
    ):
        path.write_text(json.dumps({"base": "demo", **raw}))
        recipe = load_recipe(str(path))
        assert (recipe.tokens_per_micro_batch, recipe.compile_backend) == (budget, backend)


def test_unknown_recipe_is_named():
    with pytest.raises(RecipeError, match="recipe 'nope'"):
        load_recipe("nope")
