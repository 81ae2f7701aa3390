"""The embedded spoken question/answer corpus (quick size, built once into a temporary cache)."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import datasets
import pytest

from training.demo.corpus import CorpusConfig
from training.demo.qa_corpus import (
    QACorpusConfig,
    build_qa_corpus,
    qa_corpus_config,
    qa_corpus_dir,
    split_questions,
)
from training.speech.audio import decode_audio
from training.speech.snac_codes import parse_answer_snac, samples_per_frame

QUICK = qa_corpus_config("quick")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, datasets.DatasetDict, list[str]]:
    cache = tmp_path_factory.mktemp("qa-cache")
    logs: list[str] = []
    corpus = build_qa_corpus(cache, QUICK, log=logs.append)
    return cache, corpus, logs


def test_splits_columns_and_sizes(built) -> None:
    _, corpus, _ = built
    assert set(corpus) == {"train", "dev", "heldout"}
    assert {name: len(ds) for name, ds in corpus.items()} == {"train": 1200, "dev": 40, "heldout": 100}
    for ds in corpus.values():
        assert ds.column_names[:4] == ["question", "question_audio", "answer", "answer_snac"]
        for column in ("question_audio", "answer_audio"):
            feature = ds.features[column]
            assert isinstance(feature, datasets.Audio) and not feature.decode and feature.sampling_rate == 22050
        for column in ("question", "answer", "answer_snac", "speaker", "relation", "keyword"):
            assert ds.features[column] == datasets.Value("string")
        assert all(1 <= len(a.split()) <= 3 for a in ds["answer"])


def test_question_audio_is_speech_within_the_encoder_window(built) -> None:
    _, corpus, _ = built
    for name, ds in corpus.items():
        for i in range(0, len(ds), 37):
            samples, rate = decode_audio(ds[i]["question_audio"], f"{name} row {i}")
            assert rate == 22050 and 0.5 < samples.size / rate <= QUICK.max_seconds
            assert abs(samples).max() > 0.05  # not silence


def test_heldout_questions_are_new_sentences(built) -> None:
    _, corpus, _ = built
    train = set(corpus["train"]["question"])
    assert not train & set(corpus["dev"]["question"])
    assert not train & set(corpus["heldout"]["question"])
    assert not set(corpus["dev"]["question"]) & set(corpus["heldout"]["question"])
    # ... at the pool level too, full size included
    for config in (QUICK, qa_corpus_config("full")):
        pools = split_questions(config)
        assert not {q.question for q in pools["train"]} & {q.question for q in pools["heldout"] + pools["dev"]}


def test_heldout_voices_are_the_asr_corpus_heldout_voices(built) -> None:
    _, corpus, _ = built
    train_speakers = set(corpus["train"]["speaker"])
    assert set(corpus["dev"]["speaker"]) <= train_speakers
    heldout_speakers = set(corpus["heldout"]["speaker"])
    assert heldout_speakers and not heldout_speakers & train_speakers
    assert heldout_speakers == {v.speaker_id for v in CorpusConfig().heldout_voices}
    assert train_speakers == {v.speaker_id for v in CorpusConfig().train_voices}


def test_every_heldout_answer_is_taught_in_training(built) -> None:
    _, corpus, _ = built
    train = corpus["train"]
    taught: dict[tuple[str, str], set[str]] = {}
    for r, k, a in zip(train["relation"], train["keyword"], train["answer"]):
        taught.setdefault((r, k), set()).add(a)
    assert all(len(answers) == 1 for answers in taught.values())  # the question decides the answer
    phrasings: dict[tuple[str, str], set[str]] = {}
    for r, k, q in zip(train["relation"], train["keyword"], train["question"]):
        phrasings.setdefault((r, k), set()).add(q)
    for name in ("dev", "heldout"):
        ds = corpus[name]
        for r, k, a in zip(ds["relation"], ds["keyword"], ds["answer"]):
            assert taught.get((r, k)) == {a}, f"{name}: {r} of {k!r} -> {a!r} not taught"
    assert len(set(corpus["heldout"]["relation"])) == 8  # the interleaving covers every relation
    # 1,200 rows over 121 facts: every fact in all four of its training phrasings
    assert len(phrasings) == 121 and {len(qs) for qs in phrasings.values()} == {4}


def test_answer_snac_is_the_assistant_speech(built) -> None:
    _, corpus, _ = built
    by_answer: dict[str, str] = {}
    for ds in corpus.values():
        for answer, snac in zip(ds["answer"], ds["answer_snac"]):
            # one fixed assistant voice: one encoding per distinct answer, shared by its rows
            assert by_answer.setdefault(answer, snac) == snac
    for name, ds in corpus.items():
        for i in range(0, len(ds), 29):
            row = ds[i]
            codes = parse_answer_snac(row["answer_snac"], f"{name} row {i}")
            samples, rate = decode_audio(row["answer_audio"], f"{name} row {i} answer_audio")
            # SNAC pads the 24 kHz clip to whole frames: n = ceil(duration x 24000 / 2048)
            expected = math.ceil(round(samples.size * 24000 / rate) / samples_per_frame())
            assert codes.shape == (expected, 7), (codes.shape, expected)


def test_rebuild_hits_the_cache(built) -> None:
    cache, corpus, logs = built
    assert any("rows ready" in line for line in logs)
    again: list[str] = []
    t0 = time.perf_counter()
    reloaded = build_qa_corpus(cache, QUICK, log=again.append)
    assert time.perf_counter() - t0 < 5 and again == []
    assert all(reloaded[s]._fingerprint == corpus[s]._fingerprint for s in corpus)
    assert reloaded["heldout"][0]["question_audio"]["bytes"] == corpus["heldout"][0]["question_audio"]["bytes"]
    # a different config (or generator) is a different corpus folder
    assert qa_corpus_dir(cache, QUICK) != qa_corpus_dir(cache, dataclasses.replace(QUICK, seed=1))
    assert qa_corpus_dir(cache, QUICK) != qa_corpus_dir(cache, qa_corpus_config("full"))


def test_config_checks() -> None:
    assert (QUICK.n_train, QUICK.n_dev, QUICK.n_heldout) == (1200, 40, 100)
    assert qa_corpus_config("full") == QACorpusConfig()
    with pytest.raises(ValueError, match="scale"):
        qa_corpus_config("tiny")
    with pytest.raises(ValueError, match="cannot teach"):
        build_qa_corpus("/nonexistent", dataclasses.replace(QUICK, n_train=50))
    with pytest.raises(ValueError, match="held-out voice"):
        build_qa_corpus("/nonexistent", dataclasses.replace(QUICK, heldout_voices=QUICK.train_voices[:1]))
