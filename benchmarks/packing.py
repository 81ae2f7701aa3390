"""Real (non-pad) positions per micro-batch on LibriSpeech-like lengths: packing by token budget
against today's length grouping by row count.

Lengths: `--rows` ASR utterances of 1-30 s (log-normal around 12 s, as LibriSpeech's clips),
laid out as Mini-Omni lays them: 50 whisper frames per second (frame_stack 1), ~3 transcript
tokens per second, the prompt's 3 specials and eot. The samplers are the training ones:
  - length-grouped (training/data/batching.py: LengthGroupedSampler), `--batch-size` rows padded
    to the longest: real / (rows x longest), as today's default;
  - token budget, rows padded (data/packing.py, `tokens_per_micro_batch`): the same figure;
  - token budget, packed (`packing`): one row per micro-batch, charged the whole budget, i.e. as
    if every micro-batch were padded to the budget (a fixed shape): real / (micro-batches x budget).
Counting only (no model, no timing).

    python benchmarks/packing.py [--rows 20000] [--budget 16384] [--batch-size 8]

Prints:
    real-position fraction (packed): X.XXX
    real-position fraction (length-grouped, batch_size N): X.XXX
    real-position fraction (token budget, padded): X.XXX
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.data.batching import LengthGroupedSampler  # noqa: E402
from training.data.packing import TokenBudgetSampler  # noqa: E402


def librispeech_positions(rows: int, seed: int) -> np.ndarray:
    seconds = np.clip(np.random.default_rng(seed).lognormal(np.log(12.0), 0.5, rows), 1.0, 30.0)
    frames = np.floor(seconds * 50).astype(np.int64) + 1  # layout.n_encoder_frames
    return frames + np.round(seconds * 3).astype(np.int64) + 4


def grouped_fraction(lengths: np.ndarray, batch_size: int, seed: int) -> float:
    order = np.fromiter(LengthGroupedSampler(lengths, batch_size, seed), dtype=np.int64)
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return sum(int(lengths[b].sum()) for b in batches) / sum(len(b) * int(lengths[b].max()) for b in batches)


def budget_fraction(lengths: np.ndarray, budget: int, seed: int, packed: bool) -> tuple[float, int]:
    batches = list(TokenBudgetSampler(lengths, budget, seed, packed))
    real = sum(int(lengths[b].sum()) for b in batches)
    charged = budget * len(batches) if packed else sum(len(b) * int(lengths[b].max()) for b in batches)
    worst = max(int(lengths[b].sum()) if packed else len(b) * int(lengths[b].max()) for b in batches)
    assert worst <= budget, f"a micro-batch of {worst} positions exceeds the budget {budget}"
    return real / charged, len(batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--budget", type=int, default=16_384, help="tokens_per_micro_batch (positions)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch of today's grouping")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    lengths = librispeech_positions(args.rows, args.seed)
    print(
        f"{args.rows:,} utterances, {lengths.min()}-{lengths.max()} positions (mean {lengths.mean():.0f}); "
        f"budget {args.budget:,} positions"
    )
    packed, n_packed = budget_fraction(lengths, args.budget, args.seed, packed=True)
    padded, n_padded = budget_fraction(lengths, args.budget, args.seed, packed=False)
    grouped = grouped_fraction(lengths, args.batch_size, args.seed)
    print(
        f"micro-batches per epoch: packed {n_packed:,}, padded {n_padded:,}, grouped {args.rows // args.batch_size:,}"
    )
    print(f"real-position fraction (packed): {packed:.3f}")
    print(f"real-position fraction (length-grouped, batch_size {args.batch_size}): {grouped:.3f}")
    print(f"real-position fraction (token budget, padded): {padded:.3f}")


if __name__ == "__main__":
    main()
