"""Shared set-up for the CPU benchmarks: recipe, cache, stand-ins, prepared splits, output.

Every benchmark reports a RATIO measured in one process on one machine, so a machine that is
busy with other work slows both sides alike (the scripts also alternate the two sides).

`--quick` uses the tests' recipe (quick corpus, quick stand-ins: the same model sizes as the demo,
batch 16) and the tests' cache (`OMNI_STAGE_TEST_CACHE`, default ~/.cache/omni-stage-tests), where
`pytest tests` has already built everything. Without it the demo recipe and the demo's cache
(`OMNI_STAGE_CACHE`, default ~/.cache/omni-stage) are used; a missing corpus or stand-in is built
there first (minutes), exactly as the demo does.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training.recipe_file import recipe_from_dict  # noqa: E402
from training.stages import DEMO, Recipe  # noqa: E402


def quick_recipe_dict() -> dict[str, Any]:
    """The tests' QUICK recipe (tests/conftest.py), read from there so the two never drift."""
    spec = importlib.util.spec_from_file_location("omni_stage_tests_conftest", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return json.loads(json.dumps(module.QUICK))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="the tests' quick recipe and cache (~/.cache/omni-stage-tests); default: the demo recipe",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="corpus, stand-ins and feature cache (default: OMNI_STAGE_TEST_CACHE or ~/.cache/omni-stage-tests "
        "with --quick, else OMNI_STAGE_CACHE or ~/.cache/omni-stage)",
    )
    p.add_argument("--json", type=Path, help="also append the JSON line to this file")
    return p


def cache_dir(args: argparse.Namespace) -> Path:
    if args.cache_dir is not None:
        return args.cache_dir
    if args.quick:
        return Path(os.environ.get("OMNI_STAGE_TEST_CACHE", Path.home() / ".cache" / "omni-stage-tests"))
    return Path(os.environ.get("OMNI_STAGE_CACHE", Path.home() / ".cache" / "omni-stage"))


def recipe(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Recipe:
    """The quick or demo recipe, plus benchmark overrides (same JSON form as a recipe file)."""
    raw = quick_recipe_dict() if args.quick else {"base": "demo", "name": DEMO.name}
    for key, value in (overrides or {}).items():
        if key == "stages":
            for stage, fields in value.items():
                raw.setdefault("stages", {}).setdefault(stage, {}).update(fields)
        else:
            raw[key] = value
    return recipe_from_dict(raw, source="benchmark recipe")


def context(args: argparse.Namespace, overrides: dict[str, Any] | None = None, output_dir: Path | None = None):
    """A RunContext with the splits and the (cached) stand-in checkpoints loaded."""
    from training.engine.context import RunContext
    from training.engine.launch import make_accelerator
    from training.engine.sources import load_data_and_pretrained

    rec = recipe(args, overrides)
    output_dir = output_dir or Path(tempfile.mkdtemp(prefix="omni-bench-"))
    ctx = RunContext(recipe=rec, output_dir=output_dir, cache_dir=cache_dir(args), accelerator=make_accelerator(rec))
    load_data_and_pretrained(ctx)
    return ctx


def untrained_export(ctx) -> Path:
    """The untrained pipeline (stand-ins + a fresh, seeded adapter) saved once as a stage export in
    the cache, so any stage can start from it (--init-from; setup() then skips the 'before'
    evaluation). A fixed path keeps the tokenizer's name, part of the feature-cache key, stable:
    the encoder states are computed once, not at every run."""
    import hashlib

    from training.model import build_model, save_omni

    key = hashlib.sha256(json.dumps([*ctx.pretrained, ctx.recipe.frame_stack, ctx.recipe.adapter_hidden]).encode())
    where = ctx.cache_dir / "benchmarks" / f"untrained-{key.hexdigest()[:12]}"
    if not (where / "omni_config.json").is_file():
        torch.manual_seed(0)
        model, tokenizer, feature_extractor = build_model(
            *ctx.pretrained, ctx.recipe.frame_stack, ctx.recipe.adapter_hidden
        )
        tmp = where.with_name(f".tmp-{where.name}-{os.getpid()}")
        save_omni(model, tmp, tokenizer, feature_extractor)
        tmp.rename(where)
    return where


def prepared(ctx, model, tokenizer, feature_extractor) -> dict[str, Any]:
    """The prepared (encoder states cached) splits, through the loop's own function."""
    from training.engine.prepare import prepared_splits

    return prepared_splits(ctx, model, feature_extractor, tokenizer)


def stage_model(ctx, export: Path):
    """Model, tokenizer, feature extractor from an export (as a stage would load them)."""
    from training.model import load_omni

    return load_omni(export)


def machine() -> dict[str, Any]:
    """What the figures came from. The load average shows how busy the (shared) machine was."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [
        [c if isinstance(c, str) else f"{c:,.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit(name: str, figures: dict[str, Any], args: argparse.Namespace, started: float) -> None:
    """Print the JSON line (and append it to --json)."""
    record = {
        "benchmark": name,
        "quick": bool(args.quick),
        **figures,
        "machine": machine(),
        "wall_seconds": round(time.time() - started, 1),
    }
    line = json.dumps(record)
    print(line, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            f.write(line + "\n")


def replace_spec(run, **changes):
    run.spec = dataclasses.replace(run.spec, **changes)
