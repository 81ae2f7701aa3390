"""Inference: greedy decoding of the text stream and the 7 SNAC audio streams in parallel.

`generate` runs the model's own step (8-stream embedding mean, Qwen2 with a KV cache) on a
left-padded batch of prompts built by training.speech.layout, for any of the five tasks:

  text out   asr, a1t2, t1t2   the text stream decodes; every audio stream is fed pad_a
  speech out a1a2, t1a2        text and the 7 audio layers decode together

Per answer step s (0-based) and batch row:
  text    argmax over the text slice; once eot (or a stop id) is out the row's text is over and
          pad_t is fed from then on, exactly the columns a training row holds after eot. A stop id
          is fed as eot, since eot is what training put at the end of every answer.
  audio i argmax over layer i's slice, but pad_a while s <= i (the delay of delay_audio) and pad_a
          once the layer has ended. A layer ends at eoa; any other non-code id (a special that has
          no place after the delay) ends it too, so that a weak model's stray special neither feeds
          garbage back nor breaks the code read-out.
A row is finished when its text is over (text-out tasks), or its text is over AND layer 6 has
ended (speech-out tasks: layer 6's eoa is the last column of the answer block, Mini-Omni's stop).
Decoding stops when every row is finished or after max_new_tokens steps.

`speak` answers one question (a waveform, a WAV path or text) and writes the answer speech,
decoded by the SNAC codec, to a 24 kHz 16-bit WAV. The module is also a small CLI:

    python -m training.model.inference --model runs/demo/final/final --task a1a2 --audio q.wav --out answer.wav
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from training.speech.audio import decode_audio, resample, wav_bytes
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
    n_encoder_frames,
    pad_token_column,
    strip_text_answer,
    t1a2_prompt,
    t1t2_prompt,
    undelay_audio,
)
from training.stages import TASKS

__all__ = ["Generated", "build_prompts", "encode_question", "generate", "main", "speak", "write_wav"]


@dataclass
class Generated:
    """One row's answer.

    text_ids: the answer's text tokens, specials dropped, cut before the first eot / stop id.
    audio_ids: [7, T] global ids of the audio layers as generated (delay pads, codes, eoa, pads),
        T = the steps this row took until it finished; None for text-out tasks.
    codes: [n, 7] SNAC codes read back with undelay_audio(require_eoa=False) (the frames complete
        on every layer); None for text-out tasks.
    """

    text_ids: list[int]
    audio_ids: torch.Tensor | None = None
    codes: torch.Tensor | None = None


def _check_task(task: str) -> None:
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
    _check_task(task)
    if task in SPEECH_IN_TASKS:
        if n_audio is None:
            raise ValueError(f"task {task!r} takes a speech question: pass encoder_states and encoder_lengths")
        builder = {"asr": asr_prompt, "a1t2": a1t2_prompt, "a1a2": a1a2_prompt}[task]
        return [builder(layout, int(n)) for n in n_audio]
    if question_ids is None:
        raise ValueError(f"task {task!r} takes a text question: pass question_ids (one list of ids per row)")
    builder = {"t1t2": t1t2_prompt, "t1a2": t1a2_prompt}[task]
    return [builder(layout, [int(q) for q in ids]) for ids in question_ids]


def _read_codes(layout: VocabLayout, audio_ids: torch.Tensor) -> torch.Tensor:
    """[7, T] generated audio ids -> codes [n, 7].

    A layer that ended on a special other than eoa is read as if it had emitted eoa there (the
    decoder treated it so); a generation shorter than the delay holds no complete frame."""
    if audio_ids.shape[1] < N_AUDIO_LAYERS:
        return torch.zeros((0, N_AUDIO_LAYERS), dtype=torch.long)
    ids = audio_ids.clone()
    for layer in range(N_AUDIO_LAYERS):
        local = ids[layer, layer + 1 :] - layout.audio_offset(layer)
        ends = (local >= layout.audio_codes).nonzero()
        if len(ends):
            ids[layer, layer + 1 + int(ends[0])] = layout.audio_id(layout.eoa, layer)
    return undelay_audio(layout, ids, require_eoa=False)


def _model_device(model: Any) -> torch.device:
    return model.llm.get_input_embeddings().weight.device


@torch.no_grad()
def generate(
    model: Any,
    task: str,
    *,
    encoder_states: torch.Tensor | None = None,
    encoder_lengths: torch.Tensor | None = None,
    question_ids: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    all_finished: Callable[[bool], bool] | None = None,
) -> list[Generated]:
    """Batched greedy decoding of text (+ speech for a1a2/t1a2) with a KV cache; see the module
    docstring for the per-step rules.

    encoder_states [B, F, d] / encoder_lengths [B]: speech-in tasks (asr, a1t2, a1a2), as the
    evaluation collator pads them. question_ids: text-in tasks (t1t2, t1a2), one id list per row.
    all_finished(local) -> global: under ZeRO-3 every forward gathers parameters from all ranks,
    so all ranks must take the same number of steps; the caller reduces the flag across them.
    """
    _check_task(task)
    layout: VocabLayout = model.layout
    speech_in = task in SPEECH_IN_TASKS
    speech_out = task in SPEECH_TASKS
    if speech_in and (encoder_states is None or encoder_lengths is None):
        raise ValueError(f"task {task!r} takes a speech question: pass encoder_states and encoder_lengths")
    if not speech_in and encoder_states is not None:
        raise ValueError(f"task {task!r} takes a text question; encoder_states would be ignored")
    n_audio = [n_adapter_frames(int(n), model.config.frame_stack) for n in encoder_lengths] if speech_in else None
    prompts = build_prompts(layout, task, n_audio=n_audio, question_ids=question_ids)
    batch = len(prompts)
    if batch == 0:
        return []
    device = encoder_states.device if speech_in else _model_device(model)

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
    out = model.llm.model(inputs_embeds=x, attention_mask=attention, position_ids=positions, use_cache=True)
    cache = out.cache
    last = out.last_hidden_state[:, -1]

    filler = pad_token_column(layout).to(device)  # pad_a on every audio layer, pad_t on text
    stops = torch.tensor([layout.eot, *[int(s) for s in stop_ids]], device=device)
    offsets = torch.tensor([layout.audio_offset(i) for i in range(N_AUDIO_LAYERS)], device=device)
    layer_index = torch.arange(N_AUDIO_LAYERS, device=device)
    no_speech = torch.zeros(batch, 1, dtype=torch.bool, device=device)
    text_over = torch.zeros(batch, dtype=torch.bool, device=device)
    audio_over = torch.zeros(batch, N_AUDIO_LAYERS, dtype=torch.bool, device=device)
    finished_at = torch.full((batch,), -1, dtype=torch.long, device=device)  # step each row finished at
    text_steps: list[torch.Tensor] = []
    audio_steps: list[torch.Tensor] = []
    steps = 0
    for step in range(max_new_tokens):
        steps = step + 1
        if speech_out:
            logits = model.stream_logits(last, 0, layout.total)  # one projection serves all 8 streams
            text_logits = logits[:, : layout.text_size]
        else:
            logits = None
            text_logits = model.stream_logits(last, 0, layout.text_size)  # text-out: the text slice only
        text = text_logits.argmax(-1)
        text = torch.where(text_over, torch.full_like(text, layout.pad_t), text)
        ends_now = torch.isin(text, stops)
        text_over |= ends_now
        text_steps.append(text)
        column = filler[None, :].repeat(batch, 1)
        column[:, TEXT_ROW] = torch.where(ends_now, torch.full_like(text, layout.eot), text)
        if speech_out:
            local = logits[:, layout.text_size :].reshape(batch, N_AUDIO_LAYERS, layout.audio_size).argmax(-1)
            forced = (step <= layer_index)[None, :] | audio_over  # delay, or the layer is done
            local = torch.where(forced, torch.full_like(local, layout.pad_a), local)
            audio_over |= ~forced & (local >= layout.audio_codes)  # eoa (or a stray special) ends the layer
            audio = local + offsets[None, :]
            audio_steps.append(audio)
            column[:, :N_AUDIO_LAYERS] = audio
            row_done = text_over & audio_over[:, N_AUDIO_LAYERS - 1]
        else:
            row_done = text_over
        finished_at = torch.where((finished_at < 0) & row_done, torch.full_like(finished_at, step), finished_at)
        finished = bool(row_done.all())
        if all_finished is not None:
            finished = all_finished(finished)
        if finished:
            break
        step_x = model.embed(column[:, :, None], no_speech, None, None)  # [B, 1, d]: the training embedding
        attention = torch.cat([attention, attention.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model.llm.model(
            inputs_embeds=step_x, attention_mask=attention, position_ids=positions, cache=cache, use_cache=True
        )
        cache = out.cache
        last = out.last_hidden_state[:, -1]

    texts = torch.stack(text_steps, dim=1).cpu() if text_steps else torch.zeros(batch, 0, dtype=torch.long)
    audios = torch.stack(audio_steps, dim=2).cpu() if audio_steps else None  # [B, 7, steps]
    lengths = torch.where(finished_at >= 0, finished_at + 1, torch.full_like(finished_at, steps)).cpu()
    results = []
    for row in range(batch):
        text_ids = strip_text_answer(layout, texts[row].tolist(), stop_ids)
        if audios is None:
            results.append(Generated(text_ids=text_ids))
            continue
        # a row's own length: batched and one-at-a-time runs then agree column for column
        audio_ids = audios[row, :, : int(lengths[row])].clone()
        results.append(Generated(text_ids=text_ids, audio_ids=audio_ids, codes=_read_codes(layout, audio_ids)))
    return results


# ---------------------------------------------------------------------------------------------
# One question in, answer text and speech out


def _waveform(audio: Any, sampling_rate: int) -> np.ndarray:
    """(samples, rate) or a path to an audio file -> mono float32 at sampling_rate."""
    if isinstance(audio, (str, Path)):
        mono, rate = decode_audio({"path": str(audio), "bytes": None}, str(audio))
    else:
        samples, rate = audio
        mono = np.asarray(samples, dtype=np.float32)
        if mono.ndim == 2:  # [n, channels], soundfile's layout
            mono = mono.mean(axis=1)
        if mono.ndim != 1 or mono.size == 0:
            raise ValueError(f"audio: expected mono samples [n] (or [n, channels]), got shape {mono.shape}")
    return resample(mono, int(rate), sampling_rate, "audio")


def encode_question(model: Any, feature_extractor: Any, wave: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Speech at the feature extractor's rate -> (encoder_states [1, n, d], encoder_lengths [1]),
    the way training prepares its rows (log-mel of a full window, encoder, n_encoder_frames)."""
    sr = feature_extractor.sampling_rate
    if len(wave) > feature_extractor.n_samples:
        raise ValueError(
            f"audio is {len(wave) / sr:.1f} s, longer than the encoder's "
            f"{feature_extractor.n_samples / sr:.0f} s window"
        )
    features = feature_extractor([wave], sampling_rate=sr, return_tensors="pt", padding="max_length").input_features
    if features.shape[-1] != model.n_mel_frames:
        raise ValueError(
            f"feature extractor gives {features.shape[-1]} mel frames, the encoder needs {model.n_mel_frames}"
        )
    param = next(model.encoder.parameters())
    states = model.encode(features.to(param.device, param.dtype))
    n = n_encoder_frames(len(wave), sr, model.n_mel_frames // 2)
    return states[:, :n], torch.tensor([n], device=states.device)


def write_wav(path: str | Path, samples: np.ndarray, sampling_rate: int) -> None:
    """16-bit PCM WAV; samples are clipped to [-1, 1] (a random-weight codec overshoots) so the
    integer conversion cannot wrap."""
    samples = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.size:
        path.write_bytes(wav_bytes(samples, sampling_rate))
    else:  # no frames: still a valid (empty) WAV, which wav_bytes refuses to encode
        sf.write(path, samples, sampling_rate, format="WAV", subtype="PCM_16")


def speak(
    model: Any,
    tokenizer: Any,
    codec: Any,
    *,
    audio: Any = None,
    text: str | None = None,
    task: str,
    wav_path: str | Path | None,
    max_new_tokens: int = 600,
    feature_extractor: Any = None,
    stop_ids: Sequence[int] | None = None,
) -> tuple[str, int]:
    """Answer one question; returns (answer text, number of SNAC frames written).

    audio: (samples, sampling_rate) or a path to an audio file, for speech-in tasks; text: the
    question, for text-in tasks. Speech-out tasks (a1a2, t1a2) write the answer speech decoded by
    `codec` to wav_path (24 kHz, 16-bit, frames x samples_per_frame() samples); text-out tasks
    write nothing and return 0 frames. feature_extractor defaults to the one saved with the
    model's encoder; stop_ids to the tokenizer's end-of-text token.
    """
    from training.speech.codec import SAMPLING_RATE, decode_codes  # imports snac: only speech output needs it

    _check_task(task)
    speech_in = task in SPEECH_IN_TASKS
    if speech_in and (audio is None or text is not None):
        raise ValueError(f"task {task!r} takes a speech question: pass audio, not text")
    if not speech_in and (text is None or audio is not None):
        raise ValueError(f"task {task!r} takes a text question: pass text, not audio")
    if task in SPEECH_TASKS and wav_path is None:
        raise ValueError(f"task {task!r} answers with speech: pass wav_path")
    if stop_ids is None:
        stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    model.eval()
    if speech_in:
        if feature_extractor is None:
            from transformers import WhisperFeatureExtractor

            feature_extractor = WhisperFeatureExtractor.from_pretrained(model.config.encoder)
        wave = _waveform(audio, feature_extractor.sampling_rate)
        states, lengths = encode_question(model, feature_extractor, wave)
        result = generate(
            model,
            task,
            encoder_states=states,
            encoder_lengths=lengths,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
        )[0]
    else:
        question = tokenizer(text, add_special_tokens=False).input_ids  # as prepared rows hold text ids
        result = generate(model, task, question_ids=[question], max_new_tokens=max_new_tokens, stop_ids=stop_ids)[0]
    answer = tokenizer.decode(result.text_ids)
    if result.codes is None:
        return answer, 0
    write_wav(wav_path, decode_codes(codec, result.codes), SAMPLING_RATE)
    return answer, int(result.codes.shape[0])


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Answer one spoken or written question with a stage export.")
    parser.add_argument("--model", required=True, help="a stage export folder (e.g. runs/demo/final/final)")
    parser.add_argument("--task", required=True, choices=TASKS)
    question = parser.add_mutually_exclusive_group(required=True)
    question.add_argument("--audio", help="the spoken question (WAV/FLAC/OGG), for asr, a1t2, a1a2")
    question.add_argument("--text", help="the written question, for t1t2, t1a2")
    parser.add_argument("--out", help="where to write the answer speech (a1a2, t1a2)")
    parser.add_argument(
        "--codec",
        default=None,
        help="SNAC 24 kHz checkpoint folder or hub id; without it a seeded RANDOM-weight codec "
        "decodes the codes, and the audio is not intelligible",
    )
    parser.add_argument("--max-new-tokens", type=int, default=600)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.task in SPEECH_TASKS and not args.out:
        parser.error(f"--task {args.task} answers with speech: pass --out answer.wav")

    from training.model import load_omni
    from training.speech.codec import SAMPLING_RATE, load_codec
    from training.speech.snac_codes import samples_per_frame

    model, tokenizer, feature_extractor = load_omni(args.model)
    model.to(args.device).eval()
    codec = (
        load_codec(args.codec, log=lambda m: print(m, file=sys.stderr)).to(args.device)
        if args.task in SPEECH_TASKS
        else None
    )
    answer, frames = speak(
        model,
        tokenizer,
        codec,
        audio=args.audio,
        text=args.text,
        task=args.task,
        wav_path=args.out,
        max_new_tokens=args.max_new_tokens,
        feature_extractor=feature_extractor,
    )
    print(answer)
    if args.task in SPEECH_TASKS:
        seconds = frames * samples_per_frame() / SAMPLING_RATE
        print(f"wrote {args.out}: {frames} SNAC frames, {seconds:.2f} s at {SAMPLING_RATE} Hz", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
