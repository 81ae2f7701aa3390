"""Where a run's data and pretrained parts come from, in this order: the data is read, its splits
and columns chosen and printed, its rows checked, and only then are pretrained parts built or loaded.

This is the one place the core reaches the demo (training/demo): a recipe that names no dataset
trains on the demo's synthesized corpora, and one that names no encoder/LLM on the demo's
stand-ins, trained once and then loaded by path exactly like real checkpoints. Everything else
comes from the user's sources through training/data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from training.common import RECORD, write_json_atomic
from training.data.formats import Source
from training.data.mixing import dataset_entries, mix
from training.data.sources import EMBEDDED, EMBEDDED_QA, Chosen, asr_audio_columns, asr_splits, load_source, qa_splits
from training.engine.context import RunContext
from training.engine.rank_zero import rank_zero_first
from training.model.build import outside_zero3_init

# What the run chose, kept in run_record.json ("data") for the report and the next person.
RECORDED_CHOICES = ("train_split", "heldout_split", "dev_split", "audio_column", "text_column")


def dataset_name(ctx: RunContext) -> str:
    entries = dataset_entries(ctx.recipe.data.dataset)
    return " + ".join(where for where, _ in entries) if entries else EMBEDDED


def qa_dataset_name(ctx: RunContext) -> str:
    return ctx.recipe.data.qa_dataset or EMBEDDED_QA


def data_identity(ctx: RunContext, task_mix: dict[str, float]) -> dict[str, Any]:
    """What a stage trains and is scored on: the datasets by name and each split's rows and content
    fingerprint (datasets' own; a manifest's follows its audio files), the QA data only for a
    stage whose task mix reads it. A finished stage is reused, and its record trusted, only for
    the same identity."""

    def splits(chosen: dict[str, Any]) -> dict[str, Any]:
        return {name: {"rows": len(ds), "fingerprint": ds._fingerprint} for name, ds in sorted(chosen.items())}

    identity: dict[str, Any] = {"dataset": dataset_name(ctx), "splits": splits(ctx.splits)}
    if ctx.qa_splits and any(task != "asr" and weight > 0 for task, weight in task_mix.items()):
        identity |= {"qa_dataset": qa_dataset_name(ctx), "qa_splits": splits(ctx.qa_splits)}
    return identity


def speech_data(ctx: RunContext) -> Chosen:
    """The run's speech splits: the embedded corpus, one user dataset, or several mixed by weight."""
    spec, seed = ctx.recipe.data, ctx.recipe.seed
    entries = dataset_entries(spec.dataset)
    if not entries:
        from training.demo import demo_speech

        corpus = demo_speech(ctx.cache_dir, ctx.recipe.corpus_scale, ctx.log)
        return asr_splits(Source.of(corpus, EMBEDDED, "synthesized speech"), spec, seed)
    parts = [
        (where, weight, asr_splits(load_source(where, asr_audio_columns(spec), spec.format), spec, seed))
        for where, weight in entries
    ]
    return parts[0][2] if len(parts) == 1 else mix(parts, seed, ctx.cache_dir / "mixed")


def qa_source(ctx: RunContext) -> Source:
    spec = ctx.recipe.data
    if spec.qa_dataset is not None:
        return load_source(spec.qa_dataset, (spec.question_audio_column, spec.answer_audio_column))
    from training.demo import demo_qa

    return Source.of(demo_qa(ctx.cache_dir, ctx.recipe.corpus_scale, ctx.log), EMBEDDED_QA, "synthesized QA")


def audio_window(ctx: RunContext) -> tuple[int, int]:
    """(sampling rate, longest clip in samples) of the encoder the run will use; the stand-ins'
    comes from their config, so rows are checked before any stand-in is trained."""
    source = ctx.init_from if ctx.init_from is not None else ctx.recipe.encoder
    if source is None:
        from training.demo import demo_audio_window

        return demo_audio_window(ctx.recipe.standin_scale)
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(str(source))
    return extractor.sampling_rate, extractor.n_samples


def pretrained_parts(ctx: RunContext) -> tuple[str, str]:
    """(encoder, llm) by path or hub id: the recipe's, or the demo's stand-ins built on its data."""
    recipe, spec = ctx.recipe, ctx.recipe.data
    if recipe.encoder is not None:
        return recipe.encoder, recipe.llm
    from training.demo import demo_pretrained

    def qa_pairs(split: str | None) -> list[tuple[str, str]]:
        ds = ctx.qa_splits.get(split)
        return [] if ds is None else list(dict.fromkeys(zip(ds[spec.question_column], ds[spec.answer_column])))

    train = ctx.splits[spec.train_split]
    if (spec.audio_column, spec.text_column) != ("audio", "text"):  # the stand-ins read these two names
        train = train.select_columns([spec.audio_column, spec.text_column])
        train = train.rename_columns({spec.audio_column: "audio", spec.text_column: "text"})
    # The stand-in LLM knows the facts the training questions ask for (a real LLM would); the
    # held-out questions only score it, in text: the most that answering them by speech could reach.
    # Built by rank 0 alone, as plain torch: nothing of a ZeRO-3 launch may reach into it.
    with outside_zero3_init():
        encoder, llm = demo_pretrained(
            train,
            ctx.cache_dir,
            recipe.standin_scale,
            recipe.standin_lm_texts,
            recipe.corpus_scale,
            qa_pairs(spec.train_split),
            qa_pairs(spec.heldout_split),
            ctx.log,
        )
    return str(encoder), str(llm)


def load_data(ctx: RunContext) -> None:
    """The speech splits and the QA splits the stages' task mix needs, chosen and printed; the
    run's recipe then names the chosen splits and columns (ctx.recipe.data is resolved)."""
    recipe, spec = ctx.recipe, ctx.recipe.data
    chosen = speech_data(ctx)
    ctx.splits, ctx.checked_splits, spec, notes = chosen.splits, chosen.checked, chosen.spec, chosen.notes
    wants_qa = any(task != "asr" and w > 0 for stage in recipe.stages for task, w in stage.task_mix.items())
    if wants_qa and spec.qa_dataset is None and spec.dataset is not None:
        notes.append("no QA dataset (--qa-dataset) beside the user's ASR dataset: stages train their ASR share only")
    elif wants_qa and spec.qa_dataset != "none":
        qa = qa_splits(qa_source(ctx), spec, recipe.seed, spec.train_split, spec.heldout_split)
        ctx.qa_splits, ctx.checked_qa_splits = qa.splits, qa.checked
        notes += qa.notes
    ctx.recipe = dataclasses.replace(recipe, data=spec)
    ctx.log("\n".join(notes))


def load_data_and_pretrained(ctx: RunContext, check: Callable[[RunContext], None] | None = None) -> None:
    """load_data, a check of a sample of every split's rows (DataSpec.validate_rows, spread evenly),
    `check` (every rank, e.g. whether the run folder may be reused: refused before any stand-in is
    built), and the pretrained parts. Rank 0 goes first and fills the caches; the others then read
    them (single-rank phases: engine/rank_zero.py)."""
    from training.engine.prepare import validate_splits

    ctx.enter("loading the data and pretrained parts", watch=False)
    with rank_zero_first(ctx.accelerator, "loading the data"):
        load_data(ctx)
        validate_splits(ctx, *audio_window(ctx), ctx.recipe.data.validate_rows)
    if check is not None:
        check(ctx)
    with rank_zero_first(ctx.accelerator, "loading the pretrained parts"):
        if ctx.accelerator.is_main_process:  # no barrier: a single-rank phase (engine/rank_zero.py)
            record, spec = ctx.record(), ctx.recipe.data
            record["data"] = {"dataset": dataset_name(ctx), **{k: getattr(spec, k) for k in RECORDED_CHOICES}}
            write_json_atomic(ctx.output_dir / RECORD, record)
        if ctx.recipe.encoder is None or ctx.pretrained is None:
            ctx.pretrained = pretrained_parts(ctx)
