"""What stops a stage before its last step: a stop signal (checkpoint, exit 75), too many non-finite
steps in a row (checkpoint, exit 4), or the early-stop split's loss gone flat past min_steps."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from training.engine.context import NonFiniteLoss, Preempted

if TYPE_CHECKING:
    from training.engine.stage import StageRun


class StopSignals:
    """SIGTERM/SIGUSR1 (and a first SIGINT) ask the loop to checkpoint and exit after this step;
    a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, acc: Accelerator) -> str | None:
        """The stop request as every rank sees it. A signal reaches each rank at its own moment; a
        rank that checkpoints (a collective) while another starts the next step would deadlock
        both, so the ranks agree after every step (one all-reduce of one number)."""
        if acc.num_processes == 1:
            return self.requested
        local = float(signal.Signals[self.requested].value) if self.requested else 0.0
        number = int(acc.reduce(torch.tensor([local], device=acc.device), reduction="max").item())
        if number and self.requested is None:
            self.requested = signal.Signals(number).name
        return self.requested if number else None


def skipped_step(run: StageRun, signals: StopSignals) -> None:
    """Count a step skipped for a non-finite loss; stop the run (checkpoint saved) after
    nonfinite_patience in a row, or on a pending stop signal."""
    state, patience = run.state, run.ctx.recipe.nonfinite_patience
    state["skipped_steps"] += 1
    state["nonfinite_in_a_row"] += 1
    run.log(
        f"step {state['step'] + 1}: non-finite loss, update skipped "
        f"({state['nonfinite_in_a_row']} in a row, {state['skipped_steps']} in this stage)"
    )
    stop = signals.agreed(run.ctx.accelerator)
    if state["nonfinite_in_a_row"] >= patience or stop:
        run.save_checkpoint()
    if state["nonfinite_in_a_row"] >= patience:
        raise NonFiniteLoss(
            f"[{run.stage}] {patience} steps in a row had a non-finite loss (step {state['step']}); "
            f"checkpoint saved in {run.dir}. Lower the LR peak, check the data, or use fp32."
        )
    if stop:
        raise Preempted(stop)


def early_stopping(run: StageRun) -> bool:
    """Evaluate the early-stop split; True once it has been flat for `patience` evals past min_steps."""
    state, spec, split = run.state, run.spec, run.early_stop_split
    loss = run.evaluation.heldout_loss(split)
    improved = loss < state["best_eval"] - 1e-4
    state["best_eval"] = min(state["best_eval"], loss)
    state["evals_since_best"] = 0 if improved else state["evals_since_best"] + 1
    run.log(f"step {state['step']}: {split} loss {loss:.4f} (best {state['best_eval']:.4f})")
    run.ctx.accelerator.log({f"{run.stage}/eval/{split}_loss": loss}, step=state["step"])
    if state["step"] >= spec.min_steps and state["evals_since_best"] >= spec.early_stop_patience:
        run.stop_reason = f"early stop: {split} loss flat for {spec.early_stop_patience} evals"
        return True
    return False
