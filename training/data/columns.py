"""Which column holds what: the name the user gave, or one of the names the field commonly uses.

When no name is given, the first list below that matches exactly one column wins; two matches
in one list are an error listing both, so a guess never picks the wrong transcript.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from training.data.checks import DataError

AUDIO_NAMES = ("audio", "audio_filepath", "path", "file")
TEXT_NAMES = ("text", "sentence", "transcription", "transcript", "normalized_text")
# NeMo's pseudo-label column: a transcript only when nothing above is there.
TEXT_FALLBACK_NAMES = ("pred_text",)


def pick_column(
    columns: Sequence[str], given: str | None, role: str, flag: str, where: str, *names: Sequence[str]
) -> str:
    """The column for `role` ("audio", "transcript"): `given` if set (it must exist), else the one
    column among each tuple of `names` in turn; DataError naming the candidates otherwise."""
    if given is not None:
        if given not in columns:
            raise DataError(f"{where}: no column '{given}' (columns: {list(columns)}){_closest(given, columns)}")
        return given
    for candidates in names:
        found = [c for c in candidates if c in columns]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise DataError(f"{where}: more than one column could be the {role} ({found}); name one with {flag}")
    expected = [c for candidates in names for c in candidates]
    raise DataError(f"{where}: no {role} column: none of {expected} (columns: {list(columns)}); name it with {flag}")


def _closest(name: str, columns: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(columns), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""
