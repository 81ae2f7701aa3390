"""One stage under Accelerate: set up, train (with resume and signals), export, evaluate."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from accelerate.utils import (DataLoaderConfiguration, DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs,
                               set_seed)

from training import data as data_lib
from training.checkpoint import TRAINER_STATE, StageCheckpoints, atomic_dir, read_json, write_json_atomic
from training.evaluation import answer_accuracy, audio_token_scores, evaluate_wer, heldout_loss, model_inputs
from training.layout import N_AUDIO_LAYERS, N_STREAMS
from training.model import OmniModel, build_model, is_omni_export, load_omni, parameter_summary, save_omni, set_trainable
from training.report import write_report
from training.stages import STAGE_NAMES, TASKS, Recipe, RecipeError, StageSpec, lr_at
from training.text import normalize

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on a signal, checkpoint saved, run me again"
RECORD = "run_record.json"


class StageOrderError(RuntimeError):
    """A stage was asked for whose starting weights do not exist."""


class Preempted(RuntimeError):
    """Stopped on SIGTERM/SIGUSR1/SIGINT after saving a checkpoint."""


class NonFiniteLoss(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss (checkpoint saved)."""


class WerGateFailed(RuntimeError):
    """Held-out WER above the stage's gate: a multi-stage run stops here (checkpoints kept)."""


@dataclass
class RunContext:
    recipe: Recipe
    output_dir: Path
    cache_dir: Path
    accelerator: Accelerator
    init_from: Path | None = None
    max_steps: int | None = None  # overrides every stage's max (and caps its min)
    resume: str = "auto"  # "auto": continue from the latest checkpoint; "never": refuse a used dir
    splits: dict[str, Any] = field(default_factory=dict)  # ASR: audio + transcript
    qa_splits: dict[str, Any] = field(default_factory=dict)  # spoken questions + answers (+ answer speech)
    pretrained: tuple[str, str] | None = None  # (encoder, llm) paths or hub ids
    skipped_rows: dict[str, int] = field(default_factory=dict)  # split -> bad rows left out

    def log(self, message: str) -> None:
        self.accelerator.print(message, flush=True)

    def record(self) -> dict[str, Any]:
        return read_json(self.output_dir / RECORD, default={"recipe": self.recipe.name, "stages": {}})

    def update_record(self, key: str, value: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            record = self.record()
            record["stages"][key] = value
            write_json_atomic(self.output_dir / RECORD, record)
        self.accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# Setup helpers


def resolve_precision(precision: str) -> str:
    """The recipe's precision policy as Accelerate's mixed_precision: bf16 where the hardware has
    it, fp32 on CPU (bf16 matmuls there are slow and the demo is small)."""
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "no" if precision == "fp32" else precision


def make_accelerator(recipe: Recipe, report_to: str = "none", project_dir: Path | None = None) -> Accelerator:
    """The Accelerator for this launch.

    - split_batches: the recipe's batch_size is the GLOBAL batch; each of N processes gets 1/N of
      every batch, so a run is the same computation on 1 GPU or 8 (see global_token_loss).
    - On CPU, several processes or DeepSpeed need the gloo backend (without it ranks fail or each
      acts as main); GPUs get NCCL by default.
    - Precision comes from the recipe, not the launch config (one source of truth)."""
    # DeepSpeed 0.19 still calls torch.distributed's old collective names; torch warns on every call.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    on_cpu = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or deepspeed
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and distributed else []
    # One optimizer step is always exactly grad_accum micro-batches, across epoch boundaries too.
    accumulation = GradientAccumulationPlugin(num_steps=recipe.grad_accum, sync_with_dataloader=False)
    # cpu=True turns a torchrun launch on a GPU-less machine into gloo DDP (without it each rank
    # runs alone: doubled work, no gradient averaging); DeepSpeed handles CPU itself and must not get it.
    trackers = [t for t in report_to.split(",") if t and t != "none"]
    return Accelerator(cpu=on_cpu and not deepspeed, gradient_accumulation_plugin=accumulation,
                       log_with=trackers or None, project_dir=project_dir, mixed_precision=resolve_precision(recipe.precision),
                       dataloader_config=DataLoaderConfiguration(split_batches=True), kwargs_handlers=handlers)


def check_launch(acc: Accelerator, recipe: Recipe) -> None:
    """Fail early, naming the knob, where the launch and the recipe disagree."""
    if recipe.batch_size % acc.num_processes or recipe.eval_batch_size % acc.num_processes:
        raise RecipeError(f"recipe '{recipe.name}': batch_size {recipe.batch_size} and eval_batch_size "
                              f"{recipe.eval_batch_size} are global and must divide by the {acc.num_processes} processes")
    plugin = acc.state.deepspeed_plugin if acc.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is not None:
        # The recipe owns clipping; a DeepSpeed JSON with "auto" takes it from here (Accelerate
        # would otherwise fill in 1.0), a JSON with a different number is refused.
        clip = plugin.deepspeed_config.get("gradient_clipping", "auto")
        if clip == "auto":
            plugin.deepspeed_config["gradient_clipping"] = recipe.max_grad_norm
        elif float(clip) != recipe.max_grad_norm:
            raise RecipeError(f"DeepSpeed config sets gradient_clipping {clip}, the recipe max_grad_norm "
                                  f"{recipe.max_grad_norm}: set it to \"auto\" in the JSON")


def load_data_and_pretrained(ctx: RunContext) -> None:
    """The speech splits and, for the demo, the stand-in checkpoints (built once, cached)."""
    recipe = ctx.recipe
    with ctx.accelerator.main_process_first():
        ctx.splits = data_lib.load_speech_splits(recipe.data, ctx.cache_dir, recipe.corpus_scale, log=ctx.log)
        wants_qa = any(task != "asr" and w > 0 for spec in recipe.stages for task, w in spec.task_mix.items())
        if wants_qa and recipe.data.qa_dataset is None and recipe.data.dataset is not None:
            ctx.log("no QA dataset given (--qa-dataset) beside the user ASR dataset: stages train their ASR share only")
        elif wants_qa:
            ctx.qa_splits = data_lib.load_qa_splits(recipe.data, ctx.cache_dir, recipe.corpus_scale, log=ctx.log)
        if recipe.encoder is None:
            from training.corpus import text_only_sentences
            from training.standins import QUICK_STANDINS, StandinConfig, build_standins

            config = StandinConfig() if recipe.standin_scale == "full" else QUICK_STANDINS
            # Text-only sentences of the corpus grammar (never a dev or held-out one) for the
            # stand-in LLM: a pretrained LLM knows the language, not just the ASR transcripts.
            extra = text_only_sentences(data_lib.corpus_config(recipe.corpus_scale), recipe.standin_lm_texts)
            # ...and it knows the facts the training questions ask for. The held-out questions only
            # score it (in text): the most that answering them by speech could reach.
            def qa_pairs(split: str | None) -> list[tuple[str, str]]:
                ds = ctx.qa_splits.get(split)
                return [] if ds is None else list(dict.fromkeys(zip(ds[recipe.data.question_column],
                                                                    ds[recipe.data.answer_column])))

            paths = build_standins(ctx.splits[recipe.data.train_split], ctx.cache_dir, config, log=ctx.log,
                                   extra_texts=extra, qa_pairs=qa_pairs(recipe.data.train_split),
                                   qa_heldback=qa_pairs(recipe.data.heldout_split))
            ctx.pretrained = (str(paths[0]), str(paths[1]))
        elif ctx.pretrained is None:
            ctx.pretrained = (recipe.encoder, recipe.llm)


def stage_dir(ctx: RunContext, stage: str) -> Path:
    return ctx.output_dir / stage


def initial_weights(ctx: RunContext, stage: str) -> str:
    """Where a stage starts: --init-from, else the previous stage's export, else (asr) pretrained."""
    if ctx.init_from is not None:
        if not is_omni_export(ctx.init_from):
            raise StageOrderError(f"--init-from {ctx.init_from}: not a stage export (no omni_config.json)")
        return str(ctx.init_from)
    index = STAGE_NAMES.index(stage)
    if index == 0:
        return "pretrained"
    previous = STAGE_NAMES[index - 1]
    final = stage_dir(ctx, previous) / "final"
    if is_omni_export(final):
        return str(final)
    raise StageOrderError(
        f"stage '{stage}' starts from stage '{previous}''s final checkpoint, but there is none at {final}. "
        f"Run --stage {previous} (or --stage all) first, or pass --init-from PATH to a stage export."
    )


def make_model(ctx: RunContext, source: str):
    if source == "pretrained":
        encoder, llm = ctx.pretrained
        return build_model(encoder, llm, ctx.recipe.frame_stack, ctx.recipe.adapter_hidden)
    return load_omni(source)


def encoder_key(model: OmniModel) -> str:
    """Identity of the frozen encoder's weights, for the feature cache."""
    h = hashlib.sha256(model.config.encoder.encode())
    for name, tensor in sorted(model.encoder.state_dict().items()):
        h.update(f"{name}{tuple(tensor.shape)}{float(tensor.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def dataset_name(ctx: RunContext) -> str:
    return ctx.recipe.data.dataset or data_lib.EMBEDDED


def validate_splits(ctx: RunContext, feature_extractor, max_rows: int | None) -> dict[str, data_lib.ValidationReport]:
    """Check rows of every split before any encoding (all rows, or max_rows spread over each).
    Bad rows stop the run naming them, unless the data spec says to skip them."""
    spec, sr, window = ctx.recipe.data, feature_extractor.sampling_rate, feature_extractor.n_samples
    reports = {}
    checks = [(f"dataset '{dataset_name(ctx)}', split '{s}'", ds, data_lib.asr_row_check(spec, sr, window))
              for s, ds in ctx.splits.items()]
    checks += [(f"dataset '{qa_dataset_name(ctx)}', split '{s}'", ds, data_lib.qa_row_check(spec, sr, window))
               for s, ds in ctx.qa_splits.items()]
    for where, ds, check in checks:
        report = data_lib.validate_split(ds, where, check, max_rows)
        ctx.log(report.summary(sr))
        if report.bad and not spec.skip_bad_rows:
            shown = "\n  ".join(report.bad[:10])
            raise data_lib.DataError(f"{len(report.bad)} bad rows in {report.where} (of {report.checked:,} checked):\n  "
                                     f"{shown}\nFix them, or pass --skip-bad-rows to leave them out (they are counted)")
        reports[where] = report
    return reports


def qa_dataset_name(ctx: RunContext) -> str:
    return ctx.recipe.data.qa_dataset or data_lib.EMBEDDED_QA


def validate_only(ctx: RunContext) -> int:
    """--validate-data: every row of every split, then exit (0 clean or skipping, 2 bad rows)."""
    from transformers import WhisperFeatureExtractor

    try:
        load_data_and_pretrained(ctx)
        source = ctx.init_from if ctx.init_from is not None else ctx.pretrained[0]
        reports = validate_splits(ctx, WhisperFeatureExtractor.from_pretrained(source), max_rows=None)
    except data_lib.DataError as err:
        ctx.log(f"error: {err}")
        return 2
    bad = sum(len(r.bad) for r in reports.values())
    for report in reports.values():
        for message in report.bad[:20]:
            ctx.log(f"  skipped: {message}")
    ctx.log(f"data valid: {sum(r.checked for r in reports.values()):,} rows checked"
            + (f", {bad} bad rows would be left out (--skip-bad-rows)" if bad else ", no bad rows"))
    return 0


def prepare_only(ctx: RunContext) -> int:
    """--prepare: check a sample of every split, encode all of them into the feature cache and exit
    (0, or 2 on bad data). The frozen encoder and the tokenizer are the same in all three stages,
    so one preparation serves the whole run; the stages then load the cache and encode nothing."""
    try:
        load_data_and_pretrained(ctx)
        model, tokenizer, feature_extractor = make_model(ctx, str(ctx.init_from) if ctx.init_from else "pretrained")
        validate_splits(ctx, feature_extractor, ctx.recipe.data.validate_rows)
        prepared = prepared_splits(ctx, model, feature_extractor, tokenizer)
    except data_lib.DataError as err:
        ctx.log(f"error: {err}")
        return 2
    ctx.log("prepared: " + ", ".join(f"{name} {len(ds):,} rows" for name, ds in prepared.items())
            + f"; features cached in {ctx.cache_dir / 'features'}")
    return 0


def prepared_splits(ctx: RunContext, model: OmniModel, feature_extractor, tokenizer) -> dict[str, Any]:
    key = encoder_key(model)
    out = {}
    with ctx.accelerator.main_process_first():
        for split, ds in ctx.splits.items():
            out[split] = data_lib.prepare_split(
                ds, f"dataset '{dataset_name(ctx)}', split '{split}'", ctx.recipe.data, feature_extractor, tokenizer,
                encode=model.encode, encoder_key=key, n_mel_frames=model.n_mel_frames, cache_dir=ctx.cache_dir / "features",
            )
            if len(out[split]) < len(ds):
                ctx.skipped_rows[split] = len(ds) - len(out[split])
                ctx.log(f"split '{split}': left out {ctx.skipped_rows[split]} bad rows of {len(ds):,} (--skip-bad-rows)")
        for split, ds in ctx.qa_splits.items():
            name = f"qa:{split}"
            out[name] = data_lib.prepare_qa_split(
                ds, f"dataset '{qa_dataset_name(ctx)}', split '{split}'", ctx.recipe.data, feature_extractor, tokenizer,
                encode=model.encode, encoder_key=key, n_mel_frames=model.n_mel_frames, cache_dir=ctx.cache_dir / "features",
            )
            if len(out[name]) < len(ds):
                ctx.skipped_rows[name] = len(ds) - len(out[name])
                ctx.log(f"split '{name}': left out {ctx.skipped_rows[name]} bad rows of {len(ds):,} (--skip-bad-rows)")
    return out


def optimizer_groups(model: OmniModel, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only; no decay on norms, biases and embeddings; no empty groups."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = "embed_tokens" in name or "lm_head" in name
        (no_decay if param.ndim < 2 or is_embedding else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# Per-step statistics, summed over micro-batches and then over ranks in ONE all-reduce:
# [loss share, CE sum per stream (8), tokens per stream (8), CE sum per task, tokens per task,
#  real positions, all positions]
STEP_STATS = 1 + 2 * N_STREAMS + 2 * len(TASKS) + 2
STREAM_NAMES = tuple(f"audio{i}" for i in range(N_STREAMS - 1)) + ("text",)


def micro_batch_stats(loss: torch.Tensor, out: dict[str, torch.Tensor], batch: dict[str, Any], grad_accum: int) -> torch.Tensor:
    row_sums, row_counts = out["row_loss_sum"].detach(), out["row_count"]
    task_onehot = torch.nn.functional.one_hot(batch["task_ids"].to(row_sums.device), len(TASKS)).float()  # [B, tasks]
    attention = batch["attention_mask"]
    return torch.cat([
        (loss.detach().float() / grad_accum)[None], row_sums.sum(0), row_counts.sum(0),
        task_onehot.T @ row_sums.sum(-1), task_onehot.T @ row_counts.sum(-1),
        attention.sum().float()[None], torch.tensor([float(attention.numel())], device=row_sums.device),
    ])


def step_metrics(stats: torch.Tensor, num_processes: int) -> dict[str, float]:
    """Readable metrics from the all-reduced STEP_STATS of one optimizer step."""
    values = stats.tolist()
    loss, rest = values[0] / num_processes, values[1:]
    stream_sums, stream_counts = rest[:N_STREAMS], rest[N_STREAMS:2 * N_STREAMS]
    rest = rest[2 * N_STREAMS:]
    task_sums, task_counts, (real, positions) = rest[:len(TASKS)], rest[len(TASKS):2 * len(TASKS)], rest[-2:]
    out = {"loss": loss}
    out |= {f"loss_{n}": s / c for n, s, c in zip(STREAM_NAMES, stream_sums, stream_counts) if c}
    out |= {f"loss_task_{n}": s / c for n, s, c in zip(TASKS, task_sums, task_counts) if c}
    out |= {"tokens": real, "padding": 1.0 - real / positions}
    return out


class StopSignals:
    """SIGTERM/SIGUSR1 (and a first SIGINT) ask the loop to checkpoint and exit after this step;
    a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
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


def recipe_fingerprint(recipe: Recipe, spec: StageSpec) -> dict[str, Any]:
    """The fields a resumed stage must share with the run that wrote the checkpoint."""
    fields = recipe.to_dict()
    fields.pop("stages")
    fields["stage"] = json.loads(json.dumps(dataclasses.asdict(spec)))
    return fields


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# ---------------------------------------------------------------------------------------------
# The stage


def effective_spec(ctx: RunContext, stage: str) -> StageSpec:
    spec = ctx.recipe.stage(stage)
    if ctx.max_steps is not None:
        spec = dataclasses.replace(spec, max_steps=ctx.max_steps, min_steps=min(spec.min_steps, ctx.max_steps),
                                   warmup_steps=min(spec.warmup_steps, ctx.max_steps - 1))
    return spec


class StageRun:
    """One stage, torchtune-style: ``setup()`` builds everything and resumes, ``train()`` runs the
    loop, ``finish()`` exports, evaluates and records. ``run()`` does all three."""

    def __init__(self, ctx: RunContext, stage: str) -> None:
        self.ctx = ctx
        self.stage = stage
        self.spec = effective_spec(ctx, stage)
        self.dir = stage_dir(ctx, stage)
        self.checkpoints = StageCheckpoints(self.dir, ctx.recipe.keep_last)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.stop_reason = "max_steps"
        self.majority_answer_accuracy: float | None = None  # baselines, set up with the QA loaders
        self.majority_code_accuracy: float | None = None

    def log(self, message: str) -> None:
        self.ctx.log(f"[{self.stage}] {message}")

    def completed(self) -> dict[str, Any] | None:
        done = self.ctx.record()["stages"].get(self.stage)
        return done if done and done.get("complete") and is_omni_export(self.dir / "final") else None

    def run(self) -> dict[str, Any]:
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
        self.started = time.time()
        self.source = initial_weights(ctx, self.stage)
        check_launch(acc, recipe)
        set_seed(recipe.seed)
        model, self.tokenizer, self.feature_extractor = make_model(ctx, self.source)
        set_trainable(model, spec.trainable, spec.train_text_specials)
        for module, (total, trainable) in parameter_summary(model).items():
            self.log(f"{module:<8} {total:>12,} params, {trainable:>12,} trainable")
        validate_splits(ctx, self.feature_extractor, recipe.data.validate_rows)  # a sample of big splits
        prepared = prepared_splits(ctx, model, self.feature_extractor, self.tokenizer)
        layout, k = model.layout, recipe.frame_stack
        train_set = prepared[recipe.data.train_split]
        qa_train, qa_heldout = prepared.get(f"qa:{recipe.data.train_split}"), prepared.get(f"qa:{recipe.data.heldout_split}")
        if set(spec.task_mix) != {"asr"}:
            train_set = data_lib.TaskMixture(train_set, qa_train, dict(spec.task_mix), recipe.seed, k)
            counts = collections.Counter(TASKS[t] for t in train_set.items[:, 0])
            self.log("task mix: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()) + " items per epoch"
                     + (f" (no data for {', '.join(train_set.dropped)})" if train_set.dropped else ""))
        train_dl = data_lib.train_loader(train_set, layout, k, recipe.batch_size, recipe.seed, recipe.num_workers)
        eval_names = [recipe.data.heldout_split] + ([recipe.data.dev_split] if recipe.data.dev_split else [])
        eval_dls = {s: data_lib.eval_loader(prepared[s], layout, k, recipe.eval_batch_size) for s in eval_names}
        qa_dls = {}
        if qa_heldout is not None:  # stage-boundary QA scores: text answers, and the answer speech
            qa_dls["answer"] = data_lib.eval_loader(qa_heldout, layout, k, recipe.eval_batch_size, task="a1t2")
            # the accuracy of always giving the most frequent training answer: the floor a model
            # that hears nothing of the question reaches
            if qa_train is not None:
                commonest = collections.Counter(normalize(a) for a in qa_train["answer"]).most_common(1)[0][0]
                self.majority_answer_accuracy = float(np.mean([normalize(a) == commonest for a in qa_heldout["answer"]]))
            if int(np.max(qa_heldout["n_codes"])) > 0:
                qa_dls["speech"] = data_lib.eval_loader(qa_heldout, layout, k, recipe.eval_batch_size, task="a1a2")
                # the accuracy of always answering each layer's most frequent held-out code: a
                # codec (e.g. the random-weight one) may use few codes, so chance alone flatters
                codes = np.concatenate([np.asarray(c).reshape(-1, N_AUDIO_LAYERS) for c in qa_heldout["codes"]])
                self.majority_code_accuracy = float(np.mean([np.bincount(codes[:, i]).max() / len(codes)
                                                             for i in range(codes.shape[1])]))
        self.early_stop_split = recipe.data.dev_split or recipe.data.heldout_split

        # fused AdamW: one kernel over all tensors (5x faster than the per-tensor loop on CPU)
        optimizer = torch.optim.AdamW(optimizer_groups(model, recipe.weight_decay), lr=lr_at(spec, 0),
                                      betas=recipe.adam_betas, fused=True)
        self.model, self.optimizer, self.train_dl = acc.prepare(model, optimizer, train_dl)
        self.eval_dls = {s: acc.prepare(dl) for s, dl in eval_dls.items()}
        self.qa_dls = {s: acc.prepare(dl) for s, dl in qa_dls.items()}

        if self.source == "pretrained" and "before" not in ctx.record()["stages"]:
            self.log("evaluating the untrained pipeline")
            ctx.update_record("before", {"complete": True, "heldout_loss": self.heldout_loss(),
                                         "wer": self.evaluate_wer(), **self.evaluate_qa()})

        self.fingerprint = recipe_fingerprint(recipe, spec)
        self.state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best_eval": math.inf, "evals_since_best": 0,
                      "seconds": 0.0, "losses": [], "skipped_steps": 0, "nonfinite_in_a_row": 0,
                      "recipe": self.fingerprint}
        self.resume()

    def resume(self) -> None:
        latest = self.checkpoints.latest()
        if latest is None:
            return
        if self.ctx.resume == "never":
            raise StageOrderError(f"[{self.stage}] {self.dir} already holds checkpoints and --resume never was given; "
                                  f"use a new --output-dir or --resume auto")
        saved = read_json(latest / TRAINER_STATE)
        diffs = changed_fields(saved["recipe"], self.fingerprint)
        if diffs:
            raise StageOrderError(f"[{self.stage}] refusing to resume from {latest}: the recipe changed:\n  " + "\n  ".join(diffs))
        self.state = self.checkpoints.load(self.ctx.accelerator, latest)
        self.log(f"resumed from {latest} at step {self.state['step']}")

    # -- train ---------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.state["seconds"] + time.time() - self.started

    def save_checkpoint(self) -> None:
        self.checkpoints.save(self.ctx.accelerator, self.state["step"], {**self.state, "seconds": self.elapsed()})

    def next_batch(self) -> dict[str, Any]:
        batch = next(self.batches, None)
        if batch is None:  # epoch boundary: a fresh length-grouped order
            self.state["epoch"] += 1
            self.state["batches_in_epoch"] = 0
            self.train_dl.set_epoch(self.state["epoch"])
            self.batches = iter(self.train_dl)
            batch = next(self.batches)
        self.state["batches_in_epoch"] += 1
        return batch

    def train(self) -> None:
        try:
            self._train()
        finally:
            self.batches = None  # let the loader's worker go now: a live iterator can hold the exit

    def _train(self) -> None:
        recipe, spec, acc, state = self.ctx.recipe, self.spec, self.ctx.accelerator, self.state
        model, optimizer = self.model, self.optimizer
        if acc.is_main_process:  # drop log lines past the step we resumed at
            self.dir.mkdir(parents=True, exist_ok=True)
            lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
            self.metrics_path.write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= state["step"]))
        self.log(f"training steps {state['step']}..{spec.max_steps} (min {spec.min_steps}), "
                 f"LR {spec.lr_init:g} -> {spec.lr_peak:g}, trains {'+'.join(spec.trainable)}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.train_dl.set_epoch(state["epoch"])
        skip = state["batches_in_epoch"]
        self.batches = iter(acc.skip_first_batches(self.train_dl, skip) if skip else self.train_dl)
        window: list[float] = []
        clock = time.time()
        # A progress bar where someone watches (a terminal); log lines every log_every steps always.
        bar = tqdm(total=spec.max_steps, initial=state["step"], desc=self.stage, unit="step", dynamic_ncols=True,
                   disable=None if acc.is_local_main_process else True)
        with StopSignals() as signals, bar:
            while state["step"] < spec.max_steps:
                step_clock = time.time()
                lr = lr_at(spec, state["step"])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                stats = self.accumulate_step()
                grad_norm = None
                if stats is not None:
                    if recipe.max_grad_norm > 0:  # DeepSpeed clips inside its step (the value is the recipe's)
                        grad_norm = acc.clip_grad_norm_(trainable, recipe.max_grad_norm)
                    optimizer.step()
                optimizer.zero_grad()
                if stats is None:
                    self.skipped_step(signals)
                    continue
                state["nonfinite_in_a_row"] = 0
                metrics = step_metrics(acc.reduce(stats, reduction="sum") if acc.num_processes > 1 else stats,
                                       acc.num_processes)
                if grad_norm is None and hasattr(model, "get_global_grad_norm"):  # DeepSpeed engine
                    grad_norm = model.get_global_grad_norm()
                now = time.time()
                metrics |= {"lr": lr, "tokens_per_s": metrics["tokens"] / max(now - step_clock, 1e-9)}
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                loss = metrics["loss"]
                state["step"] += 1
                state["tokens"] = state.get("tokens", 0) + int(metrics["tokens"])
                state["losses"].append(loss)
                window.append(loss)
                if acc.is_main_process:
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps({"step": state["step"], **metrics}) + "\n")
                acc.log({f"{self.stage}/train/{k}": v for k, v in metrics.items()}, step=state["step"])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                if state["step"] % recipe.log_every == 0 or state["step"] == spec.max_steps:
                    rate = len(window) / (time.time() - clock)
                    self.log(f"step {state['step']:>6}/{spec.max_steps}  loss {sum(window) / len(window):.4f}  "
                             f"lr {lr:.2e}  {rate:.1f} steps/s")
                    window, clock = [], time.time()
                if state["step"] % spec.eval_every == 0 and self.early_stopping():
                    break
                if state["step"] % recipe.save_every == 0:
                    self.save_checkpoint()
                if signals.requested:
                    self.save_checkpoint()
                    self.log(f"{signals.requested}: checkpoint saved at step {state['step']}; "
                             f"exiting with {REQUEUE_EXIT_CODE} (rerun the same command to resume)")
                    raise Preempted(signals.requested)
        self.log(f"stopped at step {state['step']} ({self.stop_reason})")

    def global_token_loss(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """This rank's share of the global batch's loss, and whether the global loss is finite.

        The loss is each stream's CE summed over its tokens on ALL ranks divided by the stream's
        global token count, averaged over streams. Each rank divides its own sums by the global
        counts (one all-reduce of 9 numbers) and scales by N, because DDP and DeepSpeed average
        gradients over ranks: the update then equals the 1-process one on the same global batch,
        whatever the split of tokens between ranks."""
        acc = self.ctx.accelerator
        sums, counts = out["row_loss_sum"].sum(0), out["row_count"].sum(0)
        bad = (~torch.isfinite(sums.detach()).all()).float()[None]
        reduced = acc.reduce(torch.cat([counts, bad]), reduction="sum") if acc.num_processes > 1 else torch.cat([counts, bad])
        global_counts, finite = reduced[:-1], bool(reduced[-1] == 0)
        present = global_counts > 0
        if not bool(present.any()):
            return out["loss"] * 0.0, finite
        share = (sums[present] / global_counts[present]).sum() / present.sum() * acc.num_processes
        return share, finite

    def accumulate_step(self) -> torch.Tensor | None:
        """Forward/backward over grad_accum micro-batches. Returns this rank's step statistics
        (see STEP_STATS), or None if a micro-batch had a non-finite loss: the step is then
        skipped (its data is consumed, no update is applied)."""
        acc, model = self.ctx.accelerator, self.model
        stats: torch.Tensor | None = torch.zeros(STEP_STATS, device=acc.device)
        done = 0
        for _ in range(self.ctx.recipe.grad_accum):
            batch = self.next_batch()
            with acc.accumulate(model):  # entered every micro-step: Accelerate counts them for sync
                if stats is None:
                    continue
                out = model(**model_inputs(batch))
                loss, finite = self.global_token_loss(out)
                if not finite:
                    if done and acc.distributed_type == DistributedType.DEEPSPEED:
                        # DeepSpeed's engine already holds this step's partial gradients and has no
                        # way to drop them: stop rather than apply a corrupted update.
                        raise NonFiniteLoss(f"[{self.stage}] non-finite loss in micro-batch {done + 1} of step "
                                            f"{self.state['step'] + 1} under DeepSpeed with grad_accum > 1; "
                                            f"the last checkpoint is intact")
                    stats = None
                    continue
                acc.backward(loss)
                done += 1
                stats += micro_batch_stats(loss, out, batch, self.ctx.recipe.grad_accum)
        return stats

    def skipped_step(self, signals: StopSignals) -> None:
        state, patience = self.state, self.ctx.recipe.nonfinite_patience
        state["skipped_steps"] += 1
        state["nonfinite_in_a_row"] += 1
        self.log(f"step {state['step'] + 1}: non-finite loss, update skipped "
                 f"({state['nonfinite_in_a_row']} in a row, {state['skipped_steps']} in this stage)")
        if state["nonfinite_in_a_row"] >= patience or signals.requested:
            self.save_checkpoint()
        if state["nonfinite_in_a_row"] >= patience:
            raise NonFiniteLoss(f"[{self.stage}] {patience} steps in a row had a non-finite loss (step {state['step']}); "
                                f"checkpoint saved in {self.dir}. Lower the LR peak, check the data, or use fp32.")
        if signals.requested:
            raise Preempted(signals.requested)

    def early_stopping(self) -> bool:
        """Evaluate the early-stop split; True once it has been flat for `patience` evals past min_steps."""
        state, spec = self.state, self.spec
        loss = self.heldout_loss(self.early_stop_split)
        improved = loss < state["best_eval"] - 1e-4
        state["best_eval"] = min(state["best_eval"], loss)
        state["evals_since_best"] = 0 if improved else state["evals_since_best"] + 1
        self.log(f"step {state['step']}: {self.early_stop_split} loss {loss:.4f} (best {state['best_eval']:.4f})")
        self.ctx.accelerator.log({f"{self.stage}/eval/{self.early_stop_split}_loss": loss}, step=state["step"])
        if state["step"] >= spec.min_steps and state["evals_since_best"] >= spec.early_stop_patience:
            self.stop_reason = f"early stop: {self.early_stop_split} loss flat for {spec.early_stop_patience} evals"
            return True
        return False

    # -- evaluation and export -----------------------------------------------------------------

    def heldout_loss(self, split: str | None = None) -> float:
        return heldout_loss(self.ctx.accelerator, self.model, self.eval_dls[split or self.ctx.recipe.data.heldout_split])

    def evaluate_wer(self) -> dict[str, Any]:
        out = {}
        for split, loader in self.eval_dls.items():
            scores, pairs = evaluate_wer(self.ctx.accelerator, self.model, loader, self.tokenizer, self.ctx.recipe.max_new_tokens)
            out[split] = scores
            for ref, hyp in pairs[:2]:
                self.log(f"[{split}] ref: {ref}")
                self.log(f"[{split}] hyp: {hyp}")
        return out

    def evaluate_qa(self) -> dict[str, Any]:
        """Held-out spoken questions: A1T2 answer accuracy and, with answer speech, the audio
        layers' teacher-forced code accuracy and CE (chance: 1/4096)."""
        out = {}
        acc = self.ctx.accelerator
        if "answer" in self.qa_dls:
            scores, pairs = answer_accuracy(acc, self.model, self.qa_dls["answer"], self.tokenizer,
                                            self.ctx.recipe.max_new_tokens)
            out["answer"] = scores
            if self.majority_answer_accuracy is not None:
                out["answer"]["majority"] = self.majority_answer_accuracy
            for ref, hyp in pairs[:2]:
                self.log(f"[answer] ref: {ref}  hyp: {hyp}")
        if "speech" in self.qa_dls:
            out["audio_tokens"] = audio_token_scores(acc, self.model, self.qa_dls["speech"])
            out["audio_tokens"]["majority"] = self.majority_code_accuracy
        return out

    def export(self) -> Path:
        """Stage-final weights in Hugging Face form, written atomically."""
        acc = self.ctx.accelerator
        final_dir = self.dir / "final"
        state_dict = acc.get_state_dict(self.model)  # gathers ZeRO-3 shards: every process takes part
        if acc.is_main_process:
            part = lambda prefix: {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}  # noqa: E731
            with atomic_dir(final_dir) as tmp:
                save_omni(acc.unwrap_model(self.model), tmp, self.tokenizer, self.feature_extractor,
                          llm_state=part("llm."), adapter_state=part("adapter."))
        acc.wait_for_everyone()
        return final_dir

    def finish(self) -> dict[str, Any]:
        """Export first (a crash in evaluation must not lose the weights), then WER, record, gate."""
        recipe, spec = self.ctx.recipe, self.spec
        final_dir = self.export()
        self.save_checkpoint()
        tail = self.state["losses"][-recipe.log_every:]
        wer = self.evaluate_wer()
        result = {
            "complete": True, "steps": self.state["step"], "stop_reason": self.stop_reason,
            "final_train_loss": sum(tail) / max(1, len(tail)), "heldout_loss": self.heldout_loss(), "wer": wer,
            **self.evaluate_qa(),
            "seconds": round(self.elapsed(), 1), "export": str(final_dir), "tokens": self.state.get("tokens", 0),
            "skipped_steps": self.state["skipped_steps"], "skipped_rows": dict(self.ctx.skipped_rows),
        }
        self.ctx.update_record(self.stage, result)
        write_run_report(self.ctx)
        boundary = {f"{self.stage}/eval/wer_{split}": v["wer"] for split, v in wer.items()}
        if "answer" in result:
            boundary[f"{self.stage}/eval/answer_accuracy"] = result["answer"]["accuracy"]
        if "audio_tokens" in result:
            boundary[f"{self.stage}/eval/audio_token_accuracy"] = result["audio_tokens"]["accuracy"]
            boundary[f"{self.stage}/eval/audio_token_ce"] = result["audio_tokens"]["ce"]
        self.ctx.accelerator.log(boundary | {f"{self.stage}/eval/heldout_loss": result["heldout_loss"]}, step=self.state["step"])
        self.log("done: " + ", ".join(f"{s} WER {v['wer']:.3f}" for s, v in wer.items())
                 + (f", answer accuracy {result['answer']['accuracy']:.3f}" if "answer" in result else "")
                 + (f", audio-token accuracy {result['audio_tokens']['accuracy']:.3f}" if "audio_tokens" in result else ""))
        heldout = wer[recipe.data.heldout_split]["wer"]
        if spec.max_wer is not None and heldout > spec.max_wer:
            raise WerGateFailed(
                f"[{self.stage}] {recipe.data.heldout_split} WER {heldout:.3f} is above the stage's gate {spec.max_wer:.3f}; "
                f"stopping here (the checkpoint and export in {self.dir} are kept)"
            )
        return result


def write_run_report(ctx: RunContext) -> None:
    """report.md + plots in the run directory (main process). A failure here never costs the run."""
    if not ctx.accelerator.is_main_process:
        return
    try:
        ctx.log(f"report: {write_report(ctx.output_dir, ctx.recipe)}")
    except Exception as err:  # noqa: BLE001 - the weights and record are already safe on disk
        ctx.log(f"warning: could not write the run report: {type(err).__name__}: {err}")


def run_stage(ctx: RunContext, stage: str) -> dict[str, Any]:
    return StageRun(ctx, stage).run()


def format_wer_table(record: dict[str, Any], splits: list[str]) -> str:
    """WER per split, and (with QA data) answer accuracy and audio-token accuracy, per boundary."""
    entries = [(key, record["stages"][key]) for key in ("before", *STAGE_NAMES) if record["stages"].get(key)]
    qa = any("answer" in e for _, e in entries)
    header = f"{'after':<8}" + "".join(f"{s + ' WER':>14}" for s in splits)
    if qa:
        header += f"{'answer acc':>12}{'audio acc':>11}"
    rows = [header + f"{'steps':>8}{'seconds':>9}"]
    percent = lambda value, width: f"{value * 100:>{width - 1}.1f}%"  # noqa: E731
    for key, entry in entries:
        cells = "".join(percent(entry["wer"][s]["wer"], 14) if s in entry["wer"] else f"{'-':>14}" for s in splits)
        if qa:
            cells += percent(entry["answer"]["accuracy"], 12) if "answer" in entry else f"{'-':>12}"
            cells += percent(entry["audio_tokens"]["accuracy"], 11) if "audio_tokens" in entry else f"{'-':>11}"
        rows.append(f"{key:<8}{cells}{entry.get('steps', 0):>8}{entry.get('seconds', 0):>9.0f}")
    return "\n".join(rows)
