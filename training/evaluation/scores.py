"""Held-out scores of a model on a loader: greedy decoding for WER and answer accuracy (Whisper-
normalized), teacher-forced audio-token accuracy, and the token-weighted loss. Each utterance is
scored exactly once across processes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import evaluate
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from training.model import model_inputs
from training.model.decoding import generate
from training.speech.layout import N_AUDIO_LAYERS
from training.speech.snac_codes import SNAC_CODEBOOK
from training.speech.text import normalize

WER_METRIC_DIR = Path(__file__).parent / "metrics" / "wer"


def load_wer_metric() -> evaluate.EvaluationModule:
    """Our local metric module: loads offline, no hub script."""
    return evaluate.load(str(WER_METRIC_DIR))


def all_ranks_finished(accelerator: Accelerator) -> Callable[[bool], bool] | None:
    """For lock-step decoding on several processes: True once every rank is finished."""
    if accelerator.num_processes == 1:
        return None

    def finished(local: bool) -> bool:
        unfinished = torch.tensor([0.0 if local else 1.0], device=accelerator.device)
        return float(accelerator.reduce(unfinished, reduction="sum")) == 0.0

    return finished


@torch.no_grad()
def transcribe(
    accelerator: Accelerator, model, loader: DataLoader, tokenizer, max_new_tokens: int, task: str = "asr"
) -> tuple[list[str], list[str]]:
    """Greedy transcripts and their references, gathered across processes, each utterance once.

    Every rank decodes the same number of batches (Accelerate pads the last one by repeating
    rows; gather_for_metrics drops the repeats) and the same number of steps per batch."""
    unwrapped = accelerator.unwrap_model(model)
    predictions, references = [], []
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sync = all_ranks_finished(accelerator)
    for batch in loader:
        answers = generate(
            unwrapped,
            task,
            encoder_states=batch["encoder_states"],
            encoder_lengths=batch["encoder_lengths"],
            max_new_tokens=max_new_tokens,
            stop_ids=stops,
            all_finished=sync,
        )
        texts = [tokenizer.decode(answer.text_ids) for answer in answers]
        predictions += accelerator.gather_for_metrics(texts, use_gather_object=True)
        references += accelerator.gather_for_metrics(batch["texts"], use_gather_object=True)
    return predictions, references


def decode_in_eval_mode(
    accelerator: Accelerator, model, loader: DataLoader, tokenizer, max_new_tokens: int, task: str
) -> tuple[list[str], list[str]]:
    """`transcribe` with the model in eval mode, back in train mode after."""
    model.eval()
    predictions, references = transcribe(accelerator, model, loader, tokenizer, max_new_tokens, task=task)
    model.train()
    return predictions, references


def word_error_rate(predictions: list[str], references: list[str]) -> dict[str, float]:
    """WER after Whisper normalization of both sides."""
    preds = [normalize(p) for p in predictions]
    refs = [normalize(r) for r in references]
    scores = load_wer_metric().compute(predictions=preds, references=refs)
    return {"wer": float(scores["wer"]), "utterances": len(refs), "words": int(scores["words"])}


def evaluate_wer(
    accelerator: Accelerator,
    model,
    loader: DataLoader,
    tokenizer,
    max_new_tokens: int,
) -> tuple[dict[str, float], list[tuple[str, str]]]:
    predictions, references = decode_in_eval_mode(accelerator, model, loader, tokenizer, max_new_tokens, "asr")
    return word_error_rate(predictions, references), list(zip(references, predictions))


def answer_accuracy(
    accelerator: Accelerator,
    model,
    loader: DataLoader,
    tokenizer,
    max_new_tokens: int,
) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """A1T2 on held-out spoken questions: greedy text answers, exact match after Whisper
    normalization, each question counted once."""
    predictions, references = decode_in_eval_mode(accelerator, model, loader, tokenizer, max_new_tokens, "a1t2")
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    return {"accuracy": hits / len(references), "questions": len(references)}, list(zip(references, predictions))


@torch.no_grad()
def audio_token_scores(accelerator: Accelerator, model, loader: DataLoader) -> dict[str, float]:
    """Teacher-forced scores of the answer speech (an A1A2 loader): greedy accuracy over SNAC code
    positions of the 7 audio layers, and their mean cross-entropy (pads and eoa included)."""
    model.eval()
    totals = []
    for batch in loader:
        out = model(**model_inputs(batch))
        audio = slice(0, N_AUDIO_LAYERS)
        rows = torch.stack(
            [
                out["row_correct"][:, audio].sum(-1),
                out["row_judged"][:, audio].sum(-1),
                out["row_loss_sum"][:, audio].sum(-1),
                out["row_count"][:, audio].sum(-1),
            ],
            dim=-1,
        )
        totals.append(accelerator.gather_for_metrics(rows).sum(0))
    model.train()
    correct, judged, ce, count = torch.stack(totals).sum(0).tolist()
    return {
        "accuracy": correct / max(judged, 1.0),
        "ce": ce / max(count, 1.0),
        "codes": int(judged),
        "chance": 1 / SNAC_CODEBOOK,
    }


@torch.no_grad()
def heldout_loss(accelerator: Accelerator, model, loader: DataLoader) -> float:
    """Token-weighted loss over the whole split (the early-stop signal); per-row sums are
    gathered so that rows repeated to even out the last batch across ranks count once."""
    model.eval()
    totals = []
    for batch in loader:
        out = model(**model_inputs(batch))
        rows = torch.stack([out["row_loss_sum"].sum(-1), out["row_count"].sum(-1)], dim=-1)  # [B, 2]
        totals.append(accelerator.gather_for_metrics(rows).sum(0))
    model.train()
    total = torch.stack(totals).sum(0)
    return float(total[0] / total[1])
