"""Data throughput: how fast the real train_loader delivers samples vs how fast a step eats them.

    python benchmarks/data_throughput.py --quick [--stage asr] [--rounds 3]

SUPPLY: the real train_loader (LengthGroupedSampler, SpeechTextCollator, the recipe's num_workers)
iterated alone for one epoch: samples / seconds, from iter() (worker start-up included) to the
last batch. For reference the same with num_workers=0 (collation on the training process).
DEMAND: the real StageRun.train() steps of a stage: batch_size / median s/step (each step's time
is the interval between two entries into StageRun.accumulate_step, everything included). The
default stage, asr (adapter + 64 special rows), has the cheapest step, so it eats samples fastest.

The two alternate for --rounds short rounds (one loader epoch, then --steps training steps), so
both sides of a round see the same load on a shared machine; the figure is the median over rounds
of each round's supply / demand (target >= 5x); the median rates are printed next to it.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

import common

from training.data import batching as data_lib
from training.engine.stage import StageRun

TARGET = 5.0


def loader_rate(loader, epoch: int) -> float:
    """Samples per second over one epoch of the loader alone."""
    loader.sampler.set_epoch(epoch)
    samples = 0
    start = time.perf_counter()
    for batch in loader:
        samples += batch["attention_mask"].shape[0]
    return samples / (time.perf_counter() - start)


class StepClock:
    """Wraps run.accumulate_step (calls the original): an entry time per optimizer step."""

    def __init__(self, run: StageRun) -> None:
        self.original, self.entries = run.accumulate_step, []

    def __call__(self):
        self.entries.append(time.perf_counter())
        return self.original()


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--stage", default="asr", choices=["asr", "second", "final"])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="training steps per round")
    args = p.parse_args()
    started = time.time()

    never = 10**9
    ctx = common.context(
        args,
        {"save_every": never, "stages": {args.stage: {"eval_every": never}}},
        Path(tempfile.mkdtemp(prefix="omni-bench-data-")),
    )
    ctx.init_from = common.untrained_export(ctx)
    run = StageRun(ctx, args.stage)
    run.setup()
    recipe = ctx.recipe
    train, layout = run.train_dl.dataset, ctx.accelerator.unwrap_model(run.model).layout
    loaders = {
        n: data_lib.train_loader(train, layout, recipe.frame_stack, recipe.batch_size, recipe.seed, n)
        for n in dict.fromkeys([recipe.num_workers, 0])
    }
    clock = StepClock(run)
    run.accumulate_step = clock

    def train_steps(n: int) -> list[float]:
        clock.entries = []
        common.replace_spec(run, max_steps=run.state["step"] + n + 1)  # n intervals need n + 1 entries
        with contextlib.redirect_stdout(io.StringIO()):
            run.train()
        run.batches = None  # close the data iterator outside the timed steps
        return [b - a for a, b in zip(clock.entries, clock.entries[1:])]

    train_steps(3)  # warm-up
    supply = {n: [] for n in loaders}
    steps: list[float] = []
    round_ratios: dict[int, list[float]] = {n: [] for n in loaders}
    for r in range(args.rounds):
        for n, loader in loaders.items():
            supply[n].append(loader_rate(loader, 100 + r))
        round_steps = train_steps(args.steps)
        steps += round_steps
        for n in loaders:
            round_ratios[n].append(supply[n][-1] * common.median(round_steps) / recipe.batch_size)

    del run.accumulate_step
    step_s = common.median(steps)
    demand = recipe.batch_size / step_s
    rates = {n: common.median(v) for n, v in supply.items()}
    ratios = {n: common.median(v) for n, v in round_ratios.items()}
    ratio = ratios[recipe.num_workers]
    print(
        f"\ndata throughput, recipe '{recipe.name}', batch {recipe.batch_size}, stage '{args.stage}' "
        f"(trains {'+'.join(run.spec.trainable)}), {args.rounds} rounds"
    )
    rows = [
        [f"train_loader, num_workers={n}{' (recipe)' if n == recipe.num_workers else ''}", rate, ratios[n]]
        for n, rate in rates.items()
    ]
    rows.append([f"training step ({step_s:.3f} s/step, median)", demand, 1.0])
    print(common.table(["side", "median samples/s", "x step (median of rounds)"], rows))
    print(f"supply / demand: {ratio:.1f}x (target >= {TARGET:g}x: {'met' if ratio >= TARGET else 'MISSED'})")
    common.emit(
        "data_throughput",
        {
            "recipe": recipe.name,
            "stage": args.stage,
            "batch_size": recipe.batch_size,
            "num_workers": recipe.num_workers,
            "loader_samples_per_s": {str(n): v for n, v in supply.items()},
            "step_s": steps,
            "loader_median": {str(n): v for n, v in rates.items()},
            "step_median_s": step_s,
            "step_samples_per_s": demand,
            "round_ratios": {str(n): v for n, v in round_ratios.items()},
            "ratio": ratio,
            "target": TARGET,
            "met": ratio >= TARGET,
        },
        args,
        started,
    )


if __name__ == "__main__":
    main()
