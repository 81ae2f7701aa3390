"""The stand-ins' LR and bf16 autocast, shared by the encoder and LLM trainings.

The schedule is the project's one warm-up + cosine shape (training/stages.py `warmup_cosine`),
set from the stand-in config: warm-up from peak / warmup_steps, decay to floor_ratio x peak.
The stand-ins' cache key covers the config, not this code: a change here bumps RECIPE_VERSION.
"""

from __future__ import annotations

import torch

from training.stages import warmup_cosine

__all__ = ["bf16_autocast", "lr_at", "set_lr"]


def lr_at(step: int, total: int, warmup: int, peak: float, floor_ratio: float) -> float:
    """Linear warm-up from peak / warmup to `peak`, then cosine decay to `floor_ratio * peak` at `total`."""
    return warmup_cosine(step, warmup, total, peak / max(1, warmup), peak, peak * floor_ratio)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def bf16_autocast(enabled: bool) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)
