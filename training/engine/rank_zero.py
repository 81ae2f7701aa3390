"""Work one rank does for all, and how the others wait for it without a collective.

The single-rank phases: building the demo corpora and stand-ins, checking the data, filling the
feature cache, setting damaged checkpoints aside. Rank 0 does each while the other ranks wait, then
they read what it wrote. This is safe only if nothing inside such a phase is a collective (no
barrier, gather, reduce, or DeepSpeed-synchronized `generate`): a collective there would pair with
whatever the waiting ranks are doing and deadlock, or wait for ranks that never join.

So the waiting is not a barrier either (a barrier is a collective, with the process group's timeout,
which a long first-time build can exceed). Rank 0 posts a heartbeat and then its outcome in the
process group's key-value store (plain TCP requests to the launcher's store, not a collective); the
others poll it, show progress, and stop with a clear message when rank 0 fails or goes silent.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from accelerate import Accelerator

HEARTBEAT_SECONDS = 5.0
SILENT_LIMIT_SECONDS = 180.0  # rank 0 is taken for dead or hung after this long without a heartbeat
PROGRESS_SECONDS = 60.0
_calls = itertools.count()  # the same sequence on every rank: phase keys agree without talking


class RankZeroFailed(RuntimeError):
    """Rank 0 failed, died or hung in a phase the other ranks were waiting for."""


def _store():
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    return dist.PrefixStore("omni-stage/", _get_default_store())


@contextmanager
def rank_zero_first(acc: Accelerator, phase: str) -> Iterator[None]:
    """Rank 0 runs the body first; every other rank waits for it (no collective), then runs it."""
    if acc.num_processes == 1:
        yield
        return
    store, key = _store(), f"{phase}#{next(_calls)}"
    if acc.is_main_process:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                store.set(f"{key}/beat", str(time.time()))

        store.set(f"{key}/beat", str(time.time()))
        threading.Thread(target=beat, daemon=True, name=f"heartbeat {phase}").start()
        try:
            yield
        except BaseException as err:
            store.set(f"{key}/done", f"failed: {type(err).__name__}: {err}"[:2000])
            raise
        finally:
            stop.set()
        store.set(f"{key}/done", "ok")
        return
    _wait(store, key, phase, acc.process_index)
    yield


def _wait(store, key: str, phase: str, rank: int) -> None:
    started = last_shown = time.time()
    while True:
        try:
            if store.check([f"{key}/done"]):
                outcome = store.get(f"{key}/done").decode()
                if outcome != "ok":
                    raise RankZeroFailed(f"rank {rank}: rank 0 failed in {phase}: {outcome.removeprefix('failed: ')}")
                return
            beat = float(store.get(f"{key}/beat").decode()) if store.check([f"{key}/beat"]) else started
        except RankZeroFailed:
            raise
        except Exception as err:  # the store is gone: the launcher or rank 0's node went down
            raise RankZeroFailed(f"rank {rank}: lost contact with rank 0 during {phase} ({err})") from err
        now = time.time()
        if now - max(beat, started) > SILENT_LIMIT_SECONDS:
            raise RankZeroFailed(
                f"rank {rank}: rank 0 sent no heartbeat for {now - max(beat, started):.0f} s during {phase}: "
                "it died or hangs"
            )
        if now - last_shown >= PROGRESS_SECONDS:
            print(f"rank {rank}: waiting for rank 0 ({phase}): {now - started:.0f} s", flush=True)
            last_shown = now
        time.sleep(0.5)
