"""Speech out, judged as spoken: free-running (greedy, KV cache, batched) answers of the held-out
questions, with the answer speech judged for what it says.

Without an intelligible codec (the demo's has random weights) the judge works on codes: the
generated [n, 7] SNAC code sequence is matched to the nearest reference answer speech among all
answer candidates (`CodeJudge`: edit distance over frames, a substituted frame costing the share of
its 7 codes that differ). That names the answer the speech says, which gives

  spoken-answer accuracy   the named answer is the question's reference answer
  text-speech agreement    the named answer is what the model's own text stream said
  exact-sequence rate      the generated codes ARE the reference codes

each beside its floor: the commonest training answer for accuracy and exact rate (a model that
ignores the question), and for agreement the chance that text and speech drawn independently from
their own answer frequencies name the same answer. Lengths (generated / reference frames) and how
often decoding ran to its token limit catch a model that never emits eoa.
With a real codec and an ASR judge (evaluation/speech_judge.py) the speech is also transcribed.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from training.evaluation.scores import all_ranks_finished
from training.model.decoding import generate
from training.speech.layout import N_AUDIO_LAYERS
from training.speech.text import normalize

MAX_CANDIDATES = 4_096  # distinct answers the code judge compares against (a bigger set needs the ASR judge)
# what the trackers get of each speech-out task at a boundary
SPOKEN_FIGURES = ("spoken_accuracy", "text_speech_agreement", "exact_sequence_rate", "length_ratio", "reached_limit")
SAMPLES_KEPT = 4  # questions per boundary kept (with their codes) for the listening page


def frame_edit_distances(codes: torch.Tensor, references: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Levenshtein distance over frames from codes [n, 7] to each of C references [C, M, 7] (padded;
    true lengths [C]). Insert and delete cost 1; a substitution costs the share of the 7 codes that
    differ, so a frame off in one fine code is nearly a match. Returns [C] floats."""
    n, count, width = codes.shape[0], references.shape[0], references.shape[1]
    column = torch.arange(width + 1, dtype=torch.float32)
    previous = column.expand(count, width + 1).clone()  # distance from 0 generated frames
    if n:
        substitution = (codes[None, :, None, :] != references[:, None, :, :]).float().mean(-1)  # [C, n, M]
    for i in range(n):
        diagonal = previous[:, :-1] + substitution[:, i]
        best = torch.minimum(diagonal, previous[:, 1:] + 1)
        row = torch.cat([previous[:, :1] + 1, best], dim=1)
        # insertions run left to right: d[j] = min over k <= j of row[k] + (j - k)
        previous = torch.cummin(row - column, dim=1).values + column
    return previous.gather(1, lengths[:, None]).squeeze(1)


class CodeJudge:
    """Names the answer a generated code sequence speaks: the candidate answer whose reference
    speech is nearest (frame edit distance; ties to the first candidate)."""

    def __init__(self, candidates: dict[str, np.ndarray]) -> None:
        if not candidates:
            raise ValueError("the code judge needs at least one reference answer with speech")
        self.answers = list(candidates)
        refs = [torch.as_tensor(np.asarray(c, dtype=np.int64).reshape(-1, N_AUDIO_LAYERS)) for c in candidates.values()]
        self.lengths = torch.tensor([len(r) for r in refs])
        self.references = torch.full((len(refs), max(1, int(self.lengths.max())), N_AUDIO_LAYERS), -1)
        for i, r in enumerate(refs):
            self.references[i, : len(r)] = r

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, Any]], limit: int = MAX_CANDIDATES) -> CodeJudge:
        """(answer text, flattened codes) rows -> a judge over the distinct normalized answers (the
        first speech seen of each), at most `limit` of them."""
        candidates: dict[str, np.ndarray] = {}
        for answer, codes in rows:
            key = normalize(answer)
            if key not in candidates and len(codes):
                candidates[key] = np.asarray(codes, dtype=np.int64)
                if len(candidates) >= limit:
                    break
        return cls(candidates)

    def reference(self, answer: str) -> torch.Tensor | None:
        """The reference codes [m, 7] of an answer, if it is a candidate."""
        key = normalize(answer)
        if key not in self.answers:
            return None
        i = self.answers.index(key)
        return self.references[i, : int(self.lengths[i])]

    def __call__(self, codes: Any) -> str:
        """codes: [n, 7] (tensor or nested lists)."""
        frames = torch.as_tensor(codes, dtype=torch.long).reshape(-1, N_AUDIO_LAYERS).cpu()
        distances = frame_edit_distances(frames, self.references, self.lengths)
        return self.answers[int(torch.argmin(distances))]


@dataclass
class SpokenAnswer:
    """One held-out question answered freely: what was asked for, said in text, and spoken."""

    question: str
    reference: str
    text: str
    codes: list[list[int]]  # [n, 7] generated SNAC codes
    reached_limit: bool


@torch.no_grad()
def speak_heldout(
    accelerator: Accelerator, model, loader: DataLoader, tokenizer, task: str, max_new_tokens: int
) -> list[SpokenAnswer]:
    """Greedy text + speech answers to every held-out question (a1a2: spoken, t1a2: written),
    gathered across processes, each question once, every rank taking the same steps."""
    unwrapped = accelerator.unwrap_model(model)
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sync = all_ranks_finished(accelerator)
    answers: list[SpokenAnswer] = []
    model.eval()
    for batch in loader:
        question = (
            {"encoder_states": batch["encoder_states"], "encoder_lengths": batch["encoder_lengths"]}
            if task == "a1a2"
            else {"question_ids": batch["question_ids"]}
        )
        generated = generate(
            unwrapped, task, max_new_tokens=max_new_tokens, stop_ids=stops, all_finished=sync, **question
        )
        local = [
            SpokenAnswer(question, ref, tokenizer.decode(g.text_ids), g.codes.tolist(), not g.finished)
            for question, ref, g in zip(batch["questions"], batch["texts"], generated)
        ]
        answers += accelerator.gather_for_metrics(local, use_gather_object=True)
    model.train()
    return answers


def chance_agreement(first: list[str], second: list[str]) -> float:
    """How often two answers drawn independently from these two lists' frequencies agree."""
    a, b = collections.Counter(first), collections.Counter(second)
    return sum(a[k] * b[k] for k in a) / max(1, len(first) * len(second))


def code_judge_scores(answers: list[SpokenAnswer], judge: CodeJudge, majority: float | None) -> dict[str, Any]:
    """Spoken-answer accuracy, text-speech agreement, exact-sequence rate and lengths (module doc)."""
    spoken = [judge(a.codes) for a in answers]
    texts = [normalize(a.text) for a in answers]
    references = [normalize(a.reference) for a in answers]
    exact, generated_frames, reference_frames = [], 0, 0
    for a in answers:
        ref = judge.reference(a.reference)
        generated_frames += len(a.codes)
        reference_frames += 0 if ref is None else len(ref)
        codes = torch.as_tensor(a.codes, dtype=torch.long).reshape(-1, N_AUDIO_LAYERS)
        exact.append(ref is not None and torch.equal(codes, ref))
    n = max(1, len(answers))
    return {
        "spoken_accuracy": sum(s == r for s, r in zip(spoken, references)) / n,
        "text_speech_agreement": sum(s == t for s, t in zip(spoken, texts)) / n,
        "agreement_floor": chance_agreement(spoken, texts),
        "exact_sequence_rate": sum(exact) / n,
        "majority": majority,  # the floor of spoken accuracy and the exact rate
        "length_ratio": generated_frames / max(1, reference_frames),
        "reached_limit": sum(a.reached_limit for a in answers) / n,
        "questions": len(answers),
        "candidates": len(judge.answers),
        "judge": "codes",
    }


def describe_spoken(scores: dict[str, Any]) -> str:
    """One log line of code_judge_scores."""
    return (
        f"spoken-answer accuracy {scores['spoken_accuracy']:.3f} (floor {scores['majority'] or 0:.3f}), "
        f"text-speech agreement {scores['text_speech_agreement']:.3f} (chance {scores['agreement_floor']:.3f}), "
        f"exact codes {scores['exact_sequence_rate']:.3f}, length x{scores['length_ratio']:.2f} of the reference, "
        f"{scores['reached_limit']:.1%} ran to the token limit"
    )
