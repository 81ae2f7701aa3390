"""Audio decoding for datasets that keep their audio column undecoded.

`datasets` 5.x decodes Audio through torchcodec, which is fragile on CPU-only machines, so the
project reads `Audio(decode=False)` values itself: soundfile to decode, soxr to resample.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import soundfile as sf
import soxr

__all__ = ["decode_audio", "load_waveform", "resample", "wav_bytes"]


def _fail(where: str, reason: str) -> ValueError:
    return ValueError(f"{where}: cannot read audio ({reason}); expected a WAV/FLAC/OGG file or bytes")


def decode_audio(value: Any, where: str = "") -> tuple[np.ndarray, int]:
    """Decode one undecoded Audio value into float32 mono samples at the file's own rate.

    `value` is what an `Audio(decode=False)` column holds: a dict with "bytes" (may be None)
    and/or "path". Bytes win over the path because datasets saved with `save_to_disk` embed
    the bytes and keep only a bare file name in "path".
    A manifest row's value may also carry "offset" and "duration" (seconds): then only that
    segment is read (long recordings are cut, not refused; the duration alone is informative).
    `where` names the row for error messages, e.g. "dataset train, row 17, column 'audio'".
    """
    where = where or "audio value"
    if not isinstance(value, dict):
        raise _fail(where, f"got {type(value).__name__}, not a dict with 'bytes' or 'path'")
    data = value.get("bytes")
    path = value.get("path")
    if data is None and not path:
        raise _fail(where, "neither 'bytes' nor 'path' is set")
    if data is not None and len(data) == 0:
        raise _fail(where, "'bytes' is empty")
    if data is None and not os.path.isfile(path):
        raise _fail(where, f"no file at path {path!r}")  # soundfile would only say "System error."
    origin = f"{len(data)} bytes" if data is not None else f"path {path!r}"
    offset, duration = value.get("offset"), value.get("duration")
    try:
        source: Any = io.BytesIO(data) if data is not None else path
        with sf.SoundFile(source) as f:
            source_rate = f.samplerate
            if offset:  # a segment of a longer recording (manifests' offset/duration)
                f.seek(min(int(round(offset * source_rate)), f.frames))
            frames = int(round(duration * source_rate)) if offset is not None and duration else -1
            samples = f.read(frames, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types (LibsndfileError, OSError, TypeError)
        # LibsndfileError's str() embeds the repr of the BytesIO; its error_string is the plain reason.
        reason = getattr(exc, "error_string", None) or str(exc)
        raise _fail(where, f"{origin}: {reason}") from exc
    if samples.size == 0:
        raise _fail(where, "the audio is empty")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if not np.all(np.isfinite(mono)):
        raise _fail(where, "the audio contains NaN or infinite samples")
    return mono, int(source_rate)


def resample(mono: np.ndarray, source_rate: int, sampling_rate: int, where: str = "") -> np.ndarray:
    """float32 samples at `sampling_rate` (soxr, high quality)."""
    if source_rate != sampling_rate:
        try:
            mono = soxr.resample(mono, source_rate, sampling_rate)
        except Exception as exc:
            raise _fail(
                where or "audio value", f"resampling {source_rate} Hz -> {sampling_rate} Hz failed: {exc}"
            ) from exc
        if mono.size == 0:
            # A clip of a few samples can vanish when downsampled; treat it like empty audio.
            raise _fail(where or "audio value", "the audio is empty after resampling")
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_waveform(value: Any, sampling_rate: int = 16000, where: str = "") -> np.ndarray:
    """Decode one undecoded Audio value into float32 mono samples at `sampling_rate`."""
    mono, source_rate = decode_audio(value, where)
    return resample(mono, source_rate, sampling_rate, where)


def wav_bytes(samples: np.ndarray, sampling_rate: int) -> bytes:
    """Encode mono samples as a 16-bit PCM WAV file in memory.

    int16 input is written as is; float input is taken to lie in [-1, 1] (soundfile's convention).
    """
    samples = np.asarray(samples)
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"wav_bytes: expected a non-empty 1-D array of samples, got shape {samples.shape}")
    buffer = io.BytesIO()
    sf.write(buffer, samples, sampling_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
