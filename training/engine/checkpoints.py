"""Checkpoints that survive crashes: atomic folders, a `latest` pointer, pruning that never touches
a stage-final export; and what a resumed stage must share with the run that wrote its checkpoint.

Layout of a run directory:

    run_record.json                  per-stage results (steps, losses, WER, time)
    <stage>/checkpoints/step-000050/ accelerator.save_state + trainer_state.json
    <stage>/checkpoints/step-000050/universal/  ZeRO state unpartitioned, made when resumed on
                                     another number of processes (engine/elastic.py)
    <stage>/checkpoints/latest       name of the newest complete checkpoint
    <stage>/checkpoints/damaged-step-000050/   one whose files failed their check, set aside
    <stage>/checkpoints/abandoned-step-000080/ newer than the one a rollback (--resume PATH) went
                                     back to, set aside (a second one of a name gets .2, .3, ...)
    <stage>/final/                   the stage-final export (load_omni), never deleted
    <stage>/metrics.jsonl            one line per optimizer step
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from training.common import LogFn, write_json_atomic, write_text_atomic
from training.engine.context import StageOrderError
from training.engine.elastic import check_same_engine, load_on_new_world_size, saved_world_size
from training.stages import Recipe, StageSpec

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"


class StageCheckpoints:
    """Step checkpoints of one stage: save_state into a temp folder, rename, then move `latest`."""

    def __init__(self, stage_dir: Path, keep_last: int) -> None:
        self.dir = stage_dir / "checkpoints"
        self.keep_last = keep_last

    def _latest_name(self) -> str | None:
        pointer = self.dir / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def latest(self) -> Path | None:
        name = self._latest_name()
        if name is None:
            return None
        path = self.dir / name
        return path if (path / TRAINER_STATE).is_file() else None

    def complete(self) -> list[Path]:
        """Step checkpoints with their trainer_state.json, oldest first."""
        return sorted(p for p in self.dir.glob("step-*") if (p / TRAINER_STATE).is_file())

    def roll_back_to(self, chosen: Path, log: LogFn) -> None:
        """Make `chosen` (an older checkpoint given by --resume PATH) the head of the trajectory:
        newer ones are renamed abandoned-<name> (never deleted), so that no later save skips its
        step as "already saved", a crash does not resume the abandoned line, and pruning keeps
        `chosen` until the new trajectory has a newer one. Run by one rank (a single-rank phase)."""
        newer = [p for p in self.complete() if p.name > chosen.name]
        aside = [set_aside(p, "abandoned").name for p in newer]
        if aside:
            log(
                f"rolling back to {chosen.name}: the newer checkpoints {', '.join(p.name for p in newer)} are "
                f"set aside as {', '.join(aside)} in {self.dir} (kept, never resumed)"
            )
        if self._latest_name() != chosen.name:
            write_text_atomic(self.dir / LATEST, chosen.name)

    def save(self, accelerator, step: int, trainer_state: dict[str, Any], log: LogFn = print) -> Path:
        """Every process takes part (DeepSpeed shards its state); the main process publishes."""
        name = f"step-{step:07d}"
        final = self.dir / name
        if (final / TRAINER_STATE).is_file():
            if self._latest_name() == name:
                # this step is already saved (a periodic save that coincides with the stage end);
                # replacing it would leave `latest` pointing at nothing for a moment
                return final
            # a complete folder `latest` never named (killed between the rename and the pointer):
            # it may hold another trajectory's state, so it is kept aside, not trusted
            if accelerator.is_main_process:
                aside = set_aside(final, "abandoned")
                log(f"{name} was saved but never named latest; set aside as {aside.name}")
        tmp = self.dir / f".{name}.tmp"
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            self._warn_if_short_of_space(log)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                # trainer_state.json goes in last: a folder without it is incomplete and ignored;
                # it lists every file's size and checksum, which a resume verifies
                record = {**trainer_state, "num_processes": accelerator.num_processes, "files": file_manifest(tmp)}
                write_json_atomic(tmp / TRAINER_STATE, record)
        except (OSError, RuntimeError) as err:
            if not accelerator.is_main_process or not _out_of_space(err, self.dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointSaveFailed(self._no_space_message(name, err)) from err
        if accelerator.is_main_process:
            if final.exists():  # an incomplete leftover (no trainer_state.json); `latest` never named it
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(self.dir / LATEST, name)
            self._prune(keep=name)
        accelerator.wait_for_everyone()
        return final

    def set_aside_damaged(self, log: LogFn) -> Path | None:
        """The newest checkpoint whose files match their recorded sizes and checksums; newer damaged
        ones are renamed damaged-<name> (never deleted) and `latest` moves to the intact one. Run by
        one rank (a single-rank phase). StageOrderError when checkpoints exist but none is intact."""
        damaged = []
        for path in reversed(self.complete()):
            problem = verify_files(path)
            if problem is None:
                if damaged:
                    write_text_atomic(self.dir / LATEST, path.name)
                    log(f"resuming from {path.name}, the newest intact checkpoint")
                return path
            aside = set_aside(path, "damaged")
            damaged.append(path.name)
            log(f"checkpoint {path.name} is damaged ({problem}); set aside as {aside}")
        if damaged:
            raise StageOrderError(
                f"every checkpoint in {self.dir} is damaged ({', '.join(damaged)}; set aside as damaged-*): "
                "no intact one to resume from; use a new --output-dir, or --resume PATH to a checkpoint"
            )
        return None

    def load(self, accelerator, path: Path, log: LogFn = print) -> dict[str, Any]:
        state = json.loads((path / TRAINER_STATE).read_text())
        check_same_engine(accelerator, path)
        saved = saved_world_size(path, state)
        if saved == accelerator.num_processes:
            accelerator.load_state(str(path))
        else:
            load_on_new_world_size(accelerator, path, saved, log)
        return state

    def resume(
        self,
        accelerator,
        path: Path,
        fingerprint: dict[str, Any],
        data: dict[str, Any],
        mode: str,
        stage: str,
        log: LogFn = print,
    ) -> dict[str, Any]:
        """Load checkpoint `path` if the run may resume from it: not --resume never, the same recipe
        and starting weights. Changed data is allowed (fixed in place, say), and said."""
        if mode == "never":
            raise StageOrderError(
                f"[{stage}] {self.dir.parent} already holds checkpoints and --resume never was given; "
                f"use a new --output-dir or --resume auto"
            )
        saved = json.loads((path / TRAINER_STATE).read_text())
        # fields that a checkpoint of an earlier version did not record cannot be compared: said, not refused
        unrecorded = changed_fields(recorded_part(fingerprint, saved["recipe"]), fingerprint)
        if unrecorded:
            log(f"[{stage}] {path.name} predates these fields, which are not compared: {', '.join(unrecorded)}")
        diffs = changed_fields(saved["recipe"], recorded_part(fingerprint, saved["recipe"]))
        if diffs:
            raise StageOrderError(
                f"[{stage}] refusing to resume from {path}: the recipe changed:\n  " + "\n  ".join(diffs)
            )
        changed = changed_fields(saved.get("data", data), data)
        if changed:
            log(
                f"[{stage}] warning: the data changed since {path.name} was saved (the order of batches from "
                "here differs from the interrupted run's):\n  " + "\n  ".join(changed)
            )
        return self.load(accelerator, path, log)

    def _warn_if_short_of_space(self, log: LogFn) -> None:
        latest = self.latest()
        if latest is None:
            return
        needed, free = folder_bytes(latest), shutil.disk_usage(self.dir).free
        if free < needed:
            log(
                f"warning: {free / 1e6:,.0f} MB free in {self.dir}, the last checkpoint took {needed / 1e6:,.0f} MB: "
                "the next save may not fit"
            )

    def _no_space_message(self, name: str, err: BaseException) -> str:
        latest = self.latest()
        needed = f"the last checkpoint took {folder_bytes(latest) / 1e6:,.0f} MB, " if latest else ""
        kept = f"the last good checkpoint, {latest.name}, is kept" if latest else "no earlier checkpoint exists"
        return (
            f"saving checkpoint {name} in {self.dir} failed: the file system is full ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); {needed}{shutil.disk_usage(self.dir).free / 1e6:,.0f} MB are free. "
            f"{kept}; free some space and rerun the same command to resume"
        )

    def _prune(self, keep: str) -> None:
        complete = self.complete()
        for path in complete[: max(0, len(complete) - self.keep_last)]:
            if path.name != keep:
                shutil.rmtree(path)
        for stale in self.dir.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)


DISK_FULL_EXIT_CODE = 74  # EX_IOERR


class CheckpointSaveFailed(RuntimeError):
    """A checkpoint could not be written for want of space (the previous one is kept)."""


def set_aside(path: Path, why: str) -> Path:
    """Rename a checkpoint folder to <why>-<name> (then .2, .3, ... if that name is taken: the same
    step can be set aside more than once); returns the new path."""
    aside = path.with_name(f"{why}-{path.name}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{why}-{path.name}.{n}")
    os.replace(path, aside)
    return aside


def file_manifest(folder: Path) -> dict[str, list]:
    """Relative path -> [size in bytes, sha256] of every file under folder."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        out[str(path.relative_to(folder))] = [path.stat().st_size, _sha256(path)]
    return out


def verify_files(folder: Path) -> str | None:
    """None if every file a checkpoint recorded is there with its size and checksum; else what is wrong.
    Checkpoints written before files were recorded pass unchecked."""
    try:
        recorded = json.loads((folder / TRAINER_STATE).read_text()).get("files")
    except (OSError, json.JSONDecodeError) as err:
        return f"{TRAINER_STATE} unreadable: {err}"
    for name, (size, digest) in (recorded or {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size:,} bytes, {size:,} were written"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum"
    return None


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _out_of_space(err: BaseException, folder: Path) -> bool:
    """ENOSPC, or a writer's wrapped error (torch.save raises RuntimeError) with the disk now full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    return "no space left" in text or "quota" in text or shutil.disk_usage(folder).free < 1 << 20


def recipe_fingerprint(recipe: Recipe, spec: StageSpec, starts_from: str) -> dict[str, Any]:
    """The fields a resumed (or reused) stage must share with the run that wrote the checkpoint (or
    finished it): the recipe, the stage's row, and the identity of the weights it starts from."""
    fields = recipe.to_dict()
    fields.pop("stages")
    fields.pop("dist_timeout_minutes")  # how long to wait for a hung rank changes no result
    fields.pop("loss_chunk_mb")  # memory only (and fp32 round-off)
    fields.pop("attn_implementation")  # the same attention by another kernel (round-off)
    fields.pop("activation_checkpointing")  # memory and time only
    fields.pop("torch_compile")  # the same layers as fused kernels (round-off)
    fields.pop("device_memory_gib")  # what it chose (tokens_per_micro_batch, resolved) is compared
    fields["data"].pop("speech_judge")  # who listens at the boundary changes no training
    fields["stage"] = json.loads(json.dumps(dataclasses.asdict(spec)))
    fields["starts_from"] = starts_from
    return fields


def recorded_part(fields: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """`fields` without the keys (at any depth) that `recorded` lacks."""
    return {
        k: recorded_part(v, recorded[k]) if isinstance(v, dict) and isinstance(recorded[k], dict) else v
        for k, v in fields.items()
        if k in recorded
    }


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
