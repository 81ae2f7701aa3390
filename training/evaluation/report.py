"""The run report: ``report.md`` plus PNG plots, rebuilt from the files a run leaves behind.

Reads only ``<output>/run_record.json`` and ``<output>/<stage>/metrics.jsonl``, so it can be
called at any stage end, at the end of ``--stage all``, or later from the command line:

    python -m training.evaluation.report --output-dir runs/demo --recipe demo

Writes (each atomically: a crash leaves the previous report or the new one, never half of one):

    <output>/report.md              stage table as run, per-stage results, embedded plots
    <output>/report/loss.png        training loss per global step, stage boundaries marked
    <output>/report/lr.png          LR per global step, same boundaries
    <output>/report/wer.png         WER per stage boundary (before, asr, second, final) per split
    <output>/report/series.json     the exact data plotted (one point per metrics.jsonl line)
    <output>/report.html            the listening page (evaluation/listening.py), its WAVs in report/audio/

Call it on the main process only: it writes shared files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The object-oriented API with the Agg canvas, never pyplot: no display is needed, and no global
# backend or figure state leaks into the training process that calls us.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from training.common import RECORD, atomic_dir, read_json, write_text_atomic
from training.evaluation.listening import copy_listening_audio, spoken_table, write_listening_page
from training.recipe_file import load_recipe
from training.stages import STAGE_NAMES, Recipe, RecipeError

REPORT_MD = "report.md"
REPORT_DIR = "report"
BOUNDARIES: tuple[str, ...] = ("before", *STAGE_NAMES)
PLOTS = {"loss": "loss.png", "lr": "lr.png", "wer": "wer.png"}
SERIES_JSON = "series.json"


@dataclass
class StageSeries:
    """One stage's logged steps, offset onto a global step axis that runs across stages."""

    stage: str
    offset: int  # global step = offset + the stage's own step
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    tokens: int | None = None  # summed "tokens" from metrics lines, when the loop logs them

    @property
    def global_step(self) -> list[int]:
        return [self.offset + s for s in self.step]

    @property
    def end(self) -> int:
        return self.offset + (self.step[-1] if self.step else 0)


# ---------------------------------------------------------------------------------------------
# Reading


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metrics lines of one stage, in file order.

    A torn last line (the process killed mid-write) is dropped rather than failing the report;
    every complete line is kept, so the plotted series is exactly the logged steps.
    """
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def stage_series(output_dir: Path, record: dict[str, Any]) -> list[StageSeries]:
    """Series for every stage with a metrics file, laid end to end in stage order.

    A stage with no metrics file but a recorded step count (e.g. its metrics were cleaned up)
    still advances the offset, so later stages sit where they ran."""
    out, offset = [], 0
    for stage in STAGE_NAMES:
        rows = read_metrics(output_dir / stage / "metrics.jsonl")
        entry = record["stages"].get(stage) or {}
        if rows:
            series = StageSeries(
                stage,
                offset,
                [int(r["step"]) for r in rows],
                [float(r["loss"]) for r in rows],
                [float(r["lr"]) for r in rows],
            )
            if any("tokens" in r for r in rows):
                series.tokens = int(sum(r.get("tokens", 0) for r in rows))
            out.append(series)
        offset += max(out[-1].step[-1] if rows else 0, int(entry.get("steps", 0)))
    return out


def wer_splits(record: dict[str, Any], recipe: Recipe) -> list[str]:
    """Eval splits in a stable order: the recipe's held-out split, its dev split, then the rest."""
    seen = {s for key in BOUNDARIES for s in (record["stages"].get(key) or {}).get("wer", {})}
    chosen = record.get("data", {})  # the splits the run chose (recipes may leave them to be recognized)
    heldout, dev = (chosen.get(k, getattr(recipe.data, k)) for k in ("heldout_split", "dev_split"))
    first = [s for s in (heldout, dev) if s in seen]
    return first + sorted(seen - set(first))


def wer_points(record: dict[str, Any], splits: list[str]) -> dict[str, list[tuple[str, float]]]:
    """Per split: (boundary, WER in %) for each boundary that recorded it."""
    points: dict[str, list[tuple[str, float]]] = {s: [] for s in splits}
    for key in BOUNDARIES:
        wer = (record["stages"].get(key) or {}).get("wer", {})
        for split in splits:
            if split in wer:
                points[split].append((key, 100.0 * float(wer[split]["wer"])))
    return points


# ---------------------------------------------------------------------------------------------
# Plots


def _mark_stages(ax: Any, series: list[StageSeries]) -> None:
    """A dashed line at each stage's end and the stage name over its span."""
    for s in series:
        ax.axvline(s.end, color="0.4", linestyle="--", linewidth=0.8)
        ax.text(
            (s.offset + s.end) / 2,
            1.01,
            s.stage,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=9,
        )


def _new_axes(title: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(9, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, pad=18)
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_per_step(series: list[StageSeries], key: str, ylabel: str, path: Path) -> None:
    """Loss or LR against the global step, one colour per stage."""
    fig, ax = _new_axes(f"{ylabel} per optimizer step")
    for s in series:
        ax.plot(s.global_step, getattr(s, key), linewidth=1.0, label=s.stage)
    _mark_stages(ax, series)
    ax.set_xlabel("global optimizer step (stages end to end)")
    ax.set_ylabel(ylabel)
    if key == "lr" and any(s.lr for s in series) and min(v for s in series for v in s.lr) > 0:
        ax.set_yscale("log")  # warm-up starts ~250x below the peak: linear would hide it
    if series:
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no steps logged yet", transform=ax.transAxes, ha="center")
    fig.savefig(path)


def plot_wer(points: dict[str, list[tuple[str, float]]], path: Path) -> None:
    """WER (%) at each stage boundary, one line per eval split."""
    fig, ax = _new_axes("WER per stage boundary")
    positions = {key: i for i, key in enumerate(BOUNDARIES)}
    for i, (split, pts) in enumerate(points.items()):
        if pts:
            xs, ys = [positions[k] for k, _ in pts], [v for _, v in pts]
            ax.plot(xs, ys, marker="o", label=split)
            # alternate labels above/below so close values of two splits stay readable
            dy = 7 if i % 2 == 0 else -13
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.1f}%", (x, y), textcoords="offset points", xytext=(0, dy), ha="center", fontsize=8)
    ax.set_xticks(range(len(BOUNDARIES)), [f"after {k}" if k != "before" else k for k in BOUNDARIES])
    ax.set_xlim(-0.5, len(BOUNDARIES) - 0.5)
    ax.set_ylabel("WER (%)")
    ax.margins(y=0.12)
    ax.set_ylim(bottom=-0.08 * ax.get_ylim()[1])  # room for a label below a point near 0 %
    if any(points.values()):
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no WER recorded yet", transform=ax.transAxes, ha="center")
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _fmt_num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-" if value is None else str(value)
    return format(value, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def stage_table(recipe: Recipe, record: dict[str, Any]) -> list[str]:
    """The recipe's stage table, plus what each stage actually did."""
    rows = []
    for s in recipe.stages:
        entry = record["stages"].get(s.name) or {}
        trained = str(entry["steps"]) if "steps" in entry else "-"
        rows.append(
            [
                f"`{s.name}`",
                f"{s.min_steps:,}-{s.max_steps:,}",
                f"{s.lr_init:.0e}",
                f"{s.lr_peak:.0e}",
                f"{s.warmup_steps:,}",
                "+".join(s.trainable),
                trained,
                entry.get("stop_reason", "-"),
            ]
        )
    return _table(
        ["stage", "steps (min-max)", "LR init", "LR peak", "warm-up", "trains", "steps trained", "stop reason"], rows
    )


def _tokens_seen(entry: dict[str, Any], series: StageSeries | None) -> str:
    tokens = entry.get("tokens", series.tokens if series else None)
    return f"{int(tokens):,}" if tokens is not None else "-"


def _throughput(entry: dict[str, Any]) -> str:
    if "model_tflops_per_s" not in entry:
        return "-"
    mfu = f" ({100 * entry['mfu']:.1f}%)" if "mfu" in entry else ""
    return f"{entry['model_tflops_per_s']:.3g}{mfu}"


def results_table(record: dict[str, Any], splits: list[str], series: list[StageSeries]) -> list[str]:
    """WER per split (%), losses, wall time, tokens and skipped steps at each boundary."""
    by_stage = {s.stage: s for s in series}
    rows = []
    for key in BOUNDARIES:
        entry = record["stages"].get(key)
        if not entry:
            continue
        wer = entry.get("wer", {})
        cells = [f"{100 * wer[s]['wer']:.1f}%" if s in wer else "-" for s in splits]
        status = "" if entry.get("complete", False) else " (incomplete)"
        rows.append(
            [
                f"{key}{status}",
                *cells,
                _fmt_num(entry.get("heldout_loss"), ".4f"),
                _fmt_num(entry.get("final_train_loss"), ".4f"),
                str(entry.get("steps", 0)),
                _fmt_seconds(entry.get("seconds")),
                _tokens_seen(entry, by_stage.get(key)),
                _throughput(entry),
                str(entry["skipped_steps"]) if "skipped_steps" in entry else "-",
            ]
        )
    header = [
        "after",
        *[f"{s} WER" for s in splits],
        "held-out loss",
        "final train loss",
        "steps",
        "wall time",
        "tokens seen",
        "TFLOP/s per device (MFU)",
        "skipped steps",
    ]
    return _table(header, rows)


def qa_table(record: dict[str, Any]) -> list[str]:
    """Held-out spoken questions at each boundary: answer accuracy (A1T2) and audio-token accuracy
    (A1A2, teacher-forced), each beside its majority floor. Empty for runs without QA data."""
    rows = []
    for key in BOUNDARIES:
        entry = record["stages"].get(key) or {}
        answer, audio = entry.get("answer"), entry.get("audio_tokens")
        if not answer and not audio:
            continue
        pct = lambda scores, name: f"{100 * scores[name]:.1f}%" if scores and name in scores else "-"  # noqa: E731
        rows.append(
            [
                key,
                pct(answer, "accuracy"),
                pct(answer, "majority"),
                str(answer["questions"]) if answer else "-",
                pct(audio, "accuracy"),
                pct(audio, "majority"),
                _fmt_num((audio or {}).get("ce"), ".3f"),
            ]
        )
    if not rows:
        return []
    header = [
        "after",
        "answer accuracy",
        "constant-answer floor",
        "questions",
        "audio-token accuracy",
        "commonest-code floor",
        "audio-token CE",
    ]
    return ["Held-out spoken questions (chance for an audio token: 1/4,096):", "", *_table(header, rows), ""]


def wer_detail(record: dict[str, Any], splits: list[str]) -> list[str]:
    """Utterances and words behind each WER, so a reader can judge how noisy it is."""
    parts = []
    for split in splits:
        for key in BOUNDARIES:
            score = (record["stages"].get(key) or {}).get("wer", {}).get(split)
            if score and "utterances" in score:
                parts.append(f"`{split}`: {score['utterances']} utterances, {score.get('words', '?')} words")
                break
    return ["WER scored on " + "; ".join(parts) + "."] if parts else []


def render_markdown(recipe: Recipe, record: dict[str, Any], splits: list[str], series: list[StageSeries]) -> str:
    lines = [
        f"# Run report: recipe `{recipe.name}`",
        "",
        (
            f"Stages run: {', '.join(s.stage for s in series) or 'none yet'}. Regenerate with "
            f"`python -m training.evaluation.report --output-dir <run dir> --recipe {recipe.name}`."
        ),
        "",
        "## Stage table as run",
        "",
        *stage_table(recipe, record),
        "",
        "## Results per stage boundary",
        "",
        *results_table(record, splits, series),
        "",
        *wer_detail(record, splits),
        "",
        *qa_table(record),
        *spoken_table(record, BOUNDARIES),
        "## Plots",
        "",
        f"![training loss per step]({REPORT_DIR}/{PLOTS['loss']})",
        "",
        f"![learning rate per step]({REPORT_DIR}/{PLOTS['lr']})",
        "",
        f"![WER per stage boundary]({REPORT_DIR}/{PLOTS['wer']})",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry points


def series_json(series: list[StageSeries], points: dict[str, list[tuple[str, float]]]) -> dict[str, Any]:
    """The plotted data, so tests and tools can check it without reading PNGs."""
    return {
        "stages": {
            s.stage: {"offset": s.offset, "step": s.step, "global_step": s.global_step, "loss": s.loss, "lr": s.lr}
            for s in series
        },
        "boundaries": {s.stage: s.end for s in series},
        "wer_percent": {split: [{"after": k, "wer": v} for k, v in pts] for split, pts in points.items()},
    }


def write_report(output_dir: Path, recipe: Recipe) -> Path:
    """Write ``<output_dir>/report.md`` and its plots from the run's files; return the report path.

    Works with any subset of stages present. The plots go into a temporary folder that replaces
    ``report/`` in one rename; report.md is replaced after, so a crash leaves the old report or
    the new one, and report.md never links to a plot that is missing.
    """
    output_dir = Path(output_dir)
    record = read_json(output_dir / RECORD, default=None) or {"recipe": recipe.name, "stages": {}}
    record.setdefault("stages", {})
    series = stage_series(output_dir, record)
    splits = wer_splits(record, recipe)
    points = wer_points(record, splits)
    with atomic_dir(output_dir / REPORT_DIR) as tmp:
        plot_per_step(series, "loss", "training loss", tmp / PLOTS["loss"])
        plot_per_step(series, "lr", "learning rate", tmp / PLOTS["lr"])
        plot_wer(points, tmp / PLOTS["wer"])
        (tmp / SERIES_JSON).write_text(json.dumps(series_json(series, points), indent=1))
        audio = copy_listening_audio(output_dir, record, tmp, REPORT_DIR, BOUNDARIES)
    write_listening_page(output_dir, record, audio, recipe.data.codec, BOUNDARIES)
    report = output_dir / REPORT_MD
    write_text_atomic(report, render_markdown(recipe, record, splits, series))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate report.md and its plots from a run directory.")
    parser.add_argument("--output-dir", type=Path, required=True, help="run directory (holds run_record.json)")
    parser.add_argument("--recipe", help="built-in recipe or JSON recipe file (default: the one named in the record)")
    args = parser.parse_args(argv)
    if not args.output_dir.is_dir():
        print(f"error: {args.output_dir} is not a directory", file=sys.stderr)
        return 2
    name = args.recipe or (read_json(args.output_dir / RECORD, default={}) or {}).get("recipe", "demo")
    try:
        recipe = load_recipe(name)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(write_report(args.output_dir, recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
