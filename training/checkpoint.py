"""Checkpoints that survive crashes: atomic folders, a `latest` pointer, pruning that never touches
a stage-final export.

Layout of a run directory:

    run_record.json                  per-stage results (steps, losses, WER, time)
    <stage>/checkpoints/step-000050/ accelerator.save_state + trainer_state.json
    <stage>/checkpoints/latest       name of the newest complete checkpoint
    <stage>/final/                   the stage-final export (load_omni), never deleted
    <stage>/metrics.jsonl            one line per optimizer step
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file, fsync, rename: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    A crash inside the block leaves only a `.tmp-` folder behind (removed next time), never a
    half-written `final`.
    """
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


class StageCheckpoints:
    """Step checkpoints of one stage: save_state into a temp folder, rename, then move `latest`."""

    def __init__(self, stage_dir: Path, keep_last: int) -> None:
        self.dir = stage_dir / "checkpoints"
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        pointer = self.dir / LATEST
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text().strip()
        return path if (path / TRAINER_STATE).is_file() else None

    def save(self, accelerator, step: int, trainer_state: dict[str, Any]) -> Path:
        """Every process takes part (DeepSpeed shards its state); the main process publishes."""
        name = f"step-{step:07d}"
        final = self.dir / name
        if (final / TRAINER_STATE).is_file():
            # this step is already saved (a periodic save that coincides with the stage end);
            # replacing it would leave `latest` pointing at nothing for a moment
            return final
        tmp = self.dir / f".{name}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # trainer_state.json goes in last: a folder without it is incomplete and ignored
            write_json_atomic(tmp / TRAINER_STATE, trainer_state)
            if final.exists():  # an incomplete leftover (no trainer_state.json); `latest` never named it
                shutil.rmtree(final)
            os.replace(tmp, final)
            (self.dir / f".{LATEST}.tmp").write_text(name)
            os.replace(self.dir / f".{LATEST}.tmp", self.dir / LATEST)
            self._prune(keep=name)
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator, path: Path) -> dict[str, Any]:
        accelerator.load_state(str(path))
        return json.loads((path / TRAINER_STATE).read_text())

    def _prune(self, keep: str) -> None:
        complete = sorted(p for p in self.dir.glob("step-*") if (p / TRAINER_STATE).is_file())
        for path in complete[: max(0, len(complete) - self.keep_last)]:
            if path.name != keep:
                shutil.rmtree(path)
        for stale in self.dir.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
