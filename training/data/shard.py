"""Shards: any source `--dataset` reads, rewritten as self-contained Arrow files of a set size.

    python -m training.data.shard --dataset /data/my_speech --to /data/my_speech.shards [--num-proc 8]

Each chosen split (train, held-out, dev: recognized or carved exactly as a run would choose them)
becomes `<to>/<role>/shard-00000.arrow`, ... with the audio file's bytes embedded (a segment of a
longer recording is cut and stored as FLAC), the transcript, and the clip's length in seconds.
Arrow files are memory-mapped when read (`datasets.Dataset.from_file`): a run's memory does not
grow with the data, and nothing is copied into a cache. `manifest.json` lists every shard with its
rows and seconds, and the totals per split; `--dataset <to>` then reads the shards as a dataset.

Shards are written to a temporary name and renamed, so a rerun skips finished shards (resumable).
`--task I/N` writes every N-th shard from the I-th: a SLURM array (scripts/slurm/shard.sbatch)
shards a large corpus across nodes; the task that finds every shard done writes the manifest.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python training/data/shard.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import datasets  # noqa: E402
import soundfile as sf  # noqa: E402
from datasets.arrow_writer import ArrowWriter  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from training.common import write_json_atomic  # noqa: E402
from training.data.checks import AUDIO_STRUCT, DataError  # noqa: E402
from training.speech.audio import decode_audio  # noqa: E402

MANIFEST = "manifest.json"
FORMAT = "omni-stage shards"
FEATURES = datasets.Features(
    {
        "audio": AUDIO_STRUCT,
        "text": datasets.Value("string"),
        "seconds": datasets.Value("float32"),
    }
)


@dataclass(frozen=True)
class ShardJob:
    role: str  # train / heldout / dev
    index: int
    start: int
    stop: int
    target: Path

    @property
    def done(self) -> bool:
        """Written: the shard and then its sidecar (renamed into place, so never half there)."""
        return self.target.is_file() and self.target.with_suffix(".json").is_file()


def shard_path(to: Path, role: str, index: int) -> Path:
    return to / role / f"shard-{index:05d}.arrow"


def plan(splits: dict[str, datasets.Dataset], to: Path, rows_per_shard: int) -> list[ShardJob]:
    jobs = []
    for role, ds in splits.items():
        for index in range(math.ceil(len(ds) / rows_per_shard)):
            start = index * rows_per_shard
            stop = min(len(ds), start + rows_per_shard)
            jobs.append(ShardJob(role, index, start, stop, shard_path(to, role, index)))
    return jobs


def embedded(audio: dict[str, Any], where: str) -> tuple[dict[str, Any], float]:
    """The audio value with its bytes inside and its length in seconds: a file's own bytes as they
    are, a segment (offset/duration) cut and stored as FLAC."""
    if audio.get("offset") is None:
        if audio.get("bytes") is not None:
            try:
                info = sf.info(io.BytesIO(audio["bytes"]))
            except Exception as err:  # noqa: BLE001
                raise DataError(f"{where}: cannot read audio ({err})") from err
            return {"bytes": audio["bytes"], "path": audio.get("path")}, info.frames / info.samplerate
        path = audio.get("path") or ""
        try:
            info = sf.info(path)
            data = Path(path).read_bytes()
        except Exception as err:  # noqa: BLE001 - any unreadable file: one message naming it
            raise DataError(f"{where}: cannot read audio file {path!r} ({err})") from err
        return {"bytes": data, "path": os.path.basename(path)}, info.frames / info.samplerate
    samples, rate = decode_audio(audio, where)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="FLAC")
    name = os.path.splitext(os.path.basename(audio.get("path") or "segment"))[0]
    return {"bytes": buffer.getvalue(), "path": f"{name}-{audio['offset']:.3f}.flac"}, len(samples) / rate


_SPLITS: dict[str, datasets.Dataset] = {}  # set before forking: workers inherit the splits
_COLUMNS: tuple[str, str] = ("audio", "text")


def write_shard(job: ShardJob) -> dict[str, Any]:
    """Write one shard (temp name, then rename); return its manifest entry."""
    if job.done:
        return json.loads(job.target.with_suffix(".json").read_text())
    audio_column, text_column = _COLUMNS
    rows = _SPLITS[job.role].select(range(job.start, job.stop))
    job.target.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.target.with_name(f".{job.target.name}.{os.getpid()}.tmp")
    seconds = 0.0
    with ArrowWriter(features=FEATURES, path=str(tmp), writer_batch_size=100) as writer:
        for i, row in enumerate(rows):
            where = f"split '{job.role}', row {job.start + i}, column '{audio_column}'"
            audio, length = embedded(row[audio_column], where)
            writer.write({"audio": audio, "text": row[text_column], "seconds": length})
            seconds += length
        writer.finalize()
    os.replace(tmp, job.target)
    entry = {"file": f"{job.role}/{job.target.name}", "rows": job.stop - job.start, "seconds": round(seconds, 3)}
    write_json_atomic(job.target.with_suffix(".json"), entry)
    return entry


def write_manifest(to: Path, jobs: list[ShardJob], source: str) -> dict[str, Any] | None:
    """manifest.json once every shard exists (None while some are missing)."""
    if not all(j.done for j in jobs):
        return None
    splits: dict[str, Any] = {}
    for job in jobs:
        entry = json.loads(job.target.with_suffix(".json").read_text())
        split = splits.setdefault(job.role, {"shards": [], "rows": 0, "hours": 0.0})
        split["shards"].append(entry)
        split["rows"] += entry["rows"]
        split["hours"] += entry["seconds"] / 3600
    for split in splits.values():
        split["hours"] = round(split["hours"], 4)
    manifest = {"format": FORMAT, "version": 1, "source": source, "splits": splits}
    write_json_atomic(to / MANIFEST, manifest)
    return manifest


def read_shards(folder: Path) -> dict[str, datasets.Dataset]:
    """A shard folder's splits, memory-mapped (nothing copied, memory flat in the data's size)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    out = {}
    for role, split in manifest["splits"].items():
        parts = []
        for entry in split["shards"]:
            path = folder / entry["file"]
            if not path.is_file():
                raise DataError(f"shards {folder}: {entry['file']} is listed in {MANIFEST} but missing")
            parts.append(datasets.Dataset.from_file(str(path)))
        out[role] = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return out


def convert(
    dataset: str, to: Path, rows_per_shard: int, num_proc: int, task: tuple[int, int], seed: int, log=print
) -> dict[str, Any] | None:
    from training.data.sources import asr_audio_columns, asr_splits, load_source
    from training.stages import DataSpec

    global _COLUMNS
    spec = DataSpec()
    chosen = asr_splits(load_source(dataset, asr_audio_columns(spec)), spec, seed)
    for note in chosen.notes:
        log(note)
    spec = chosen.spec
    roles = {"train": spec.train_split, "heldout": spec.heldout_split, "dev": spec.dev_split}
    _SPLITS.clear()
    _SPLITS.update({role: chosen.splits[name] for role, name in roles.items() if name is not None})
    _COLUMNS = (spec.audio_column, spec.text_column)
    jobs = plan(_SPLITS, to, rows_per_shard)
    mine = [j for k, j in enumerate(jobs) if k % task[1] == task[0]]
    todo = [j for j in mine if not j.done]
    log(
        f"{len(jobs)} shards of up to {rows_per_shard:,} rows in {to}; this task: {len(mine)}, "
        f"{len(mine) - len(todo)} already written"
    )
    bar = tqdm(total=sum(j.stop - j.start for j in todo), desc="sharding", unit="rows")
    if num_proc > 1 and len(todo) > 1:
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            for entry in pool.imap_unordered(write_shard, todo):
                bar.update(entry["rows"])
    else:
        for job in todo:
            bar.update(write_shard(job)["rows"])
    bar.close()
    manifest = write_manifest(to, jobs, dataset)
    if manifest is None:
        log("shards of other tasks are still missing; the last task to finish writes the manifest")
    else:
        totals = ", ".join(f"{r} {s['rows']:,} rows / {s['hours']:.2f} h" for r, s in manifest["splits"].items())
        log(f"manifest: {to / MANIFEST}: {totals}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="any source --dataset accepts")
    parser.add_argument("--to", type=Path, required=True, help="folder for the shards and manifest.json")
    parser.add_argument("--rows-per-shard", type=int, default=2_000, help="rows per shard (default 2,000)")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="shards written in parallel")
    parser.add_argument("--task", default="0/1", help="I/N: write every N-th shard from the I-th (SLURM arrays)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of carved held-out/dev slices (the recipe's)")
    args = parser.parse_args(argv)
    try:
        i, n = (int(v) for v in args.task.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        parser.error(f"--task {args.task}: expected I/N with 0 <= I < N")
    if args.rows_per_shard < 1:
        parser.error("--rows-per-shard must be >= 1")
    try:
        convert(args.dataset, args.to, args.rows_per_shard, args.num_proc, (i, n), args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
