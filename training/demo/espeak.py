"""espeak-ng driven through ctypes: the demo corpora's only source of speech.

No speech data set is reachable offline, so the demo synthesizes its own. espeak-ng comes from the
PyPI package `espeakng-loader` (the shared library plus its voice data) and runs in synchronous
mode: the default 1,800 utterances of the ASR corpus take ~5 s on one core. Its output is not
bit-identical from run to run, which is why the corpora built from it are cached once and reused.

Both corpora (training.demo.corpus, training.demo.qa_corpus) speak through `speak_clip`.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = [
    "ESPEAK_SAMPLE_RATE",
    "ClipSettings",
    "VoiceSpec",
    "check_voices",
    "speak_clip",
    "synthesize",
]

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


# ----------------------------------------------------------------------------------------------
# The engine.

_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT enum: PLAYBACK, RETRIEVAL, SYNCHRONOUS, ...
_POS_CHARACTER = 1  # espeak_POSITION_TYPE
_CHARS_UTF8 = 1
_PARAM_RATE = 1  # espeak_PARAMETER enum: SILENCE, RATE, VOLUME, PITCH, RANGE, ...
_PARAM_PITCH = 3
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Espeak:
    """The process-wide espeak-ng engine (the C library keeps global state: initialize once)."""

    _instance: _Espeak | None = None

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise RuntimeError(
                "speech synthesis needs the PyPI package espeakng-loader (pip install espeakng-loader)"
            ) from exc
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
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(
                f"espeak_Initialize failed (returned {rate}); data path {espeakng_loader.get_data_path()}"
            )
        self.lib = lib
        self.sample_rate = rate
        self.variants_dir = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
        self._lock = threading.Lock()  # one engine, one output buffer: one utterance at a time
        self._chunks: list[np.ndarray] = []

        def collect(wav: ctypes._Pointer[ctypes.c_short], n: int, _events: int | None) -> int:
            # espeak calls back with successive int16 chunks, and once more with NULL at the end.
            if wav and n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0  # 0 = keep synthesizing

        # Keep a reference: ctypes does not, and a collected callback crashes the process.
        self._callback = _SYNTH_CALLBACK(collect)
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None

    @classmethod
    def get(cls) -> _Espeak:
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
                raise ValueError(f"espeak-ng has no voice variant {variant!r} (in {voice!r}); see {self.variants_dir}")
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
    return samples[max(0, loud[0] - keep) : loud[-1] + 1 + keep]


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
        samples = _trim(
            synthesize(text, voice, int(rate * samples.size / max_samples) + 10, pitch),
            settings.silence_threshold,
            keep,
        )
        if samples.size > max_samples:
            raise RuntimeError(
                f"{where}: {text!r} is {samples.size / settings.sampling_rate:.2f} s "
                f"even spoken fast; max_seconds={settings.max_seconds}"
            )
    return samples


def check_voices(train_voices: Sequence[VoiceSpec], heldout_voices: Sequence[VoiceSpec]) -> None:
    """Held-out speakers share neither voice nor variant with training ones: "heldout" means unheard."""
    train_ids = {v.voice for v in train_voices}
    train_variants = {v.variant for v in train_voices}
    for held in heldout_voices:
        if held.voice in train_ids or held.variant in train_variants:
            raise ValueError(
                f"held-out voice {held.voice!r} (variant {held.variant!r}) also occurs in training; "
                f"a held-out speaker must be new"
            )
