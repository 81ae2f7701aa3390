"""Transcript normalization shared by data validation and WER scoring."""

from __future__ import annotations

from whisper_normalizer.english import EnglishTextNormalizer

_normalizer = EnglishTextNormalizer()


def normalize(text: str) -> str:
    """Whisper's English normalizer (case, punctuation, spelling variants, numbers, [noise] tags)."""
    return _normalizer(text)
