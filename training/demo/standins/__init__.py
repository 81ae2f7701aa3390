"""Tiny stand-ins for the pretrained checkpoints (Whisper encoder, Qwen2 LLM).

No hub is reachable, so the demo trains its own small "pretrained" parts on the training split
and saves them with `save_pretrained`. The three-stage recipe then loads them by path, exactly as
it loads openai/whisper-small and Qwen/Qwen2-0.5B:

  encoder_dir  WhisperModel (trained encoder, token-sized decoder) + WhisperFeatureExtractor,
               plus the CTC head used to train it (ctc_head.safetensors; the recipe does not load it)
  llm_dir      Qwen2ForCausalLM + its tokenizer (byte-level BPE trained on the training text)

Here: the cache key and `build_standins`. What is trained: config.py; how: encoder.py (features,
VTLP, CTC) and llm.py (tokenizer, LM + copy + QA); their shared LR schedule: optim.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from training.common import LogFn, build_once
from training.demo.standins.config import FULL_STANDINS, QUICK_STANDINS, STANDIN_SCALES, StandinConfig
from training.demo.standins.encoder import CTC_ALPHABET, train_encoder
from training.demo.standins.llm import QAPair, train_llm

__all__ = [
    "CTC_ALPHABET",
    "FULL_STANDINS",
    "QUICK_STANDINS",
    "STANDIN_SCALES",
    "RECIPE_VERSION",
    "StandinConfig",
    "build_standins",
    "standins_dir",
]

SUMMARY_FILE = "standins.json"
# Bump when the training recipe changes in a way the config does not capture, so caches rebuild.
RECIPE_VERSION = 2


def _data_fingerprint(train: Dataset) -> str:
    """Identifies the training data: datasets' own fingerprint (content-derived, stable across
    `load_from_disk`) plus the transcripts, in case a caller hands in a dataset without one."""
    hasher = hashlib.sha256()
    hasher.update(str(getattr(train, "_fingerprint", "")).encode())
    hasher.update(str(len(train)).encode())
    for text in train["text"]:
        hasher.update(text.encode())
        hasher.update(b"\n")
    return hasher.hexdigest()


def _cache_key(
    config: StandinConfig, train: Dataset, extra_texts: Sequence[str] = (), qa_pairs: Sequence[QAPair] = ()
) -> str:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("cache_key", True)}
    extra = hashlib.sha256(json.dumps([list(extra_texts), [list(p) for p in qa_pairs]]).encode()).hexdigest()
    payload = json.dumps(
        {"recipe": RECIPE_VERSION, "config": fields, "data": _data_fingerprint(train), "extra": extra}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def standins_dir(
    cache_dir: str | Path,
    train: Dataset,
    config: StandinConfig = FULL_STANDINS,
    extra_texts: Sequence[str] = (),
    qa_pairs: Sequence[QAPair] = (),
) -> Path:
    """Where `build_standins` keeps (or will keep) the stand-ins for this config and data."""
    return Path(cache_dir) / f"standins-{_cache_key(config, train, extra_texts, qa_pairs)}"


def _split_indices(n: int, heldback: int, seed: int) -> tuple[list[int], list[int]]:
    if n < 2:
        raise ValueError(f"stand-in training needs at least 2 utterances, got {n}")
    heldback = max(1, min(heldback, n // 10))
    order = np.random.default_rng(seed).permutation(n).tolist()
    return sorted(order[heldback:]), sorted(order[:heldback])


def build_standins(
    train: Dataset,
    cache_dir: str | Path,
    config: StandinConfig = FULL_STANDINS,
    log: LogFn = print,
    extra_texts: Sequence[str] = (),
    qa_pairs: Sequence[QAPair] = (),
    qa_heldback: Sequence[QAPair] = (),
) -> tuple[Path, Path]:
    """Train (once) the stand-in encoder and LLM on `train`; returns (encoder_dir, llm_dir).

    `train` is a `datasets.Dataset` with "audio" (`Audio(decode=False)` values) and "text".
    `extra_texts` are text-only sentences the LLM (and its tokenizer) also learn from, as a real
    LLM has read far more text than any speech corpus holds. `qa_pairs` are (question, answer)
    texts it learns to answer, as a real LLM knows the facts a spoken question asks for;
    `qa_heldback` are other pairs, only scored (exact answers, in the build's summary).
    The result lives in `cache_dir/standins-<hash of config and data>/{encoder,llm}`; it is
    written to a temporary folder and renamed into place, so a crash never leaves a partial
    build that a later call would return.
    """
    config.validate()
    for column in ("audio", "text"):
        if column not in train.column_names:
            raise ValueError(f"stand-in training data needs columns 'audio' and 'text'; has {train.column_names}")
    target = standins_dir(cache_dir, train, config, extra_texts, [*qa_pairs, *qa_heldback])
    encoder_dir, llm_dir = target / "encoder", target / "llm"
    if target.is_dir():
        return encoder_dir, llm_dir

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
    try:
        with build_once(target, log, "stand-ins") as tmp:
            (tmp / "encoder").mkdir()
            (tmp / "llm").mkdir()
            started = time.perf_counter()
            rows, heldback = _split_indices(len(train), config.heldback, config.seed)
            log(
                f"stand-ins: training on {len(rows)} utterances, {len(heldback)} held back for checks, "
                f"{torch.get_num_threads()} threads"
            )
            summary: dict[str, Any] = {}
            summary.update(train_encoder(train, rows, heldback, tmp / "encoder", config, log))
            all_texts = list(train["text"])
            summary.update(
                train_llm(
                    [all_texts[i] for i in rows] + list(extra_texts),
                    [all_texts[i] for i in heldback],
                    tmp / "llm",
                    config,
                    log,
                    qa_pairs=qa_pairs,
                    qa_heldback=qa_heldback,
                )
            )
            summary["total_seconds"] = time.perf_counter() - started
            (tmp / SUMMARY_FILE).write_text(
                json.dumps({"config": dataclasses.asdict(config), "results": summary}, indent=2) + "\n"
            )
        log(f"stand-ins: ready in {summary['total_seconds']:.0f} s at {target}")
    finally:
        torch.set_num_threads(previous_threads)  # the caller's thread count, whatever happened
    return encoder_dir, llm_dir
