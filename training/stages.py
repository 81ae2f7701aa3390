"""The stage table and recipes: the one source of truth for every training number.

This module imports nothing of the project, so the table can be read (``run.py --help``,
tests, docs) without building a model. Recipe files (JSON overrides) are read by training/recipe_file.py.

The seed numbers (steps, initial and peak LR) are Mini-Omni's published recipe:

    stage   steps            initial LR   peak LR
    asr     10,000-20,000    4e-6         1e-3
    second  20,000-30,000    4e-6         4e-4
    final   50,000-60,000    4e-6         4e-4
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

STAGE_NAMES: tuple[str, ...] = ("asr", "second", "final")
MODULES: tuple[str, ...] = ("encoder", "adapter", "llm")
TASKS: tuple[str, ...] = ("asr", "a1t2", "t1t2", "a1a2", "t1a2")
# How a local dataset folder is read (data.format; training/data/formats.py): "auto" recognizes it.
DATA_FORMATS: tuple[str, ...] = ("auto", "shards", "save_to_disk", "audiofolder", "manifests", "data_files")


class RecipeError(ValueError):
    """A recipe (built-in or from a file) is malformed; the message names the field."""


@dataclass(frozen=True)
class StageSpec:
    """One row of the stage table."""

    name: str
    description: str
    min_steps: int  # a stage always trains at least this many optimizer steps
    max_steps: int  # ... and at most this many; the LR schedule spans max_steps
    lr_init: float  # LR at step 0; warm-up rises linearly from here to lr_peak
    lr_peak: float
    warmup_steps: int
    lr_floor: float  # cosine decay ends here at max_steps
    trainable: tuple[str, ...]  # modules whose weights this stage updates
    # Train the LLM's 64 new text-special rows (eot, asr, ...) in the embedding and output layer
    # even when the LLM is frozen (a gradient mask keeps every other row fixed). Without it a
    # frozen LLM can never emit Mini-Omni's eot, a row it did not have when pretrained.
    train_text_specials: bool
    task_mix: Mapping[str, float]  # task -> sampling weight
    eval_every: int  # held-out loss every N steps (early-stop signal)
    early_stop_patience: int  # evals without improvement before stopping (after min_steps)
    max_wer: float | None  # held-out WER gate at the stage boundary; None = no gate
    # gate on the free-running spoken-answer accuracy (evaluation/spoken.py) of every speech-out
    # task the stage trains; None = no gate
    min_spoken_accuracy: float | None = None

    def validate(self) -> None:
        where = f"stage '{self.name}'"
        if self.name not in STAGE_NAMES:
            raise RecipeError(f"{where}: name must be one of {STAGE_NAMES}")
        if not 0 < self.min_steps <= self.max_steps:
            raise RecipeError(f"{where}: need 0 < min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise RecipeError(f"{where}: warmup_steps must be in [0, max_steps), got {self.warmup_steps}")
        if not 0 < self.lr_init <= self.lr_peak or not 0 < self.lr_floor <= self.lr_peak:
            raise RecipeError(f"{where}: need 0 < lr_init, lr_floor <= lr_peak")
        unknown = set(self.trainable) - set(MODULES) | ({"encoder"} & set(self.trainable))
        if unknown or not self.trainable:
            raise RecipeError(
                f"{where}: trainable must be a non-empty subset of ('adapter', 'llm'), got {self.trainable}"
            )
        bad_tasks = set(self.task_mix) - set(TASKS)
        if (
            bad_tasks
            or not self.task_mix
            or any(w < 0 for w in self.task_mix.values())
            or sum(self.task_mix.values()) <= 0
        ):
            raise RecipeError(
                f"{where}: task_mix must map tasks {TASKS} to non-negative weights, got {dict(self.task_mix)}"
            )
        if self.eval_every <= 0 or self.early_stop_patience <= 0:
            raise RecipeError(f"{where}: eval_every and early_stop_patience must be positive")
        if self.min_spoken_accuracy is not None and not 0 <= self.min_spoken_accuracy <= 1:
            raise RecipeError(f"{where}: min_spoken_accuracy is a fraction in [0, 1] (or null)")


def warmup_cosine(
    step: int, warmup_steps: int, total_steps: int, lr_init: float, lr_peak: float, lr_floor: float
) -> float:
    """The one LR schedule, a pure function of the optimizer step (so resuming needs only the step).

    Linear warm-up from lr_init to lr_peak over warmup_steps, then cosine decay to lr_floor at
    total_steps; constant at lr_floor afterwards.
    """
    if step < warmup_steps:
        return lr_init + (lr_peak - lr_init) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return lr_floor + 0.5 * (lr_peak - lr_floor) * (1.0 + math.cos(math.pi * progress))


def lr_at(stage: StageSpec, step: int) -> float:
    """A stage's LR at an optimizer step: its row's warm-up and decay over max_steps."""
    return warmup_cosine(step, stage.warmup_steps, stage.max_steps, stage.lr_init, stage.lr_peak, stage.lr_floor)


# The seed table. Warm-up, floor, eval cadence, patience, task mix and gates are ours; the
# step ranges and learning rates are the published ones and must not change.
SEED_STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        name="asr",
        description="modality alignment: adapter learns to feed speech to the frozen LLM",
        min_steps=10_000,
        max_steps=20_000,
        lr_init=4e-6,
        lr_peak=1e-3,
        warmup_steps=1_000,
        lr_floor=4e-6,
        trainable=("adapter",),
        train_text_specials=True,
        task_mix={"asr": 1.0},
        eval_every=1_000,
        early_stop_patience=3,
        max_wer=None,
    ),
    StageSpec(
        name="second",
        description="adaption: LLM learns to answer from speech features (ASR kept in the mix)",
        min_steps=20_000,
        max_steps=30_000,
        lr_init=4e-6,
        lr_peak=4e-4,
        warmup_steps=1_000,
        lr_floor=4e-6,
        trainable=("llm",),
        train_text_specials=False,
        task_mix={"asr": 0.5, "a1t2": 0.35, "t1t2": 0.15},
        eval_every=1_000,
        early_stop_patience=3,
        max_wer=None,
    ),
    StageSpec(
        name="final",
        description="multimodal finetuning: adapter + LLM (encoder stays frozen)",
        min_steps=50_000,
        max_steps=60_000,
        lr_init=4e-6,
        lr_peak=4e-4,
        warmup_steps=1_000,
        lr_floor=4e-6,
        trainable=("adapter", "llm"),
        train_text_specials=False,
        task_mix={"asr": 0.4, "a1t2": 0.15, "t1t2": 0.05, "a1a2": 0.2, "t1a2": 0.2},
        eval_every=2_000,
        early_stop_patience=3,
        max_wer=None,
    ),
)


@dataclass(frozen=True)
class DataSpec:
    """Where the speech comes from. dataset=None means the embedded synthesized corpus."""

    # A folder or file in any format training/data/formats.py reads, or a hub id; several, each
    # "where[:weight]", are mixed by weight (training/data/mixing.py).
    dataset: str | tuple[str, ...] | None = None
    # How each local dataset folder is read: "auto" (recognized; a folder two formats fit equally
    # well is refused, both named) or one of DATA_FORMATS. The QA dataset is always recognized.
    format: str = "auto"
    # Splits by name; None = recognized by their common names (train; heldout/test/validation/dev;
    # dev/validation/valid), or, when absent, a seeded slice of train (training/data/splits.py).
    # The held-out split is never read during training; early stopping reads the dev split, and
    # dev_split "none" turns early stopping off.
    train_split: str | None = None
    heldout_split: str | None = None  # WER gate; for the demo: voices AND sentences never trained on
    dev_split: str | None = None
    carve_fraction: float = 0.05  # share of train held out as a missing split (at least 1 row) ...
    carve_max_rows: int = 500  # ... and at most this many
    # Columns by name; None = recognized by their common names (training/data/columns.py).
    audio_column: str | None = None
    text_column: str | None = None
    max_eval_examples: int | None = None  # subsample eval splits (None = all)
    # Spoken question answering (tasks a1t2, t1t2, a1a2, t1a2): None = the embedded QA corpus;
    # "none" = no QA data (stages train their ASR share only); else a save_to_disk folder or hub
    # id in our schema or VoiceAssistant-400K's (question, question_audio, answer, answer_snac).
    qa_dataset: str | None = None
    question_column: str = "question"
    question_audio_column: str = "question_audio"
    answer_column: str = "answer"
    answer_snac_column: str = "answer_snac"  # "# c1 ... c7 # ..." per row, or
    answer_audio_column: str = "answer_audio"  # ... answer speech, encoded with the codec below
    codec: str | None = None  # SNAC 24 kHz checkpoint (path or hub id); None = seeded random weights
    # Transcribes the free-running answer speech at the boundary (evaluation/speech_judge.py): a
    # Whisper checkpoint (path or hub id) or "self" (the run's own model in ASR mode); None = the
    # code judge only. Needs a real codec above to mean anything.
    speech_judge: str | None = None
    # The frozen encoder's states for the training splits: "cache" (computed once, stored: fast
    # steps, ~276 MB per hour of speech for whisper-small in bf16), "step" (computed in each training
    # step from log-mel made by the loader: no cache, flat memory, the encoder's forward in every
    # step), or "auto": "step" for an encoder the user gives (--encoder, --init-from) or for at least
    # encode_in_step_rows training rows, else "cache" (the demo). Evaluation splits are always cached.
    encoder_states: str = "auto"
    encode_in_step_rows: int = 20_000
    feature_cache_dtype: str = "bf16"  # cached states in "bf16" (half the disk) or "fp32"
    validate_rows: int = 1_000  # rows per split checked before a stage starts (spread evenly; all if fewer)
    skip_bad_rows: bool = False  # drop (and count) rows that fail the checks instead of stopping


@dataclass(frozen=True)
class Recipe:
    """A full training recipe: the stage table plus every other knob."""

    name: str
    stages: tuple[StageSpec, ...]
    encoder: str | None  # path or hub id of a Whisper checkpoint; None = build demo stand-ins
    llm: str | None  # path or hub id of a Qwen2 checkpoint; None = build demo stand-ins
    data: DataSpec = field(default_factory=DataSpec)
    frame_stack: int = 1  # encoder frames stacked into one adapter input (Mini-Omni uses 1)
    adapter_hidden: int | None = None  # gated-MLP width; None = 4 x LLM hidden size
    batch_size: int = 8  # GLOBAL rows per micro-step, split across processes (same run on 1 or N)
    # Micro-batches by positions instead (data/packing.py): up to this many per process and
    # micro-step, rows of similar length padded, or with `packing` all in one row, attention kept
    # within each sample. None = batch_size rows. "auto": the most that fit the GPU's memory beside
    # the model states (model/memory.py; the run prints its choice and the figures behind it).
    tokens_per_micro_batch: int | str | None = None
    # GiB per process that "auto" may fill with model states + activations; None = the GPU's own
    # memory, 90 % of it less 1 GiB (a CPU run must give it)
    device_memory_gib: float | None = None
    packing: bool = False
    attn_implementation: str = "sdpa"  # or "eager", or "flash_attention_2" (needs the flash-attn package)
    activation_checkpointing: bool = False  # recompute the LLM layers' activations in backward
    # torch.compile of each LLM decoder layer: false, true (= "inductor"), or a backend's name
    torch_compile: bool | str = False
    grad_accum: int = 1
    precision: str = "auto"  # "auto": bf16 on a GPU that has it, else fp32; or "bf16" / "fp32"
    nonfinite_patience: int = 5  # a non-finite loss skips the step; this many in a row stop the run
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    # MB of fp32 logits the loss holds at once per stream (model/loss.py; 256 = 441 positions of
    # the text stream at Qwen2's vocabulary); 0 = all positions at once. Changes memory only (and
    # fp32 round-off), so a run may resume under another value
    loss_chunk_mb: float = 256.0
    seed: int = 1234
    num_workers: int = 0
    # A collective (all-reduce, barrier) that waits longer than this ends the run with every rank's
    # stack, instead of holding the allocation until its wall-clock limit (gloo's default is 30).
    dist_timeout_minutes: float = 10.0
    save_every: int = 1_000  # optimizer steps between resumable checkpoints
    keep_last: int = 2  # step checkpoints kept per stage (stage-final exports are never deleted)
    log_every: int = 10
    max_new_tokens: int = 64  # greedy decoding limit at evaluation
    eval_batch_size: int = 32
    standin_scale: str = "full"  # demo only: "full", "quick" (tests) or "tiny" (cold-start launch tests)
    corpus_scale: str = "full"  # demo only: "full" or "quick" corpus
    standin_lm_texts: int = 20_000  # demo only: text-only sentences the stand-in LLM also reads

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise RecipeError(f"unknown stage '{name}': expected one of {[s.name for s in self.stages]}")

    def validate(self) -> None:
        if tuple(s.name for s in self.stages) != STAGE_NAMES:
            raise RecipeError(f"recipe '{self.name}': stages must be {STAGE_NAMES} in order")
        for spec in self.stages:
            spec.validate()
        if self.data.encoder_states not in ("auto", "cache", "step"):
            raise RecipeError(f"recipe '{self.name}': data.encoder_states is 'auto', 'cache' or 'step'")
        if self.data.feature_cache_dtype not in ("bf16", "fp32"):
            raise RecipeError(f"recipe '{self.name}': data.feature_cache_dtype is 'bf16' or 'fp32'")
        if self.data.format not in DATA_FORMATS:
            raise RecipeError(f"recipe '{self.name}': data.format is one of {DATA_FORMATS}, got {self.data.format!r}")
        if not self.dist_timeout_minutes > 0:
            raise RecipeError(f"recipe '{self.name}': dist_timeout_minutes must be > 0")
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise RecipeError(
                f"recipe '{self.name}': attn_implementation is 'sdpa', 'eager' or 'flash_attention_2', "
                f"got {self.attn_implementation!r}"
            )
        if self.packing and not self.tokens_per_micro_batch:
            raise RecipeError(f"recipe '{self.name}': packing needs tokens_per_micro_batch (positions per row)")
        if not isinstance(self.torch_compile, (bool, str)) or self.torch_compile == "":
            raise RecipeError(
                f"recipe '{self.name}': torch_compile is false, true or a backend name (\"inductor\"), "
                f"got {self.torch_compile!r}"
            )
        budget = self.tokens_per_micro_batch
        if budget is not None and budget != "auto" and (not isinstance(budget, int) or budget < 1):
            raise RecipeError(
                f"recipe '{self.name}': tokens_per_micro_batch is a number of positions >= 1, \"auto\" or null; "
                f"got {budget!r}"
            )
        if self.device_memory_gib is not None and not self.device_memory_gib > 0:
            raise RecipeError(f"recipe '{self.name}': device_memory_gib must be > 0 (or null)")
        if self.frame_stack < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise RecipeError(f"recipe '{self.name}': frame_stack, batch_size, grad_accum must be >= 1")
        if (self.encoder is None) != (self.llm is None):
            raise RecipeError(f"recipe '{self.name}': give both encoder and llm, or neither (demo stand-ins)")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise RecipeError(
                f"recipe '{self.name}': precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}"
            )
        if self.nonfinite_patience < 1:
            raise RecipeError(f"recipe '{self.name}': nonfinite_patience must be >= 1")
        if self.loss_chunk_mb < 0:
            raise RecipeError(f"recipe '{self.name}': loss_chunk_mb must be >= 0 (0 = all positions at once)")
        if self.standin_scale not in ("full", "quick", "tiny") or self.corpus_scale not in ("full", "quick"):
            raise RecipeError(
                f"recipe '{self.name}': standin_scale is 'full', 'quick' or 'tiny'; corpus_scale 'full' or 'quick'"
            )

    @property
    def compile_backend(self) -> str | None:
        """torch.compile's backend for the LLM layers, or None (not compiled)."""
        if self.torch_compile is True:
            return "inductor"
        return self.torch_compile or None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def scale_steps(
    stages: tuple[StageSpec, ...], divisor: int, warmup_steps: int, eval_every: int
) -> tuple[StageSpec, ...]:
    """Divide every stage's step range by `divisor`; LRs, task mix and modules stay the seed's."""
    return tuple(
        replace(
            s,
            min_steps=s.min_steps // divisor,
            max_steps=s.max_steps // divisor,
            warmup_steps=warmup_steps,
            eval_every=eval_every,
        )
        for s in stages
    )


# Mini-Omni as published: whisper-small encoder, Qwen2-0.5B, the seed table.
MINI_OMNI = Recipe(
    name="mini-omni",
    stages=SEED_STAGES,
    encoder="openai/whisper-small",
    llm="Qwen/Qwen2-0.5B",
    data=DataSpec(dataset=None),
    frame_stack=1,
    # Mini-Omni's adapter (litgpt whisperMLP) is as wide as the LLM's MLP: Qwen2-0.5B's
    # intermediate_size. Keeping that width lets training.model.export write their checkpoint format.
    adapter_hidden=4864,
    batch_size=64,  # global: 8 per GPU on 8 GPUs (use grad_accum on fewer)
)

# The embedded CPU demo: the SAME table with every step range divided by 50 (asr 200-400,
# second 400-600, final 1000-1200), warm-up and eval cadence shortened to fit. LRs are the
# seed's. Tiny stand-ins and the synthesized corpus replace the pretrained parts and data;
# 4 encoder frames are stacked per adapter input to cut sequence length on CPU.
DEMO = Recipe(
    name="demo",
    stages=tuple(
        replace(s, max_wer=gate)
        for s, gate in zip(scale_steps(SEED_STAGES, divisor=50, warmup_steps=20, eval_every=50), (1.0, 0.8, 0.5))
    ),
    encoder=None,
    llm=None,
    frame_stack=4,
    batch_size=32,
    save_every=100,
    num_workers=1,  # reading rows from Arrow overlaps the step
    max_new_tokens=32,
    eval_batch_size=50,
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (DEMO, MINI_OMNI)}


def format_stage_table(recipe: Recipe) -> str:
    rows = [f"{'stage':<7} {'steps':>15} {'LR init':>9} {'LR peak':>9} {'warm-up':>8}  trains"]
    for s in recipe.stages:
        rows.append(
            f"{s.name:<7} {f'{s.min_steps:,}-{s.max_steps:,}':>15} {s.lr_init:>9.0e} {s.lr_peak:>9.0e} "
            f"{s.warmup_steps:>8,}  {'+'.join(s.trainable)}"
        )
    return "\n".join(rows)


for _recipe in RECIPES.values():
    _recipe.validate()
