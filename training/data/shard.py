"""Shards: any source `--dataset` reads, rewritten as self-contained Arrow files of a set size.

    python -m training.data.shard --dataset /data/my_speech --to /data/my_speech.shards [--num-proc 8]

Each chosen split (train, held-out, dev: recognized or carved exactly as a run would choose them)
becomes `<to>/<role>/shard-00000.arrow`, ... with the audio file's bytes embedded (a segment of a
longer recording is cut and stored as FLAC), the transcript, and the clip's length in seconds.
Arrow files are memory-mapped when read (`datasets.Dataset.from_file`): a run's memory does not
grow with the data, and nothing is copied into a cache. `manifest.json` lists every shard with its
rows and seconds, the totals per split, and what they were made from (below); `--dataset <to>`
then reads the shards as a dataset.

Shards are written to a temporary name and renamed, so a rerun skips finished shards (resumable).
`--task I/N` writes every N-th shard from the I-th: a SLURM array (scripts/slurm/shard.sbatch)
shards a large corpus across nodes; the task that finds every shard done writes the manifest.

Before any shard, `shard-plan.json` records what the shards are of: each split's source name, rows
and fingerprint (it follows the audio files: training/data/formats.py), the columns, --seed and
--rows-per-shard. The first task creates it (atomically: it is there whole or not at all); every
other task, and every rerun, must find the same plan, or stops naming what changed: finished
shards of another source or size are never reused, and nothing is deleted for the user. Each
shard's sidecar names its plan too. `--to` must be new, empty or such a shard folder, and never
the source or inside it.
"""

from __future__ import annotations

import argparse
import hashlib
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
from training.stages import DATA_FORMATS  # noqa: E402

MANIFEST = "manifest.json"
PLAN = "shard-plan.json"
FORMAT = "omni-stage shards"
PLAN_FORMAT = "omni-stage shard plan"
# The plan's fields that decide what the shards hold; a rerun or another task must match them.
PLANNED = ("rows_per_shard", "seed", "columns", "splits")
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
    plan_id: str  # the plan it belongs to (plan_id()), kept in its sidecar

    @property
    def done(self) -> bool:
        """Written for this plan: the shard and then its sidecar (renamed into place, so never half
        there), the sidecar naming this plan."""
        sidecar = self.target.with_suffix(".json")
        if not (self.target.is_file() and sidecar.is_file()):
            return False
        try:
            return json.loads(sidecar.read_text()).get("plan") == self.plan_id
        except (OSError, ValueError, AttributeError):  # unreadable: written again
            return False


def shard_path(to: Path, role: str, index: int) -> Path:
    return to / role / f"shard-{index:05d}.arrow"


def plan(splits: dict[str, datasets.Dataset], to: Path, rows_per_shard: int, plan_id: str) -> list[ShardJob]:
    jobs = []
    for role, ds in splits.items():
        for index in range(math.ceil(len(ds) / rows_per_shard)):
            start = index * rows_per_shard
            stop = min(len(ds), start + rows_per_shard)
            jobs.append(ShardJob(role, index, start, stop, shard_path(to, role, index), plan_id))
    return jobs


def is_shard_folder(folder: Path) -> bool:
    """A finished shard folder: its manifest.json is this converter's (a NeMo manifest may share the name)."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def shard_plan(
    dataset: str, splits: dict[str, tuple[str, datasets.Dataset]], rows_per_shard: int, seed: int, columns
) -> dict[str, Any]:
    """What the shards will hold: per role, the source split's name, rows and fingerprint (the
    dataset's name is kept for people, not compared: the fingerprints say what the data is)."""
    return {
        "format": PLAN_FORMAT,
        "version": 1,
        "dataset": dataset,
        "rows_per_shard": rows_per_shard,
        "seed": seed,
        "columns": {"audio": columns[0], "text": columns[1]},
        "splits": {
            role: {"split": name, "rows": len(ds), "fingerprint": ds._fingerprint}
            for role, (name, ds) in splits.items()
        },
    }


def plan_id(shard_plan: dict[str, Any]) -> str:
    planned = {k: shard_plan[k] for k in PLANNED}
    return hashlib.sha256(json.dumps(planned, sort_keys=True).encode()).hexdigest()[:16]


def check_destination(dataset: str, to: Path) -> None:
    """--to is never the source, nor inside it (the converter would write into the user's folder,
    and its manifest.json replace theirs)."""
    source = Path(dataset).expanduser()
    if not source.exists():
        return  # a hub id
    source, target = source.resolve(), to.expanduser().resolve()
    if target == source:
        raise DataError(f"--to {to} is the dataset itself; shards go to a folder of their own")
    if source in target.parents:
        raise DataError(f"--to {to} is inside the dataset {dataset}; shards go to a folder outside it")


def claim(to: Path, wanted: dict[str, Any]) -> bool:
    """Make `to` the folder of the plan `wanted`, or find it already is (True: a plan was there).
    DataError if it is a file, a non-empty folder that is not a shard folder, or another plan's.
    Safe against other tasks doing the same at once: the plan file is created whole (a link of a
    written file, which fails if one is there), and the folder is listed before the plan is read,
    so a task that sees another's shards also sees the plan that came first."""
    if to.exists() and not to.is_dir():
        raise DataError(f"--to {to} is a file; shards go to a folder")
    listed = [p.name for p in to.iterdir() if not p.name.startswith(f".{PLAN}.")] if to.is_dir() else []
    existing = _read_plan(to)
    if existing is None:
        if listed:
            if is_shard_folder(to):
                raise DataError(
                    f"--to {to} holds shards written without a record of their source and settings ({PLAN}); "
                    "remove the folder, or choose another --to, to write them again"
                )
            shown = ", ".join(sorted(listed)[:5]) + (", ..." if len(listed) > 5 else "")
            raise DataError(f"--to {to} is not empty ({shown}) and is not a shard folder; shards go to a new folder")
        existing = _create_plan(to, wanted)
        if existing is None:
            return False
    changes = [
        f"{key}: {existing.get(key)!r} there, {wanted[key]!r} now"
        for key in PLANNED
        if key != "splits" and existing.get(key) != wanted[key]
    ]
    before, now = existing.get("splits", {}), wanted["splits"]
    for role in sorted(set(before) | set(now)):
        if before.get(role) != now.get(role):
            changes.append(f"split {role}: {_split_line(before.get(role))} there, {_split_line(now.get(role))} now")
    if changes:
        raise DataError(
            f"--to {to} holds shards of another source or settings ({'; '.join(changes)}); remove the folder, "
            "or choose another --to, to write them again"
        )
    return True


def _split_line(split: dict[str, Any] | None) -> str:
    if split is None:
        return "none"
    return f"'{split['split']}' {split['rows']:,} rows, fingerprint {split['fingerprint']}"


def _read_plan(to: Path) -> dict[str, Any] | None:
    path = to / PLAN
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({err}); remove the folder, or choose another --to") from err
    if not isinstance(found, dict) or found.get("format") != PLAN_FORMAT:
        raise DataError(f"{path}: not a shard plan; remove the folder, or choose another --to")
    return found


def _create_plan(to: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """Write the plan unless another task's came first (None: ours is it; else theirs)."""
    to.mkdir(parents=True, exist_ok=True)
    tmp = to / f".{PLAN}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(wanted, indent=2))
    try:
        os.link(tmp, to / PLAN)  # fails if a plan is there: the first task's plan stands
    except FileExistsError:
        return _read_plan(to)
    except OSError:  # no hard links here: renamed instead (then the last task's plan stands, and
        os.replace(tmp, to / PLAN)  # a task whose plan it is not writes shards no manifest counts)
        return _read_plan(to)
    finally:
        tmp.unlink(missing_ok=True)
    return None


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
    entry = {
        "file": f"{job.role}/{job.target.name}",
        "rows": job.stop - job.start,
        "seconds": round(seconds, 3),
        "plan": job.plan_id,
    }
    write_json_atomic(job.target.with_suffix(".json"), entry)
    return entry


def write_manifest(to: Path, jobs: list[ShardJob], shard_plan: dict[str, Any]) -> dict[str, Any] | None:
    """manifest.json once every shard exists (None while some are missing), with the plan's record
    of the source: the dataset, and per split its source split, rows and fingerprint."""
    if not all(j.done for j in jobs):
        return None
    splits: dict[str, Any] = {}
    for job in jobs:
        entry = json.loads(job.target.with_suffix(".json").read_text())
        source = shard_plan["splits"][job.role]
        split = splits.setdefault(
            job.role,
            {
                "shards": [],
                "rows": 0,
                "hours": 0.0,
                "source_split": source["split"],
                "fingerprint": source["fingerprint"],
            },
        )
        split["shards"].append(entry)
        split["rows"] += entry["rows"]
        split["hours"] += entry["seconds"] / 3600
    for split in splits.values():
        split["hours"] = round(split["hours"], 4)
    manifest = {
        "format": FORMAT,
        "version": 2,
        "source": shard_plan["dataset"],
        "rows_per_shard": shard_plan["rows_per_shard"],
        "columns": shard_plan["columns"],
        "plan": plan_id(shard_plan),
        "splits": splits,
    }
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
    dataset: str,
    to: Path,
    rows_per_shard: int,
    num_proc: int,
    task: tuple[int, int],
    seed: int,
    log=print,
    fmt: str = "auto",
) -> dict[str, Any] | None:
    from training.data.sources import asr_audio_columns, asr_splits, load_source
    from training.stages import DataSpec

    global _COLUMNS
    check_destination(dataset, to)
    spec = DataSpec()
    chosen = asr_splits(load_source(dataset, asr_audio_columns(spec), fmt), spec, seed)
    for note in chosen.notes:
        log(note)
    spec = chosen.spec
    roles = {"train": spec.train_split, "heldout": spec.heldout_split, "dev": spec.dev_split}
    _SPLITS.clear()
    _SPLITS.update({role: chosen.splits[name] for role, name in roles.items() if name is not None})
    _COLUMNS = (spec.audio_column, spec.text_column)
    wanted = shard_plan(dataset, {r: (roles[r], ds) for r, ds in _SPLITS.items()}, rows_per_shard, seed, _COLUMNS)
    resumed = claim(to, wanted)
    jobs = plan(_SPLITS, to, rows_per_shard, plan_id(wanted))
    mine = [j for k, j in enumerate(jobs) if k % task[1] == task[0]]
    todo = [j for j in mine if not j.done]
    log(
        f"{len(jobs)} shards of up to {rows_per_shard:,} rows in {to} ({'the same plan found' if resumed else 'new'}); "
        f"this task: {len(mine)}, {len(mine) - len(todo)} already written"
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
    manifest = write_manifest(to, jobs, wanted)
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
    parser.add_argument(
        "--format", default="auto", choices=DATA_FORMATS, help="how the dataset folder is read (default: recognized)"
    )
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
        convert(args.dataset, args.to, args.rows_per_shard, args.num_proc, (i, n), args.seed, fmt=args.format)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
