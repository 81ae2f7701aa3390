"""Token ids and the 8-stream prompt/label layout of Mini-Omni.

Every position carries 8 parallel streams: rows 0..6 are the 7 SNAC audio layers, row 7 is
text. One vocabulary covers all of them:

    [0, text_vocab)                         the LLM's own text tokens
    [text_vocab, text_vocab + 64)           text specials (eot, pad_t, input_t, answer_t, asr)
    then 7 blocks of 4096 + 64 ids          audio layer i: code + text_size + i * 4160

With Qwen2's 151,936 text ids this gives 152,000 + 7 * 4,160 = 181,120, Mini-Omni's vocabulary.
This module is pure index arithmetic; it knows nothing of models or datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE = -100  # label value that the loss skips
N_AUDIO_LAYERS = 7
N_STREAMS = N_AUDIO_LAYERS + 1
TEXT_ROW = N_AUDIO_LAYERS  # the text stream is the last row


@dataclass(frozen=True)
class VocabLayout:
    text_vocab: int = 151_936  # the LLM's text vocabulary (config.vocab_size before growth)
    text_specials: int = 64
    audio_codes: int = 4_096  # SNAC codebook size
    audio_specials: int = 64

    # text specials, as offsets past text_vocab
    @property
    def eot(self) -> int:
        return self.text_vocab

    @property
    def pad_t(self) -> int:
        return self.text_vocab + 1

    @property
    def input_t(self) -> int:
        return self.text_vocab + 2

    @property
    def answer_t(self) -> int:
        return self.text_vocab + 3

    @property
    def asr(self) -> int:
        return self.text_vocab + 4

    @property
    def text_size(self) -> int:
        return self.text_vocab + self.text_specials

    @property
    def audio_size(self) -> int:
        """Ids per audio layer (codes + specials)."""
        return self.audio_codes + self.audio_specials

    @property
    def total(self) -> int:
        return self.text_size + N_AUDIO_LAYERS * self.audio_size

    def audio_offset(self, layer: int) -> int:
        return self.text_size + layer * self.audio_size

    def audio_id(self, code: int, layer: int) -> int:
        """Global id of a code (or an audio special, given before the shift) in a layer."""
        return code + self.audio_offset(layer)

    # audio specials, before the per-layer shift
    @property
    def eoa(self) -> int:
        return self.audio_codes

    @property
    def pad_a(self) -> int:
        return self.audio_codes + 1

    @property
    def input_a(self) -> int:
        return self.audio_codes + 2

    @property
    def answer_a(self) -> int:
        return self.audio_codes + 3

    @property
    def split(self) -> int:
        return self.audio_codes + 4

    def stream_slices(self) -> list[tuple[int, int]]:
        """[start, end) of each stream's slice of the output vocabulary, rows 0..7."""
        audio = [(self.audio_offset(i), self.audio_offset(i) + self.audio_size) for i in range(N_AUDIO_LAYERS)]
        return audio + [(0, self.text_size)]


def _audio_column(layout: VocabLayout, special: int) -> list[int]:
    """One position where every audio layer holds the same special (shifted per layer)."""
    return [layout.audio_id(special, i) for i in range(N_AUDIO_LAYERS)]


@dataclass(frozen=True)
class Example:
    """One laid-out training row: 8-stream ids, labels and which positions carry speech."""

    input_ids: torch.Tensor  # [8, T] long
    labels: torch.Tensor  # [8, T] long, IGNORE except answer positions
    audio_mask: torch.Tensor  # [T] bool, True where adapter output replaces audio embeddings


def speech_prompt(layout: VocabLayout, n_audio: int, task_token_audio: int, task_token_text: int) -> torch.Tensor:
    """Speech-in prompt: audio [input_a, T x pad_a, eoa, task_a], text [input_t, T x pad_t, eot, task_t]."""
    cols = [_audio_column(layout, layout.input_a) + [layout.input_t]]
    cols += [_audio_column(layout, layout.pad_a) + [layout.pad_t]] * n_audio
    cols.append(_audio_column(layout, layout.eoa) + [layout.eot])
    cols.append(_audio_column(layout, task_token_audio) + [task_token_text])
    return torch.tensor(cols, dtype=torch.long).T.contiguous()


def asr_prompt(layout: VocabLayout, n_audio: int) -> torch.Tensor:
    """The ASR task prompt: audio streams end with pad_a, the text stream with the asr token."""
    return speech_prompt(layout, n_audio, layout.pad_a, layout.asr)


def a1t2_prompt(layout: VocabLayout, n_audio: int) -> torch.Tensor:
    """Speech question -> text answer: audio streams end with pad_a, text with answer_t."""
    return speech_prompt(layout, n_audio, layout.pad_a, layout.answer_t)


def text_answer(layout: VocabLayout, token_ids: Sequence[int]) -> torch.Tensor:
    """A text-only answer: the tokens then eot on the text stream, pad_a on every audio layer."""
    ids = list(token_ids) + [layout.eot]
    audio = torch.tensor(_audio_column(layout, layout.pad_a), dtype=torch.long)[:, None].expand(-1, len(ids))
    return torch.cat([audio, torch.tensor(ids, dtype=torch.long)[None, :]], dim=0)


def speech_to_text_example(layout: VocabLayout, n_audio: int, answer_ids: Sequence[int], task: str = "asr") -> Example:
    """A speech-in, text-out row (ASR or A1T2). Loss only on the text answer and its eot."""
    prompt = asr_prompt(layout, n_audio) if task == "asr" else a1t2_prompt(layout, n_audio)
    answer = text_answer(layout, answer_ids)
    input_ids = torch.cat([prompt, answer], dim=1)
    labels = torch.full_like(input_ids, IGNORE)
    labels[TEXT_ROW, prompt.shape[1]:] = answer[TEXT_ROW]
    audio_mask = torch.zeros(input_ids.shape[1], dtype=torch.bool)
    audio_mask[1 : 1 + n_audio] = True
    return Example(input_ids=input_ids, labels=labels, audio_mask=audio_mask)


def pad_token_column(layout: VocabLayout) -> torch.Tensor:
    """Filler for padded positions (never attended, never scored)."""
    return torch.tensor(_audio_column(layout, layout.pad_a) + [layout.pad_t], dtype=torch.long)


def strip_text_answer(layout: VocabLayout, ids: Sequence[int], stop_ids: Sequence[int] = ()) -> list[int]:
    """Generated text ids up to (not including) the first eot or stop id, with specials dropped."""
    out = []
    for token in ids:
        if token == layout.eot or token in stop_ids:
            break
        if token < layout.text_vocab:
            out.append(int(token))
    return out


def n_encoder_frames(n_samples: int, sampling_rate: int, max_frames: int) -> int:
    """Mini-Omni keeps int(duration_ms / 20) + 1 encoder frames (50 per second)."""
    return min(max_frames, int(1000 * n_samples / sampling_rate / 20) + 1)


def n_adapter_frames(n_frames: int, frame_stack: int) -> int:
    """Speech positions in the prompt: frame_stack encoder frames make one adapter input."""
    return -(-n_frames // frame_stack)
