"""The ASR judge of answer speech (data.speech_judge): what the generated speech says, heard.

The generated SNAC codes are decoded by the run's codec (data.codec) to 24 kHz, resampled to the
judge's rate and transcribed greedily, by a Whisper checkpoint (a local path or hub id: its
processor and WhisperForConditionalGeneration) or, with "self", by the run's own model in its ASR
task. Scored, Whisper-normalized, through the same `evaluate` WER module as ASR:

  speech WER            transcripts against the reference answers (NeMo's ASR-BLEU idea, as WER)
  text-speech WER       transcripts against the model's own text stream (do text and speech agree?)

Only meaningful with a real codec: the demo's random-weight SNAC makes unintelligible audio, so
there the code judge (evaluation/spoken.py) is the honest one and this path is plumbing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from training.evaluation.scores import word_error_rate
from training.speech.audio import resample
from training.speech.layout import N_AUDIO_LAYERS
from training.speech.text import normalize

SELF = "self"  # data.speech_judge value: the run's own model, in ASR mode
JUDGE_BATCH = 16


class SpeechJudge:
    """Transcribes answer speech given as SNAC codes (module docstring)."""

    def __init__(
        self,
        source: str,
        codec: Any,
        model: Any = None,
        tokenizer: Any = None,
        feature_extractor: Any = None,
        device: str | torch.device = "cpu",
    ) -> None:
        """source: SELF (model, tokenizer, feature_extractor: the run's own) or a Whisper checkpoint,
        loaded onto `device`."""
        self.source, self.codec = source, codec
        if source == SELF:
            self.model, self.tokenizer, self.feature_extractor = model, tokenizer, feature_extractor
            self.whisper = None
        else:
            from transformers import AutoProcessor, WhisperForConditionalGeneration

            self.whisper = WhisperForConditionalGeneration.from_pretrained(source).eval().to(device)
            self.processor = AutoProcessor.from_pretrained(source)
            self.feature_extractor = getattr(self.processor, "feature_extractor", self.processor)
            self.tokenizer = getattr(self.processor, "tokenizer", None)
            if self.tokenizer is None:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(source)

    def _speech(self, codes: Any) -> np.ndarray:
        from training.speech.codec import SAMPLING_RATE, decode_codes

        frames = torch.as_tensor(codes, dtype=torch.long).reshape(-1, N_AUDIO_LAYERS)
        wave = decode_codes(self.codec, frames)
        rate = self.feature_extractor.sampling_rate
        return np.clip(resample(wave, SAMPLING_RATE, rate, "answer speech"), -1.0, 1.0)

    @torch.no_grad()
    def transcribe(
        self, answers_codes: Sequence[Any], max_new_tokens: int, all_finished: Callable[[bool], bool] | None = None
    ) -> list[str]:
        """One transcript per code sequence ("" for speech of no frames). all_finished: the ranks'
        lock-step for the run's own model under ZeRO-3 (evaluation/scores.py)."""
        waves = [self._speech(c) if len(c) else None for c in answers_codes]
        out = [""] * len(waves)
        spoken = [i for i, w in enumerate(waves) if w is not None and w.size]
        if self.whisper is None:
            from training.model.decoding import generate
            from training.model.inference import encode_question

            stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
            window = self.feature_extractor.n_samples  # the encoder hears one window
            for i in spoken:
                states, lengths = encode_question(self.model, self.feature_extractor, waves[i][:window])
                heard = generate(
                    self.model, "asr", encoder_states=states, encoder_lengths=lengths,
                    max_new_tokens=max_new_tokens, stop_ids=stops, all_finished=all_finished,
                )[0]  # fmt: skip
                out[i] = self.tokenizer.decode(heard.text_ids)
            return out
        device = self.whisper.device
        for start in range(0, len(spoken), JUDGE_BATCH):
            rows = spoken[start : start + JUDGE_BATCH]
            features = self.feature_extractor(
                [waves[i] for i in rows], sampling_rate=self.feature_extractor.sampling_rate, return_tensors="pt"
            ).input_features.to(device, self.whisper.dtype)
            ids = self.whisper.generate(input_features=features, max_new_tokens=max_new_tokens)
            for i, text in zip(rows, self.tokenizer.batch_decode(ids, skip_special_tokens=True)):
                out[i] = text
        return out


def asr_judge_scores(transcripts: list[str], references: list[str], texts: list[str], source: str) -> dict[str, Any]:
    """Speech WER against the reference answers, and against the model's own text answers where
    it said any (an empty text stream has no words to agree with)."""
    against_reference = word_error_rate(transcripts, references)
    said = [(t, x) for t, x in zip(transcripts, texts) if normalize(x).split()]
    against_text = word_error_rate(*map(list, zip(*said))) if said else {"wer": None}
    return {
        "judge": source,
        "speech_wer": against_reference["wer"],
        "text_speech_wer": against_text["wer"],
        "text_answers": len(said),
        "words": against_reference["words"],
    }
