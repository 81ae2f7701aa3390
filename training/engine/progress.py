"""What a stage shows and keeps of each optimizer step: a line in metrics.jsonl, tracker scalars,
the progress bar (where someone watches), and a log line every log_every steps."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from tqdm.auto import tqdm

from training.common import LogFn, write_text_atomic


def kept_metrics(path: Path, step: int) -> tuple[list[str], list[str]]:
    """(the lines of steps up to `step`, the unreadable ones, shortened) of a metrics.jsonl."""
    kept, torn = [], []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            if line.strip():
                torn.append(line[:80])
    return kept, torn


class StepProgress:
    def __init__(
        self, acc: Accelerator, stage: str, metrics_path: Path, log: LogFn, log_every: int, max_steps: int
    ) -> None:
        self.acc, self.stage, self.metrics_path, self.log = acc, stage, metrics_path, log
        self.log_every, self.max_steps = log_every, max_steps

    def start(self, step: int) -> tqdm:
        """Drop metrics.jsonl lines past the step we resume at, and a line torn by a kill mid-write
        (said); return the progress bar (a context)."""
        if self.acc.is_main_process:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            kept, torn = kept_metrics(self.metrics_path, step)
            if torn:
                self.log(
                    f"{self.metrics_path}: dropped {len(torn)} unreadable line(s), torn by a kill mid-write: {torn}"
                )
            write_text_atomic(self.metrics_path, "".join(line + "\n" for line in kept))
        self.window: list[float] = []
        self.clock = time.time()
        self.bar = tqdm(
            total=self.max_steps,
            initial=step,
            desc=self.stage,
            unit="step",
            dynamic_ncols=True,
            disable=None if self.acc.is_local_main_process else True,
        )
        return self.bar

    def step_done(self, step: int, metrics: dict[str, Any]) -> None:
        loss, lr = metrics["loss"], metrics["lr"]
        self.window.append(loss)
        if self.acc.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.acc.log({f"{self.stage}/train/{k}": v for k, v in metrics.items()}, step=step)
        self.bar.update(1)
        shown = {"loss": f"{loss:.3f}", "lr": f"{lr:.1e}", "tok_s": f"{metrics['tokens_per_s']:.0f}"}
        if "mfu" in metrics:
            shown["mfu"] = f"{metrics['mfu']:.1%}"
        self.bar.set_postfix(shown)
        if step % self.log_every == 0 or step == self.max_steps:
            rate = len(self.window) / (time.time() - self.clock)
            mfu = f"  MFU {metrics['mfu']:.1%}" if "mfu" in metrics else ""
            self.log(
                f"step {step:>6}/{self.max_steps}  loss {sum(self.window) / len(self.window):.4f}  "
                f"lr {lr:.2e}  {rate:.1f} steps/s  {metrics['model_tflops_per_s']:.3g} TFLOP/s{mfu}"
            )
            self.window, self.clock = [], time.time()
