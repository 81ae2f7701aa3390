"""Loop overhead: the stage loop (StageRun.train) vs a bare PyTorch loop, same model/data/batches.

    python benchmarks/loop_overhead.py --quick [--stage final] [--steps 120] [--profile DIR]

OURS is the real code path, unmodified: StageRun.setup() (Accelerate prepare, fused AdamW over the
stage's parameter groups), then ONE StageRun.train() call: LR set per step, the accumulate()
context, global_token_loss, accelerator.backward, gradient clipping (the recipe's max_grad_norm),
the loss all-reduce, metrics.jsonl appended every step, a log line every log_every steps, epoch
boundaries (a fresh data iterator each epoch). Scheduled evaluation and checkpoints are pushed past
the timed steps: they are work, not per-step overhead (evaluation has its own benchmark).

BARE is what one writes by hand, on the SAME model object and the SAME (unwrapped) optimizer:
`for batch in loader: model(**batch)["loss"].backward(); opt.step(); opt.zero_grad()`, with a
plain DataLoader built by the same train_loader() (same sampler, collator, num_workers) and a
fresh iterator per epoch.

The two alternate step by step, so a busy (shared) machine slows both alike: one bare step runs
each time train() enters StageRun.accumulate_step (wrapped on the instance, calling the original),
and OUR step is the time from the end of that bare step to the next entry, i.e. everything the
loop does for one optimizer step. Both sides start at epoch 0 and see identical batches in the
same order. The first --warmup pairs are dropped. Figures: median s/step per side and their
ratio; the ratio of the totals (mean s/step, which includes the epoch-boundary and log-line steps)
is printed next to it.

--profile DIR: after the timed run, one more train() call and the same number of bare steps, each
under torch.profiler (record_function labels mark the loop's phases); tables go into DIR.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

import common
import torch

from training.data import batching as data_lib
from training.engine.stage import StageRun
from training.model import model_inputs

TARGET = 1.03


class BareLoop:
    """A hand-written training loop over its own DataLoader, one step per call."""

    def __init__(self, model, optimizer, loader) -> None:
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.epoch, self.batches = 0, None

    def step(self) -> None:
        batch = next(self.batches, None) if self.batches is not None else None
        if batch is None:  # a new epoch: same order as the stage loop's
            self.epoch += self.batches is not None
            self.loader.sampler.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            batch = next(self.batches)
        out = self.model(**model_inputs(batch))
        out["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


class Interleaved:
    """Stands in for run.accumulate_step: runs one bare step, then the loop's own accumulate_step,
    and records the time of each side's step."""

    def __init__(self, run: StageRun, bare: BareLoop) -> None:
        self.original = run.accumulate_step  # bound method of the instance: the real code
        self.bare = bare
        self.ours: list[float] = []
        self.bare_times: list[float] = []
        self.mark: float | None = None

    def __call__(self):
        now = time.perf_counter()
        if self.mark is not None:
            self.ours.append(now - self.mark)  # our previous step, from its accumulate to here
        self.bare.step()
        self.mark = time.perf_counter()
        self.bare_times.append(self.mark - now)
        return self.original()


def set_stop(run: StageRun, steps: int) -> None:
    common.replace_spec(run, max_steps=run.state["step"] + steps)


def profile_both(run: StageRun, bare: BareLoop, steps: int, folder: Path) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    folder.mkdir(parents=True, exist_ok=True)
    del run.accumulate_step  # the class's own method again
    set_stop(run, steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof, contextlib.redirect_stdout(io.StringIO()):
        with record_function("ours: StageRun.train"):
            run.train()
    (folder / "ours.txt").write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=60))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("bare: loop"):
            for _ in range(steps):
                bare.step()
    run.batches = bare.batches = None
    (folder / "bare.txt").write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=60))


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument(
        "--stage",
        default="final",
        choices=["asr", "second", "final"],
        help="stage whose trainable set is used (default final: adapter + LLM)",
    )
    p.add_argument("--steps", type=int, default=100, help="timed steps per side (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="pairs of steps dropped at the start")
    p.add_argument("--profile", type=Path, help="also profile each side (torch.profiler) into this folder")
    args = p.parse_args()
    started = time.time()

    never = 10**9
    out_dir = Path(tempfile.mkdtemp(prefix="omni-bench-loop-"))
    ctx = common.context(args, {"save_every": never, "stages": {args.stage: {"eval_every": never}}}, out_dir)
    ctx.init_from = common.untrained_export(ctx)
    run = StageRun(ctx, args.stage)
    run.setup()
    recipe = ctx.recipe

    model = ctx.accelerator.unwrap_model(run.model)
    optimizer = run.optimizer.optimizer  # the torch AdamW inside Accelerate's wrapper
    train = run.train_dl.dataset
    loader = data_lib.train_loader(
        train, model.layout, recipe.frame_stack, recipe.batch_size, recipe.seed, recipe.num_workers
    )
    # Same batches on both sides: the prepared loader and the plain one draw the same order.
    run.train_dl.set_epoch(3)
    loader.sampler.set_epoch(3)
    first_ours, first_bare = next(iter(run.train_dl)), next(iter(loader))
    same = first_ours["texts"] == first_bare["texts"] and torch.equal(first_ours["input_ids"], first_bare["input_ids"])

    bare = BareLoop(model, optimizer, loader)
    timer = Interleaved(run, bare)
    run.accumulate_step = timer
    # Gradient clipping is computation the recipe asks for (a norm over every trainable gradient),
    # not bookkeeping: time it separately (a wrapper on the accelerator instance) to split it out.
    clip_times: list[float] = []
    norms: list[float] = []
    real_clip = ctx.accelerator.clip_grad_norm_

    def timed_clip(*a, **k):
        start = time.perf_counter()
        norm = real_clip(*a, **k)
        clip_times.append(time.perf_counter() - start)
        norms.append(float(norm))
        return norm

    ctx.accelerator.clip_grad_norm_ = timed_clip
    set_stop(run, args.warmup + args.steps + 1)  # +1: our last step has no following entry to close it
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's log lines (still written), off the table
        run.train()
    del ctx.accelerator.clip_grad_norm_
    run.batches = bare.batches = None  # close both data iterators (a live one blocks the exit)
    ours = timer.ours[args.warmup :]
    bare_times = timer.bare_times[args.warmup : len(timer.ours)]
    clips = clip_times[args.warmup : len(timer.ours)]  # clip i happens inside our step i
    ours_no_clip = [o - c for o, c in zip(ours, clips)] if clips else ours

    if args.profile:
        profile_both(run, bare, min(args.steps, 30), args.profile)

    ratio = common.median(ours) / common.median(bare_times)
    total_ratio = sum(ours) / sum(bare_times)
    pair_ratio = common.median([o / b for o, b in zip(ours, bare_times)])
    no_clip_ratio = common.median(ours_no_clip) / common.median(bare_times)
    per_epoch = len(train) // recipe.batch_size
    # Steps that start an epoch (fresh iterator: a worker process starts) vs the rest, per side.
    first = [i for i in range(len(ours)) if (i + args.warmup) % per_epoch == 0]
    rest = [i for i in range(len(ours)) if (i + args.warmup) % per_epoch != 0]
    clipped = sum(n > recipe.max_grad_norm for n in norms[args.warmup : len(timer.ours)])
    print(
        f"\nloop overhead, stage '{args.stage}' (trains {'+'.join(run.spec.trainable)}), recipe '{recipe.name}', "
        f"batch {recipe.batch_size}, num_workers {recipe.num_workers}, {len(ours)} steps per side alternating "
        f"({per_epoch} batches per epoch), identical batches: {same}"
    )
    print(
        common.table(
            ["loop", "median s/step", "mean s/step", "p10", "p90"],
            [
                [name, common.median(t), sum(t) / len(t), common.quantile(t, 0.1), common.quantile(t, 0.9)]
                for name, t in (
                    ("stage loop (StageRun.train)", ours),
                    ("bare PyTorch loop", bare_times),
                    ("  of ours: gradient clipping", clips or [0.0]),
                    ("  ours minus clipping", ours_no_clip),
                )
            ],
        )
    )
    print(
        f"ratio ours/bare (median s/step): {ratio:.3f}; totals: {total_ratio:.3f}; median per-pair: {pair_ratio:.3f}; "
        f"target <= {TARGET}: {'met' if ratio <= TARGET else 'MISSED'}"
    )
    print(
        f"without the clipping (max_grad_norm {recipe.max_grad_norm}): {no_clip_ratio:.3f}; the norm exceeded "
        f"{recipe.max_grad_norm} (so clipping changed the gradients) in {clipped} of {len(clips)} steps"
    )
    if first:
        print(
            f"epoch-start steps ({len(first)}): ours mean {sum(ours[i] for i in first) / len(first):.3f} s, bare "
            f"{sum(bare_times[i] for i in first) / len(first):.3f} s; other steps: ours mean "
            f"{sum(ours[i] for i in rest) / len(rest):.3f} s, bare {sum(bare_times[i] for i in rest) / len(rest):.3f} s"
        )
    common.emit(
        "loop_overhead",
        {
            "stage": args.stage,
            "recipe": recipe.name,
            "batch_size": recipe.batch_size,
            "num_workers": recipe.num_workers,
            "steps": len(ours),
            "identical_batches": bool(same),
            "ours_median_s": common.median(ours),
            "bare_median_s": common.median(bare_times),
            "ours_mean_s": sum(ours) / len(ours),
            "bare_mean_s": sum(bare_times) / len(bare_times),
            "clip_median_s": common.median(clips) if clips else 0.0,
            "clipped_steps": clipped,
            "ratio_without_clipping": no_clip_ratio,
            "ratio": ratio,
            "ratio_totals": total_ratio,
            "ratio_pair_median": pair_ratio,
            "target": TARGET,
            "met": ratio <= TARGET,
        },
        args,
        started,
    )


if __name__ == "__main__":
    main()
