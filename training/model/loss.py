"""Cross-entropy over one stream's slice of the vocabulary, without ever holding all its logits.

The text stream alone is 152k columns wide for Qwen2: at 4,520 labelled positions its fp32 logits
take 2.75 GB, and their gradient as much again, which caps the micro-batch. Here the positions go
through the output projection a chunk at a time; each chunk's logits live only while its loss is
computed, and backward recomputes them chunk by chunk (activation checkpointing of the head alone).
Each position's loss is the same computation as with all logits at once; the weight gradient sums
the chunks in another order (fp32 round-off).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Project = Callable[[torch.Tensor], torch.Tensor]  # hidden [n, d] -> the stream's logits [n, width]


def chunk_positions(chunk_mb: float, width: int) -> int:
    """Positions per chunk so that a chunk's fp32 logits over `width` columns take at most
    `chunk_mb` MB (at least one position); 0 = no chunking."""
    return max(1, int(chunk_mb * 2**20) // (4 * width)) if chunk_mb > 0 else 0


def stream_cross_entropy(
    project: Project, hidden: torch.Tensor, target: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position CE [n] (fp32) and greedy prediction [n] of `project(hidden)` against `target`,
    `chunk` positions at a time (0, or n <= chunk: all at once)."""
    if chunk <= 0 or len(hidden) <= chunk:
        return _chunk_loss(project, hidden, target)
    losses, predictions = [], []
    for start in range(0, len(hidden), chunk):
        ce, predicted = checkpoint(
            _chunk_loss, project, hidden[start : start + chunk], target[start : start + chunk], use_reentrant=False
        )
        losses.append(ce)
        predictions.append(predicted)
    return torch.cat(losses), torch.cat(predictions)


def _chunk_loss(project: Project, hidden: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = project(hidden).float()
    return F.cross_entropy(logits, target, reduction="none"), logits.detach().argmax(-1)
