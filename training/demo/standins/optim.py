"""The stand-ins' own LR schedule and bf16 autocast, shared by the encoder and LLM trainings.

Their own, not the recipe's: the stand-ins' cache key covers the config, not this code, so the
schedule stays exactly as it is (changing it means bumping RECIPE_VERSION).
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
