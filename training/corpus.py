"""The embedded speech corpus: English sentences from a small grammar, spoken by espeak-ng.

No speech data set is reachable offline, so the demo synthesizes one. espeak-ng comes from the
PyPI package `espeakng-loader` (the shared library plus its voice data) and is driven through
ctypes in synchronous mode: the default 1,800 utterances take ~5 s on one core.

Splits:
  train    training voices   x training sentences
  dev      training voices   x dev sentences        (new sentences, known voices)
  heldout  held-out voices   x held-out sentences   (new sentences AND new voices)

espeak output is not bit-identical from run to run, so a built corpus is saved once with
`save_to_disk` and every later call loads that copy: runs and resumed runs see the same audio.

The spoken question/answer corpus (training/qa_corpus.py) reuses this module's voices, synthesis
(`speak_clip`) and caching (`save_atomically`, `load_cached`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from datasets import Audio, Dataset, DatasetDict, Features, Value, load_from_disk

from training.audio import wav_bytes

__all__ = [
    "CorpusConfig",
    "VoiceSpec",
    "SPLITS",
    "build_corpus",
    "check_voices",
    "config_hash",
    "corpus_dir",
    "load_cached",
    "make_sentences",
    "save_atomically",
    "speak_clip",
    "split_sentences",
    "synthesize",
    "vocabulary",
]

SPLITS = ("train", "dev", "heldout")
ESPEAK_SAMPLE_RATE = 22050  # what espeak-ng reports from espeak_Initialize; checked at init


@dataclass(frozen=True)
class VoiceSpec:
    """One synthetic speaker: an espeak voice ("language+variant"), a rate and a pitch."""

    voice: str  # e.g. "en-us+m3": base voice "en-us", variant "m3"
    rate: int  # words per minute (espeak default 175)
    pitch: int  # 0-100 (espeak default 50)

    @property
    def speaker_id(self) -> str:
        return f"{self.voice}_r{self.rate}_p{self.pitch}"

    @property
    def base(self) -> str:
        return self.voice.split("+", 1)[0]

    @property
    def variant(self) -> str:
        return self.voice.split("+", 1)[1] if "+" in self.voice else ""


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


LogFn = Callable[[str], None]

# ----------------------------------------------------------------------------------------------
# Sentences: a small template grammar over ~200 words.

_DETERMINERS = ("the", "a", "my", "your", "his", "her", "our", "their", "this", "that")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_ADJECTIVES = (
    "small", "big", "red", "blue", "green", "yellow", "black", "white", "old", "new", "happy",
    "little", "tall", "warm", "cold", "quiet", "loud", "bright", "dark", "soft", "young", "funny",
    "clever", "hungry", "tired", "brown",
)
_CREATURES = (
    "dog", "cat", "bird", "horse", "cow", "fish", "mouse", "child", "teacher", "doctor", "farmer",
    "baby", "girl", "boy", "man", "woman", "friend", "king", "queen", "cook",
)
# Objects with their plurals (irregular spellings spelled out; no inflection rules needed).
_OBJECTS = {
    "ball": "balls", "book": "books", "cup": "cups", "box": "boxes", "hat": "hats", "car": "cars",
    "boat": "boats", "chair": "chairs", "table": "tables", "door": "doors", "key": "keys",
    "apple": "apples", "cake": "cakes", "letter": "letters", "picture": "pictures", "bag": "bags",
    "lamp": "lamps", "clock": "clocks", "shoe": "shoes", "coat": "coats", "bottle": "bottles",
    "flower": "flowers", "stone": "stones",
}
_PLACES = (
    "house", "garden", "park", "river", "school", "market", "kitchen", "forest", "city", "village",
    "beach", "hill", "road", "bridge", "station", "shop", "farm", "library", "field", "lake",
)
# Verbs as (third person singular, base form).
_INTRANSITIVE = (
    ("runs", "run"), ("walks", "walk"), ("sleeps", "sleep"), ("sings", "sing"), ("jumps", "jump"),
    ("waits", "wait"), ("swims", "swim"), ("sits", "sit"), ("plays", "play"), ("dances", "dance"),
    ("laughs", "laugh"), ("works", "work"),
)
_TRANSITIVE = (
    ("sees", "see"), ("likes", "like"), ("finds", "find"), ("takes", "take"), ("opens", "open"),
    ("carries", "carry"), ("wants", "want"), ("holds", "hold"), ("buys", "buy"), ("paints", "paint"),
    ("cleans", "clean"), ("brings", "bring"), ("watches", "watch"), ("needs", "need"),
)
_MOTION_PREPOSITIONS = ("to", "into", "across", "from", "near", "behind")
_LOCATION_PREPOSITIONS = ("in", "on", "near", "under", "behind", "by")
_ADVERBS = ("quickly", "slowly", "quietly", "happily", "often", "always", "never", "sometimes", "now")
_TIMES = (
    ("in", "the", "morning"), ("in", "the", "evening"), ("at", "night"), ("every", "day"),
    ("after", "lunch"), ("before", "dinner"), ("today",), ("on", "sunday"),
)
_PLURAL_PRONOUNS = ("we", "they", "you")
_SINGULAR_PRONOUNS = ("he", "she")


def _pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


def _noun_phrase(rng: random.Random, nouns: Sequence[str], adjective_p: float = 0.5) -> list[str]:
    words = [_pick(rng, _ADJECTIVES)] if rng.random() < adjective_p else []
    words.append(_pick(rng, nouns))
    det = _pick(rng, _DETERMINERS)
    if det == "a" and words[0][0] in "aeiou":
        det = "an"  # "an apple", "an old cat"
    return [det, *words]


def _tail(rng: random.Random, adverbs: bool = True) -> list[str]:
    """An optional adverb or time phrase at the end of a sentence."""
    r = rng.random()
    if r < 0.25 and adverbs:
        return [_pick(rng, _ADVERBS)]
    if r < 0.5:
        return list(_TIMES[rng.randrange(len(_TIMES))])
    return []


def _things() -> tuple[str, ...]:
    return _CREATURES + tuple(_OBJECTS)


def _sentence(rng: random.Random) -> list[str]:
    kind = rng.randrange(9)
    if kind == 0:  # the small dog runs to the red house
        verb = _pick(rng, [v for v, _ in _INTRANSITIVE])
        return [*_noun_phrase(rng, _CREATURES), verb, _pick(rng, _MOTION_PREPOSITIONS),
                *_noun_phrase(rng, _PLACES), *_tail(rng)]
    if kind == 1:  # the teacher sleeps quietly
        verb = _pick(rng, [v for v, _ in _INTRANSITIVE])
        return [*_noun_phrase(rng, _CREATURES), verb, *(_tail(rng) or [_pick(rng, _ADVERBS)])]
    if kind == 2:  # my friend finds a blue key in the garden
        verb = _pick(rng, [v for v, _ in _TRANSITIVE])
        words = [*_noun_phrase(rng, _CREATURES), verb, *_noun_phrase(rng, _things())]
        if rng.random() < 0.5:
            words += [_pick(rng, _LOCATION_PREPOSITIONS), *_noun_phrase(rng, _PLACES, 0.3)]
        return words + _tail(rng)
    if kind == 3:  # they watch the old horse every day
        subject = _pick(rng, _PLURAL_PRONOUNS + _SINGULAR_PRONOUNS)
        third, base = _TRANSITIVE[rng.randrange(len(_TRANSITIVE))]
        verb = third if subject in _SINGULAR_PRONOUNS else base
        return [subject, verb, *_noun_phrase(rng, _things()), *_tail(rng)]
    if kind == 4:  # there are three red apples on the table
        if rng.random() < 0.5:
            return ["there", "is", *_noun_phrase(rng, _things()), _pick(rng, _LOCATION_PREPOSITIONS),
                    *_noun_phrase(rng, _PLACES, 0.3)]
        plural = _OBJECTS[_pick(rng, tuple(_OBJECTS))]
        adjective = [_pick(rng, _ADJECTIVES)] if rng.random() < 0.5 else []
        return ["there", "are", _pick(rng, _NUMBERS), *adjective, plural,
                _pick(rng, _LOCATION_PREPOSITIONS), *_noun_phrase(rng, _PLACES, 0.3)]
    if kind == 5:  # the cat is very hungry today
        very = ["very"] if rng.random() < 0.4 else []
        return [*_noun_phrase(rng, _CREATURES, 0.3), "is", *very, _pick(rng, _ADJECTIVES),
                *_tail(rng, adverbs=False)]
    if kind == 6:  # where is the red cup / is the dog in the park
        if rng.random() < 0.5:
            return ["where", "is", *_noun_phrase(rng, _things())]
        return ["is", *_noun_phrase(rng, _things()), _pick(rng, _LOCATION_PREPOSITIONS),
                *_noun_phrase(rng, _PLACES, 0.3)]
    if kind == 7:  # can you see the big tree near the river
        words = ["can", "you", _TRANSITIVE[rng.randrange(len(_TRANSITIVE))][1], *_noun_phrase(rng, _things())]
        if rng.random() < 0.4:
            words += [_pick(rng, _LOCATION_PREPOSITIONS), *_noun_phrase(rng, _PLACES, 0.3)]
        return words
    # the cat and the dog play in the park
    base = _INTRANSITIVE[rng.randrange(len(_INTRANSITIVE))][1]
    return [*_noun_phrase(rng, _CREATURES, 0.3), "and", *_noun_phrase(rng, _CREATURES, 0.3), base,
            _pick(rng, _LOCATION_PREPOSITIONS), *_noun_phrase(rng, _PLACES, 0.0)]


def vocabulary() -> frozenset[str]:
    """Every word the grammar can produce."""
    words: set[str] = set(_DETERMINERS) | {"an"} | set(_NUMBERS) | set(_ADJECTIVES) | set(_CREATURES)
    words |= set(_OBJECTS) | set(_OBJECTS.values()) | set(_PLACES)
    words |= {w for pair in _INTRANSITIVE + _TRANSITIVE for w in pair}
    words |= set(_MOTION_PREPOSITIONS) | set(_LOCATION_PREPOSITIONS) | set(_ADVERBS)
    words |= {w for phrase in _TIMES for w in phrase} | set(_PLURAL_PRONOUNS) | set(_SINGULAR_PRONOUNS)
    words |= {"there", "is", "are", "very", "where", "can", "and"}
    return frozenset(words)


def make_sentences(n: int, seed: int, min_words: int = 4, max_words: int = 10) -> list[str]:
    """`n` distinct sentences (lowercase, no punctuation), deterministic in `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"the sentence grammar yielded only {len(out)} distinct sentences of "
                               f"{min_words}-{max_words} words; asked for {n}")
        words = _sentence(rng)
        if not min_words <= len(words) <= max_words:
            continue
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


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
        pools[name] = pool[start:start + sizes[name]]
        start += sizes[name]
    train = set(pools["train"])
    # Distinct by construction; asserted because every held-out claim rests on it.
    assert not train & set(pools["dev"]), "a dev sentence is also a training sentence"
    assert not train & set(pools["heldout"]), "a held-out sentence is also a training sentence"
    assert not set(pools["dev"]) & set(pools["heldout"]), "a dev sentence is also a held-out sentence"
    return pools


# ----------------------------------------------------------------------------------------------
# espeak-ng through ctypes.

_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT enum: PLAYBACK, RETRIEVAL, SYNCHRONOUS, ...
_POS_CHARACTER = 1  # espeak_POSITION_TYPE
_CHARS_UTF8 = 1
_PARAM_RATE = 1  # espeak_PARAMETER enum: SILENCE, RATE, VOLUME, PITCH, RANGE, ...
_PARAM_PITCH = 3
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Espeak:
    """The process-wide espeak-ng engine (the C library keeps global state: initialize once)."""

    _instance: "_Espeak | None" = None

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise RuntimeError("speech synthesis needs the PyPI package espeakng-loader "
                               "(pip install espeakng-loader)") from exc
        lib_path = espeakng_loader.get_library_path()
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError as exc:
            raise RuntimeError(f"cannot load libespeak-ng from {lib_path}: {exc}") from exc
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate}); data path "
                               f"{espeakng_loader.get_data_path()}")
        self.lib = lib
        self.sample_rate = rate
        self.variants_dir = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
        self._lock = threading.Lock()  # one engine, one output buffer: one utterance at a time
        self._chunks: list[np.ndarray] = []

        def collect(wav: "ctypes._Pointer[ctypes.c_short]", n: int, _events: int | None) -> int:
            # espeak calls back with successive int16 chunks, and once more with NULL at the end.
            if wav and n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0  # 0 = keep synthesizing

        # Keep a reference: ctypes does not, and a collected callback crashes the process.
        self._callback = _SYNTH_CALLBACK(collect)
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None

    @classmethod
    def get(cls) -> "_Espeak":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def say(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        with self._lock:
            return self._say(text, voice, rate, pitch)

    def _say(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        if voice != self._voice:
            variant = voice.split("+", 1)[1] if "+" in voice else ""
            # espeak silently ignores an unknown variant ("en+nonsense" speaks plain "en"): check it.
            if variant and not (self.variants_dir / variant).is_file():
                raise ValueError(f"espeak-ng has no voice variant {variant!r} (in {voice!r}); "
                                 f"see {self.variants_dir}")
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r} (expected e.g. 'en-us+m3')")
            self._voice = voice
        self.lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        self._chunks.clear()
        data = text.encode("utf-8") + b"\0"
        status = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status} on {text!r}")
        if not self._chunks:
            raise RuntimeError(f"espeak produced no audio for {text!r} with voice {voice!r}")
        return np.concatenate(self._chunks)


def synthesize(text: str, voice: VoiceSpec | str, rate: int | None = None, pitch: int | None = None) -> np.ndarray:
    """Speak `text`; returns int16 samples at 22,050 Hz (see `ESPEAK_SAMPLE_RATE`)."""
    if isinstance(voice, VoiceSpec):
        rate = voice.rate if rate is None else rate
        pitch = voice.pitch if pitch is None else pitch
        voice = voice.voice
    engine = _Espeak.get()
    if engine.sample_rate != ESPEAK_SAMPLE_RATE:
        raise RuntimeError(f"espeak-ng reports {engine.sample_rate} Hz, expected {ESPEAK_SAMPLE_RATE}")
    return engine.say(text, voice, 175 if rate is None else rate, 50 if pitch is None else pitch)


def _trim(samples: np.ndarray, threshold: int, keep: int) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > threshold)
    if loud.size == 0:
        return samples
    return samples[max(0, loud[0] - keep): loud[-1] + 1 + keep]


class ClipSettings(Protocol):
    """The audio settings `speak_clip` reads (CorpusConfig has them; so may other corpus configs)."""

    silence_threshold: int
    keep_silence_ms: int
    max_seconds: float
    sampling_rate: int


def speak_clip(text: str, voice: str, rate: int, pitch: int, settings: ClipSettings, where: str) -> np.ndarray:
    """One utterance as the corpora store it: synthesized, silence trimmed, at most `max_seconds`.

    A clip that comes out too long is spoken again faster rather than dropped, so split sizes and
    text pools stay as configured; `where` names the row if even that is too long.
    """
    keep = int(settings.keep_silence_ms * settings.sampling_rate / 1000)
    max_samples = int(settings.max_seconds * settings.sampling_rate)
    samples = _trim(synthesize(text, voice, rate, pitch), settings.silence_threshold, keep)
    if samples.size > max_samples:
        samples = _trim(synthesize(text, voice, int(rate * samples.size / max_samples) + 10, pitch),
                        settings.silence_threshold, keep)
        if samples.size > max_samples:
            raise RuntimeError(f"{where}: {text!r} is {samples.size / settings.sampling_rate:.2f} s "
                               f"even spoken fast; max_seconds={settings.max_seconds}")
    return samples


# ----------------------------------------------------------------------------------------------
# Building and caching.


def _check_config(config: CorpusConfig) -> None:
    if min(config.n_train, config.n_dev, config.n_heldout) < 1:
        raise ValueError(f"every split needs at least one utterance: {config}")
    if not config.train_voices or not config.heldout_voices:
        raise ValueError("CorpusConfig needs at least one training voice and one held-out voice")
    if config.sampling_rate != ESPEAK_SAMPLE_RATE:
        raise ValueError(f"espeak-ng synthesizes at {ESPEAK_SAMPLE_RATE} Hz; got sampling_rate={config.sampling_rate}")
    check_voices(config.train_voices, config.heldout_voices)


def check_voices(train_voices: Sequence[VoiceSpec], heldout_voices: Sequence[VoiceSpec]) -> None:
    """Held-out speakers share neither voice nor variant with training ones: "heldout" means unheard."""
    train_ids = {v.voice for v in train_voices}
    train_variants = {v.variant for v in train_voices}
    for held in heldout_voices:
        if held.voice in train_ids or held.variant in train_variants:
            raise ValueError(f"held-out voice {held.voice!r} (variant {held.variant!r}) also occurs in training; "
                             f"a held-out speaker must be new")


def config_hash(config: CorpusConfig) -> str:
    text = json.dumps(dataclasses.asdict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def corpus_dir(cache_dir: str | Path, config: CorpusConfig = CorpusConfig()) -> Path:
    """Where `build_corpus` keeps (or will keep) the corpus for `config`."""
    return Path(cache_dir) / f"corpus-{config_hash(config)}"


def _to_dataset(columns: dict[str, list]) -> Dataset:
    """A Dataset whose "audio" column is `Audio(decode=False)` holding our WAV bytes.

    The columns go in as plain Arrow structs and are then cast: `Features.encode_example` for
    Audio imports torchcodec (which needs FFmpeg) even for ready-made bytes; a cast does not.
    """
    features = Features({"audio": {"bytes": Value("binary"), "path": Value("string")},
                         "text": Value("string"), "speaker": Value("string")})
    dataset = Dataset.from_dict(columns, features=features)
    return dataset.cast_column("audio", Audio(sampling_rate=ESPEAK_SAMPLE_RATE, decode=False))


def _synthesize_split(name: str, sentences: list[str], voices: Sequence[VoiceSpec], config: CorpusConfig,
                      rng: random.Random) -> dict[str, list]:
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
    _check_config(config)
    target = corpus_dir(cache_dir, config)
    if target.exists():
        return _load(target)

    started = time.perf_counter()
    pools = split_sentences(config)
    voices = {"train": config.train_voices, "dev": config.train_voices, "heldout": config.heldout_voices}
    rng = random.Random(config.seed + 1)  # jitter stream, independent of the sentence stream
    splits: dict[str, Dataset] = {}
    for name in SPLITS:
        t0 = time.perf_counter()
        columns = _synthesize_split(name, pools[name], voices[name], config, rng)
        seconds = sum(len(a["bytes"]) - 44 for a in columns["audio"]) / 2 / config.sampling_rate
        log(f"corpus: synthesized {name}: {len(pools[name])} utterances, {seconds / 60:.1f} min of audio, "
            f"{len(voices[name])} voices in {time.perf_counter() - t0:.1f} s")
        splits[name] = _to_dataset(columns)
    save_atomically(DatasetDict(splits), target, log, "corpus")
    log(f"corpus: {sum(len(d) for d in splits.values())} utterances ready in "
        f"{time.perf_counter() - started:.1f} s at {target}")
    return _load(target)


def save_atomically(corpus: DatasetDict, target: Path, log: LogFn, label: str) -> None:
    """`save_to_disk` into a temporary folder, then rename it to `target`.

    An interrupted build never leaves a folder that a later call would load, and when two
    processes (e.g. two ranks) build at once, the first rename wins and both use that copy.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        corpus.save_to_disk(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process (e.g. a second rank) finished first: keep its copy so all agree.
            if not target.exists():
                raise
            log(f"{label}: {target} appeared while building; using that copy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after a successful rename


def load_cached(target: Path) -> DatasetDict:
    """A corpus saved by `save_atomically`, checked to hold the splits train/dev/heldout."""
    return _load(target)


def _load(target: Path) -> DatasetDict:
    try:
        corpus = load_from_disk(str(target))
    except Exception as exc:
        raise RuntimeError(f"cannot load the cached corpus at {target} ({exc}); "
                           f"delete that folder to rebuild it") from exc
    if not isinstance(corpus, DatasetDict) or set(corpus) != set(SPLITS):
        raise RuntimeError(f"the cached corpus at {target} does not hold the splits {SPLITS}; "
                           f"delete that folder to rebuild it")
    return corpus
