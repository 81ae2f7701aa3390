"""Where a stage's weights start: --init-from, the previous stage's export, or (first stage) the
pretrained parts with a fresh adapter."""

from __future__ import annotations

import hashlib

from training.engine.context import RunContext, StageOrderError
from training.model import OmniModel, build_model, is_omni_export, load_omni
from training.stages import STAGE_NAMES

PRETRAINED = "pretrained"


def initial_weights(ctx: RunContext, stage: str) -> str:
    """Where a stage starts: --init-from, else the previous stage's export, else (asr) pretrained."""
    if ctx.init_from is not None:
        if not is_omni_export(ctx.init_from):
            raise StageOrderError(f"--init-from {ctx.init_from}: not a stage export (no omni_config.json)")
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
