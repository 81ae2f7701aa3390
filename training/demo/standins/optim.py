"""The stand-ins' LR schedule and bf16 autocast, shared by the encoder and LLM trainings.

The schedule has the recipe's shape (training/stages.py `warmup_cosine`: linear warm-up, cosine
decay to a floor) but not its arithmetic: warm-up counts from step 1 and the floor is a ratio of
the peak. Moving the stand-ins onto `warmup_cosine` changes every stand-in weight, and with them
every demo figure and the quick test run's losses, so the stand-ins keep this formula, pinned by
RECIPE_VERSION (the cache key covers the config, not this code).
"""

from __future__ import annotations

import math

import torch

__all__ = ["bf16_autocast", "lr_at", "set_lr"]


def lr_at(step: int, total: int, warmup: int, peak: float, floor_ratio: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor_ratio * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def bf16_autocast(enabled: bool) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)
