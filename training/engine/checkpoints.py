"""Checkpoints that survive crashes: atomic folders, a `latest` pointer, pruning that never touches
a stage-final export; and what a resumed stage must share with the run that wrote its checkpoint.

Layout of a run directory:

    run_record.json                  per-stage results (steps, losses, WER, time)
    <stage>/checkpoints/step-000050/ accelerator.save_state + trainer_state.json
    <stage>/checkpoints/latest       name of the newest complete checkpoint
    <stage>/final/                   the stage-final export (load_omni), never deleted
    <stage>/metrics.jsonl            one line per optimizer step
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from training.common import write_json_atomic, write_text_atomic
from training.engine.context import StageOrderError
from training.stages import Recipe, StageSpec

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"


class StageCheckpoints:
    """Step checkpoints of one stage: save_state into a temp folder, rename, then move `latest`."""

    def __init__(self, stage_dir: Path, keep_last: int) -> None:
        self.dir = stage_dir / "checkpoints"
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        pointer = self.dir / LATEST
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text().strip()
        return path if (path / TRAINER_STATE).is_file() else None

    def save(self, accelerator, step: int, trainer_state: dict[str, Any]) -> Path:
        """Every process takes part (DeepSpeed shards its state); the main process publishes."""
        name = f"step-{step:07d}"
        final = self.dir / name
        if (final / TRAINER_STATE).is_file():
            # this step is already saved (a periodic save that coincides with the stage end);
            # replacing it would leave `latest` pointing at nothing for a moment
            return final
        tmp = self.dir / f".{name}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # trainer_state.json goes in last: a folder without it is incomplete and ignored
            write_json_atomic(tmp / TRAINER_STATE, trainer_state)
            if final.exists():  # an incomplete leftover (no trainer_state.json); `latest` never named it
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(self.dir / LATEST, name)
            self._prune(keep=name)
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator, path: Path) -> dict[str, Any]:
        accelerator.load_state(str(path))
        return json.loads((path / TRAINER_STATE).read_text())

    def resume(self, accelerator, path: Path, fingerprint: dict[str, Any], mode: str, stage: str) -> dict[str, Any]:
        """Load checkpoint `path` if the run may resume from it: --resume auto and the same recipe."""
        if mode == "never":
            raise StageOrderError(
                f"[{stage}] {self.dir.parent} already holds checkpoints and --resume never was given; "
                f"use a new --output-dir or --resume auto"
            )
        diffs = changed_fields(json.loads((path / TRAINER_STATE).read_text())["recipe"], fingerprint)
        if diffs:
            raise StageOrderError(
                f"[{stage}] refusing to resume from {path}: the recipe changed:\n  " + "\n  ".join(diffs)
            )
        return self.load(accelerator, path)

    def _prune(self, keep: str) -> None:
        complete = sorted(p for p in self.dir.glob("step-*") if (p / TRAINER_STATE).is_file())
        for path in complete[: max(0, len(complete) - self.keep_last)]:
            if path.name != keep:
                shutil.rmtree(path)
        for stale in self.dir.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)


def recipe_fingerprint(recipe: Recipe, spec: StageSpec) -> dict[str, Any]:
    """The fields a resumed stage must share with the run that wrote the checkpoint."""
    fields = recipe.to_dict()
    fields.pop("stages")
    fields.pop("dist_timeout_minutes")  # how long to wait for a hung rank changes no result
    fields["stage"] = json.loads(json.dumps(dataclasses.asdict(spec)))
    return fields


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
