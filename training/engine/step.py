"""One optimizer step: the LR from the schedule, forward/backward over grad_accum micro-batches with
the global-token loss, clipping, the update; a step whose loss is not finite skipped; the step's
statistics reduced across ranks at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from training.engine.context import NonFiniteLoss
from training.engine.mfu import throughput
from training.model import OmniModel, model_inputs
from training.model.flops import squared_sample_lengths
from training.speech.layout import N_STREAMS
from training.stages import TASKS, lr_at

if TYPE_CHECKING:
    from training.engine.stage import StageRun

STREAM_NAMES = tuple(f"audio{i}" for i in range(N_STREAMS - 1)) + ("text",)


@dataclass
class StepStats:
    """One step's statistics, summed over micro-batches and then over ranks in ONE all-reduce."""

    loss: torch.Tensor  # [1] this rank's loss share, divided by grad_accum
    stream_ce: torch.Tensor  # [8] cross-entropy sums per stream
    stream_tokens: torch.Tensor  # [8] labelled tokens per stream
    task_ce: torch.Tensor  # [tasks] cross-entropy sums per task
    task_tokens: torch.Tensor  # [tasks]
    real_positions: torch.Tensor  # [1] attended positions
    positions: torch.Tensor  # [1] all positions, padding included
    squared_lengths: torch.Tensor  # [1] each sample's length squared, summed (attention's FLOPs)
    speech_positions: torch.Tensor  # [1] positions the adapter fills

    @classmethod
    def zeros(cls, device: torch.device) -> StepStats:
        sizes = (1, N_STREAMS, N_STREAMS, len(TASKS), len(TASKS), 1, 1, 1, 1)
        return cls(*(torch.zeros(n, device=device) for n in sizes))

    @classmethod
    def of_micro_batch(
        cls, loss: torch.Tensor, out: dict[str, torch.Tensor], batch: dict[str, Any], grad_accum: int
    ) -> StepStats:
        row_sums, row_counts = out["row_loss_sum"].detach(), out["row_count"]
        task_onehot = torch.nn.functional.one_hot(batch["task_ids"].to(row_sums.device), len(TASKS)).float()  # [B, T]
        attention = batch["attention_mask"]
        return cls(
            loss=(loss.detach().float() / grad_accum)[None],
            stream_ce=row_sums.sum(0),
            stream_tokens=row_counts.sum(0),
            task_ce=task_onehot.T @ row_sums.sum(-1),
            task_tokens=task_onehot.T @ row_counts.sum(-1),
            real_positions=attention.sum().float()[None],
            positions=torch.tensor([float(attention.numel())], device=row_sums.device),
            squared_lengths=squared_sample_lengths(batch).to(row_sums.device),
            speech_positions=batch["audio_mask"].sum().float().to(row_sums.device)[None],
        )

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def __iadd__(self, other: StepStats) -> StepStats:
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine += theirs
        return self

    def reduced(self, accelerator: Accelerator) -> StepStats:
        """Summed over all ranks: one all-reduce of the fields packed together."""
        if accelerator.num_processes == 1:
            return self
        tensors = self._tensors()
        total = accelerator.reduce(torch.cat(tensors), reduction="sum")
        return StepStats(*total.split([t.numel() for t in tensors]))

    def metrics(self, num_processes: int) -> dict[str, float]:
        """Readable metrics of one optimizer step (of the reduced statistics)."""
        real, positions = self.real_positions.item(), self.positions.item()
        out = {"loss": self.loss.item() / num_processes}
        out |= {
            f"loss_{n}": s / c
            for n, s, c in zip(STREAM_NAMES, self.stream_ce.tolist(), self.stream_tokens.tolist())
            if c
        }
        out |= {
            f"loss_task_{n}": s / c for n, s, c in zip(TASKS, self.task_ce.tolist(), self.task_tokens.tolist()) if c
        }
        out |= {"tokens": real, "padding": 1.0 - real / positions}
        return out


def global_token_loss(acc: Accelerator, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """This rank's share of the global batch's loss, and whether the global loss is finite.

    The loss is each stream's CE summed over its tokens on ALL ranks divided by the stream's
    global token count, averaged over streams. Each rank divides its own sums by the global
    counts (one all-reduce of 9 numbers) and scales by N, because DDP and DeepSpeed average
    gradients over ranks: the update then equals the 1-process one on the same global batch,
    whatever the split of tokens between ranks."""
    sums, counts = out["row_loss_sum"].sum(0), out["row_count"].sum(0)
    bad = (~torch.isfinite(sums.detach()).all()).float()[None]
    local = torch.cat([counts, bad])
    reduced = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
    global_counts, finite = reduced[:-1], bool(reduced[-1] == 0)
    present = global_counts > 0
    if not bool(present.any()):
        return out["loss"] * 0.0, finite
    share = (sums[present] / global_counts[present]).sum() / present.sum() * acc.num_processes
    return share, finite


def forward_backward(
    acc: Accelerator, model: OmniModel, next_batch: Callable[[], dict[str, Any]], grad_accum: int, where: str, step: int
) -> StepStats | None:
    """Forward/backward over grad_accum micro-batches. Returns this rank's step statistics, or None
    if a micro-batch had a non-finite loss: the step is then skipped (its data is consumed, no
    update is applied). `where` ("[stage]") and `step` (1-based) name the step in errors."""
    stats: StepStats | None = StepStats.zeros(acc.device)
    done = 0
    for _ in range(grad_accum):
        batch = next_batch()
        with acc.accumulate(model):  # entered every micro-step: Accelerate counts them for sync
            if stats is None:
                continue
            out = model(**model_inputs(batch))
            loss, finite = global_token_loss(acc, out)
            if not finite:
                if done and acc.distributed_type == DistributedType.DEEPSPEED:
                    # DeepSpeed's engine already holds this step's partial gradients and has no
                    # way to drop them: stop rather than apply a corrupted update.
                    raise NonFiniteLoss(
                        f"{where} non-finite loss in micro-batch {done + 1} of step {step} under "
                        f"DeepSpeed with grad_accum > 1; the last checkpoint is intact"
                    )
                stats = None
                continue
            acc.backward(loss)
            done += 1
            stats += StepStats.of_micro_batch(loss, out, batch, grad_accum)
    return stats


def optimizer_step(run: StageRun) -> dict[str, float] | None:
    """One optimizer step of `run` at the schedule's LR: forward/backward, clip, update. Its metrics,
    or None if it was skipped (non-finite loss)."""
    recipe, acc, state, model = run.ctx.recipe, run.ctx.accelerator, run.state, run.model
    step_clock = time.time()
    lr = lr_at(run.spec, state["step"])
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    stats = run.accumulate_step()
    grad_norm = None
    if stats is not None:
        if recipe.max_grad_norm > 0:  # DeepSpeed clips inside its step (the value is the recipe's)
            grad_norm = acc.clip_grad_norm_(run.trainable, recipe.max_grad_norm)
        run.optimizer.step()
    run.optimizer.zero_grad()
    if stats is None:
        return None
    state["nonfinite_in_a_row"] = 0
    reduced = stats.reduced(acc)
    metrics = reduced.metrics(acc.num_processes)
    if grad_norm is None and hasattr(model, "get_global_grad_norm"):  # DeepSpeed engine
        grad_norm = model.get_global_grad_norm()
    seconds = max(time.time() - step_clock, 1e-9)
    metrics |= {"lr": lr, "tokens_per_s": metrics["tokens"] / seconds}
    flops = run.step_flops.of_step(
        positions=metrics["tokens"],
        squared_lengths=reduced.squared_lengths.item(),
        stream_tokens=reduced.stream_tokens.tolist(),
        speech_positions=reduced.speech_positions.item(),
    )
    metrics |= throughput(flops, seconds, acc.num_processes, run.peak_tflops)
    state["model_flops"] = state.get("model_flops", 0.0) + flops  # for the stage's mean (run record)
    state["step_seconds"] = state.get("step_seconds", 0.0) + seconds
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics
