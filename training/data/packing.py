"""Micro-batches by token budget, and packing several samples into one row.

`data.tokens_per_micro_batch` (recipe) replaces a fixed number of rows per micro-batch with a
number of positions per process, so short clips come many to a batch and long ones few, and
memory use is the same in every step:

- unpacked: a micro-batch is rows of similar length padded to the longest; its cost is
  rows x longest <= budget;
- packed (`data.packing`): a micro-batch is ONE row holding its samples end to end, each with its
  own position ids (restarting at 0), so attention never crosses a sample (transformers builds the
  block-diagonal mask from the position ids, or runs flash attention's variable-length kernel);
  its cost is the sum of the samples' lengths <= budget, and nothing is padded.

Every epoch the sampler draws a permutation from (seed, epoch), cuts it into buffers of
`buffer_items` items, fills micro-batches within each buffer (packed: best fit, largest first;
unpacked: sorted by length, cut where the next row would break the budget), and shuffles the
micro-batches. The list is the same on every process, whatever their number; process r takes
micro-batches r, r + N, ... (trimmed to a multiple of N so that every process makes the same number
of steps), so the data position is a number of global micro-batches, as for the fixed-size sampler,
and a resume on M processes goes on from exactly there (`resume_at`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

from training.data.checks import DataError

BUFFER_ITEMS = 2048  # items planned together: larger fills micro-batches better, costs memory for indices


def packed_micro_batches(lengths: np.ndarray, items: np.ndarray, budget: int) -> list[list[int]]:
    """Best fit decreasing: each item, longest first, goes into the open micro-batch it fills most
    closely; a new one is opened when none has room."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in items[np.argsort(-lengths[items], kind="stable")].tolist():
        fits = [b for b, r in enumerate(room) if r >= lengths[i]]
        if fits:
            b = min(fits, key=room.__getitem__)
        else:
            bins.append([])
            room.append(budget)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= int(lengths[i])
    return bins


def padded_micro_batches(lengths: np.ndarray, items: np.ndarray, budget: int) -> list[list[int]]:
    """Items sorted by length, longest first, cut into rows padded to their longest: a micro-batch
    closes where one more row would make rows x longest exceed the budget."""
    batches: list[list[int]] = []
    for i in items[np.argsort(-lengths[items], kind="stable")].tolist():
        if batches and (len(batches[-1]) + 1) * int(lengths[batches[-1][0]]) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclass(frozen=True)
class TokenBudget:
    """Micro-batches of up to `tokens` positions on each process, packed into one row or padded rows."""

    tokens: int
    packed: bool
    num_processes: int = 1
    process_index: int = 0


class TokenBudgetSampler(Sampler[list[int]]):
    """This process's micro-batches (lists of item indices), each within `budget` positions."""

    def __init__(
        self,
        lengths: Sequence[int],
        budget: int,
        seed: int,
        packed: bool,
        num_processes: int = 1,
        process_index: int = 0,
        buffer_items: int = BUFFER_ITEMS,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        too_long = np.flatnonzero(self.lengths > budget)
        if len(too_long):
            i = int(too_long[0])
            raise DataError(
                f"training item {i} has {int(self.lengths[i]):,} positions, more than "
                f"data.tokens_per_micro_batch ({budget:,}); {len(too_long):,} items do: raise the budget"
            )
        self.budget, self.seed, self.packed = budget, seed, packed
        self.num_processes, self.process_index = num_processes, process_index
        self.buffer_items = buffer_items
        self.epoch = 0
        self.start = 0  # global micro-batches of this epoch read before a resume (any process count)
        self._planned: tuple[int, list[list[int]]] | None = None  # (epoch, its micro-batches)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # Accelerate re-sets the current epoch at each iteration: keep `start`
            self.start = 0
        self.epoch = epoch

    def resume_at(self, global_micro_batches: int) -> None:
        """Go on after this epoch's first `global_micro_batches` (read by however many processes
        wrote the checkpoint): every later one is read once, by one of this run's processes."""
        self.start = global_micro_batches

    def micro_batches(self) -> list[list[int]]:
        """The epoch's micro-batches for all processes, in order (the same list on every process)."""
        if self._planned is None or self._planned[0] != self.epoch:
            self._planned = (self.epoch, self._plan())
        return self._planned[1]

    def _plan(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).numpy()
        plan = packed_micro_batches if self.packed else padded_micro_batches
        batches: list[list[int]] = []
        for start in range(0, len(perm), self.buffer_items):
            batches += plan(self.lengths, perm[start : start + self.buffer_items], self.budget)
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[b] for b in order]

    def _remaining(self) -> list[list[int]]:
        """The epoch's micro-batches from `start`, cut to a whole number per process (every
        process takes as many steps)."""
        remaining = self.micro_batches()[self.start :]
        return remaining[: len(remaining) - len(remaining) % self.num_processes]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._remaining()[self.process_index :: self.num_processes]

    def __len__(self) -> int:
        return len(self._remaining()) // self.num_processes
