"""SNAC codes <-> Mini-Omni's 7-codes-per-frame form, and the VoiceAssistant-400K string form.

The 24 kHz SNAC codec quantizes speech on 3 levels at 12, 23 and 47 Hz (hop 512 samples, level
strides 4, 2, 1), each with a 4,096-entry codebook. One coarse (level-0) step spans 4 hops =
2,048 samples and holds 1 + 2 + 4 = 7 codes. Mini-Omni reads those 7 codes as one "frame", in
the order

    [L0[j], L1[2j], L2[4j], L2[4j+1], L1[2j+1], L2[4j+2], L2[4j+3]]

i.e. depth first: each level-1 code is followed by the two level-2 codes it covers. Column k of a
frame becomes audio layer k of the 8-stream layout (see training/speech/layout.py for the delay).

VoiceAssistant-400K stores a row's answer speech as text: "#" before every frame, then its 7
codes as decimal integers, all separated by whitespace, e.g. "# 1 2 3 4 5 6 7 # 8 9 ...".

Pure tensor/string code: no codec weights, no model, no dataset.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

SNAC_CODEBOOK = 4_096
CODES_PER_FRAME = 7

# Constructor arguments of SNAC for hubertsiuzdak/snac_24khz (the codec Mini-Omni decodes with).
# Taken from that checkpoint's config.json; SNAC(**SNAC_24KHZ_CONFIG) has 19.8 M parameters, the
# figure its model card gives, which a different encoder/decoder width would not match.
SNAC_24KHZ_CONFIG: dict[str, Any] = {
    "sampling_rate": 24_000,
    "encoder_dim": 48,
    "encoder_rates": [2, 4, 8, 8],
    "decoder_dim": 1_024,
    "decoder_rates": [8, 8, 4, 2],
    "attn_window_size": None,
    "codebook_size": SNAC_CODEBOOK,
    "codebook_dim": 8,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}

# (level, index within the frame's span of that level) for each of the 7 columns of a frame
FRAME_ORDER: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3))
_LEVEL_WIDTH = (1, 2, 4)  # codes per frame on each level (the level strides 4, 2, 1 inverted)

_INT = re.compile(r"[+-]?[0-9]+")


def samples_per_frame(config: dict[str, Any] = SNAC_24KHZ_CONFIG) -> int:
    """Waveform samples that one 7-code frame decodes to: hop length x the coarsest stride."""
    return math.prod(config["encoder_rates"]) * config["vq_strides"][0]


def _as_long_1d(level: Any, name: str) -> torch.Tensor:
    """A level as a 1-D long tensor; SNAC.encode gives [1, L], so one leading batch dim of 1 is
    accepted and dropped."""
    t = level.detach().cpu() if isinstance(level, torch.Tensor) else torch.as_tensor(np.asarray(level))
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (or [1, L]), got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer codes, got {t.dtype}")
    return t.long()


def _check_range(codes: torch.Tensor, what: str) -> None:
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= SNAC_CODEBOOK):
        raise ValueError(f"{what}: codes must lie in [0, {SNAC_CODEBOOK}), got {int(codes.min())}..{int(codes.max())}")


def flatten_snac(levels: Sequence[Any]) -> torch.Tensor:
    """3 SNAC levels [L0 (n), L1 (2n), L2 (4n)] -> codes [n, 7] in Mini-Omni's frame order."""
    if len(levels) != 3:
        raise ValueError(f"expected 3 SNAC levels (24 kHz codec), got {len(levels)}")
    flat = [_as_long_1d(level, f"level {k}") for k, level in enumerate(levels)]
    n = flat[0].shape[0]
    for k, width in enumerate(_LEVEL_WIDTH):
        if flat[k].shape[0] != width * n:
            raise ValueError(f"level {k} has {flat[k].shape[0]} codes; with {n} level-0 codes it needs {width * n}")
        _check_range(flat[k], f"level {k}")
    per_frame = [flat[k].view(n, width) for k, width in enumerate(_LEVEL_WIDTH)]  # [n, 1], [n, 2], [n, 4]
    return torch.stack([per_frame[level][:, i] for level, i in FRAME_ORDER], dim=1)


def as_codes(codes: Any, what: str = "codes") -> torch.Tensor:
    t = codes.detach().cpu() if isinstance(codes, torch.Tensor) else torch.as_tensor(np.asarray(codes))
    if t.dim() != 2 or t.shape[1] != CODES_PER_FRAME:
        raise ValueError(f"{what} must have shape [n, {CODES_PER_FRAME}], got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer codes, got {t.dtype}")
    t = t.long()
    _check_range(t, what)
    return t


def unflatten_snac(codes: Any) -> list[torch.Tensor]:
    """codes [n, 7] -> [L0 [1, n], L1 [1, 2n], L2 [1, 4n]], the list SNAC.decode takes (batch 1)."""
    t = as_codes(codes)
    levels: list[list[torch.Tensor]] = [[], [], []]
    for column, (level, _) in enumerate(FRAME_ORDER):
        levels[level].append(t[:, column])
    # within a level, FRAME_ORDER lists a frame's codes in time order, so stacking them per frame
    # and reading row-major restores the level's time axis
    return [torch.stack(cols, dim=1).reshape(1, -1) for cols in levels]


def parse_answer_snac(text: Any, where: str) -> torch.Tensor:
    """VoiceAssistant-400K's answer_snac string -> codes [n, 7].

    `where` names the row (e.g. "dataset X, row 12, column 'answer_snac'") and starts every
    error message, so one bad row in 400k can be found. A trailing "#" is tolerated; anything
    before the first "#", a frame without exactly 7 codes, a token that is not a decimal integer
    and a code outside [0, 4096) are errors.
    """
    if not isinstance(text, str):  # a missing cell is bad data like the rest: one error type for callers
        raise ValueError(  # noqa: TRY004
            f"{where}: answer_snac must be a string, got {type(text).__name__}"
        )
    if not text.strip():
        raise ValueError(f"{where}: answer_snac is empty")
    head, *chunks = text.split("#")
    if head.strip():
        raise ValueError(f"{where}: answer_snac must start with '#', found {head.strip()[:40]!r} before it")
    if chunks and not chunks[-1].strip():
        chunks = chunks[:-1]  # "... c7 #": a closing marker, not an empty frame
    if not chunks:
        raise ValueError(f"{where}: answer_snac holds no frames")
    rows = []
    for j, chunk in enumerate(chunks):
        tokens = chunk.split()
        if len(tokens) != CODES_PER_FRAME:
            raise ValueError(f"{where}: frame {j} has {len(tokens)} codes, expected {CODES_PER_FRAME}")
        row = []
        for token in tokens:
            if not _INT.fullmatch(token):
                raise ValueError(f"{where}: frame {j}: {token[:20]!r} is not an integer code")
            code = int(token)
            if not 0 <= code < SNAC_CODEBOOK:
                raise ValueError(f"{where}: frame {j}: code {code} outside [0, {SNAC_CODEBOOK})")
            row.append(code)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def format_answer_snac(codes: Any) -> str:
    """codes [n, 7] -> "# c1 c2 c3 c4 c5 c6 c7 # ..." (the inverse of parse_answer_snac)."""
    t = as_codes(codes)
    return " ".join("# " + " ".join(str(c) for c in frame) for frame in t.tolist())
