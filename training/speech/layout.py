"""Token ids and the 8-stream prompt/label layout of Mini-Omni.

Every position carries 8 parallel streams: rows 0..6 are the 7 SNAC audio layers, row 7 is
text. One vocabulary covers all of them:

    [0, text_vocab)                         the LLM's own text tokens
    [text_vocab, text_vocab + 64)           text specials (eot, pad_t, input_t, answer_t, asr)
    then 7 blocks of 4096 + 64 ids          audio layer i: code + text_size + i * 4160

With Qwen2's 151,936 text ids this gives 152,000 + 7 * 4,160 = 181,120, Mini-Omni's vocabulary.
This module is pure index arithmetic; it knows nothing of models or datasets.

Speech answers and the five tasks
---------------------------------
Picture: A1A2 with 2 speech-input positions, text answer [t0 t1] and 2 SNAC frames (a, b; a3 is
frame a's code for audio layer 3). P = pad_a, E = eoa, p = pad_t; every audio id is shifted into
its layer's block. Columns 0-4 are the prompt, 5-14 the answer (n + 8 = 10 columns); positions
scored by the loss are marked * (everything else is IGNORE).

  col  0        1  2  3    4         | 5    6    7    8    9    10   11   12   13   14
  A0   input_a  P  P  E    answer_a  | P*   a0*  b0*  E*   P*   P*   P*   P*   P*   P*
  A1   input_a  P  P  E    answer_a  | P*   P*   a1*  b1*  E*   P*   P*   P*   P*   P*
  A2   input_a  P  P  E    answer_a  | P*   P*   P*   a2*  b2*  E*   P*   P*   P*   P*
  A3   input_a  P  P  E    answer_a  | P*   P*   P*   P*   a3*  b3*  E*   P*   P*   P*
  A4   input_a  P  P  E    answer_a  | P*   P*   P*   P*   P*   a4*  b4*  E*   P*   P*
  A5   input_a  P  P  E    answer_a  | P*   P*   P*   P*   P*   P*   a5*  b5*  E*   P*
  A6   input_a  P  P  E    answer_a  | P*   P*   P*   P*   P*   P*   P*   a6*  b6*  E*
  T    input_t  p  p  eot  answer_t  | t0*  t1*  eot* p    p    p    p    p    p    p
  mask F        T  T  F    F         | F    F    F    F    F    F    F    F    F    F

Audio layer i holds i + 1 pad_a, its n codes, eoa, then 6 - i pad_a: every layer spans n + 8
columns and layer 6's eoa (Mini-Omni's stop signal) is the block's last column. Should the text
(tokens + eot) be longer than n + 8, the block widens to it; the extra audio columns hold pad_a
and are not scored (generation has stopped by then).

The other tasks (text-in prompts follow Mini-Omni's text-question inputs):
  A1A2  audio [input_a, T x pad_a, eoa, answer_a] text [input_t, T x pad_t, eot, answer_t] + speech answer
  A1T2  audio [input_a, T x pad_a, eoa, pad_a]    text [input_t, T x pad_t, eot, answer_t] + text answer
  ASR   audio [input_a, T x pad_a, eoa, pad_a]    text [input_t, T x pad_t, eot, asr]      + text answer
  T1A2  audio [(Q + 2) x pad_a, answer_a]         text [input_t, Q question ids, eot, answer_t] + speech answer
  T1T2  audio [(Q + 3) x pad_a]                   text [input_t, Q question ids, eot, answer_t] + text answer
  text answer: text [answer ids, eot], audio pad_a throughout; only the text ids + eot are scored.

Labels hold the same global id as input_ids where scored (IGNORE elsewhere); the model shifts
them (column t predicts column t + 1), so the task-token column predicts the first answer column.

What is scored, and why:
  text stream: the answer ids and eot. The pad_t after eot is not: Mini-Omni's decoder replaces
    the text stream with pad_t once eot is out, so the model never has to predict it (SLAM-Omni,
    which reproduces this training, leaves it unscored too).
  audio streams (speech answers): every column of the n + 8 block, i.e. the delay pad_a, the
    codes, eoa and the pad_a after eoa. At inference every audio prediction, pads included, is
    fed back as the next input until layer 6 emits eoa, so the model must produce those pads to
    keep its own inputs looking like training; eoa is how it ends its speech.
  text answers: audio streams are not scored (Mini-Omni feeds fixed pad_a there and never reads
    the audio logits).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from training.speech.snac_codes import as_codes
from training.stages import TASKS

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
    labels[TEXT_ROW, prompt.shape[1] :] = answer[TEXT_ROW]
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


# -- speech output: the delayed audio block and the five task layouts (pictured in the module
# docstring) ----------------------------------------------------------------------------------

SPEECH_TASKS = ("a1a2", "t1a2")  # tasks whose answer carries speech
SPEECH_IN_TASKS = ("asr", "a1t2", "a1a2")  # tasks whose question is speech


def audio_block_width(n_frames: int) -> int:
    """Columns the delayed audio of n frames spans: layer 6 waits 7, then n codes, then eoa."""
    return n_frames + N_AUDIO_LAYERS + 1


def delay_audio(layout: VocabLayout, codes: torch.Tensor) -> torch.Tensor:
    """codes [n, 7] (frame order of training.speech.snac_codes) -> global ids [7, n + 8].

    Layer i: (i + 1) x pad_a, its n codes, eoa, (6 - i) x pad_a, all shifted into layer i's block.
    """
    t = as_codes(codes)
    if layout.audio_codes != 4_096:
        raise ValueError(f"SNAC codes need audio_codes=4096, layout has {layout.audio_codes}")
    n = t.shape[0]
    if n == 0:
        raise ValueError("a speech answer needs at least one SNAC frame")
    width = audio_block_width(n)
    out = torch.full((N_AUDIO_LAYERS, width), layout.pad_a, dtype=torch.long)
    for layer in range(N_AUDIO_LAYERS):
        out[layer, layer + 1 : layer + 1 + n] = t[:, layer]
        out[layer, layer + 1 + n] = layout.eoa
    shift = torch.tensor([layout.audio_offset(i) for i in range(N_AUDIO_LAYERS)], dtype=torch.long)[:, None]
    return out + shift


def undelay_audio(layout: VocabLayout, ids: torch.Tensor, require_eoa: bool = True) -> torch.Tensor:
    """Global audio ids [7, T] (or [8, T] with the text row last, ignored) -> codes [n, 7].

    Layer i must open with i + 1 pad_a, then hold codes up to its first eoa; what follows eoa is
    ignored (a decoder stops there). Every layer must hold the same number of codes. With
    require_eoa=False (a generation cut off by a length limit) a layer without eoa runs to the end
    and only the frames complete on all layers are returned. Malformed input raises ValueError.
    """
    t = torch.as_tensor(ids).detach().cpu().long()
    if t.dim() != 2 or t.shape[0] not in (N_AUDIO_LAYERS, N_STREAMS):
        raise ValueError(f"ids must have shape [7, T] or [8, T], got {tuple(t.shape)}")
    columns = []
    for layer in range(N_AUDIO_LAYERS):
        row = t[layer] - layout.audio_offset(layer)  # back to per-layer ids: codes, then specials
        lead = row[: layer + 1]
        if lead.shape[0] < layer + 1 or bool((lead != layout.pad_a).any()):
            raise ValueError(
                f"audio layer {layer} must open with {layer + 1} pad_a (its delay), got {row[: layer + 1].tolist()}"
            )
        body = row[layer + 1 :]
        ends = (body == layout.eoa).nonzero()
        if len(ends):
            body = body[: int(ends[0])]
        elif require_eoa:
            raise ValueError(f"audio layer {layer} has no eoa")
        bad = (body < 0) | (body >= layout.audio_codes)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            raise ValueError(
                f"audio layer {layer}: id {int(t[layer, layer + 1 + k])} at answer column {layer + 1 + k} "
                f"is not a code of that layer"
            )
        columns.append(body)
    counts = [c.shape[0] for c in columns]
    if require_eoa and len(set(counts)) != 1:
        raise ValueError(f"audio layers hold different numbers of codes (layers 0..6: {counts})")
    n = min(counts)
    return torch.stack([c[:n] for c in columns], dim=1) if n else torch.zeros((0, N_AUDIO_LAYERS), dtype=torch.long)


def text_prompt(layout: VocabLayout, question_ids: Sequence[int], task_token_audio: int) -> torch.Tensor:
    """Text-in prompt: text [input_t, question, eot, answer_t]; audio pad_a, the last one task_a."""
    text = [layout.input_t, *[int(q) for q in question_ids], layout.eot, layout.answer_t]
    audio = torch.tensor(_audio_column(layout, layout.pad_a), dtype=torch.long)[:, None].repeat(1, len(text))
    audio[:, -1] = torch.tensor(_audio_column(layout, task_token_audio), dtype=torch.long)
    return torch.cat([audio, torch.tensor(text, dtype=torch.long)[None, :]], dim=0)


def a1a2_prompt(layout: VocabLayout, n_audio: int) -> torch.Tensor:
    """Speech question -> speech + text answer: audio streams end with answer_a, text with answer_t."""
    return speech_prompt(layout, n_audio, layout.answer_a, layout.answer_t)


def t1a2_prompt(layout: VocabLayout, question_ids: Sequence[int]) -> torch.Tensor:
    """Text question -> speech + text answer: audio streams end with answer_a."""
    return text_prompt(layout, question_ids, layout.answer_a)


def t1t2_prompt(layout: VocabLayout, question_ids: Sequence[int]) -> torch.Tensor:
    """Text question -> text answer: audio streams stay pad_a."""
    return text_prompt(layout, question_ids, layout.pad_a)


def speech_answer(
    layout: VocabLayout, token_ids: Sequence[int], codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speech-output answer block: (ids [8, W], labels [8, W]), W = max(n + 8, len(text) + 1).

    Text: the tokens, eot, then pad_t. Audio: delay_audio's block, then pad_a. Labels as the
    module docstring says: text tokens + eot, and the n + 8 audio columns.
    """
    audio = delay_audio(layout, codes)
    text = [int(x) for x in token_ids] + [layout.eot]
    width = max(audio.shape[1], len(text))
    ids = pad_token_column(layout)[:, None].repeat(1, width)
    ids[:N_AUDIO_LAYERS, : audio.shape[1]] = audio
    ids[TEXT_ROW, : len(text)] = torch.tensor(text, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    labels[:N_AUDIO_LAYERS, : audio.shape[1]] = audio
    labels[TEXT_ROW, : len(text)] = ids[TEXT_ROW, : len(text)]
    return ids, labels


def task_example(
    layout: VocabLayout,
    task: str,
    question: int | Sequence[int],
    answer_ids: Sequence[int],
    answer_codes: torch.Tensor | None = None,
) -> Example:
    """One training row for any of the five tasks.

    question: the number of speech positions (adapter frames) for speech-in tasks (asr, a1t2,
    a1a2), the question's text ids for text-in tasks (t1t2, t1a2). answer_codes ([n, 7] SNAC
    codes) is required by the speech-out tasks (a1a2, t1a2) and ignored by the others, so one
    prepared row can serve every task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    speech_in = task in SPEECH_IN_TASKS
    if speech_in != isinstance(question, numbers.Integral) or isinstance(question, bool):
        wanted = "a number of speech positions (int)" if speech_in else "question token ids"
        raise ValueError(f"task {task!r} needs {wanted} as its question, got {type(question).__name__}")
    if task in ("asr", "a1t2"):
        return speech_to_text_example(layout, int(question), answer_ids, task=task)
    if task == "t1t2":
        prompt = t1t2_prompt(layout, question)
        answer = text_answer(layout, answer_ids)
        answer_labels = torch.full_like(answer, IGNORE)
        answer_labels[TEXT_ROW] = answer[TEXT_ROW]
    else:
        if answer_codes is None:
            raise ValueError(f"task {task!r} produces speech and needs answer_codes")
        prompt = a1a2_prompt(layout, int(question)) if task == "a1a2" else t1a2_prompt(layout, question)
        answer, answer_labels = speech_answer(layout, answer_ids, answer_codes)
    input_ids = torch.cat([prompt, answer], dim=1)
    labels = torch.cat([torch.full_like(prompt, IGNORE), answer_labels], dim=1)
    audio_mask = torch.zeros(input_ids.shape[1], dtype=torch.bool)
    if speech_in:
        audio_mask[1 : 1 + int(question)] = True
    return Example(input_ids=input_ids, labels=labels, audio_mask=audio_mask)
