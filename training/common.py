"""What every package shares: the log callback type and crash-safe writes.

Everything the project writes to disk that a later run reads back (records, checkpoints, exports,
reports, the demo's corpora and stand-ins) goes through one of these, so a crash mid-write leaves
the previous file or folder in charge, never a half-written one. Imports nothing of the project.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LogFn = Callable[[str], None]  # where long work reports its progress (print, or the run's logger)
RECORD = "run_record.json"  # a run directory's record of every stage boundary (written by the engine)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file, fsync, rename: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    A crash inside the block leaves only a `.tmp` folder behind (removed next time), never a
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


@contextmanager
def build_once(target: Path, log: LogFn, label: str) -> Iterator[Path]:
    """Yield a temporary sibling folder to build `target` in; at the end it is renamed to `target`.

    For caches that are built once and then only read (the demo's corpora and stand-ins): an
    interrupted build leaves nothing a later call would load, and when two processes (e.g. two
    ranks) build at once, the first rename wins and both use that copy.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
            log(f"{label}: {target} appeared while building; using that copy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after a successful rename
