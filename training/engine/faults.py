"""How a multi-process run ends when one rank fails: promptly, every rank saying where it was.

- Every rank knows its phase ("stage asr: step 120", ...); a rank whose step or phase runs past the
  process group's timeout writes its Python stack (faulthandler's watchdog), so a rank that hangs
  outside any collective shows where, while the others' collectives time out and end the run.
- A rank that raises (a timed-out collective included) prints its rank, phase and error and every
  thread's stack, then leaves at once: the process group is unusable by then, and a normal exit
  would wait in it. The launcher then stops the other ranks. Checkpoints are written atomically, so
  none that finished is lost.
- A run that ends on its own terms (done, a WER gate, a stop signal, bad input: every rank knows)
  ends on every rank at once with the same exit code, after rank 0 has written the record and
  report (`leave_together`): the launcher stops the other ranks as soon as one exits with an error.
- `OMNI_STAGE_FAULT` injects a fault for tests: "hang@RANK:STEP" (sleeps) or "crash@RANK:STEP"
  (raises) on that rank after that optimizer step.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

from accelerate import Accelerator

FAULT_ENV = "OMNI_STAGE_FAULT"
CRASH_EXIT_CODE = 70  # EX_SOFTWARE: a rank failed; its message and every stack are in the log


class InjectedFault(RuntimeError):
    """Raised by the test-only fault hook."""


class Phase:
    """Where this rank is, for messages; re-arms the stack watchdog on each change."""

    def __init__(self, acc: Accelerator, timeout_s: float) -> None:
        self.acc, self.timeout_s, self.name = acc, timeout_s, "starting"
        self.watch = acc.num_processes > 1

    def enter(self, name: str, watch: bool = True) -> None:
        """Set the phase; with watch, dump this rank's stack if it is still here after the timeout
        (plus a margin, so that a rank waiting in a collective reports its own timeout first)."""
        self.name = name
        if self.watch:
            faulthandler.cancel_dump_traceback_later()
            if watch:
                faulthandler.dump_traceback_later(self.timeout_s + 15, exit=False)

    def quiet(self) -> None:
        """No watchdog (single-rank phases may legitimately take longer than the timeout)."""
        if self.watch:
            faulthandler.cancel_dump_traceback_later()


def inject_fault(acc: Accelerator, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, _, where = spec.partition("@")
    rank, _, at = where.partition(":")
    if int(rank) != acc.process_index or int(at) != step:
        return
    print(f"rank {acc.process_index}: injected fault '{kind}' after step {step}", flush=True)
    if kind == "hang":
        while True:
            time.sleep(3600)
    raise InjectedFault(f"injected crash on rank {acc.process_index} after step {step}")


def leave_together(acc: Accelerator, code: int) -> int:
    """End the run (trackers, process group) and return `code`. In a multi-process run every rank
    leaves with `code`, together, once rank 0 is done with its files: a rank leaving first with an
    error makes the launcher SIGTERM the others (exit -15 in its summary) while rank 0 may still be
    writing, and the interpreter's teardown of a process group can abort a finished run. So: a
    barrier, and out without the teardown."""
    if acc.num_processes == 1:
        acc.end_training()
        return code
    # whoever is still here when the first rank is gone gets the launcher's SIGTERM: same code
    signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    acc.wait_for_everyone()  # the ends train_stages maps to a code (gate, signal, bad input) reach every rank alike
    acc.end_training()  # trackers closed, process group destroyed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fail_rank(acc: Accelerator, phase: Phase, err: BaseException) -> None:
    """Report this rank's failure and end the process now (multi-process runs only)."""
    faulthandler.cancel_dump_traceback_later()
    timed_out = "timed out" in str(err).lower() or "timeout" in type(err).__name__.lower()
    reason = (
        f"a collective waited longer than the process group's timeout ({phase.timeout_s / 60:g} min, "
        "dist_timeout_minutes): another rank stopped or hangs (its stack is in the log)"
        if timed_out
        else "this rank raised"
    )
    print(
        f"error: rank {acc.process_index} of {acc.num_processes} failed in phase '{phase.name}': "
        f"{type(err).__name__}: {err}\n{reason}; every thread's stack follows",
        file=sys.stderr,
        flush=True,
    )
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    import traceback

    traceback.print_exception(err, file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(CRASH_EXIT_CODE)
