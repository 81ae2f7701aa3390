"""What a run folder (--output-dir) holds that a new command may build on, and when it may not:
a finished stage is reused only for the same recipe, starting weights and data (else two runs
would mix in one folder and one record); --resume PATH must name a checkpoint of a stage this
command runs (else it would be silently ignored)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.engine.checkpoints import changed_fields, recipe_fingerprint
from training.engine.context import RunContext, StageOrderError
from training.engine.sources import data_identity
from training.engine.weights import initial_weights, weights_identity
from training.model import is_omni_export
from training.stages import STAGE_NAMES


def finished_stage(ctx: RunContext, stage: str, starts_from: str) -> dict[str, Any] | None:
    """The record of `stage` when it finished in this folder with this run's recipe, starting
    weights (`starts_from`: PRETRAINED or an export folder) and data: then it is reused. None when it
    did not finish. StageOrderError when it finished as part of another run, naming what differs."""
    done = ctx.record()["stages"].get(stage)
    folder = ctx.stage_dir(stage)
    if not (done and done.get("complete") and is_omni_export(folder / "final")):
        return None
    if "fingerprint" not in done:
        raise StageOrderError(
            f"[{stage}] {folder} holds a finished '{stage}' stage whose record names no recipe fingerprint or "
            "data (written by an earlier version): it cannot be checked against this run, so it is not reused. "
            f"Use a new --output-dir (with --init-from {folder / 'final'} to start from its weights), or run "
            "only the stages after it (--stage NAME)."
        )
    fingerprint = recipe_fingerprint(ctx.recipe, ctx.stage_spec(stage), weights_identity(starts_from))
    recorded = done["fingerprint"]
    if fingerprint.get("tokens_per_micro_batch") == "auto":  # the finished run recorded what it resolved
        recorded = {k: v for k, v in recorded.items() if k != "tokens_per_micro_batch"}
        fingerprint.pop("tokens_per_micro_batch")
    diffs = changed_fields(recorded, fingerprint)
    diffs += changed_fields(done.get("data", {}), data_identity(ctx, ctx.stage_spec(stage).task_mix), "data: ")
    if diffs:
        raise StageOrderError(
            f"[{stage}] {folder} holds a finished '{stage}' stage of another run, which differs from this one "
            "(recorded -> now):\n  " + "\n  ".join(diffs) + "\nIt is not reused. Train this run in a new "
            f"--output-dir (to start from that stage's weights: --init-from {folder / 'final'}), or rerun with the "
            "recipe and data it was trained on."
        )
    return done


def check_finished_stages(ctx: RunContext, stages: list[str]) -> None:
    """Before any pretrained part is built: every stage of this command already finished in the
    folder is checked (finished_stage), in order, up to the first one that is not finished or that
    --resume PATH trains again."""
    for i, stage in enumerate(stages):
        if resume_checkpoint(ctx, stage) is not None:
            return
        index = STAGE_NAMES.index(stage)
        if index == 0 or (i == 0 and ctx.init_from is not None):
            source = initial_weights(ctx, stage)
        else:  # a later stage of this command starts from the previous one's export (as train_stages runs it)
            source = str(ctx.stage_dir(STAGE_NAMES[index - 1]) / "final")
        if finished_stage(ctx, stage, source) is None:
            return


def resume_checkpoint(ctx: RunContext, stage: str) -> Path | None:
    """The checkpoint --resume PATH names when it is one of `stage`'s in this run's folder."""
    if ctx.resume in ("auto", "never"):
        return None
    given = Path(ctx.resume)
    return given if given.resolve().parent == (ctx.stage_dir(stage) / "checkpoints").resolve() else None


def check_resume_path(ctx: RunContext, stages: list[str]) -> None:
    """--resume PATH must be a step checkpoint of a stage this command runs, in its --output-dir:
    anything else would be silently ignored (StageOrderError, exit 2)."""
    if ctx.resume in ("auto", "never") or any(resume_checkpoint(ctx, s) for s in stages):
        return
    given = Path(ctx.resume).resolve()
    other = next((s for s in STAGE_NAMES if resume_checkpoint(ctx, s)), None)
    why = (
        f"it is a checkpoint of stage '{other}', which this command does not run"
        if other
        else f"it is not a step checkpoint in --output-dir {ctx.output_dir}"
    )
    raise StageOrderError(
        f"--resume {given}: {why}; expected {ctx.output_dir}/<stage>/checkpoints/step-N for one of {stages}. "
        "To start from another run's weights, pass its stage export with --init-from <run>/<stage>/final."
    )
