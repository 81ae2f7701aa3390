"""The offline demo's stand-ins for what a real run downloads: speech data and pretrained models.

No hub is reachable, so the demo makes its own:

  espeak.py      espeak-ng through ctypes: voices, synthesis, silence trimming (`speak_clip`)
  grammar.py     sentences from a small template grammar
  corpus.py      the ASR corpus: those sentences spoken by espeak-ng
  qa_corpus.py   the spoken question/answer corpus (facts in qa_facts.py), answers as SNAC codes
  standins/      tiny Whisper encoder and Qwen2 LLM trained on those corpora, saved by path

Everything is built once into the cache folder under a hash of its inputs and loaded from there
afterwards. The core reaches the demo only through the four functions below. This package may
import training.common, training.stages, training.speech.* and third-party libraries (datasets, torch,
transformers, tokenizers), never training.engine, training.data or training.model, so the demo
can be left out without touching the core. The facade imports its modules lazily: importing
`training.demo` loads neither torch nor espeak-ng.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from training.common import LogFn

if TYPE_CHECKING:
    import datasets

__all__ = ["demo_audio_window", "demo_pretrained", "demo_qa", "demo_speech"]


def demo_speech(cache_dir: Path, scale: str, log: LogFn) -> datasets.DatasetDict:
    """The embedded ASR corpus (splits train/dev/heldout) at "full" or "quick" scale."""
    from training.demo.corpus import build_corpus, corpus_config

    return build_corpus(cache_dir, corpus_config(scale), log=log)


def demo_qa(cache_dir: Path, scale: str, log: LogFn) -> datasets.DatasetDict:
    """The embedded spoken QA corpus (splits train/dev/heldout) at "full" or "quick" scale."""
    from training.demo.qa_corpus import build_qa_corpus, qa_corpus_config

    return build_qa_corpus(cache_dir, qa_corpus_config(scale), log=log)


def demo_pretrained(
    train: datasets.Dataset,
    cache_dir: Path,
    scale: str,
    lm_texts: int,
    corpus_scale: str,
    qa_train: list[tuple[str, str]],
    qa_heldout: list[tuple[str, str]],
    log: LogFn,
) -> tuple[Path, Path]:
    """The stand-in (encoder_dir, llm_dir), trained once on `train` at "full" or "quick" scale.

    The LLM also reads `lm_texts` text-only sentences of the corpus grammar (never a dev or held-out
    one; `corpus_scale` is the ASR corpus's scale, which fixes those): a pretrained LLM knows the
    language, not just the ASR transcripts. It learns the `qa_train` (question, answer) pairs, as
    a pretrained LLM knows the facts the questions ask for; `qa_heldout` pairs are only scored.
    """
    from training.demo.corpus import corpus_config, text_only_sentences
    from training.demo.standins import STANDIN_SCALES, build_standins

    config = STANDIN_SCALES[scale]
    extra = text_only_sentences(corpus_config(corpus_scale), lm_texts)
    return build_standins(
        train, cache_dir, config, log=log, extra_texts=extra, qa_pairs=qa_train, qa_heldback=qa_heldout
    )


def demo_audio_window(scale: str) -> tuple[int, int]:
    """(sampling rate, longest clip in samples) of the stand-in encoder at "full" or "quick" scale:
    what the data checks need before the stand-ins exist."""
    from training.demo.standins import STANDIN_SCALES

    config = STANDIN_SCALES[scale]
    return config.sampling_rate, config.chunk_length * config.sampling_rate
