"""`run.py --dry-run`: what a recipe would train and what it needs, without training.

The model is built on the meta device from config files only (no weights are read or
downloaded), with the stage table's `trainable` / `train_text_specials` applied through the same
`set_trainable` the loop uses, so the counts are the ones training would see. Per stage it prints
parameter counts per module, the memory the model states need per GPU under each hardware
profile, the tokens per optimizer step, and the frozen encoder's share of a row's FLOPs (the
count the training log's MFU uses, model/flops.py). A recipe's encoder / llm that is a local
folder is read from its config.json; a hub id that is not falls back to the configs shipped under
`configs/` (written from the published model configs), and the output says so.

Memory (model/memory.py): model states per profile from DeepSpeed's own estimators, activations
measured on the CPU from one and two of the LLM's decoder layers, and from both the largest
`tokens_per_micro_batch` that fits a GPU of `--gpu-memory` GiB under each profile.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from training.model import OmniConfig, OmniModel, grow_vocabulary, parameter_summary, set_trainable
from training.model.flops import StepFlops, encoder_forward_flops
from training.model.memory import (
    GIB,
    RESERVED_BYTES,
    USABLE_SHARE,
    Activations,
    Memory,
    count,
    largest_budget,
    largest_layer,
    measure_activations,
    memory_per_gpu,
    usable_bytes,
)
from training.speech.layout import TEXT_ROW, VocabLayout, n_adapter_frames, n_encoder_frames
from training.stages import MODULES, Recipe, StageSpec

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
# Hub ids whose published configs ship with the project (architecture only, no weights).
SHIPPED_CONFIGS: dict[str, Path] = {
    "openai/whisper-small": CONFIGS_DIR / "whisper-small",
    "Qwen/Qwen2-0.5B": CONFIGS_DIR / "qwen2-0.5b",
}
# Read speech runs at ~2.5 words/s, ~1.2 Qwen2 tokens per English word: ~3 text tokens per second.
TEXT_TOKENS_PER_SECOND = 3.0
ENCODER_FRAMES_PER_SECOND = 50  # Whisper: 100 mel frames per second, halved by its strided conv
DEFAULT_SPEECH_SECONDS = 10.0  # a spoken question or a read sentence; the demo corpus' are ~1.8 s
PROMPT_EXTRA = 3  # input_a, eoa and the task token around the speech positions
ANSWER_EXTRA = 1  # the eot closing the text answer


class DryRunError(ValueError):
    """A config is missing or malformed; the message names the file or the recipe field."""


# ---------------------------------------------------------------------------------------------
# Building on the meta device


def config_folder(name_or_path: str, role: str) -> tuple[Path, str]:
    """The folder to read `role`'s config.json from, and a line saying where it came from."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DryRunError(f"{role} '{name_or_path}': local folder without a config.json")
        return path, f"{role}: {name_or_path} (local folder, config.json)"
    if name_or_path in SHIPPED_CONFIGS:
        shipped = SHIPPED_CONFIGS[name_or_path]
        where = shipped.relative_to(CONFIGS_DIR.parent)
        return (
            shipped,
            f"{role}: {name_or_path} is a hub id, not a local folder: "
            f"using the shipped config {where}/ (nothing downloaded)",
        )
    raise DryRunError(
        f"{role} '{name_or_path}': not a local folder, and no config ships for this hub id "
        f"(shipped: {sorted(SHIPPED_CONFIGS)}); point it at a folder holding the model's config.json"
    )


def _read_config(folder: Path, model_type: str) -> dict:
    file = folder / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DryRunError(f"{file}: cannot read ({err})") from err
    if raw.get("model_type") != model_type:
        raise DryRunError(f"{file}: model_type is {raw.get('model_type')!r}, expected {model_type!r}")
    return raw


def build_meta_model(
    encoder_dir: Path, llm_dir: Path, frame_stack: int, adapter_hidden: int | None, encoder_ref: str
) -> tuple[OmniModel, int]:
    """The whole pipeline on the meta device (shapes only, no storage), vocabulary grown exactly as
    build_model grows it. Returns the model and the LLM's parameter count before the growth."""
    encoder_config = WhisperConfig(**_read_config(encoder_dir, "whisper"))
    llm_config = Qwen2Config(**_read_config(llm_dir, "qwen2"))
    with torch.device("meta"):  # every tensor created here is shape-only: nothing is allocated
        encoder = WhisperEncoder(encoder_config)
        llm = Qwen2ForCausalLM(llm_config)
        pretrained_count = count(llm.parameters())
        text_vocab = llm_config.vocab_size
        grow_vocabulary(llm, VocabLayout(text_vocab=text_vocab))
        config = OmniConfig.for_parts(
            encoder_ref, encoder_config.d_model, text_vocab, llm_config.hidden_size, frame_stack, adapter_hidden
        )
        model = OmniModel(encoder, llm, config)
    return model, pretrained_count


# ---------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class StageReport:
    stage: StageSpec
    modules: dict[str, tuple[int, int, int]]  # module -> (total, trainable, in optimizer)
    memory: list[Memory]
    activations: Activations | None = None
    budgets: tuple[int, ...] = ()  # per profile, in memory's order: the largest tokens_per_micro_batch
    flops: StepFlops | None = None  # the MFU's count (model/flops.py) of this stage's training

    @property
    def in_optimizer(self) -> int:
        return sum(v[2] for v in self.modules.values())


@dataclass(frozen=True)
class DryRun:
    recipe: Recipe
    sources: list[str]
    llm_pretrained: int  # LLM parameters before the vocabulary growth
    llm_grown: int
    text_vocab: int
    total_vocab: int
    gpus_per_node: int
    nodes: int
    speech_seconds: float
    text_tokens: int
    seq_len: int
    stages: list[StageReport]
    encoder_flops: int = 0  # its forward over its whole window: it runs on every clip padded to it
    encoder_width: int = 0
    speech_hours: float = 1.0
    gpu_memory_gib: float = 80.0
    longest_row: int = 0  # positions of a row of the encoder's whole window (padded rows' worst case)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def tokens_per_step(self) -> int:
        """Positions per optimizer step: a fixed token budget's ceiling, else batch_size rows of seq_len.
        An "auto" budget depends on the launch's profile: stage_tokens_per_step gives it per profile."""
        budget = self.recipe.tokens_per_micro_batch
        if isinstance(budget, int):  # positions per process per micro-step, batch_size unused
            return budget * self.world * self.recipe.grad_accum
        # batch_size is the global number of rows per micro-step (split across processes)
        return self.recipe.batch_size * self.recipe.grad_accum * self.seq_len

    def stage_tokens_per_step(self, report: StageReport) -> list[int]:
        """Per memory profile, the positions per optimizer step this stage would run."""
        if self.recipe.tokens_per_micro_batch != "auto":
            return [self.tokens_per_step] * len(report.memory)
        return [b * self.world * self.recipe.grad_accum for b in report.budgets]

    @property
    def speech_positions(self) -> int:
        return self.seq_len - PROMPT_EXTRA - self.text_tokens - ANSWER_EXTRA

    def row_flops(self, flops: StepFlops) -> float:
        """Training FLOPs of one row of this shape, its text answer and eot labelled."""
        labelled = [0.0] * TEXT_ROW + [float(self.text_tokens + ANSWER_EXTRA)]  # the text stream comes last
        shape = {"positions": self.seq_len, "squared_lengths": self.seq_len**2}
        return flops.of_step(**shape, stream_tokens=labelled, speech_positions=self.speech_positions)


def sequence_length(seconds: float, text_tokens: int, frame_stack: int, sampling_rate: int, max_frames: int) -> int:
    """Positions of one speech-in, text-out row: [input_a] + speech + [eoa, task] + answer + [eot]."""
    frames = n_encoder_frames(int(seconds * sampling_rate), sampling_rate, max_frames)
    return n_adapter_frames(frames, frame_stack) + PROMPT_EXTRA + text_tokens + ANSWER_EXTRA


def longest_row(max_frames: int, frame_stack: int, sampling_rate: int = 16_000) -> int:
    """Positions of a row whose speech fills the encoder's whole window (30 s for Whisper)."""
    seconds = max_frames / ENCODER_FRAMES_PER_SECOND
    return sequence_length(seconds, round(TEXT_TOKENS_PER_SECOND * seconds), frame_stack, sampling_rate, max_frames)


def stage_budgets(
    recipe: Recipe, spec: StageSpec, llm_config, memory: list[Memory], device_bytes: int, row: int, head_trains: bool
) -> tuple[Activations, tuple[int, ...]]:
    """Activations measured for this stage's settings, and per profile the largest token budget."""
    activations = measure_activations(
        llm_config,
        recipe.attn_implementation,
        recipe.activation_checkpointing,
        layers_train="llm" in spec.trainable,
        packed=recipe.packing,
        loss_chunk_mb=recipe.loss_chunk_mb,
        text_width=VocabLayout(text_vocab=llm_config.vocab_size).stream_slices()[0][1],
        head_trains=head_trains,
    )
    rows = None if recipe.packing else row
    return activations, tuple(
        largest_budget(usable_bytes(device_bytes), m.gpu_total, activations, rows) for m in memory
    )


def dry_run(
    recipe: Recipe,
    stage_names: Sequence[str],
    gpus_per_node: int = 8,
    nodes: int = 1,
    speech_seconds: float | None = None,
    text_tokens: int | None = None,
    speech_hours: float | None = None,
    gpu_memory_gib: float = 80.0,
) -> DryRun:
    if recipe.encoder is None or recipe.llm is None:
        raise DryRunError(
            f"recipe '{recipe.name}' builds its stand-in checkpoints at run time (their vocabulary "
            "comes from the corpus), so there is no config to size; use --recipe mini-omni or give "
            "--encoder and --llm"
        )
    if gpus_per_node < 1 or nodes < 1:
        raise DryRunError(f"--gpus and --nodes must be >= 1, got {gpus_per_node}, {nodes}")
    if not gpu_memory_gib > 0:
        raise DryRunError(f"--gpu-memory must be > 0 GiB, got {gpu_memory_gib}")
    encoder_dir, encoder_line = config_folder(recipe.encoder, "encoder")
    llm_dir, llm_line = config_folder(recipe.llm, "llm")
    model, pretrained = build_meta_model(
        encoder_dir, llm_dir, recipe.frame_stack, recipe.adapter_hidden, recipe.encoder
    )
    sampling_rate = _sampling_rate(encoder_dir)
    seconds = speech_seconds if speech_seconds is not None else DEFAULT_SPEECH_SECONDS
    tokens = text_tokens if text_tokens is not None else round(TEXT_TOKENS_PER_SECOND * seconds)
    max_frames = model.encoder.config.max_source_positions
    seq_len = sequence_length(seconds, tokens, recipe.frame_stack, sampling_rate, max_frames)
    largest = largest_layer(model)
    row = longest_row(max_frames, recipe.frame_stack, sampling_rate)
    llm_config = Qwen2Config(**_read_config(llm_dir, "qwen2"))
    reports = []
    for name in stage_names:
        spec = recipe.stage(name)
        set_trainable(model, spec.trainable, spec.train_text_specials)
        summary = parameter_summary(model)
        modules = {
            m: (*summary[m], count(p for p in getattr(model, m).parameters() if p.requires_grad)) for m in MODULES
        }
        in_opt = sum(v[2] for v in modules.values())
        frozen = count(model.parameters()) - in_opt
        memory = memory_per_gpu(in_opt, frozen, largest, gpus_per_node, nodes)
        activations, budgets = stage_budgets(
            recipe, spec, llm_config, memory, int(gpu_memory_gib * GIB), row, model.llm.lm_head.weight.requires_grad
        )
        reports.append(StageReport(spec, modules, memory, activations, budgets, StepFlops.of(model)))
    return DryRun(
        recipe=recipe,
        sources=[encoder_line, llm_line],
        llm_pretrained=pretrained,
        llm_grown=count(model.llm.parameters()),
        text_vocab=model.layout.text_vocab,
        total_vocab=model.layout.total,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        speech_seconds=seconds,
        text_tokens=tokens,
        seq_len=seq_len,
        stages=reports,
        encoder_flops=encoder_forward_flops(model.encoder),
        encoder_width=model.encoder.config.d_model,
        speech_hours=speech_hours if speech_hours is not None else 1.0,
        gpu_memory_gib=gpu_memory_gib,
        longest_row=row,
    )


def _sampling_rate(encoder_dir: Path) -> int:
    file = encoder_dir / "preprocessor_config.json"
    if not file.is_file():
        return 16_000  # every Whisper checkpoint's rate
    try:
        return int(json.loads(file.read_text())["sampling_rate"])
    except (json.JSONDecodeError, KeyError, ValueError) as err:
        raise DryRunError(f"{file}: no readable sampling_rate ({err})") from err


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_dry_run(result: DryRun) -> str:
    r = result.recipe
    lines = [
        f"dry run: recipe '{r.name}', {result.nodes} node(s) x {result.gpus_per_node} GPU(s) = "
        f"{result.world} processes; "
        "model built on the meta device (no weights read or downloaded)",
        *(f"  {s}" for s in result.sources),
        f"  LLM: {result.llm_pretrained:,} parameters as published; {result.llm_grown:,} after growing the vocabulary "
        f"{result.text_vocab:,} -> {result.total_vocab:,} rows",
        f"sequence: {result.speech_seconds:g} s speech -> "
        f"{result.speech_positions} speech positions + {PROMPT_EXTRA} "
        f"prompt tokens + {result.text_tokens} text tokens + eot = {result.seq_len} positions "
        "(--speech-seconds / --text-tokens change it)",
        _step_line(result),
    ]
    for rep in result.stages:
        s = rep.stage
        extra = (
            " (+ the 64 new text-special rows of the embedding and output layer)"
            if s.train_text_specials and "llm" not in s.trainable
            else ""
        )
        lines += [
            "",
            f"stage {s.name} ({s.min_steps:,}-{s.max_steps:,} steps, up to "
            f"{_billions(result.stage_tokens_per_step(rep), s.max_steps)} tokens): trains {' + '.join(s.trainable)}"
            f"{extra}",
            f"  {'module':<8} {'total':>13} {'trainable':>13} {'in optimizer':>13}",
        ]
        for m, (total, trainable, in_opt) in rep.modules.items():
            lines.append(f"  {m:<8} {total:>13,} {trainable:>13,} {in_opt:>13,}")
        lines.append(
            f"  {'all':<8} {sum(v[0] for v in rep.modules.values()):>13,} "
            f"{sum(v[1] for v in rep.modules.values()):>13,} {rep.in_optimizer:>13,}"
        )
        lines.append(
            f"  model-state memory, GiB ({result.world} GPUs), and the most positions per micro-batch that fit "
            f"beside them on a {result.gpu_memory_gib:g} GiB GPU (--gpu-memory)"
        )
        lines.append(
            f"  {'profile':<14} {'weights':>8} {'grad+optim':>11} {'gathered':>9} {'GPU total':>10} {'CPU/node':>9}"
            f" {'tokens_per_micro_batch':>23}"
        )
        for mem, budget in zip(rep.memory, rep.budgets or (None,) * len(rep.memory)):
            lines.append(
                f"  {mem.profile:<14} {_gib(mem.weights):>8} {_gib(mem.grads_optim):>11} {_gib(mem.gathered):>9} "
                f"{_gib(mem.gpu_total):>10} {_gib(mem.cpu_per_node):>9} "
                + (f"{budget:>23,}" if budget else f"{'does not fit' if budget == 0 else '-':>23}")
            )
        if rep.activations is not None:
            lines.append(format_activations(result, rep.activations))
    lines += ["", *format_data_cost(result)]
    lines += [
        "",
        "'in optimizer' counts whole tensors that get gradients: with train_text_specials the full embedding "
        "(and output) tensor reaches Adam although a gradient mask leaves all but 64 rows unchanged.",
        "Memory: DeepSpeed's estimate_zero2/zero3_model_states_mem_needs on the parameters in the optimizer, "
        "plus frozen weights in bf16 (ddp: fp32 weights + 12 bytes per trainable parameter). Token budgets: "
        f"{USABLE_SHARE:.0%} of the GPU less {RESERVED_BYTES / GIB:g} GiB (CUDA context, fragmentation) for model "
        "states + activations (model/memory.py); `tokens_per_micro_batch: auto` makes the same choice at run time.",
    ]
    return "\n".join(lines)


def _step_line(result: DryRun) -> str:
    r = result.recipe
    budget = r.tokens_per_micro_batch
    if budget == "auto":
        return (
            f"tokens per optimizer step: chosen at launch from the GPU's memory (tokens_per_micro_batch auto): "
            f"the stage's tokens_per_micro_batch column below x {result.world} processes x {r.grad_accum} accumulation"
        )
    if isinstance(budget, int):
        return (
            f"tokens per optimizer step: up to {budget:,} positions per process (tokens_per_micro_batch) x "
            f"{result.world} processes x {r.grad_accum} accumulation = {result.tokens_per_step:,} "
            "(batch_size is not used with a token budget)"
        )
    per_gpu = r.batch_size / result.world
    return (
        f"tokens per optimizer step: {r.batch_size} rows (global) x {r.grad_accum} accumulation x {result.seq_len} = "
        f"{result.tokens_per_step:,} ({per_gpu:g} rows per GPU per micro-step"
        + ("; not a whole number: batch_size should divide by the process count" if per_gpu != int(per_gpu) else "")
        + ")"
    )


def _billions(per_step: list[int], steps: int) -> str:
    fitting = sorted({n for n in per_step if n > 0}) or [0]
    low, high = fitting[0] * steps / 1e9, fitting[-1] * steps / 1e9
    return f"{high:.2f} B" if low == high else f"{low:.2f}-{high:.2f} B (by profile)"


def format_activations(result: DryRun, activations: Activations) -> str:
    r = result.recipe
    kernel = r.attn_implementation + (", checkpointed" if r.activation_checkpointing else "")
    rows = "packed rows" if r.packing else f"padded rows of up to {result.longest_row:,} positions"
    return (
        f"  activations: {activations.per_position() / 2**20:.2f} MiB per position ({kernel}, bf16, {rows}; "
        f"measured on the CPU from this LLM's decoder layers) + up to {activations.loss_bytes(2**30) / 2**20:,.0f} MiB "
        f"for the loss (loss_chunk_mb {r.loss_chunk_mb:g})"
    )


def format_data_cost(result: DryRun) -> list[str]:
    """What caching the frozen encoder's states costs on disk, against computing them in the step."""
    frames_per_hour = 3600 * ENCODER_FRAMES_PER_SECOND
    per_hour = frames_per_hour * result.encoder_width
    hours = result.speech_hours
    encoder = result.encoder_flops
    lines = [
        f"data: {hours:,g} h of speech (--speech-hours) = {hours * frames_per_hour:,.0f} encoder frames of "
        f"{result.encoder_width} values",
        f"  feature cache on disk (data.encoder_states 'cache'): {hours * per_hour * 2 / 1e9:,.1f} GB in bf16 "
        f"(data.feature_cache_dtype, the default; {per_hour * 2 / 1e6:,.0f} MB per hour), "
        f"{hours * per_hour * 4 / 1e9:,.1f} GB in fp32",
    ]
    for rep in result.stages:
        step = result.row_flops(rep.flops)
        share = encoder / (encoder + step)
        lines.append(
            f"  stage {rep.stage.name}: the frozen encoder computed in the step would be {share:.0%} of its "
            f"FLOPs ({encoder / 1e9:,.0f} GFLOP of {(encoder + step) / 1e9:,.0f} per row)"
        )
    return lines


def main_dry_run(
    recipe: Recipe,
    stage: str,
    gpus_per_node: int,
    nodes: int,
    speech_seconds: float | None,
    text_tokens: int | None,
    speech_hours: float | None = None,
    gpu_memory_gib: float = 80.0,
) -> int:
    """run.py's --dry-run branch: print the report; exit code 0, or 2 on a config problem."""
    from training.stages import STAGE_NAMES

    names = list(STAGE_NAMES) if stage == "all" else [stage]
    try:
        result = dry_run(recipe, names, gpus_per_node, nodes, speech_seconds, text_tokens, speech_hours, gpu_memory_gib)
    except DryRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_dry_run(result))
    return 0
