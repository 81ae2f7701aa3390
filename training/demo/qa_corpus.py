"""The embedded spoken question/answer corpus: questions spoken by espeak-ng, short text answers,
and the answers spoken by one fixed assistant voice as SNAC codes.

It feeds the stages that answer (A1T2, A1A2, T1A2, T1T2) the way the ASR corpus (training.demo.corpus)
feeds ASR: it reuses that corpus's voices, Arrow layout and loader, and speaks through training.demo.espeak.

Generator
---------
Facts come from a few relations (training.demo.qa_facts), each a table keyword -> answer (1-3 words):

  opposite      hot -> cold, up -> down, ...          color      the sky -> blue, a frog -> green, ...
  number_after  seven -> eight (one .. twelve)        number_before  seven -> six (two .. thirteen)
  animal_sound  a cow -> moo, ...                     legs       a spider -> eight, ...
  baby_animal   a cat -> kitten, ...                  day_after  monday -> tuesday, ...

and each relation has six phrasings (templates), e.g. "what is the opposite of {k}", "tell me the
opposite of {k}", "{k} is the opposite of what". A question is one (template, keyword) pair, so its
answer is fixed by the question, and what a model must learn is (a) which relation a phrasing asks
for and (b) the keyword's fact: both are taught by training rows and neither needs world knowledge.
The vocabulary is common English words that espeak-ng pronounces plainly.

Held-out rule
-------------
Within each relation the keywords are put in a seeded order; keyword i gets template i mod 6 as
its "heldout" question, template (i+1) mod 6 as its "dev" question, and the other four as
training questions. Hence

* every dev/heldout question is a sentence that training never contains (asserted);
* its keyword's answer is taught in training through four other phrasings (the training split
  lists every keyword's first training phrasing before any keyword's second, so even the quick
  size teaches every keyword; asserted after building);
* its phrasing is used in training with the relation's other keywords (the rotation spreads the
  held-out slot over all six templates).

Answering a held-out question therefore takes composing a known phrasing with a known fact; a
model that memorized the training sentences gets it wrong.

Splits (as for ASR)
-------------------
  train    training voices x training questions     (questions repeat, each time with another voice)
  dev      training voices x dev questions          (new sentences, known voices)
  heldout  held-out voices x heldout questions      (new sentences AND new voices)

Voices default to the ASR corpus's: the held-out speakers are the same two speakers the ASR corpus
holds out. dev and heldout rows interleave the relations, so a cut-down size still covers each.

Schema ("ours"; the first four columns carry VoiceAssistant-400K's names and forms)
-----------------------------------------------------------------------------------
  question        str    the question text, lowercase, no punctuation
  question_audio  Audio  the question spoken by the row's voice (Audio(sampling_rate=22050,
                         decode=False): {"bytes": WAV bytes, "path": file name})
  answer          str    the short text answer (1-3 words)
  answer_snac     str    the answer spoken by the fixed assistant voice, encoded with the 24 kHz
                         SNAC codec into [n, 7] codes, as "# c1 c2 c3 c4 c5 c6 c7 # ..."
                         (training.speech.snac_codes.parse_answer_snac reads it back)
  answer_audio    Audio  that assistant speech itself (same form as question_audio), so a user
                         with real SNAC weights can re-encode it
  speaker         str    the question voice's speaker id
  relation        str    e.g. "opposite"
  keyword         str    the fact's keyword, e.g. "hot" or "the sky"

Answer speech comes from one assistant voice, so each distinct answer text is synthesized and
encoded once and shared by all rows with that answer. The default codec is SNAC built with seeded
random weights (training.speech.codec.load_codec(None)): the codes are a real training target, but
decoding them gives unintelligible audio; set `QACorpusConfig.codec` to a local snac_24khz
folder for real codes.

A built corpus is saved once under cache_dir/qa-corpus-<hash> and loaded from there afterwards
(espeak output is not bit-identical from run to run). The hash covers the config, the relation
tables and templates, and the codec's identity, so editing any of them builds a new corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value

from training.common import LogFn, build_once
from training.demo.corpus import SPLITS, CorpusConfig, audio_dataset, check_corpus_config, load_corpus, split_voices
from training.demo.espeak import ESPEAK_SAMPLE_RATE, VoiceSpec, speak_clip
from training.demo.qa_facts import RELATIONS
from training.speech.audio import wav_bytes

__all__ = [
    "QACorpusConfig",
    "QAItem",
    "build_qa_corpus",
    "qa_config_hash",
    "qa_corpus_config",
    "qa_corpus_dir",
    "split_questions",
]


@dataclass(frozen=True)
class QACorpusConfig:
    """Sizes, voices and audio settings of the QA corpus (all of it goes into the cache hash)."""

    n_train: int = 1200
    n_dev: int = 100
    n_heldout: int = 100
    seed: int = 0
    # The ASR corpus's speakers, so "heldout" here holds out the same voices as there.
    train_voices: tuple[VoiceSpec, ...] = CorpusConfig.train_voices
    heldout_voices: tuple[VoiceSpec, ...] = CorpusConfig.heldout_voices
    # The assistant: one fixed voice (a variant no question speaker uses), no jitter.
    assistant_voice: VoiceSpec = VoiceSpec("en-us+f5", 165, 52)
    # None: SNAC 24 kHz with seeded random weights; else a local snac_24khz folder or hub id.
    codec: str | None = None
    rate_jitter: int = 10
    pitch_jitter: int = 5
    silence_threshold: int = 300
    keep_silence_ms: int = 60
    max_seconds: float = 3.9  # the stand-in encoder's 4 s window, as for ASR
    sampling_rate: int = ESPEAK_SAMPLE_RATE


def qa_corpus_config(scale: str) -> QACorpusConfig:
    """The QA corpus at full size (the demo) or quick size (the tests)."""
    if scale == "full":
        return QACorpusConfig()
    if scale == "quick":
        return QACorpusConfig(n_train=1200, n_dev=40, n_heldout=100)
    raise ValueError(f"QA corpus scale is 'full' or 'quick', got {scale!r}")


@dataclass(frozen=True)
class QAItem:
    """One question (a phrasing filled with a keyword) and the answer that its fact fixes."""

    question: str
    answer: str
    relation: str
    keyword: str


def split_questions(config: QACorpusConfig) -> dict[str, list[QAItem]]:
    """The distinct questions of each split, in the order rows are drawn from them.

    train: every keyword's first training phrasing, then every keyword's second, ... (shuffled
    within a round, relations mixed), so any prefix of at least one question per keyword teaches
    every fact. dev/heldout: one question per keyword, relations interleaved round-robin.
    """
    rng = random.Random(f"{config.seed}-questions")
    pools: dict[str, list[QAItem]] = {}
    train_rounds: dict[int, list[QAItem]] = {}
    held: dict[str, list[list[QAItem]]] = {"dev": [], "heldout": []}
    for relation in RELATIONS:
        facts = list(relation.facts)
        random.Random(f"{config.seed}-{relation.name}-order").shuffle(facts)
        m = len(relation.templates)
        if m < 3:
            raise ValueError(f"relation {relation.name!r} needs at least 3 phrasings (train, dev, heldout)")
        per_split: dict[str, list[QAItem]] = {"dev": [], "heldout": []}
        for i, (keyword, answer) in enumerate(facts):
            # template i mod m -> heldout, (i+1) mod m -> dev, the rest -> training rounds 0..m-3
            heldout, dev, *trained = [
                QAItem(relation.templates[(i + j) % m].format(k=keyword), answer, relation.name, keyword)
                for j in range(m)
            ]
            per_split["heldout"].append(heldout)
            per_split["dev"].append(dev)
            for r, item in enumerate(trained):
                train_rounds.setdefault(r, []).append(item)
        for split, lists in held.items():
            rng.shuffle(per_split[split])
            lists.append(per_split[split])
    train: list[QAItem] = []
    for r in sorted(train_rounds):
        rng.shuffle(train_rounds[r])
        train += train_rounds[r]
    pools["train"] = train
    for split, lists in held.items():
        pools[split] = [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]
    _check_pools(pools)
    return pools


def _check_pools(pools: dict[str, list[QAItem]]) -> None:
    """Every claim the held-out splits rest on, checked on the question pools."""
    answers: dict[str, str] = {}
    for items in pools.values():
        for it in items:
            if answers.setdefault(it.question, it.answer) != it.answer:
                raise AssertionError(f"question {it.question!r} has two answers")
            if not 1 <= len(it.answer.split()) <= 3:
                raise AssertionError(f"answer {it.answer!r} is not 1-3 words")
    texts = {name: [it.question for it in items] for name, items in pools.items()}
    for name, items in texts.items():
        assert len(set(items)) == len(items), f"{name}: a question occurs twice in its pool"
    train = set(texts["train"])
    assert not train & set(texts["dev"]), "a dev question is also a training question"
    assert not train & set(texts["heldout"]), "a held-out question is also a training question"
    assert not set(texts["dev"]) & set(texts["heldout"]), "a dev question is also a held-out question"


def _n_keywords() -> int:
    return sum(len(r.facts) for r in RELATIONS)


# ----------------------------------------------------------------------------------------------
# Building and caching.


def _check_config(config: QACorpusConfig) -> None:
    check_corpus_config(config, unit="row")
    if config.n_train < _n_keywords():
        raise ValueError(
            f"n_train={config.n_train} cannot teach all {_n_keywords()} facts; the held-out questions "
            f"would ask about facts training never shows (use n_train >= {_n_keywords()})"
        )


def qa_config_hash(config: QACorpusConfig) -> str:
    """Hash of everything the corpus content depends on: config, relation tables, codec identity."""
    from training.speech.codec import RANDOM_SEED
    from training.speech.snac_codes import SNAC_24KHZ_CONFIG

    payload = {
        "config": dataclasses.asdict(config),
        "relations": [dataclasses.asdict(r) for r in RELATIONS],
        "codec": config.codec if config.codec is not None else {"random_seed": RANDOM_SEED, **SNAC_24KHZ_CONFIG},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def qa_corpus_dir(cache_dir: str | Path, config: QACorpusConfig = QACorpusConfig()) -> Path:
    """Where `build_qa_corpus` keeps (or will keep) the corpus for `config`."""
    return Path(cache_dir) / f"qa-corpus-{qa_config_hash(config)}"


def _rows(pool: list[QAItem], n: int, voices: tuple[VoiceSpec, ...]) -> list[tuple[QAItem, VoiceSpec]]:
    """`n` rows drawn from `pool` in order, cycling; voices round-robin, shifted by one on each
    pass so a repeated question comes back in another voice."""
    rows = []
    for i in range(n):
        rows.append((pool[i % len(pool)], voices[(i + i // len(pool)) % len(voices)]))
    return rows


def _speak_answers(answers: list[str], config: QACorpusConfig, log: LogFn) -> dict[str, tuple[bytes, str]]:
    """Each distinct answer, once: (WAV bytes of the assistant voice, answer_snac string)."""
    import torch

    from training.speech.codec import encode_speech, load_codec
    from training.speech.snac_codes import format_answer_snac

    codec = load_codec(config.codec, log=log)
    voice = config.assistant_voice
    out: dict[str, tuple[bytes, str]] = {}
    # One thread: the clips are tiny (~0.5 s), and on a busy 2-core machine two intra-op threads
    # spin against each other (measured ~10x slower: 154 s vs 14 s for the 87 answers).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for answer in answers:
            samples = speak_clip(answer, voice.voice, voice.rate, voice.pitch, config, f"answer {answer!r}")
            codes = encode_speech(codec, samples.astype(np.float32) / 32768.0, config.sampling_rate)
            out[answer] = (wav_bytes(samples, config.sampling_rate), format_answer_snac(codes))
    finally:
        torch.set_num_threads(threads)
    return out


_FEATURES = Features(
    {
        "question": Value("string"),
        "question_audio": {"bytes": Value("binary"), "path": Value("string")},
        "answer": Value("string"),
        "answer_snac": Value("string"),
        "answer_audio": {"bytes": Value("binary"), "path": Value("string")},
        "speaker": Value("string"),
        "relation": Value("string"),
        "keyword": Value("string"),
    }
)


def build_qa_corpus(
    cache_dir: str | Path, config: QACorpusConfig = QACorpusConfig(), log: LogFn = print
) -> DatasetDict:
    """Build (once) and load the spoken question/answer corpus as a `datasets.DatasetDict`.

    Splits "train", "dev", "heldout"; columns as in the module docstring. It lives in
    `cache_dir/qa-corpus-<hash>` and is written to a temporary folder and renamed into place.
    """
    _check_config(config)
    target = qa_corpus_dir(cache_dir, config)
    if target.exists():
        return load_corpus(target)

    started = time.perf_counter()
    pools = split_questions(config)
    voices = split_voices(config)
    sizes = {"train": config.n_train, "dev": config.n_dev, "heldout": config.n_heldout}
    rows = {name: _rows(pools[name], sizes[name], voices[name]) for name in SPLITS}

    t0 = time.perf_counter()
    distinct = sorted({item.answer for split_rows in rows.values() for item, _ in split_rows})
    answers = _speak_answers(distinct, config, log)
    log(f"qa corpus: spoke and SNAC-encoded {len(distinct)} distinct answers in {time.perf_counter() - t0:.1f} s")

    rng = random.Random(f"{config.seed}-jitter")
    splits: dict[str, Dataset] = {}
    for name in SPLITS:
        t0 = time.perf_counter()
        columns: dict[str, list] = {key: [] for key in _FEATURES}
        for i, (item, voice) in enumerate(rows[name]):
            rate = voice.rate + rng.randint(-config.rate_jitter, config.rate_jitter)
            pitch = voice.pitch + rng.randint(-config.pitch_jitter, config.pitch_jitter)
            samples = speak_clip(item.question, voice.voice, rate, pitch, config, f"qa {name} row {i}")
            answer_wav, answer_snac = answers[item.answer]
            columns["question"].append(item.question)
            columns["question_audio"].append(
                {"bytes": wav_bytes(samples, config.sampling_rate), "path": f"qa-{name}-{i:05d}.wav"}
            )
            columns["answer"].append(item.answer)
            columns["answer_snac"].append(answer_snac)
            columns["answer_audio"].append({"bytes": answer_wav, "path": f"answer-{item.answer.replace(' ', '_')}.wav"})
            columns["speaker"].append(voice.speaker_id)
            columns["relation"].append(item.relation)
            columns["keyword"].append(item.keyword)
        seconds = sum(len(a["bytes"]) - 44 for a in columns["question_audio"]) / 2 / config.sampling_rate
        log(
            f"qa corpus: synthesized {name}: {len(rows[name])} questions ({len(set(columns['question']))} distinct), "
            f"{seconds / 60:.1f} min of audio, {len(voices[name])} voices in {time.perf_counter() - t0:.1f} s"
        )
        splits[name] = audio_dataset(columns, _FEATURES, ("question_audio", "answer_audio"))

    _check_answerable(splits)
    with build_once(target, log, "qa corpus") as tmp:
        DatasetDict(splits).save_to_disk(str(tmp))
    log(
        f"qa corpus: {sum(len(d) for d in splits.values())} rows ready in {time.perf_counter() - started:.1f} s "
        f"at {target}"
    )
    return load_corpus(target)


def _check_answerable(splits: dict[str, Dataset]) -> None:
    """Each dev/heldout row's (relation, keyword) is taught in train with the same answer."""
    train = splits["train"]
    taught = {(r, k): a for r, k, a in zip(train["relation"], train["keyword"], train["answer"])}
    for name in ("dev", "heldout"):
        ds = splits[name]
        for i, (r, k, a) in enumerate(zip(ds["relation"], ds["keyword"], ds["answer"])):
            if taught.get((r, k)) != a:
                raise AssertionError(f"qa {name} row {i}: {r} of {k!r} -> {a!r} is not taught by training")
