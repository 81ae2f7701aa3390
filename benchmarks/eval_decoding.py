"""Evaluation: batched greedy decoding vs one utterance at a time, same model and utterances.

    python benchmarks/eval_decoding.py --quick [--model EXPORT] [--rounds 3]

Both sides are the real evaluation path: transcribe() (inference.generate with a KV cache,
left-padded prompts, the recipe's max_new_tokens, stop at eot or the LLM's end-of-text) over an
eval_loader prepared by Accelerate, as StageRun does. BATCHED uses the recipe's eval_batch_size,
ONE-AT-A-TIME a batch size of 1. The utterances are the held-out and dev splits.

The model is a stage export (--model, e.g. runs/demo/final/final after the demo) or, by
default, the untrained pipeline (stand-ins + a fresh adapter), which rarely stops before
max_new_tokens. The number of decoding steps matters: a batch runs until its LAST row stops, one
utterance until its own end, so the generated-token counts are printed too.

On a shared 2-core machine another process can slow torch's 2 threads 10-30x for seconds at a
time, so the sides alternate per batch: each batch of eval_batch_size utterances is decoded once
batched and once one at a time (order flipped every batch), both by transcribe() on the batches
that eval_loader collated (collation is outside the timing on both sides). The figure is the
median over batches of (one-at-a-time seconds / batched seconds), over --rounds passes; the
transcripts of the two sides are compared one by one.
"""

from __future__ import annotations

import time
from pathlib import Path

import common
from datasets import concatenate_datasets

from training.data import batching as data_lib
from training.evaluation.scores import transcribe
from training.model import load_omni


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--model", type=Path, help="a stage export to decode with (default: the untrained pipeline)")
    p.add_argument("--rounds", type=int, default=3, help="passes over the utterances")
    p.add_argument("--limit", type=int, help="decode at most this many utterances")
    args = p.parse_args()
    started = time.time()

    ctx = common.context(args)
    recipe, acc = ctx.recipe, ctx.accelerator
    source = args.model or common.untrained_export(ctx)
    model, tokenizer, feature_extractor = load_omni(source)
    splits = common.prepared(ctx, model, tokenizer, feature_extractor)
    names = [recipe.data.heldout_split] + ([recipe.data.dev_split] if recipe.data.dev_split else [])
    utterances = concatenate_datasets([splits[n] for n in names])
    if args.limit:
        utterances = utterances.select(range(min(args.limit, len(utterances))))
    model = acc.prepare(model)
    model.eval()
    layout, k = model.layout, recipe.frame_stack
    batches = list(acc.prepare(data_lib.eval_loader(utterances, layout, k, recipe.eval_batch_size)))
    singles = list(acc.prepare(data_lib.eval_loader(utterances, layout, k, 1)))
    groups = [singles[i : i + recipe.eval_batch_size] for i in range(0, len(singles), recipe.eval_batch_size)]

    def decode(loader) -> tuple[float, list[str]]:
        start = time.perf_counter()
        predictions, _ = transcribe(acc, model, loader, tokenizer, recipe.max_new_tokens)
        return time.perf_counter() - start, predictions

    decode(batches[:1])  # warm-up
    decode(groups[0][:4])
    seconds = {"batched": [], "one at a time": []}
    ratios = []
    for r in range(args.rounds):
        batched, single = [], []
        for i, (whole, ones) in enumerate(zip(batches, groups)):
            if (r + i) % 2 == 0:
                (tb, pb), (ts, ps) = decode([whole]), decode(ones)
            else:
                (ts, ps), (tb, pb) = decode(ones), decode([whole])
            batched += pb
            single += ps
            ratios.append(ts / tb)
            seconds["batched"].append(tb)
            seconds["one at a time"].append(ts)
    differing = [i for i, (a, b) in enumerate(zip(batched, single)) if a != b]
    words = [len(t.split()) for t in single]
    speedup = common.median(ratios)
    n = len(utterances)
    print(
        f"\nevaluation decoding, recipe '{recipe.name}', model {source}, {n} utterances ({'+'.join(names)}), "
        f"max_new_tokens {recipe.max_new_tokens}, {len(batches)} batches x {args.rounds} rounds, alternating per batch"
    )
    print(
        common.table(
            ["decoding", "batch", "median s per batch of utterances", "total s"],
            [
                [name, recipe.eval_batch_size if name == "batched" else 1, common.median(v), sum(v)]
                for name, v in seconds.items()
            ],
        )
    )
    print(
        f"transcripts: mean {sum(words) / n:.1f} words, {words.count(0)} of {n} empty (a batch decodes until its "
        f"longest row stops, at most {recipe.max_new_tokens} tokens)"
    )
    print(
        f"speed-up batched vs one at a time: {speedup:.2f}x (median over batches; totals "
        f"{sum(seconds['one at a time']) / sum(seconds['batched']):.2f}x); "
        f"identical transcripts: {n - len(differing)}/{n}"
    )
    for i in differing[:3]:
        print(f"  differs at {i}: batched {batched[i]!r} / single {single[i]!r}")
    common.emit(
        "eval_decoding",
        {
            "recipe": recipe.name,
            "model": str(source),
            "utterances": n,
            "eval_batch_size": recipe.eval_batch_size,
            "max_new_tokens": recipe.max_new_tokens,
            "seconds": seconds,
            "pair_ratios": ratios,
            "speedup": speedup,
            "speedup_totals": sum(seconds["one at a time"]) / sum(seconds["batched"]),
            "identical": n - len(differing),
            "mean_words": sum(words) / n,
            "empty": words.count(0),
        },
        args,
        started,
    )


if __name__ == "__main__":
    main()
