"""Data at volume: the same stage on a small and on a large shard folder, the encoder in the step.

The large set is the embedded corpus's training split repeated to `--large` rows (several GB of
audio on disk), the small one its first `--small` rows; both are written as shards with the
converter's own writer. Each side is a fresh `training/run.py --stage asr` process (encoder states
computed in the step, stand-in encoder and LLM from the cache) run for a few steps; we record its
peak resident memory (the process, sampled every 50 ms) and the time from its start to its first
optimizer step. Resident memory here is the process's own (anonymous) memory: pages of the
memory-mapped shards that reading rows brings in are file-backed page cache, which the kernel
drops under pressure (reading 1,000 rows spread over 50,000 maps ~1.3 GB of them, readahead
around each row); the figure with them is printed too. The loader's rate is the training split
read through the run's own loader (decode, resample, log-mel, collate) against what the measured
steps consume.

    python benchmarks/data_scale.py --quick [--large 50000] [--small 1000] [--steps 6]

Prints, last, exactly:
    peak RSS ratio (large / small): X.XX
    time to first step ratio (large / small): X.XX
    loader rows/s over step need (streaming): X.X
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

ROOT = common.ROOT


def write_shards(splits: dict[str, tuple[datasets.Dataset, int]], to: Path, rows_per_shard: int = 2_000) -> None:
    """Per split, n rows (its source cycled) as shards + manifest, with the converter's writer."""
    from datasets.arrow_writer import ArrowWriter

    from training.common import write_json_atomic
    from training.data.shard import FEATURES, FORMAT, MANIFEST
    from training.speech.audio import decode_audio

    manifest = {}
    for split, (rows, n) in splits.items():
        audio, text = rows["audio"], rows["text"]
        seconds = [len(w) / r for w, r in (decode_audio(a) for a in audio)]
        entries, total = [], 0.0
        (to / split).mkdir(parents=True, exist_ok=True)
        for index, start in enumerate(range(0, n, rows_per_shard)):
            stop = min(n, start + rows_per_shard)
            path = to / split / f"shard-{index:05d}.arrow"
            part = 0.0
            with ArrowWriter(features=FEATURES, path=str(path), writer_batch_size=200) as writer:
                for i in range(start, stop):
                    j = i % len(text)
                    writer.write({"audio": audio[j], "text": text[j], "seconds": seconds[j]})
                    part += seconds[j]
                writer.finalize()
            entries.append({"file": f"{split}/{path.name}", "rows": stop - start, "seconds": round(part, 3)})
            total += part
        manifest[split] = {"shards": entries, "rows": n, "hours": round(total / 3600, 4)}
    write_json_atomic(to / MANIFEST, {"format": FORMAT, "version": 1, "source": "benchmark", "splits": manifest})


def run_stage(shards: Path, args, cache: Path, encoder: str, llm: str, out: Path) -> dict:
    """One fresh training process: peak RSS, seconds to its first step, seconds per step."""
    recipe = out / "recipe.json"
    recipe.write_text(
        json.dumps(
            {
                "batch_size": args.batch_size,
                "num_workers": args.workers,
                "save_every": 10_000,
                "log_every": 1,
                "data": {"encoder_states": "step", "dev_split": "none"},
                "stages": {"asr": {"max_wer": None}},
            }
        )
    )
    cmd = [sys.executable, str(ROOT / "training" / "run.py"), "--stage", "asr", "--recipe", str(recipe)]
    cmd += ["--dataset", str(shards), "--encoder", encoder, "--llm", llm]
    cmd += ["--max-steps", str(args.steps), "--output-dir", str(out / "run"), "--cache-dir", str(cache)]
    cmd += ["--report-to", "none"]
    metrics = out / "run" / "asr" / "metrics.jsonl"
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak, peak_total, first = psutil.Process(proc.pid), 0, 0, None
    while proc.poll() is None:
        try:
            mem = ps.memory_info()
            peak, peak_total = max(peak, mem.rss - mem.shared), max(peak_total, mem.rss)
        except psutil.Error:
            pass
        if first is None and metrics.is_file() and metrics.read_text().strip():
            first = time.time() - start
        time.sleep(0.05)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"the stage failed ({proc.returncode}):\n{output[-3000:]}")
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    per_step = [s["tokens"] / s["tokens_per_s"] for s in steps[1:]]  # the first step warms up
    return {"peak_rss": peak, "peak_rss_total": peak_total, "first_step": first, "step_seconds": per_step}


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=1_000)
    p.add_argument("--large", type=int, default=50_000)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--work-dir", type=Path, help="where the shards go (default: a temporary folder)")
    args = p.parse_args()
    started = time.time()
    ctx = common.context(args, {"data": {"qa_dataset": "none"}})
    encoder, llm = ctx.pretrained
    corpus = ctx.splits[ctx.recipe.data.train_split]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="omni-data-scale-"))
    heldout = ctx.splits[ctx.recipe.data.heldout_split]
    sides = {}
    for name, n in (("small", args.small), ("large", args.large)):
        shards = work / f"shards-{n}"
        if not (shards / "manifest.json").is_file():
            t = time.time()
            write_shards({"train": (corpus, n), "heldout": (heldout, min(64, len(heldout)))}, shards)
            size = sum(f.stat().st_size for f in shards.rglob("*.arrow"))
            print(f"{name}: wrote {n:,} rows, {size / 1e9:.2f} GB of shards in {time.time() - t:.0f} s", flush=True)
        sides[name] = shards
    results = {}
    for name in ("small", "large", "small", "large"):  # alternated: a busy machine slows both alike
        out = Path(tempfile.mkdtemp(prefix=f"omni-data-scale-{name}-"))
        r = run_stage(sides[name], args, common.cache_dir(args), encoder, llm, out)
        results.setdefault(name, []).append(r)
        print(
            f"{name}: peak RSS {r['peak_rss'] / 2**20:,.0f} MiB, first step after {r['first_step']:.1f} s", flush=True
        )
    rss = {k: min(r["peak_rss"] for r in v) for k, v in results.items()}
    total = {k: min(r["peak_rss_total"] for r in v) for k, v in results.items()}
    first = {k: min(r["first_step"] for r in v) for k, v in results.items()}

    # the loader alone, on the large set: rows per second through decode, resample, log-mel, collate
    rate, need = loader_rate(ctx, sides["large"], args), None
    steps = [s for r in results["large"] for s in r["step_seconds"]]
    if steps:
        need = args.batch_size / common.median(steps)
    figures = {
        "rows": {"small": args.small, "large": args.large},
        "peak_rss_mib": {k: round(v / 2**20) for k, v in rss.items()},
        "peak_rss_with_mapped_files_mib": {k: round(v / 2**20) for k, v in total.items()},
        "first_step_seconds": {k: round(v, 2) for k, v in first.items()},
        "loader_rows_per_second": round(rate, 1),
        "step_need_rows_per_second": None if need is None else round(need, 1),
    }
    common.emit("data_scale", figures, args, started)
    print(f"peak RSS ratio (large / small): {rss['large'] / rss['small']:.2f}")
    print(f"time to first step ratio (large / small): {first['large'] / first['small']:.2f}")
    print(f"loader rows/s over step need (streaming): {rate / need:.1f}" if need else "loader rows/s: n/a")


def loader_rate(ctx, shards: Path, args) -> float:
    import torch

    from training.data.batching import train_loader
    from training.data.shard import read_shards
    from training.data.stream import EncodeInStep
    from training.model import load_omni

    export = common.untrained_export(ctx)
    model, tokenizer, fe = load_omni(export)
    split = read_shards(shards)["train"]
    rows = EncodeInStep(split, "benchmark", ctx.recipe.data, fe, tokenizer, model.n_mel_frames)
    loader = train_loader(rows, model.layout, model.config.frame_stack, args.batch_size, 0, args.workers)
    torch.set_num_threads(1)
    batches, start = 0, time.time()
    for batch in loader:
        batches += 1
        if batches == 2:
            start, counted = time.time(), 0
        elif batches > 2:
            counted += len(batch["texts"])
        if batches >= 22:
            break
    return counted / (time.time() - start)


if __name__ == "__main__":
    main()
