"""One stage under Accelerate, torchtune-style: ``setup()`` builds everything and resumes,
``train()`` runs the loop, ``finish()`` exports, evaluates and records. ``run()`` does all three."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from accelerate.utils import set_seed

from training.engine.boundary import StageEvaluation, finish_stage
from training.engine.budget import resolve_token_budget
from training.engine.checkpoints import StageCheckpoints, recipe_fingerprint, verify_files
from training.engine.context import REQUEUE_EXIT_CODE, Preempted, RunContext, StageOrderError
from training.engine.faults import inject_fault
from training.engine.guards import StopSignals, early_stopping, skipped_step
from training.engine.launch import check_launch
from training.engine.loaders import prepare_budget_loader, stage_loaders
from training.engine.mfu import StepFlops, device_peak_tflops
from training.engine.prepare import prepared_splits
from training.engine.progress import StepProgress
from training.engine.rank_zero import rank_zero_first
from training.engine.run_folder import finished_stage, resume_checkpoint
from training.engine.sources import data_identity
from training.engine.step import StepStats, forward_backward, optimizer_step
from training.engine.weights import PRETRAINED, initial_weights, make_model, weights_identity
from training.model import optimizer_groups, parameter_summary, set_trainable
from training.stages import RecipeError, lr_at


class StageRun:
    def __init__(self, ctx: RunContext, stage: str) -> None:
        self.ctx, self.stage = ctx, stage
        self.spec = ctx.stage_spec(stage)
        self.dir = ctx.stage_dir(stage)
        self.checkpoints = StageCheckpoints(self.dir, ctx.recipe.keep_last)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.stop_reason = "max_steps"

    def log(self, message: str) -> None:
        self.ctx.log(f"[{self.stage}] {message}")

    def completed(self) -> dict[str, Any] | None:
        """This stage's record when it already finished in this folder as part of this same run
        (engine/run_folder.py: StageOrderError when it finished as part of another)."""
        return finished_stage(self.ctx, self.stage, initial_weights(self.ctx, self.stage))

    def run(self) -> dict[str, Any]:
        if resume_checkpoint(self.ctx, self.stage) is None:  # --resume PATH of this stage: train from there
            done = self.completed()
            if done:
                self.log(f"already complete (export at {self.dir / 'final'}); skipping")
                return done
        self.setup()
        self.train()
        return self.finish()

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        ctx, recipe, spec, acc = self.ctx, self.ctx.recipe, self.spec, self.ctx.accelerator
        ctx.enter(f"stage {self.stage}: setup", watch=False)  # includes single-rank work (feature cache)
        self.started = time.time()
        self.source = initial_weights(ctx, self.stage)
        check_launch(acc, recipe)
        set_seed(recipe.seed)
        model, self.tokenizer, self.feature_extractor = make_model(ctx, self.source)
        set_trainable(model, spec.trainable, spec.train_text_specials)
        model.loss_chunk_mb = recipe.loss_chunk_mb
        backend = recipe.compile_backend
        if backend and backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise RecipeError(f"torch_compile '{backend}': not a torch.compile backend (e.g. 'inductor')")
        try:
            model.set_llm_options(recipe.attn_implementation, recipe.activation_checkpointing, backend)
        except (ImportError, ValueError) as err:  # flash attention asked for, not installed or not supported
            raise RecipeError(f"attn_implementation '{recipe.attn_implementation}': {err}") from None
        if backend:
            self.log(f"LLM decoder layers compiled by torch.compile (backend {backend}, dynamic shapes)")
        recipe = resolve_token_budget(acc, recipe, model, self.log)  # "auto" -> a number; else unchanged
        self.step_flops = StepFlops.of(model)  # counted on the whole model, before ZeRO-3 shards it
        self.peak_tflops = device_peak_tflops(acc.device)
        for module, (total, trainable) in parameter_summary(model).items():
            self.log(f"{module:<8} {total:>12,} params, {trainable:>12,} trainable")
        prepared = prepared_splits(ctx, model, self.feature_extractor, self.tokenizer)
        if model.config.frame_stack != recipe.frame_stack:
            k = model.config.frame_stack
            self.log(f"the model stacks {k} encoder frames per adapter input (recipe: {recipe.frame_stack}); using {k}")
        loaders = stage_loaders(
            recipe,
            spec,
            prepared,
            model.layout,
            model.config.frame_stack,
            self.log,
            (acc.num_processes, acc.process_index),
        )
        # Early stopping reads the dev split only: the held-out split stays unseen until the boundary.
        self.early_stop_split = recipe.data.dev_split
        # fused AdamW: one kernel over all tensors (5x faster than the per-tensor loop on CPU)
        optimizer = torch.optim.AdamW(
            optimizer_groups(model, recipe.weight_decay), lr=lr_at(spec, 0), betas=recipe.adam_betas, fused=True
        )
        self.budget_sampler = loaders.train.batch_sampler if recipe.tokens_per_micro_batch else None
        if recipe.tokens_per_micro_batch:
            self.model, self.optimizer, self.train_dl = prepare_budget_loader(acc, model, optimizer, loaders.train)
        else:
            self.model, self.optimizer, self.train_dl = acc.prepare(model, optimizer, loaders.train)
        # the data position (batches_in_epoch) counts global micro-batches; a token-budget process reads 1/N
        self.global_per_batch = acc.num_processes if recipe.tokens_per_micro_batch else 1
        loaders.evals = {s: acc.prepare(dl) for s, dl in loaders.evals.items()}
        loaders.qa = {s: acc.prepare(dl) for s, dl in loaders.qa.items()}
        self.evaluation = StageEvaluation(
            ctx, self.model, self.tokenizer, loaders, self.log, self.dir, self.feature_extractor
        )
        self.data = data_identity(ctx, spec.task_mix)
        before = ctx.record()["stages"].get("before")
        if self.source == PRETRAINED and (before is None or before.get("data") != self.data):
            self.log("evaluating the untrained pipeline")
            ctx.update_record("before", {**self.evaluation.before_training(), "data": self.data})
        self.fingerprint = recipe_fingerprint(recipe, spec, weights_identity(self.source))
        self.state = {
            "step": 0,
            "epoch": 0,
            "batches_in_epoch": 0,
            "best_eval": math.inf,
            "evals_since_best": 0,
            "seconds": 0.0,
            "losses": [],
            "skipped_steps": 0,
            "nonfinite_in_a_row": 0,
            "recipe": self.fingerprint,
            "data": self.data,
        }
        self.resume()

    def resume(self) -> None:
        """From --resume PATH when it is this stage's (a rollback when it is older than the newest:
        the newer ones are set aside), else the newest intact checkpoint (damaged newer ones are set
        aside first). Rank 0 alone moves folders."""
        ctx, acc = self.ctx, self.ctx.accelerator
        given = resume_checkpoint(ctx, self.stage)
        if given is not None:
            problem = verify_files(given)
            if problem is not None:
                raise StageOrderError(f"--resume {given}: {problem}")
            with rank_zero_first(acc, f"stage {self.stage}: rolling back"):
                if acc.is_main_process:
                    self.checkpoints.roll_back_to(given, self.log)
            latest = given
        else:
            if ctx.resume != "never":
                with rank_zero_first(acc, f"stage {self.stage}: checking checkpoints"):
                    if acc.is_main_process:
                        self.checkpoints.set_aside_damaged(self.log)
            latest = self.checkpoints.latest()
        if latest is not None:
            mode = "auto" if given is not None else ctx.resume
            self.state = self.checkpoints.resume(acc, latest, self.fingerprint, self.data, mode, self.stage, self.log)
            self.log(f"resumed from {latest} at step {self.state['step']}")

    # -- train ---------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.state["seconds"] + time.time() - self.started

    def save_checkpoint(self) -> None:
        state = {**self.state, "seconds": self.elapsed()}
        self.checkpoints.save(self.ctx.accelerator, self.state["step"], state, self.log)

    def next_batch(self) -> dict[str, Any]:
        batch = next(self.batches, None)
        if batch is None:  # epoch boundary: a fresh length-grouped order
            self.state["epoch"] += 1
            self.state["batches_in_epoch"] = 0
            self.train_dl.set_epoch(self.state["epoch"])
            self.batches = iter(self.train_dl)
            batch = next(self.batches)
        self.state["batches_in_epoch"] += self.global_per_batch
        return batch

    def accumulate_step(self) -> StepStats | None:
        """Forward/backward over the step's micro-batches; None when the step is skipped (non-finite)."""
        return forward_backward(
            self.ctx.accelerator,
            self.model,
            self.next_batch,
            self.ctx.recipe.grad_accum,
            f"[{self.stage}]",
            self.state["step"] + 1,
        )

    def train(self) -> None:
        try:
            self._train()
        finally:
            self.batches = None  # let the loader's worker go now: a live iterator can hold the exit

    def _train(self) -> None:
        spec, acc, state = self.spec, self.ctx.accelerator, self.state
        progress = StepProgress(acc, self.stage, self.metrics_path, self.log, self.ctx.recipe.log_every, spec.max_steps)
        bar = progress.start(state["step"])  # a progress bar where someone watches; log lines always
        self.log(
            f"training steps {state['step']}..{spec.max_steps} (min {spec.min_steps}), "
            f"LR {spec.lr_init:g} -> {spec.lr_peak:g}, trains {'+'.join(spec.trainable)}"
        )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.train_dl.set_epoch(state["epoch"])
        if self.budget_sampler is not None:  # from the exact global micro-batch, on any number of processes
            self.budget_sampler.resume_at(state["batches_in_epoch"])
            self.batches = iter(self.train_dl)
        else:
            skip = state["batches_in_epoch"] // self.global_per_batch
            self.batches = iter(acc.skip_first_batches(self.train_dl, skip) if skip else self.train_dl)
        with StopSignals() as signals, bar:
            while state["step"] < spec.max_steps:
                self.ctx.enter(f"stage {self.stage}: step {state['step'] + 1}")  # arms the stack watchdog
                metrics = optimizer_step(self)
                if metrics is None:
                    skipped_step(self, signals)
                    continue
                state["step"] += 1
                inject_fault(acc, state["step"])  # test-only (OMNI_STAGE_FAULT); a no-op otherwise
                state["tokens"] = state.get("tokens", 0) + int(metrics["tokens"])
                state["losses"].append(metrics["loss"])
                progress.step_done(state["step"], metrics)
                if self.early_stop_split and state["step"] % spec.eval_every == 0 and early_stopping(self):
                    break
                if state["step"] % self.ctx.recipe.save_every == 0:
                    self.save_checkpoint()
                stop = signals.agreed(acc)
                if stop:
                    self.save_checkpoint()
                    self.log(
                        f"{stop}: checkpoint saved at step {state['step']}; "
                        f"exiting with {REQUEUE_EXIT_CODE} (rerun the same command to resume)"
                    )
                    raise Preempted(stop)
        self.log(f"stopped at step {state['step']} ({self.stop_reason})")

    # -- finish --------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        self.ctx.enter(f"stage {self.stage}: boundary (export, evaluation)", watch=False)
        return finish_stage(self)


def run_stage(ctx: RunContext, stage: str) -> dict[str, Any]:
    return StageRun(ctx, stage).run()
