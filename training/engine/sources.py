"""Where a run's data and pretrained parts come from.

This is the one place the core reaches the demo (training/demo): a recipe that names no dataset
trains on the demo's synthesized corpora, and one that names no encoder/LLM on the demo's
stand-ins, trained once and then loaded by path exactly like real checkpoints. Everything else
comes from the user's sources through training/data.
"""

from __future__ import annotations

import datasets

from training.data.sources import EMBEDDED, EMBEDDED_QA, asr_splits, load_source, qa_splits
from training.engine.context import RunContext


def dataset_name(ctx: RunContext) -> str:
    return ctx.recipe.data.dataset or EMBEDDED


def qa_dataset_name(ctx: RunContext) -> str:
    return ctx.recipe.data.qa_dataset or EMBEDDED_QA


def speech_source(ctx: RunContext) -> datasets.DatasetDict:
    if ctx.recipe.data.dataset is not None:
        return load_source(ctx.recipe.data.dataset)
    from training.demo import demo_speech

    return demo_speech(ctx.cache_dir, ctx.recipe.corpus_scale, ctx.log)


def qa_source(ctx: RunContext) -> datasets.DatasetDict:
    if ctx.recipe.data.qa_dataset is not None:
        return load_source(ctx.recipe.data.qa_dataset)
    from training.demo import demo_qa

    return demo_qa(ctx.cache_dir, ctx.recipe.corpus_scale, ctx.log)


def pretrained_parts(ctx: RunContext) -> tuple[str, str]:
    """(encoder, llm) by path or hub id: the recipe's, or the demo's stand-ins built on its data."""
    recipe = ctx.recipe
    if recipe.encoder is not None:
        return recipe.encoder, recipe.llm
    from training.demo import demo_pretrained

    def qa_pairs(split: str | None) -> list[tuple[str, str]]:
        ds = ctx.qa_splits.get(split)
        return (
            []
            if ds is None
            else list(dict.fromkeys(zip(ds[recipe.data.question_column], ds[recipe.data.answer_column])))
        )

    # The stand-in LLM knows the facts the training questions ask for (a real LLM would); the
    # held-out questions only score it, in text: the most that answering them by speech could reach.
    encoder, llm = demo_pretrained(
        ctx.splits[recipe.data.train_split],
        ctx.cache_dir,
        recipe.standin_scale,
        recipe.standin_lm_texts,
        recipe.corpus_scale,
        qa_pairs(recipe.data.train_split),
        qa_pairs(recipe.data.heldout_split),
        ctx.log,
    )
    return str(encoder), str(llm)


def load_data_and_pretrained(ctx: RunContext) -> None:
    """The speech splits, the QA splits the stages' task mix needs, and the pretrained parts."""
    recipe, spec = ctx.recipe, ctx.recipe.data
    with ctx.accelerator.main_process_first():
        ctx.splits = asr_splits(speech_source(ctx), dataset_name(ctx), spec)
        wants_qa = any(task != "asr" and w > 0 for stage in recipe.stages for task, w in stage.task_mix.items())
        if wants_qa and spec.qa_dataset is None and spec.dataset is not None:
            ctx.log("no QA dataset given (--qa-dataset) beside the user ASR dataset: stages train their ASR share only")
        elif wants_qa and spec.qa_dataset != "none":
            ctx.qa_splits = qa_splits(qa_source(ctx), qa_dataset_name(ctx), spec)
        if recipe.encoder is None or ctx.pretrained is None:
            ctx.pretrained = pretrained_parts(ctx)
