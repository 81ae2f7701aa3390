"""Speech you can listen to: at each stage boundary a few held-out questions answered freely are
written as WAVs (the question, the answer speech the model generated, the reference answer speech,
both decoded by the run's codec), and the run report gains ``report.html``, a page with an audio
player for each, beside the text answer and what the speech was judged to say.

    <output>/<stage>/listening/<task>-<i>-{question,answer,reference}.wav   written at the boundary
    <output>/report/audio/<stage>-<task>-<i>-*.wav                          copied by the report
    <output>/report.html                                                    the listening page

With the demo's random-weight codec the speech is not intelligible: the page says so.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.common import write_text_atomic
from training.speech.audio import decode_audio
from training.speech.layout import N_AUDIO_LAYERS

LISTENING_DIR = "listening"
REPORT_HTML = "report.html"
AUDIO_DIR = "audio"  # inside the report folder


def write_listening_audio(
    stage_dir: Path,
    task: str,
    samples: list[dict[str, Any]],
    codec: Any,
    judge: Any,
    questions: Any = None,
    question_column: str = "question",
    question_audio_column: str = "question_audio",
) -> None:
    """WAVs of the kept samples (in place: each sample gains a "wavs" entry of file names relative
    to stage_dir). questions: the raw held-out QA split, to find each spoken question's audio by
    its text (absent or not found: no question player)."""
    from training.model.inference import write_wav
    from training.speech.codec import SAMPLING_RATE, decode_codes

    folder = stage_dir / LISTENING_DIR
    folder.mkdir(parents=True, exist_ok=True)
    asked = list(questions[question_column]) if questions is not None else []
    for i, sample in enumerate(samples):
        wavs: dict[str, str] = {}
        speech = {"answer": sample["codes"], "reference": judge.reference(sample["reference"])}
        for kind, codes in speech.items():
            if codes is None or len(codes) == 0:  # no speech: no player
                continue
            name = f"{LISTENING_DIR}/{task}-{i}-{kind}.wav"
            frames = torch.as_tensor(codes, dtype=torch.long).reshape(-1, N_AUDIO_LAYERS)
            write_wav(stage_dir / name, decode_codes(codec, frames), SAMPLING_RATE)
            wavs[kind] = name
        if task == "a1a2" and sample.get("question") in asked:
            row = asked.index(sample["question"])
            mono, rate = decode_audio(questions[row][question_audio_column], f"held-out question row {row}")
            name = f"{LISTENING_DIR}/{task}-{i}-question.wav"
            write_wav(stage_dir / name, np.asarray(mono), rate)
            wavs["question"] = name
        sample["wavs"] = wavs


def spoken_table(record: dict[str, Any], boundaries: tuple[str, ...]) -> list[str]:
    """report.md: free-running speech answers per boundary and task, each figure beside its floor."""
    rows = []
    for key in boundaries:
        for task, s in ((record["stages"].get(key) or {}).get("spoken") or {}).items():
            pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            rows.append(
                f"| {key} | {task} | {pct(s['spoken_accuracy'])} | {pct(s.get('majority'))} "
                f"| {pct(s['text_speech_agreement'])} | {pct(s['agreement_floor'])} | {pct(s['exact_sequence_rate'])} "
                f"| {s['length_ratio']:.2f} | {pct(s['reached_limit'])} | {s['questions']} | {s['candidates']} |"
            )
    if not rows:
        return []
    return [
        "Speech answers generated freely (greedy) and judged by their codes: the answer whose reference",
        "speech is nearest by frame edit distance. Listen to some in [report.html](report.html).",
        "",
        "| after | task | spoken-answer accuracy | constant-answer floor | text-speech agreement "
        "| chance agreement | exact codes | length / reference | at the token limit | questions | candidates |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _player(src: str | None) -> str:
    if src is None:
        return "-"
    return f'<audio controls preload="metadata" src="{html.escape(src)}"></audio>'


def copy_listening_audio(
    output_dir: Path, record: dict[str, Any], report_tmp: Path, report_name: str, boundaries: tuple[str, ...]
) -> dict[tuple[str, str, int, str], str]:
    """Copy every boundary's listening WAVs into the report folder being built (report_tmp, which
    becomes report_name); returns (boundary, task, sample, kind) -> the path the page links to."""
    sources = {}
    for key in boundaries:
        for task, scores in ((record["stages"].get(key) or {}).get("spoken") or {}).items():
            for i, sample in enumerate(scores.get("samples", [])):
                for kind, name in (sample.get("wavs") or {}).items():
                    source = output_dir / key / name
                    if source.is_file():
                        target = f"{AUDIO_DIR}/{key}-{Path(name).name}"
                        (report_tmp / AUDIO_DIR).mkdir(exist_ok=True)
                        shutil.copyfile(source, report_tmp / target)
                        sources[key, task, i, kind] = f"{report_name}/{target}"
    return sources


def write_listening_page(
    output_dir: Path,
    record: dict[str, Any],
    sources: dict[tuple[str, str, int, str], str],
    codec: str | None,
    boundaries: tuple[str, ...],
) -> Path:
    """report.html beside report.md: per boundary and speech-out task, the kept questions with
    players for the question, the reference answer speech and the generated answer speech."""
    sections = []
    for key in boundaries:
        for task, scores in ((record["stages"].get(key) or {}).get("spoken") or {}).items():
            rows = []
            for i, sample in enumerate(scores.get("samples", [])):
                player = {k: _player(sources.get((key, task, i, k))) for k in ("question", "reference", "answer")}
                rows.append(
                    f"<tr><td>{i}</td><td>{html.escape(sample.get('question') or '')}<br>{player['question']}</td>"
                    f"<td>{html.escape(sample['reference'])}<br>{player['reference']}</td>"
                    f"<td>{html.escape(sample['text'])}</td><td>{player['answer']}</td>"
                    f"<td>{html.escape(sample['judged'])}</td></tr>"
                )
            sections.append(
                f"<h2>after {html.escape(key)}: {html.escape(task)}</h2>"
                f"<p>spoken-answer accuracy {100 * scores['spoken_accuracy']:.1f}% on {scores['questions']} "
                f"held-out questions; text-speech agreement {100 * scores['text_speech_agreement']:.1f}%</p>"
                "<table><tr><th>#</th><th>question</th><th>reference answer</th><th>text answer</th>"
                "<th>answer speech</th><th>speech judged as</th></tr>" + "".join(rows) + "</table>"
            )
    codec_note = codec or "a seeded RANDOM-weight SNAC: the speech is not intelligible, judge it by its codes"
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Listening: "
        f"{html.escape(str(record.get('recipe', '')))}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px}"
        "table{border-collapse:collapse}</style></head><body>"
        f"<h1>Held-out questions, answered in speech</h1><p>Codec: {html.escape(codec_note)}.</p>"
        + ("".join(sections) or "<p>No stage has trained a speech answer yet.</p>")
        + "</body></html>"
    )
    path = output_dir / REPORT_HTML
    write_text_atomic(path, page)
    return path
