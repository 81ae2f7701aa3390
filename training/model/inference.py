"""Inference: answer one question (a waveform, a WAV path or text) in text and, for a1a2 / t1a2,
in speech decoded by the SNAC codec to a 24 kHz 16-bit WAV, whole or streamed.

Decoding itself (greedy or sampled, batched, batch-parallel) is training.model.decoding. Streamed
speech is decoded as frames complete, each chunk with a sliding window of SNAC frames around it
(`StreamingDecoder`: frames of left context and a few frames of look-ahead), so the joins of the
chunks sound as the whole decode does. The module is also a small CLI:

    python -m training.model.inference --model runs/demo/final/final --task a1a2 --audio q.wav --out answer.wav
    python -m training.model.inference ... --stream --batch-parallel --temperature 0.8 --top-k 50 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from training.model.decoding import (
    RULES,
    Generated,
    Sampling,
    build_prompts,
    check_task,
    decode_steps,
    generate,
    read_codes,
)
from training.speech.audio import decode_audio, resample, wav_bytes
from training.speech.layout import N_AUDIO_LAYERS, SPEECH_IN_TASKS, SPEECH_TASKS, n_encoder_frames, strip_text_answer
from training.stages import TASKS

__all__ = [
    "Generated",
    "Sampling",
    "SpeechStream",
    "StreamingDecoder",
    "build_prompts",
    "encode_question",
    "generate",
    "main",
    "speak",
    "write_wav",
]


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


class StreamingDecoder:
    """SNAC frames in, audio out as they complete: each chunk is decoded with `context` frames
    before it and `lookahead` frames after it, and only its own samples are kept, so that a
    chunk's edges see (nearly) what the whole decode sees there. A chunk goes out once `chunk`
    new frames have their look-ahead; `flush` decodes the rest at the end."""

    def __init__(self, codec: Any, context: int = 8, lookahead: int = 2, chunk: int = 4) -> None:
        from training.speech.snac_codes import samples_per_frame

        self.codec, self.context, self.lookahead, self.chunk = codec, context, lookahead, chunk
        self.frame_samples = samples_per_frame()
        self.codes = torch.zeros((0, N_AUDIO_LAYERS), dtype=torch.long)
        self.emitted = 0  # frames whose samples have gone out

    def push(self, frames: torch.Tensor) -> np.ndarray:
        """Append frames [k, 7]; returns the samples now ready (possibly none)."""
        self.codes = torch.cat([self.codes, frames.long().cpu()])
        ready = len(self.codes) - self.lookahead
        if ready - self.emitted < self.chunk:
            return np.zeros(0, dtype=np.float32)
        return self._decode(ready)

    def flush(self) -> np.ndarray:
        return self._decode(len(self.codes)) if len(self.codes) > self.emitted else np.zeros(0, dtype=np.float32)

    def _decode(self, end: int) -> np.ndarray:
        from training.speech.codec import decode_codes

        first = max(0, self.emitted - self.context)
        audio = decode_codes(self.codec, self.codes[first : min(len(self.codes), end + self.lookahead)])
        out = audio[(self.emitted - first) * self.frame_samples : (end - first) * self.frame_samples]
        self.emitted = end
        return out


class SpeechStream:
    """The answer speech as it is generated: iterate for float32 chunks at 24 kHz. Once iterated
    to the end, `text` holds the answer text, `frames` the SNAC frames spoken, and
    `first_audio_s` the seconds from the start of decoding to the first chunk."""

    def __init__(
        self, model: Any, tokenizer: Any, steps: Iterator[Any], decoder: StreamingDecoder, stops: Sequence[int]
    ) -> None:
        self.model, self.tokenizer, self.steps, self.decoder, self.stops = model, tokenizer, steps, decoder, stops
        self.text, self.frames, self.first_audio_s = "", 0, None
        self.started = time.perf_counter()

    def __iter__(self) -> Iterator[np.ndarray]:
        text_ids, columns = [], []
        for step in self.steps:
            text_ids.append(int(step.text[0]))
            columns.append(step.audio[0].cpu())
            codes = read_codes(self.model.layout, torch.stack(columns, dim=1))
            yield from self._out(self.decoder.push(codes[len(self.decoder.codes) :]))
            if bool(step.done[0]):  # batch-parallel: row 0 (the speech row) ends the answer
                break
        yield from self._out(self.decoder.flush())
        self.text = self.tokenizer.decode(strip_text_answer(self.model.layout, text_ids, self.stops))
        self.frames = len(self.decoder.codes)

    def _out(self, chunk: np.ndarray) -> Iterator[np.ndarray]:
        if chunk.size:
            if self.first_audio_s is None:
                self.first_audio_s = time.perf_counter() - self.started
            yield chunk


def _question(
    model: Any, tokenizer: Any, task: str, audio: Any, text: str | None, feature_extractor: Any
) -> dict[str, Any]:
    """The decoding inputs of one question: encoder states of the speech, or the text's ids."""
    speech_in = task in SPEECH_IN_TASKS
    if speech_in and (audio is None or text is not None):
        raise ValueError(f"task {task!r} takes a speech question: pass audio, not text")
    if not speech_in and (text is None or audio is not None):
        raise ValueError(f"task {task!r} takes a text question: pass text, not audio")
    if not speech_in:
        return {"question_ids": [tokenizer(text, add_special_tokens=False).input_ids]}  # as prepared rows hold
    if feature_extractor is None:
        from transformers import WhisperFeatureExtractor

        feature_extractor = WhisperFeatureExtractor.from_pretrained(model.config.encoder)
    states, lengths = encode_question(model, feature_extractor, _waveform(audio, feature_extractor.sampling_rate))
    return {"encoder_states": states, "encoder_lengths": lengths}


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
    sampling: Sampling | None = None,
    batch_parallel: bool = False,
    stream: bool = False,
    rules: str = "ours",
) -> Any:
    """Answer one question; returns (answer text, number of SNAC frames written).

    audio: (samples, sampling_rate) or a path to an audio file, for speech-in tasks; text: the
    question, for text-in tasks. Speech-out tasks (a1a2, t1a2) write the answer speech decoded by
    `codec` to wav_path (24 kHz, 16-bit, frames x samples_per_frame() samples); text-out tasks
    write nothing and return 0 frames. feature_extractor defaults to the one saved with the
    model's encoder; stop_ids to the tokenizer's end-of-text token. sampling: draws instead of
    greedy; batch_parallel: a1a2 steered by its A1T2 row; rules: "ours" or "mini-omni" (the
    reference decoder's rules; training.model.decoding says how they differ).
    stream=True (speech-out tasks) returns a SpeechStream instead and writes nothing: iterate it
    for the audio chunks as the frames complete.
    """
    from training.speech.codec import SAMPLING_RATE, decode_codes  # imports snac: only speech output needs it

    check_task(task)
    if task in SPEECH_TASKS and wav_path is None and not stream:
        raise ValueError(f"task {task!r} answers with speech: pass wav_path")
    if stream and task not in SPEECH_TASKS:
        raise ValueError(f"task {task!r} answers in text: there is no speech to stream")
    if stop_ids is None:
        stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    model.eval()
    question = _question(model, tokenizer, task, audio, text, feature_extractor)
    decoding = {"max_new_tokens": max_new_tokens, "sampling": sampling, "batch_parallel": batch_parallel}
    decoding["rules"] = rules
    if stream:
        steps = decode_steps(model, task, stop_ids=stop_ids, **decoding, **question)
        return SpeechStream(model, tokenizer, steps, StreamingDecoder(codec), stop_ids)
    result = generate(model, task, stop_ids=stop_ids, **decoding, **question)[0]
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
    parser.add_argument("--stream", action="store_true", help="write the WAV as frames complete (a1a2, t1a2)")
    parser.add_argument("--batch-parallel", action="store_true", help="a1a2 steered by its A1T2 row's text")
    parser.add_argument("--temperature", type=float, default=None, help="sample instead of greedy decoding")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws when sampling")
    parser.add_argument(
        "--decoding-rules",
        choices=RULES,
        default="ours",
        help="mini-omni: the reference decoder's rules (audio fed back as chosen, stop at layer 6's eoa)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.task in SPEECH_TASKS and not args.out:
        parser.error(f"--task {args.task} answers with speech: pass --out answer.wav")
    if args.stream and args.task not in SPEECH_TASKS:
        parser.error(f"--stream: task {args.task} answers in text")
    if args.batch_parallel and args.task != "a1a2":
        parser.error("--batch-parallel pairs an a1a2 row with an a1t2 row: use --task a1a2")
    sampled = args.temperature is not None or args.top_k is not None or args.top_p is not None
    try:
        sampling = Sampling(args.temperature or 1.0, args.top_k, args.top_p, args.seed) if sampled else None
    except ValueError as err:
        parser.error(str(err))

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
    options = {"sampling": sampling, "batch_parallel": args.batch_parallel, "rules": args.decoding_rules}
    options["feature_extractor"] = feature_extractor
    common = {"audio": args.audio, "text": args.text, "task": args.task, "max_new_tokens": args.max_new_tokens}
    if args.stream:
        speech = speak(model, tokenizer, codec, wav_path=None, stream=True, **common, **options)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with sf.SoundFile(args.out, "w", SAMPLING_RATE, 1, subtype="PCM_16", format="WAV") as wav:
            for chunk in speech:  # written as it comes: a reader may play the file while it grows
                wav.write(np.clip(chunk, -1.0, 1.0))
                wav.flush()
        answer, frames = speech.text, speech.frames
        if speech.first_audio_s is not None:
            print(f"first audio after {speech.first_audio_s:.2f} s", file=sys.stderr)
    else:
        answer, frames = speak(model, tokenizer, codec, wav_path=args.out, **common, **options)
    print(answer)
    if args.task in SPEECH_TASKS:
        seconds = frames * samples_per_frame() / SAMPLING_RATE
        print(f"wrote {args.out}: {frames} SNAC frames, {seconds:.2f} s at {SAMPLING_RATE} Hz", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
