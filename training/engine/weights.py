"""Where a stage's weights start: --init-from, the previous stage's export, or (first stage) the
pretrained parts with a fresh adapter."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

from training.common import build_once
from training.engine.context import RunContext, StageOrderError
from training.engine.rank_zero import rank_zero_first
from training.model import OmniModel, build_model, is_omni_export, load_omni, save_omni
from training.model.export import LIT_CONFIG, LIT_WEIGHTS, import_mini_omni
from training.model.litgpt import ExportError
from training.stages import STAGE_NAMES

PRETRAINED = "pretrained"
EXPORT_ID = "stage_export.json"  # in each stage export: a new id per export, so a retrained one differs


def initial_weights(ctx: RunContext, stage: str) -> str:
    """Where a stage starts: --init-from (a stage export, or a Mini-Omni checkpoint folder, imported
    once into the cache), else the previous stage's export, else (asr) pretrained."""
    if ctx.init_from is not None:
        if is_mini_omni_folder(ctx.init_from) and not is_omni_export(ctx.init_from):
            ctx.init_from = imported_mini_omni(ctx, ctx.init_from)
        if not is_omni_export(ctx.init_from):
            raise StageOrderError(
                f"--init-from {ctx.init_from}: neither a stage export (omni_config.json) nor a Mini-Omni "
                "checkpoint folder (lit_model.pth + model_config.yaml)"
            )
        return str(ctx.init_from)
    index = STAGE_NAMES.index(stage)
    if index == 0:
        return PRETRAINED
    previous = STAGE_NAMES[index - 1]
    final = ctx.stage_dir(previous) / "final"
    if is_omni_export(final):
        return str(final)
    raise StageOrderError(
        f"stage '{stage}' starts from stage '{previous}''s final checkpoint, but there is none at {final}. "
        f"Run --stage {previous} (or --stage all) first, or pass --init-from PATH to a stage export."
    )


def weights_identity(source: str) -> str:
    """What a stage starts from, for the resume fingerprint: PRETRAINED (the recipe names the parts),
    a stage export's own id (a new one each time a stage finishes), else the folder's path."""
    if source == PRETRAINED:
        return PRETRAINED
    marker = Path(source) / EXPORT_ID
    if marker.is_file():
        return json.loads(marker.read_text())["id"]
    return str(Path(source).resolve())


def write_export_id(folder: Path, stage: str, step: int) -> str:
    export_id = f"{stage}-step{step}-{uuid.uuid4().hex[:12]}"
    (folder / EXPORT_ID).write_text(json.dumps({"id": export_id, "stage": stage, "step": step}))
    return export_id


def is_mini_omni_folder(path: Path) -> bool:
    return (path / LIT_WEIGHTS).is_file() and (path / LIT_CONFIG).is_file()


def imported_mini_omni(ctx: RunContext, folder: Path) -> Path:
    """A Mini-Omni litgpt folder (theirs, or one training.model.export wrote) as a stage export in
    the cache, converted once per folder content and encoder (--encoder, or the folder's sidecar)."""
    key = hashlib.sha256(str(ctx.recipe.encoder).encode())
    for name in sorted(p.name for p in folder.iterdir() if p.is_file()):
        stat = (folder / name).stat()
        key.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = ctx.cache_dir / "imports" / f"mini-omni-{key.hexdigest()[:12]}"
    # rank 0 converts; the others then find the export (a single-rank phase: engine/rank_zero.py)
    with rank_zero_first(ctx.accelerator, "importing the --init-from checkpoint"):
        if is_omni_export(target):
            return target
        ctx.log(f"--init-from {folder}: a Mini-Omni checkpoint; importing it into {target}")
        try:
            model, tokenizer, feature_extractor = import_mini_omni(folder, ctx.recipe.encoder)
        except ExportError as err:
            raise StageOrderError(f"--init-from {folder}: {err}") from err
        with build_once(target, ctx.log, "import") as tmp:
            save_omni(model, tmp, tokenizer, feature_extractor)
    return target


def make_model(ctx: RunContext, source: str):
    """(model, tokenizer, feature extractor) from a stage export, or PRETRAINED parts."""
    if source == PRETRAINED:
        encoder, llm = ctx.pretrained
        return build_model(encoder, llm, ctx.recipe.frame_stack, ctx.recipe.adapter_hidden)
    return load_omni(source)


def encoder_key(model: OmniModel) -> str:
    """Identity of the frozen encoder's weights, for the feature cache."""
    h = hashlib.sha256(model.config.encoder.encode())
    for name, tensor in sorted(model.encoder.state_dict().items()):
        h.update(f"{name}{tuple(tensor.shape)}{float(tensor.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]
