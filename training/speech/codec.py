"""The 24 kHz SNAC speech codec: answer speech <-> Mini-Omni's 7-codes-per-frame form.

Real weights come by local path (a downloaded hubertsiuzdak/snac_24khz folder with config.json
and pytorch_model.bin) or hub id. Without one, the embedded default builds the same codec from its
config with seeded random weights: the training task (predict the codes of the answer speech) is
the real one, but audio decoded from those codes is not intelligible.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from snac import SNAC

from training.common import LogFn
from training.speech.audio import resample
from training.speech.snac_codes import SNAC_24KHZ_CONFIG, flatten_snac, samples_per_frame, unflatten_snac

SAMPLING_RATE = SNAC_24KHZ_CONFIG["sampling_rate"]
RANDOM_SEED = 0


def load_codec(source: str | None, log: LogFn = print) -> SNAC:
    """SNAC by local path / hub id, or (source None) the 24 kHz config with seeded random weights."""
    if source is None:
        log(
            "speech codec: SNAC 24 kHz built from its config with seeded RANDOM weights (no checkpoint given): "
            "answer codes are a real training target, but decoded audio is not intelligible"
        )
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_SEED)
            codec = SNAC(**SNAC_24KHZ_CONFIG)
    else:
        if not os.path.isdir(source):
            log(f"speech codec: SNAC from hub id {source}")
        codec = SNAC.from_pretrained(source)
    return codec.eval()


@torch.no_grad()
def encode_speech(codec: SNAC, wave: np.ndarray, sampling_rate: int) -> torch.Tensor:
    """Mono speech at any rate -> codes [n_frames, 7]."""
    at_24k = resample(np.asarray(wave, dtype=np.float32), sampling_rate, SAMPLING_RATE)
    levels = codec.encode(torch.from_numpy(at_24k)[None, None])
    return flatten_snac(levels)


@torch.no_grad()
def decode_codes(codec: SNAC, codes: torch.Tensor) -> np.ndarray:
    """codes [n_frames, 7] -> mono float32 waveform at 24 kHz, n_frames * 2048 samples."""
    if codes.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    levels = [level.to(next(codec.parameters()).device) for level in unflatten_snac(codes)]
    audio = codec.decode(levels)[0, 0]
    return audio[: codes.shape[0] * samples_per_frame()].float().cpu().numpy()
