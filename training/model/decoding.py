"""Decoding: the text stream and the 7 SNAC audio streams in parallel, with a KV cache.

`decode_steps` runs the model's own step (8-stream embedding mean, Qwen2 with a KV cache) on a
left-padded batch of prompts built by training.speech.layout, for any of the five tasks, and yields
each step's columns; `generate` collects them into answers:

  text out   asr, a1t2, t1t2   the text stream decodes; every audio stream is fed pad_a
  speech out a1a2, t1a2        text and the 7 audio layers decode together

Per answer step s (0-based) and batch row:
  text    the chosen id of the text slice; once eot (or a stop id) is out the row's text is over
          and pad_t is fed from then on, exactly the columns a training row holds after eot. A
          stop id is fed as eot, since eot is what training put at the end of every answer.
  audio i the chosen id of layer i's slice, but pad_a while s <= i (the delay of delay_audio) and
          pad_a once the layer has ended. A layer ends at eoa; any other non-code id (a special
          that has no place after the delay) ends it too, so that a weak model's stray special
          neither feeds garbage back nor breaks the code read-out.
"Chosen" is the argmax (greedy), or a draw under `Sampling` (temperature, top-k, top-p, seeded).
A row is finished when its text is over (text-out tasks), or its text is over AND layer 6 has
ended (speech-out tasks: layer 6's eoa is the last column of the answer block, Mini-Omni's stop).
Decoding stops when every row is finished or after max_new_tokens steps.

Mini-Omni's reference decoder (litgpt/generate/base.py, generate_AA) differs on purpose, and
rules="mini-omni" decodes by its rules for a side-by-side comparison: every audio id is fed back as
chosen (no pad_a forced during a layer's delay or after its eoa; a special does not end a layer),
and a row stops as soon as layer 6 emits eoa, whether or not its text is over. Ours keep the fed
columns exactly as training laid them out (the model never sees a column training could not hold)
and never cut the text answer short. The codes are read the same way under both (read_codes, the
delay columns skipped).

Batch-parallel (a1a2 only, as Mini-Omni's inference does it): each question is decoded in two
rows, its A1A2 row and its A1T2 row, and the text id chosen in the A1T2 row is fed to both, so the
text answer (the model's best text-only answer) steers the speech. The A1T2 row's audio stays
pad_a, as in every A1T2 training row (Mini-Omni feeds it the speech row's audio ids instead; ours
keeps the row as it was trained).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from training.speech.layout import (
    N_AUDIO_LAYERS,
    SPEECH_IN_TASKS,
    SPEECH_TASKS,
    TEXT_ROW,
    VocabLayout,
    a1a2_prompt,
    a1t2_prompt,
    asr_prompt,
    n_adapter_frames,
    pad_token_column,
    strip_text_answer,
    t1a2_prompt,
    t1t2_prompt,
    undelay_audio,
)
from training.stages import TASKS

RULES = ("ours", "mini-omni")

__all__ = [
    "RULES",
    "DecodeStep",
    "check_task",
    "Generated",
    "Sampling",
    "build_prompts",
    "decode_steps",
    "generate",
    "read_codes",
]


@dataclass(frozen=True)
class Sampling:
    """Draws instead of the argmax: logits / temperature, then only the top_k ids and the smallest
    set whose probability reaches top_p stay; seeded, so a rerun draws the same."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (greedy decoding: no Sampling), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def choose(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """logits [..., V] -> ids [...]."""
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            ordered, order = torch.sort(scores, dim=-1, descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.top_p  # keeps the first id that reaches top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        flat = scores.softmax(-1).reshape(-1, scores.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(scores.shape[:-1])


@dataclass
class Generated:
    """One row's answer.

    text_ids: the answer's text tokens, specials dropped, cut before the first eot / stop id.
    audio_ids: [7, T] global ids of the audio layers as generated (delay pads, codes, eoa, pads),
        T = the steps this row took until it finished; None for text-out tasks.
    codes: [n, 7] SNAC codes read back (read_codes: the frames complete on every layer); None for
        text-out tasks.
    finished: False when decoding reached max_new_tokens before the row's stop.
    """

    text_ids: list[int]
    audio_ids: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    finished: bool = True


@dataclass
class DecodeStep:
    """One step's columns for every row: text [B], audio [B, 7] global ids (None for text-out
    tasks), and which rows are finished [B] (bool)."""

    text: torch.Tensor
    audio: torch.Tensor | None
    done: torch.Tensor


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def build_prompts(
    layout: VocabLayout,
    task: str,
    n_audio: Sequence[int] | None = None,
    question_ids: Sequence[Sequence[int]] | None = None,
) -> list[torch.Tensor]:
    """One [8, P] prompt per row: speech-in tasks from their numbers of speech positions, text-in
    tasks from their question token ids."""
    check_task(task)
    if task in SPEECH_IN_TASKS:
        if n_audio is None:
            raise ValueError(f"task {task!r} takes a speech question: pass encoder_states and encoder_lengths")
        builder = {"asr": asr_prompt, "a1t2": a1t2_prompt, "a1a2": a1a2_prompt}[task]
        return [builder(layout, int(n)) for n in n_audio]
    if question_ids is None:
        raise ValueError(f"task {task!r} takes a text question: pass question_ids (one list of ids per row)")
    builder = {"t1t2": t1t2_prompt, "t1a2": t1a2_prompt}[task]
    return [builder(layout, [int(q) for q in ids]) for ids in question_ids]


def read_codes(layout: VocabLayout, audio_ids: torch.Tensor) -> torch.Tensor:
    """[7, T] generated audio ids -> codes [n, 7].

    A layer that ended on a special other than eoa is read as if it had emitted eoa there (the
    decoder treated it so); a generation shorter than the delay holds no complete frame."""
    if audio_ids.shape[1] < N_AUDIO_LAYERS:
        return torch.zeros((0, N_AUDIO_LAYERS), dtype=torch.long)
    ids = audio_ids.clone()
    for layer in range(N_AUDIO_LAYERS):
        ids[layer, : layer + 1] = layout.audio_id(layout.pad_a, layer)  # the delay (chosen freely by mini-omni rules)
        local = ids[layer, layer + 1 :] - layout.audio_offset(layer)
        ends = (local >= layout.audio_codes).nonzero()
        if len(ends):
            ids[layer, layer + 1 + int(ends[0])] = layout.audio_id(layout.eoa, layer)
    return undelay_audio(layout, ids, require_eoa=False)


def _model_device(model: Any) -> torch.device:
    return model.llm.get_input_embeddings().weight.device


def _check_inputs(task: str, encoder_states: Any, encoder_lengths: Any, batch_parallel: bool, rules: str) -> None:
    check_task(task)
    if rules not in RULES:
        raise ValueError(f"decoding rules are one of {RULES}, got {rules!r}")
    if task in SPEECH_IN_TASKS and (encoder_states is None or encoder_lengths is None):
        raise ValueError(f"task {task!r} takes a speech question: pass encoder_states and encoder_lengths")
    if task not in SPEECH_IN_TASKS and encoder_states is not None:
        raise ValueError(f"task {task!r} takes a text question; encoder_states would be ignored")
    if batch_parallel and task != "a1a2":
        raise ValueError(f"batch-parallel decoding pairs an a1a2 row with an a1t2 row; task is {task!r}")


@torch.no_grad()
def decode_steps(
    model: Any,
    task: str,
    *,
    encoder_states: torch.Tensor | None = None,
    encoder_lengths: torch.Tensor | None = None,
    question_ids: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    all_finished: Callable[[bool], bool] | None = None,
    sampling: Sampling | None = None,
    batch_parallel: bool = False,
    rules: str = "ours",
) -> Iterator[DecodeStep]:
    """Yields each decoding step's columns (module docstring); `generate` collects them.

    With batch_parallel the batch holds 2B rows: the B A1A2 rows first, then their A1T2 rows.
    all_finished(local) -> global: under ZeRO-3 every forward gathers parameters from all ranks,
    so all ranks must take the same number of steps; the caller reduces the flag across them."""
    _check_inputs(task, encoder_states, encoder_lengths, batch_parallel, rules)
    theirs = rules == "mini-omni"
    layout: VocabLayout = model.layout
    speech_in = task in SPEECH_IN_TASKS
    n_audio = [n_adapter_frames(int(n), model.config.frame_stack) for n in encoder_lengths] if speech_in else None
    prompts = build_prompts(layout, task, n_audio=n_audio, question_ids=question_ids)
    questions = len(prompts)
    speaks = [task in SPEECH_TASKS] * questions
    if batch_parallel:
        prompts += build_prompts(layout, "a1t2", n_audio=n_audio)
        n_audio, speaks = n_audio + n_audio, speaks + [False] * questions
        encoder_states, encoder_lengths = encoder_states.repeat(2, 1, 1), encoder_lengths.repeat(2)
    batch = len(prompts)
    if batch == 0:
        return
    device = encoder_states.device if speech_in else _model_device(model)
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling else None
    choose = (lambda x: x.argmax(-1)) if sampling is None else (lambda x: sampling.choose(x, generator))  # noqa: E731
    # each row is fed the text chosen in this row (its own) or, batch-parallel, in the A1T2 row
    text_source = torch.arange(batch, device=device)
    if batch_parallel:
        text_source = (text_source % questions) + questions
    speaks_t = torch.tensor(speaks, device=device)
    any_speech = bool(speaks_t.any())

    # Left padding puts every row's last prompt column at the same index, so one step serves all.
    width = max(p.shape[1] for p in prompts)
    input_ids = pad_token_column(layout)[None, :, None].repeat(batch, 1, width)
    attention = torch.zeros(batch, width, dtype=torch.long)
    audio_mask = torch.zeros(batch, width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        offset = width - prompt.shape[1]
        input_ids[row, :, offset:] = prompt
        attention[row, offset:] = 1
        if speech_in:
            audio_mask[row, offset + 1 : offset + 1 + n_audio[row]] = True  # after input_a, as the layout puts it
    input_ids, attention, audio_mask = input_ids.to(device), attention.to(device), audio_mask.to(device)
    x = model.embed(input_ids, audio_mask, encoder_states if speech_in else None, encoder_lengths)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # padded rows start at position 0 like unpadded ones
    # layers compiled for training (recipe torch_compile) run eager here: each cached step's new
    # shapes would recompile them until torch gives up, and training then runs uncompiled
    with torch.compiler.set_stance("force_eager"):
        out = model.llm.model(inputs_embeds=x, attention_mask=attention, position_ids=positions, use_cache=True)
    cache, last = out.cache, out.last_hidden_state[:, -1]

    filler = pad_token_column(layout).to(device)  # pad_a on every audio layer, pad_t on text
    stops = torch.tensor([layout.eot, *[int(s) for s in stop_ids]], device=device)
    offsets = torch.tensor([layout.audio_offset(i) for i in range(N_AUDIO_LAYERS)], device=device)
    layer_index = torch.arange(N_AUDIO_LAYERS, device=device)
    no_speech = torch.zeros(batch, 1, dtype=torch.bool, device=device)
    text_over = torch.zeros(batch, dtype=torch.bool, device=device)
    audio_over = torch.zeros(batch, N_AUDIO_LAYERS, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        # one projection serves all 8 streams; text-out decoding needs the text slice only
        logits = model.stream_logits(last, 0, layout.total if any_speech else layout.text_size)
        text = choose(logits[:, : layout.text_size])[text_source]
        text = torch.where(text_over, torch.full_like(text, layout.pad_t), text)
        ends_now = torch.isin(text, stops)
        text_over |= ends_now
        column = filler[None, :].repeat(batch, 1)
        column[:, TEXT_ROW] = torch.where(ends_now, torch.full_like(text, layout.eot), text)
        audio = None
        row_done = text_over.clone()
        if any_speech:
            local = choose(logits[:, layout.text_size :].reshape(batch, N_AUDIO_LAYERS, layout.audio_size))
            if theirs:  # only a text-out row's audio is fixed; layer 6's eoa ends the row
                forced = ~speaks_t[:, None].expand(-1, N_AUDIO_LAYERS)
            else:  # delay, layer done, or text-out row
                forced = (step <= layer_index)[None, :] | audio_over | ~speaks_t[:, None]
            local = torch.where(forced, torch.full_like(local, layout.pad_a), local)
            ended = ~forced & ((local == layout.eoa) if theirs else (local >= layout.audio_codes))
            audio_over |= ended  # ours: eoa (or a stray special) ends the layer
            audio = local + offsets[None, :]
            column[:, :N_AUDIO_LAYERS] = audio
            if theirs:
                row_done = torch.where(speaks_t, audio_over[:, N_AUDIO_LAYERS - 1], text_over)
            else:
                row_done &= audio_over[:, N_AUDIO_LAYERS - 1] | ~speaks_t
        yield DecodeStep(text, audio, row_done)
        finished = bool(row_done.all())
        if all_finished is not None:
            finished = all_finished(finished)
        if finished:
            return
        step_x = model.embed(column[:, :, None], no_speech, None, None)  # [B, 1, d]: the training embedding
        attention = torch.cat([attention, attention.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
        with torch.compiler.set_stance("force_eager"):
            out = model.llm.model(
                inputs_embeds=step_x, attention_mask=attention, position_ids=positions, cache=cache, use_cache=True
            )
        cache, last = out.cache, out.last_hidden_state[:, -1]


def generate(model: Any, task: str, *, stop_ids: Sequence[int] = (), **decoding: Any) -> list[Generated]:
    """Batched decoding of text (+ speech for a1a2/t1a2); the answers of `decode_steps` (same
    arguments: encoder_states / encoder_lengths for speech-in tasks as the evaluation collator pads
    them, question_ids for text-in tasks, max_new_tokens, sampling, batch_parallel, ...). With
    batch_parallel one answer per question: its speech, and the text that steered it."""
    steps = list(decode_steps(model, task, stop_ids=stop_ids, **decoding))
    if not steps:
        return []
    rows = len(steps[0].text) // (2 if decoding.get("batch_parallel") else 1)
    texts = torch.stack([s.text for s in steps], dim=1).cpu()
    done = torch.stack([s.done for s in steps], dim=1).cpu()
    audios = torch.stack([s.audio for s in steps], dim=2).cpu() if steps[0].audio is not None else None
    results = []
    for row in range(rows):
        text_ids = strip_text_answer(model.layout, texts[row].tolist(), stop_ids)
        finished = bool(done[row].any())
        if audios is None or task not in SPEECH_TASKS:
            results.append(Generated(text_ids=text_ids, finished=finished))
            continue
        # a row's own length: batched and one-at-a-time runs then agree column for column
        length = int(done[row].nonzero()[0]) + 1 if finished else len(steps)
        audio_ids = audios[row, :, :length].clone()
        codes = read_codes(model.layout, audio_ids)
        results.append(Generated(text_ids=text_ids, audio_ids=audio_ids, codes=codes, finished=finished))
    return results
