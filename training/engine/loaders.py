"""A stage's loaders from the prepared splits: training items drawn by the stage's task mix, the
evaluation splits, the held-out spoken questions, and the floors their scores are read against."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from training.common import LogFn
from training.data.batching import TaskMixture, eval_loader, train_loader
from training.data.checks import DataError
from training.data.packing import TokenBudget
from training.evaluation.spoken import CodeJudge
from training.speech.layout import N_AUDIO_LAYERS, VocabLayout
from training.speech.text import normalize
from training.stages import TASKS, Recipe, StageSpec


@dataclass
class StageLoaders:
    train: DataLoader
    evals: dict[str, DataLoader]  # split -> ASR loader (held-out, dev)
    qa: dict[str, DataLoader] = field(default_factory=dict)  # "answer" (A1T2), "speech" (A1A2): held-out questions
    # Floors: always giving the commonest training answer; always emitting each layer's commonest code.
    majority_answer_accuracy: float | None = None
    majority_code_accuracy: float | None = None
    # Free-running speech answers (evaluation/spoken.py): qa["spoken:a1a2"] / qa["spoken:t1a2"] for
    # the speech-out tasks the stage trains, the judge of their codes, and their decoding limit.
    judge: CodeJudge | None = None
    speech_max_new_tokens: int = 0


def stage_loaders(
    recipe: Recipe,
    spec: StageSpec,
    prepared: dict[str, Any],
    layout: VocabLayout,
    frame_stack: int,
    log: LogFn,
    processes: tuple[int, int] = (1, 0),
) -> StageLoaders:
    """`processes` (number, this one's index) splits token-budget micro-batches between processes."""
    # frame_stack is the model's own (an --init-from export may stack frames unlike the recipe)
    data, k = recipe.data, frame_stack
    train_set = prepared[data.train_split]
    qa_train, qa_heldout = prepared.get(f"qa:{data.train_split}"), prepared.get(f"qa:{data.heldout_split}")
    if set(spec.task_mix) != {"asr"}:
        train_set = TaskMixture(train_set, qa_train, dict(spec.task_mix), recipe.seed, k)
        counts = collections.Counter(TASKS[t] for t in train_set.items[:, 0])
        log(
            "task mix: "
            + ", ".join(f"{t} {n:,}" for t, n in counts.items())
            + " items per epoch"
            + (f" (no data for {', '.join(train_set.dropped)})" if train_set.dropped else "")
        )
    budget = None
    if recipe.tokens_per_micro_batch:
        budget = TokenBudget(recipe.tokens_per_micro_batch, recipe.packing, *processes)
        log(
            f"micro-batches of up to {budget.tokens:,} positions per process, "
            + ("packed into one row (attention within each sample)" if budget.packed else "rows padded to the longest")
        )
    elif len(train_set) < recipe.batch_size:  # drop_last would leave an epoch of no batches at all
        raise DataError(
            f"split '{data.train_split}' has {len(train_set):,} training items, fewer than one global batch "
            f"({recipe.batch_size}): add rows, or set a smaller batch_size in a recipe file"
        )
    train_dl = train_loader(train_set, layout, k, recipe.batch_size, recipe.seed, recipe.num_workers, budget)
    if budget is not None and len(train_dl) == 0:
        raise DataError(
            f"split '{data.train_split}': {len(train_set):,} training items make fewer micro-batches of "
            f"{budget.tokens:,} positions than there are processes ({budget.num_processes}): lower the budget"
        )
    eval_names = [data.heldout_split] + ([data.dev_split] if data.dev_split else [])
    loaders = StageLoaders(
        train_dl, {s: eval_loader(prepared[s], layout, k, recipe.eval_batch_size) for s in eval_names}
    )
    if qa_heldout is None:
        return loaders
    loaders.qa["answer"] = eval_loader(qa_heldout, layout, k, recipe.eval_batch_size, task="a1t2")
    if qa_train is not None:  # the floor a model that hears nothing of the question reaches
        answers = qa_train.answers() if hasattr(qa_train, "answers") else qa_train["answer"]  # on demand, or cached
        commonest = collections.Counter(normalize(a) for a in answers).most_common(1)[0][0]
        loaders.majority_answer_accuracy = float(np.mean([normalize(a) == commonest for a in qa_heldout["answer"]]))
    if int(np.max(qa_heldout["n_codes"])) > 0:
        loaders.qa["speech"] = eval_loader(qa_heldout, layout, k, recipe.eval_batch_size, task="a1a2")
        # a codec (e.g. the random-weight one) may use few codes, so chance alone flatters
        codes = np.concatenate([np.asarray(c).reshape(-1, N_AUDIO_LAYERS) for c in qa_heldout["codes"]])
        loaders.majority_code_accuracy = float(
            np.mean([np.bincount(codes[:, i]).max() / len(codes) for i in range(codes.shape[1])])
        )
        spoken_tasks = [t for t in ("a1a2", "t1a2") if spec.task_mix.get(t, 0) > 0]
        for task in spoken_tasks:
            loaders.qa[f"spoken:{task}"] = eval_loader(qa_heldout, layout, k, recipe.eval_batch_size, task=task)
        if spoken_tasks:
            loaders.judge = CodeJudge.from_rows(answer_speech_rows(qa_heldout, qa_train))
            # room for twice the longest reference answer, its delay and eoa: a model that never
            # stops is caught at the limit (and counted), not left decoding
            loaders.speech_max_new_tokens = max(
                recipe.max_new_tokens, 2 * int(np.max(qa_heldout["n_codes"])) + N_AUDIO_LAYERS + 1
            )
    return loaders


def answer_speech_rows(heldout: Any, train: Any) -> Iterator[tuple[str, Any]]:
    """(answer, codes) of the held-out rows, then of the cached training rows: the answers the
    code judge chooses among (training answers included, since a model may say one of those)."""
    yield from zip(heldout["answer"], heldout["codes"])
    if train is None or not hasattr(train, "column_names") or "codes" not in train.column_names:
        return  # rows made in the step hold no codes until read: the held-out answers only
    for chunk in train.select_columns(["answer", "codes"]).iter(batch_size=1_024):
        yield from zip(chunk["answer"], chunk["codes"])


def prepare_budget_loader(acc: Accelerator, model: Any, optimizer: Any, train_dl: DataLoader) -> tuple[Any, Any, Any]:
    """accelerate.prepare for a token-budget stage. Its loader already yields this process's own
    micro-batches (data/packing.py), so Accelerate only moves them to the device and must not
    split them again; DeepSpeed, which reads a micro-batch size from the loader ("auto"), is told
    1 row (it only books the figure: a budget's micro-batches vary in rows)."""
    plugin = acc.state.deepspeed_plugin
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    model, optimizer = acc.prepare(model, optimizer)
    loader = prepare_data_loader(train_dl, acc.device, num_processes=1, process_index=0, put_on_device=True)
    return model, optimizer, loader
