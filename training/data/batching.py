"""Batching: a stage's task mixture, length-grouped sampling, and the 8-stream collator.

Prepared rows (training/data/features.py) in; padded batches of the five tasks' layouts out
(training/speech/layout.py lays each row out).
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from training.data.checks import DataError
from training.data.features import widened
from training.data.packing import TokenBudget, TokenBudgetSampler
from training.speech.layout import (
    IGNORE,
    N_AUDIO_LAYERS,
    SPEECH_IN_TASKS,
    SPEECH_TASKS,
    Example,
    VocabLayout,
    n_adapter_frames,
    pad_token_column,
    task_example,
)
from training.stages import TASKS


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices in which each run of `batch_size` has similar lengths (little padding).

    Each epoch draws a permutation from (seed, epoch), cuts it into mega-batches of
    batch_size * group_batches, sorts each by length, and shuffles the order of the batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_batches: int = 32) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = batch_size * group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).numpy()
        batches = []
        for start in range(0, len(perm), self.group):
            chunk = perm[start : start + self.group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield from batches[b].tolist()


def cycled_rows(rng: np.random.Generator, n_rows: int, count: int) -> np.ndarray:
    """`count` row indices of `n_rows`: seeded permutations, one after another, cut to count (every
    row once before any row twice)."""
    return np.concatenate([rng.permutation(n_rows) for _ in range(-(-count // n_rows))])[:count]


class TaskMixture(torch.utils.data.Dataset):
    """A stage's training items: (task, row) pairs drawn by the stage's task mix.

    The epoch has as many items as the sources have rows; task t gets round(weight_t / total
    weight * size) of them, taken from its source (ASR rows for asr, QA rows for the rest, QA rows
    with answer speech for a1a2/t1a2) in a seeded permutation, cycled when a task needs more items
    than its source has rows. The list is fixed for the stage, so resuming needs only the sampler's
    position; the length-grouped sampler reshuffles it every epoch."""

    def __init__(
        self,
        asr: datasets.Dataset,
        qa: datasets.Dataset | None,
        task_mix: dict[str, float],
        seed: int,
        frame_stack: int,
    ) -> None:
        self.sources = {"asr": asr, "qa": qa}
        self.qa_lengths = _qa_lengths(qa) if qa is not None else None
        speech_out = qa is not None and int(np.max(self.qa_lengths["n_codes"])) > 0
        usable = {
            t: w
            for t, w in task_mix.items()
            if w > 0 and (t == "asr" or qa is not None) and (t not in ("a1a2", "t1a2") or speech_out)
        }
        if not usable:
            raise DataError(
                f"task mix {dict(task_mix)}: no task has data (QA data: {'yes' if qa is not None else 'none'})"
            )
        self.dropped = sorted(set(t for t, w in task_mix.items() if w > 0) - set(usable))
        size = len(asr) + (len(qa) if qa is not None else 0)
        total = sum(usable.values())
        rng = np.random.default_rng(seed)
        items = []
        for task, weight in usable.items():
            source = "asr" if task == "asr" else "qa"
            n_rows = len(self.sources[source])
            count = max(1, round(weight / total * size))
            rows = cycled_rows(rng, n_rows, count)
            items += [(TASKS.index(task), source == "qa", int(r)) for r in rows]
        self.items = np.array(items, dtype=np.int64)
        self.lengths = self._lengths(frame_stack)
        # the laid-out row's width: the prompt's 3 specials, and eot after a text answer (layout.py)
        speech_out = np.isin(self.items[:, 0], [TASKS.index(t) for t in SPEECH_TASKS])
        self.positions = self.lengths + np.where(speech_out, 3, 4)

    def _lengths(self, frame_stack: int) -> np.ndarray:
        """Approximate positions per item, for grouping similar lengths into a batch."""
        asr, qa = self.sources["asr"], self.sources["qa"]
        if hasattr(asr, "lengths"):  # rows made on demand (data/stream.py): estimated lengths
            asr_len = asr.lengths(frame_stack)
        else:
            asr_len = np.array(
                [n_adapter_frames(int(n), frame_stack) + len(t) for n, t in zip(asr["n_frames"], asr["text_ids"])]
            )
        if qa is not None:
            speech = np.array([n_adapter_frames(int(n), frame_stack) for n in self.qa_lengths["n_frames"]])
            question, answer = self.qa_lengths["question_tokens"], self.qa_lengths["answer_tokens"]
            frames = self.qa_lengths["n_codes"] + N_AUDIO_LAYERS + 1
        out = []
        for task, is_qa, row in self.items:
            name = TASKS[task]
            if not is_qa:
                out.append(asr_len[row])
                continue
            q = speech[row] if name in SPEECH_IN_TASKS else question[row]
            a = max(frames[row], answer[row] + 1) if name in ("a1a2", "t1a2") else answer[row]
            out.append(q + a)
        return np.asarray(out)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        task, is_qa, row = (int(v) for v in self.items[i])
        return {**self.sources["qa" if is_qa else "asr"][row], "task": TASKS[task]}


def _qa_lengths(qa: datasets.Dataset | torch.utils.data.Dataset) -> dict[str, np.ndarray]:
    """QA rows' encoder frames, question and answer tokens and answer code frames: counted in the
    cache, or estimated for rows made on demand (data/stream.py)."""
    if hasattr(qa, "estimates"):
        return qa.estimates
    return {
        "n_frames": np.asarray(qa["n_frames"]),
        "question_tokens": np.array([len(q) for q in qa["question_ids"]]),
        "answer_tokens": np.array([len(a) for a in qa["answer_ids"]]),
        "n_codes": np.asarray(qa["n_codes"]),
    }


@dataclass
class SpeechTextCollator:
    """Lays out each row for its task (see layout.task_example) and pads the batch on the right.

    ASR rows (audio + transcript) serve the asr task; QA rows serve a1t2, t1t2, a1a2 and t1a2.
    `task` forces one task for every row (evaluation loaders); else rows carry their own."""

    layout: VocabLayout
    frame_stack: int
    task: str | None = None
    packed: bool = False  # all rows end to end in ONE row, positions restarting per sample (data/packing.py)

    def _example(self, row: dict) -> tuple[Example, int, str]:
        """(laid-out example, encoder frames it uses, reference answer text)."""
        task = self.task or row.get("task", "asr")
        n_frames = int(row["n_frames"])
        speech_in = task in SPEECH_IN_TASKS
        question: int | list[int] = (
            n_adapter_frames(n_frames, self.frame_stack) if speech_in else row["question_ids"].tolist()
        )
        if "text_ids" in row:  # an ASR row
            if task != "asr":
                raise DataError(f"an ASR row (audio + transcript) cannot serve task '{task}'")
            return task_example(self.layout, task, question, row["text_ids"].tolist()), n_frames, str(row["text"])
        if task == "asr":  # a QA row used for ASR: transcribe the spoken question
            answer = row["question_ids"].tolist()
            return task_example(self.layout, task, question, answer), n_frames, str(row["question"])
        codes = torch.from_numpy(np.asarray(row["codes"], dtype=np.int64).reshape(-1, N_AUDIO_LAYERS))
        example = task_example(self.layout, task, question, row["answer_ids"].tolist(), codes)
        return example, n_frames if speech_in else 0, str(row["answer"])

    def __call__(self, rows: list[dict]) -> dict:
        laid_out = [self._example(r) for r in rows]
        frames = max(n for _, n, _ in laid_out)
        in_step = "input_features" in rows[0]  # the encoder runs in the step (data/stream.py)
        if any(("input_features" in r) != in_step for r in rows):
            raise DataError("a batch mixes rows with cached encoder states and rows encoded in the step")
        dim = 0 if in_step else rows[0]["encoder_states"].shape[-1]
        batch = len(rows)
        states = torch.zeros(batch, frames, dim)
        for i, ((_, n, _), r) in enumerate(zip(laid_out, rows)):
            if not in_step:
                states[i, :n] = widened(r["encoder_states"][:n])
        audio = (
            {"input_features": torch.from_numpy(np.stack([r["input_features"] for r in rows]))}
            if in_step
            else {"encoder_states": states}
        )
        examples = [e for e, _, _ in laid_out]
        streams = self._packed(examples) if self.packed else self._padded(examples)
        return {
            **streams,
            **audio,
            "encoder_lengths": torch.tensor([n for _, n, _ in laid_out]),
            "texts": [ref for _, _, ref in laid_out],  # reference answers (transcripts for asr), for evaluation
            "task_ids": torch.tensor([TASKS.index(self.task or r.get("task", "asr")) for r in rows]),
            "questions": [str(r.get("question", "")) for r in rows],  # QA rows: the question asked (its text)
            # the written questions of a text-in evaluation loader, for free-running decoding
            **({"question_ids": [r["question_ids"].tolist() for r in rows]} if self.task in ("t1t2", "t1a2") else {}),
        }

    def _padded(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """One row per example, padded on the right to the longest."""
        width = max(e.input_ids.shape[1] for e in examples)
        batch = len(examples)
        input_ids = pad_token_column(self.layout)[None, :, None].repeat(batch, 1, width)
        labels = torch.full((batch, input_ids.shape[1], width), IGNORE, dtype=torch.long)
        attention = torch.zeros(batch, width, dtype=torch.long)
        audio_mask = torch.zeros(batch, width, dtype=torch.bool)
        for i, e in enumerate(examples):
            t = e.input_ids.shape[1]
            input_ids[i, :, :t] = e.input_ids
            labels[i, :, :t] = e.labels
            attention[i, :t] = 1
            audio_mask[i, :t] = e.audio_mask
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "audio_mask": audio_mask}

    def _packed(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """The examples end to end in one row. Position ids restart at 0 for each example (attention
        stays within it; RoPE positions are those it has alone), sample_index names the example of
        each position (its loss is summed per example), and each example's first label is dropped:
        alone it is never a target, packed it would be the previous example's last prediction."""
        labels = []
        for e in examples:
            first_dropped = e.labels.clone()
            first_dropped[:, 0] = IGNORE
            labels.append(first_dropped)
        widths = [e.input_ids.shape[1] for e in examples]
        return {
            "input_ids": torch.cat([e.input_ids for e in examples], dim=1)[None],
            "labels": torch.cat(labels, dim=1)[None],
            "attention_mask": torch.ones(1, sum(widths), dtype=torch.long),
            "audio_mask": torch.cat([e.audio_mask for e in examples])[None],
            "position_ids": torch.cat([torch.arange(w) for w in widths])[None],
            "sample_index": torch.cat([torch.full((w,), i) for i, w in enumerate(widths)])[None],
        }


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1/SIGINT to the training process, which checkpoints and
    then shuts them down; a worker killed by the signal would make the loader raise mid-save."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


@atexit.register  # registered after multiprocessing's own exit handler, so it runs before it
def _kill_loader_workers() -> None:
    """At exit, end loader workers still alive: after an error the loader's iterator can outlive the
    stage (held by the exception's traceback), and multiprocessing's exit would SIGTERM the workers,
    which ignore it (above), then wait for them forever."""
    for process in multiprocessing.active_children():
        if process.daemon:  # the loader's workers; multiprocessing would terminate these anyway
            process.kill()


def item_positions(dataset: datasets.Dataset | TaskMixture, frame_stack: int) -> np.ndarray:
    """Each training item's laid-out width (exact for cached rows; for rows made on demand the
    transcript's tokens are estimated, data/stream.py)."""
    if isinstance(dataset, TaskMixture):
        return dataset.positions
    if hasattr(dataset, "lengths"):
        return dataset.lengths(frame_stack) + 4
    speech = [n_adapter_frames(int(n), frame_stack) for n in dataset["n_frames"]]
    return np.array([s + len(t) + 4 for s, t in zip(speech, dataset["text_ids"])])  # prompt specials, eot


def train_loader(
    dataset: datasets.Dataset | TaskMixture,
    layout: VocabLayout,
    frame_stack: int,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    budget: TokenBudget | None = None,
) -> DataLoader:
    """Batches of batch_size rows (global: Accelerate splits each across processes), or with a
    token budget this process's micro-batches of up to budget.tokens positions (data/packing.py)."""
    collator = SpeechTextCollator(layout, frame_stack, packed=budget is not None and budget.packed)
    if budget is not None:
        sampler = TokenBudgetSampler(
            item_positions(dataset, frame_stack),
            budget.tokens,
            seed,
            budget.packed,
            budget.num_processes,
            budget.process_index,
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collator,
            worker_init_fn=_ignore_stop_signals,
        )
    if isinstance(dataset, TaskMixture):
        lengths = dataset.lengths
    elif hasattr(dataset, "lengths"):  # rows made on demand (data/stream.py): frames from the seconds column
        lengths = dataset.n_frames
    else:
        lengths = dataset["n_frames"]
    sampler = LengthGroupedSampler(lengths, batch_size, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=collator,
        worker_init_fn=_ignore_stop_signals,
    )


def eval_loader(
    prepared: datasets.Dataset, layout: VocabLayout, frame_stack: int, batch_size: int, task: str | None = None
) -> DataLoader:
    """In dataset order (no shuffle) so every utterance is scored exactly once."""
    return DataLoader(
        prepared, batch_size=batch_size, shuffle=False, collate_fn=SpeechTextCollator(layout, frame_stack, task)
    )
