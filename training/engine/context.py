"""What every stage of one run shares: the recipe, the folders, the Accelerator, the loaded data, the
run record; and the ways a run ends early (each maps to an exit code in training/run.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from training.common import RECORD, read_json, write_json_atomic
from training.engine.faults import Phase
from training.stages import Recipe, StageSpec

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on a signal, checkpoint saved, run me again"


class StageOrderError(RuntimeError):
    """A stage was asked for whose starting weights do not exist."""


class Preempted(RuntimeError):
    """Stopped on SIGTERM/SIGUSR1/SIGINT after saving a checkpoint."""


class NonFiniteLoss(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss (checkpoint saved)."""


class WerGateFailed(RuntimeError):
    """Held-out WER above the stage's gate: a multi-stage run stops here (checkpoints kept)."""


@dataclass
class RunContext:
    recipe: Recipe
    output_dir: Path
    cache_dir: Path
    accelerator: Accelerator
    init_from: Path | None = None
    max_steps: int | None = None  # overrides every stage's max (and caps its min)
    resume: str = "auto"  # "auto": continue from the latest checkpoint; "never": refuse a used dir
    splits: dict[str, Any] = field(default_factory=dict)  # ASR: audio + transcript
    qa_splits: dict[str, Any] = field(default_factory=dict)  # spoken questions + answers (+ answer speech)
    # The sources' own splits, whole, as the row checks read them (carved slices are not splits there)
    checked_splits: dict[str, Any] = field(default_factory=dict)
    checked_qa_splits: dict[str, Any] = field(default_factory=dict)
    pretrained: tuple[str, str] | None = None  # (encoder, llm) paths or hub ids
    skipped_rows: dict[str, int] = field(default_factory=dict)  # split -> bad rows left out
    phase: Phase | None = None  # where this rank is, for failure messages (engine/faults.py)

    def enter(self, phase: str, watch: bool = True) -> None:
        if self.phase is not None:
            self.phase.enter(phase, watch)

    def log(self, message: str) -> None:
        self.accelerator.print(message, flush=True)

    def record(self) -> dict[str, Any]:
        return read_json(self.output_dir / RECORD, default={"recipe": self.recipe.name, "stages": {}})

    def update_record(self, key: str, value: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            record = self.record()
            record["stages"][key] = value
            write_json_atomic(self.output_dir / RECORD, record)
        self.accelerator.wait_for_everyone()

    def stage_dir(self, stage: str) -> Path:
        return self.output_dir / stage

    def stage_spec(self, stage: str) -> StageSpec:
        """The stage's row of the table, capped by --max-steps."""
        spec = self.recipe.stage(stage)
        if self.max_steps is not None:
            spec = dataclasses.replace(
                spec,
                max_steps=self.max_steps,
                min_steps=min(spec.min_steps, self.max_steps),
                warmup_steps=min(spec.warmup_steps, self.max_steps - 1),
            )
        return spec
