"""Padding efficiency: real (non-pad) positions per batch, length-grouped batches vs fixed 2048.

    python benchmarks/padding.py --quick [--epochs 3]

Batches come from the real train_loader (LengthGroupedSampler + SpeechTextCollator) over the real
training split of the embedded corpus (encoder states from the feature cache). A position is one
column of the 8-stream layout; it is real where the collator's attention_mask is 1. Compared
with:
  - padding every sample to a fixed 2048 positions (same samples: real / (batch x 2048));
  - shuffled batches without length grouping (same collator), for reference.
The figure is the token-weighted real fraction (all real positions / all positions over the
epochs); the worst batch and the 10th percentile are printed too, and the same for the
encoder-state frames that the collator pads for the adapter. Counting only: no timing involved.
"""

from __future__ import annotations

import time

import common
import torch
from torch.utils.data import DataLoader

from training.data import batching as data_lib
from training.model import load_omni

FIXED = 2048
TARGET = 0.9


def fractions(loader: DataLoader, epochs: int, fixed: int | None = None) -> dict[str, float]:
    per_batch, real_total, padded_total = [], 0, 0
    frames_real, frames_padded, widths = 0, 0, []
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            mask = batch["attention_mask"]
            real = int(mask.sum())
            if fixed is not None and mask.shape[1] > fixed:
                raise ValueError(f"a sample has {mask.shape[1]} positions, more than the fixed {fixed}")
            padded = mask.shape[0] * (fixed or mask.shape[1])
            per_batch.append(real / padded)
            real_total += real
            padded_total += padded
            widths.append(fixed or mask.shape[1])
            frames_real += int(batch["encoder_lengths"].sum())
            frames_padded += batch["encoder_states"].shape[0] * batch["encoder_states"].shape[1]
    return {
        "real_fraction": real_total / padded_total,
        "worst_batch": min(per_batch),
        "p10_batch": common.quantile(per_batch, 0.1),
        "batches": len(per_batch),
        "mean_width": sum(widths) / len(widths),
        "frames_real_fraction": frames_real / frames_padded,
    }


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--epochs", type=int, default=3, help="epochs of batches to count (each a fresh order)")
    args = p.parse_args()
    started = time.time()

    ctx = common.context(args)
    recipe = ctx.recipe
    model, tokenizer, feature_extractor = load_omni(common.untrained_export(ctx))
    train = common.prepared(ctx, model, tokenizer, feature_extractor)[recipe.data.train_split]
    layout, k, batch = model.layout, recipe.frame_stack, recipe.batch_size

    grouped_loader = data_lib.train_loader(train, layout, k, batch, recipe.seed, num_workers=0)
    grouped = fractions(grouped_loader, args.epochs)
    fixed = fractions(data_lib.train_loader(train, layout, k, batch, recipe.seed, num_workers=0), args.epochs, FIXED)
    shuffled_loader = DataLoader(
        train,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(recipe.seed),
        collate_fn=data_lib.SpeechTextCollator(layout, k),
    )
    shuffled = fractions(shuffled_loader, args.epochs)

    ratio = grouped["real_fraction"] / fixed["real_fraction"]
    print(
        f"\npadding, recipe '{recipe.name}': {len(train)} training utterances, batch {batch}, "
        f"{grouped['batches']} batches ({args.epochs} epochs), frame_stack {k}"
    )
    print(
        common.table(
            ["batching", "real fraction", "worst batch", "p10 batch", "mean width", "encoder frames real"],
            [
                [
                    "length-grouped (train_loader)",
                    grouped["real_fraction"],
                    grouped["worst_batch"],
                    grouped["p10_batch"],
                    grouped["mean_width"],
                    grouped["frames_real_fraction"],
                ],
                [
                    f"fixed {FIXED} positions",
                    fixed["real_fraction"],
                    fixed["worst_batch"],
                    fixed["p10_batch"],
                    float(FIXED),
                    "-",
                ],
                [
                    "shuffled, no grouping",
                    shuffled["real_fraction"],
                    shuffled["worst_batch"],
                    shuffled["p10_batch"],
                    shuffled["mean_width"],
                    shuffled["frames_real_fraction"],
                ],
            ],
        )
    )
    print(
        f"real fraction with grouping: {grouped['real_fraction']:.3f} (target >= {TARGET}: "
        f"{'met' if grouped['real_fraction'] >= TARGET else 'MISSED'}); {ratio:.1f}x the fixed-{FIXED} layout's"
    )
    common.emit(
        "padding",
        {
            "recipe": recipe.name,
            "utterances": len(train),
            "batch_size": batch,
            "epochs": args.epochs,
            "grouped": grouped,
            "fixed_2048": fixed,
            "shuffled": shuffled,
            "ratio_grouped_vs_fixed": ratio,
            "target": TARGET,
            "met": grouped["real_fraction"] >= TARGET,
        },
        args,
        started,
    )


if __name__ == "__main__":
    main()
