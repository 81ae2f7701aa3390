"""The embedded speech corpus: English sentences from a small grammar (training.demo.grammar),
spoken by espeak-ng.

Splits:
  train    training voices   x training sentences
  dev      training voices   x dev sentences        (new sentences, known voices)
  heldout  held-out voices   x held-out sentences   (new sentences AND new voices)

espeak output is not bit-identical from run to run (training.demo.espeak), so a built corpus is
saved once with `save_to_disk` and every later call loads that copy: runs and resumed runs see the
same audio.

The spoken question/answer corpus (training.demo.qa_corpus) reuses this module's splits, voices
(CorpusConfig's), Arrow layout (`audio_dataset`) and loader (`load_corpus`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import Audio, Dataset, DatasetDict, Features, Value, load_from_disk

from training.common import LogFn, build_once
from training.demo.espeak import ESPEAK_SAMPLE_RATE, VoiceSpec, check_voices, speak_clip
from training.demo.grammar import make_sentences
from training.speech.audio import wav_bytes

__all__ = [
    "SPLITS",
    "CorpusConfig",
    "audio_dataset",
    "build_corpus",
    "check_corpus_config",
    "config_hash",
    "corpus_config",
    "corpus_dir",
    "load_corpus",
    "make_sentences",
    "split_sentences",
    "split_voices",
    "text_only_sentences",
]

SPLITS = ("train", "dev", "heldout")


@dataclass(frozen=True)
class CorpusConfig:
    n_train: int = 2400
    n_dev: int = 100
    n_heldout: int = 100
    seed: int = 0
    # Eight training speakers; the two held-out speakers use base voices (accents) AND variants
    # (formant/pitch profiles) that training never hears, so "heldout" measures unseen voices.
    train_voices: tuple[VoiceSpec, ...] = (
        VoiceSpec("en-us+m3", 170, 45),
        VoiceSpec("en+f3", 165, 55),
        VoiceSpec("en-gb-x-rp+m1", 185, 40),
        VoiceSpec("en-us+f2", 160, 60),
        VoiceSpec("en-gb-scotland+m5", 175, 50),
        VoiceSpec("en-029+m2", 170, 50),
        VoiceSpec("en-gb-x-gbcwmd+f1", 160, 58),
        VoiceSpec("en+m6", 180, 42),
    )
    heldout_voices: tuple[VoiceSpec, ...] = (
        VoiceSpec("en-us-nyc+f4", 170, 55),
        VoiceSpec("en-gb-x-gbclan+m7", 180, 45),
    )
    # Per-utterance jitter around each speaker's rate/pitch, so one speaker is not one fixed tempo.
    rate_jitter: int = 10
    pitch_jitter: int = 5
    min_words: int = 4
    max_words: int = 10
    # Leading/trailing silence below this level (int16 units) is cut down to `keep_silence_ms`.
    silence_threshold: int = 300
    keep_silence_ms: int = 60
    # The stand-in encoder sees a 4 s window; a longer clip would lose the end of its transcript.
    max_seconds: float = 3.9
    sampling_rate: int = ESPEAK_SAMPLE_RATE


def corpus_config(scale: str) -> CorpusConfig:
    """The corpus at full size (the demo) or quick size (the tests; any scale but "full")."""
    return CorpusConfig() if scale == "full" else CorpusConfig(n_train=480, n_dev=40, n_heldout=40)


def text_only_sentences(config: CorpusConfig, n: int) -> list[str]:
    """`n` more sentences of the same grammar, text only, for pretraining the stand-in LLM (the
    stand-in for the web text a real LLM has read). None is a dev or held-out sentence."""
    pools = split_sentences(config)
    unseen = set(pools["dev"]) | set(pools["heldout"])
    spoken = set(pools["train"])
    extra = make_sentences(n + len(unseen) + len(spoken), config.seed + 1, config.min_words, config.max_words)
    return [s for s in extra if s not in unseen and s not in spoken][:n]


def split_sentences(config: CorpusConfig) -> dict[str, list[str]]:
    """Disjoint sentence pools for the three splits (one sentence per utterance)."""
    sizes = {"train": config.n_train, "dev": config.n_dev, "heldout": config.n_heldout}
    pool = make_sentences(sum(sizes.values()), config.seed, config.min_words, config.max_words)
    pools: dict[str, list[str]] = {}
    start = 0
    for name in SPLITS:
        pools[name] = pool[start : start + sizes[name]]
        start += sizes[name]
    train = set(pools["train"])
    # Distinct by construction; asserted because every held-out claim rests on it.
    assert not train & set(pools["dev"]), "a dev sentence is also a training sentence"
    assert not train & set(pools["heldout"]), "a held-out sentence is also a training sentence"
    assert not set(pools["dev"]) & set(pools["heldout"]), "a dev sentence is also a held-out sentence"
    return pools


# ----------------------------------------------------------------------------------------------
# Building and caching.


def check_corpus_config(config, unit: str = "utterance") -> None:
    """What any synthesized corpus config needs (CorpusConfig, QACorpusConfig): every split a `unit`,
    training and held-out voices that do not overlap, espeak-ng's sample rate."""
    if min(config.n_train, config.n_dev, config.n_heldout) < 1:
        raise ValueError(f"every split needs at least one {unit}: {config}")
    if not config.train_voices or not config.heldout_voices:
        raise ValueError(f"{type(config).__name__} needs at least one training voice and one held-out voice")
    if config.sampling_rate != ESPEAK_SAMPLE_RATE:
        raise ValueError(f"espeak-ng synthesizes at {ESPEAK_SAMPLE_RATE} Hz; got sampling_rate={config.sampling_rate}")
    check_voices(config.train_voices, config.heldout_voices)


def split_voices(config) -> dict[str, tuple[VoiceSpec, ...]]:
    """Who speaks each split: dev in the training voices (new sentences), heldout in voices never trained on."""
    return {"train": config.train_voices, "dev": config.train_voices, "heldout": config.heldout_voices}


def config_hash(config: CorpusConfig) -> str:
    text = json.dumps(dataclasses.asdict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def corpus_dir(cache_dir: str | Path, config: CorpusConfig = CorpusConfig()) -> Path:
    """Where `build_corpus` keeps (or will keep) the corpus for `config`."""
    return Path(cache_dir) / f"corpus-{config_hash(config)}"


_FEATURES = Features(
    {"audio": {"bytes": Value("binary"), "path": Value("string")}, "text": Value("string"), "speaker": Value("string")}
)


def audio_dataset(columns: dict[str, list], features: Features, audio_columns: Sequence[str]) -> Dataset:
    """A Dataset whose `audio_columns` are `Audio(decode=False)` holding our WAV bytes.

    The columns go in as plain Arrow structs and are then cast: `Features.encode_example` for
    Audio imports torchcodec (which needs FFmpeg) even for ready-made bytes; a cast does not.
    """
    dataset = Dataset.from_dict(columns, features=features)
    for column in audio_columns:
        dataset = dataset.cast_column(column, Audio(sampling_rate=ESPEAK_SAMPLE_RATE, decode=False))
    return dataset


def _synthesize_split(
    name: str, sentences: list[str], voices: Sequence[VoiceSpec], config: CorpusConfig, rng: random.Random
) -> dict[str, list]:
    columns: dict[str, list] = {"audio": [], "text": [], "speaker": []}
    for i, text in enumerate(sentences):
        voice = voices[i % len(voices)]  # round-robin: every speaker gets an equal share
        rate = voice.rate + rng.randint(-config.rate_jitter, config.rate_jitter)
        pitch = voice.pitch + rng.randint(-config.pitch_jitter, config.pitch_jitter)
        samples = speak_clip(text, voice.voice, rate, pitch, config, f"{name} row {i}")
        columns["audio"].append({"bytes": wav_bytes(samples, config.sampling_rate), "path": f"{name}-{i:05d}.wav"})
        columns["text"].append(text)
        columns["speaker"].append(voice.speaker_id)
    return columns


def build_corpus(cache_dir: str | Path, config: CorpusConfig = CorpusConfig(), log: LogFn = print) -> DatasetDict:
    """Build (once) and load the synthesized corpus as a `datasets.DatasetDict`.

    Splits "train", "dev", "heldout"; columns "audio" (`Audio(sampling_rate=22050, decode=False)`:
    {"bytes": WAV bytes, "path": file name}), "text", "speaker". The corpus lives in
    `cache_dir/corpus-<config hash>`; it is written to a temporary folder and renamed into place,
    so an interrupted build never leaves a folder that a later call would load.
    """
    check_corpus_config(config)
    target = corpus_dir(cache_dir, config)
    if target.exists():
        return load_corpus(target)

    started = time.perf_counter()
    pools = split_sentences(config)
    voices = split_voices(config)
    rng = random.Random(config.seed + 1)  # jitter stream, independent of the sentence stream
    splits: dict[str, Dataset] = {}
    for name in SPLITS:
        t0 = time.perf_counter()
        columns = _synthesize_split(name, pools[name], voices[name], config, rng)
        seconds = sum(len(a["bytes"]) - 44 for a in columns["audio"]) / 2 / config.sampling_rate
        log(
            f"corpus: synthesized {name}: {len(pools[name])} utterances, {seconds / 60:.1f} min of audio, "
            f"{len(voices[name])} voices in {time.perf_counter() - t0:.1f} s"
        )
        splits[name] = audio_dataset(columns, _FEATURES, ("audio",))
    with build_once(target, log, "corpus") as tmp:
        DatasetDict(splits).save_to_disk(str(tmp))
    log(
        f"corpus: {sum(len(d) for d in splits.values())} utterances ready in "
        f"{time.perf_counter() - started:.1f} s at {target}"
    )
    return load_corpus(target)


def load_corpus(target: Path) -> DatasetDict:
    """A corpus saved by a build (this module's or the QA corpus's), checked to hold train/dev/heldout."""
    try:
        corpus = load_from_disk(str(target))
    except Exception as exc:
        raise RuntimeError(
            f"cannot load the cached corpus at {target} ({exc}); delete that folder to rebuild it"
        ) from exc
    if not isinstance(corpus, DatasetDict) or set(corpus) != set(SPLITS):
        raise RuntimeError(
            f"the cached corpus at {target} does not hold the splits {SPLITS}; delete that folder to rebuild it"
        )
    return corpus
