"""The run report: report.md and its PNGs are written from a run directory's files alone, the plotted
series are exactly the logged steps, and a run with only some stages done still gets a report."""

import json
import math
from dataclasses import replace
from pathlib import Path

from training.evaluation.report import main, write_report
from training.stages import DEMO, lr_at, scale_steps

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The demo table cut to a few dozen steps a stage, as a short test run would train.
RECIPE = replace(DEMO, name="demo-report", stages=scale_steps(DEMO.stages, divisor=10, warmup_steps=5, eval_every=10))
STEPS = {"asr": 40, "second": 30, "final": 25}
# WER fractions per boundary (the record stores fractions; the report shows percent).
WER = {"before": (1.984, 1.546), "asr": (0.787, 0.772), "second": (0.642, 0.600), "final": (0.268, 0.054)}


def wer_entry(heldout: float, dev: float) -> dict:
    return {
        "heldout": {"wer": heldout, "utterances": 100, "words": 412},
        "dev": {"wer": dev, "utterances": 100, "words": 398},
    }


def write_stage(run: Path, stage: str, start_loss: float, with_tokens: bool) -> None:
    """metrics.jsonl as training.engine.stage writes it: one line per optimizer step, optional extra keys."""
    spec = RECIPE.stage(stage)
    lines = []
    for step in range(1, STEPS[stage] + 1):
        row = {"step": step, "loss": start_loss * math.exp(-step / 30), "lr": lr_at(spec, step - 1)}
        if with_tokens:
            row.update(grad_norm=0.5, tokens_per_s=1234.5, padding_ratio=0.08, tokens=512)
        lines.append(json.dumps(row))
    (run / stage).mkdir(parents=True)
    (run / stage / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def stage_result(stage: str, loss: float) -> dict:
    result = {
        "complete": True,
        "steps": STEPS[stage],
        "stop_reason": "max_steps",
        "final_train_loss": loss,
        "heldout_loss": loss + 0.3,
        "wer": wer_entry(*WER[stage]),
        "seconds": 83.4 + STEPS[stage],
        "export": f"runs/x/{stage}/final",
    }
    if stage == "second":
        result.update(tokens=30 * 512, skipped_steps=2)
    if stage == "final":
        result.update(
            answer={"accuracy": 0.34, "questions": 100, "majority": 0.06},
            audio_tokens={"accuracy": 0.9847, "ce": 0.0381, "codes": 8000, "chance": 1 / 4096, "majority": 0.4794},
        )
    return result


def make_run(run: Path, stages: tuple[str, ...]) -> None:
    record = {
        "recipe": RECIPE.name,
        "stages": {"before": {"complete": True, "heldout_loss": 9.1, "wer": wer_entry(*WER["before"])}},
    }
    for i, stage in enumerate(stages):
        write_stage(run, stage, start_loss=6.0 - i, with_tokens=stage != "asr")
        record["stages"][stage] = stage_result(stage, 2.0 - 0.5 * i)
    (run / "run_record.json").write_text(json.dumps(record, indent=2))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path


def series(run: Path) -> dict:
    return json.loads((run / "report" / "series.json").read_text())


def test_full_run_report(tmp_path):
    make_run(tmp_path, ("asr", "second", "final"))
    report = write_report(tmp_path, RECIPE)
    assert report == tmp_path / "report.md"
    text = report.read_text()

    for stage in ("before", "asr", "second", "final"):
        heldout, dev = WER[stage]
        assert f"{100 * heldout:.1f}%" in text and f"{100 * dev:.1f}%" in text, stage
    assert "20-40" in text  # the stage table as run: the recipe's step range ...
    assert "max_steps" in text  # ... and the stop reason from the record
    assert "15,360" in text  # tokens seen (recorded) for second
    assert "12,800" in text  # tokens seen (summed from metrics lines) for final
    assert "1 min 53 s" in text  # wall time of second (113.4 s)
    # spoken questions: answer and audio-token accuracy beside their floors
    assert "| final | 34.0% | 6.0% | 100 | 98.5% | 47.9% | 0.038 |" in text

    for name in ("loss.png", "lr.png", "wer.png"):
        assert f"](report/{name})" in text  # relative links
        assert_png(tmp_path / "report" / name)

    plotted = series(tmp_path)
    for stage, n in STEPS.items():
        logged = (tmp_path / stage / "metrics.jsonl").read_text().splitlines()
        s = plotted["stages"][stage]
        assert len(logged) == n == len(s["loss"]) == len(s["lr"]) == len(s["global_step"])
        assert s["loss"] == [json.loads(line)["loss"] for line in logged]
    # stages laid end to end on one axis, boundaries at each stage's last step
    assert plotted["boundaries"] == {"asr": 40, "second": 70, "final": 95}
    assert plotted["stages"]["second"]["global_step"][0] == 41
    assert [p["after"] for p in plotted["wer_percent"]["heldout"]] == ["before", "asr", "second", "final"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary leftovers


def test_partial_run_report_and_regeneration(tmp_path):
    make_run(tmp_path, ("asr",))
    text = write_report(tmp_path, RECIPE).read_text()
    assert f"{100 * WER['asr'][0]:.1f}%" in text and f"{100 * WER['before'][0]:.1f}%" in text
    assert "second" in text  # the stage table still lists every stage, not yet trained
    plotted = series(tmp_path)
    assert list(plotted["stages"]) == ["asr"] and len(plotted["stages"]["asr"]["loss"]) == STEPS["asr"]
    for name in ("loss.png", "lr.png", "wer.png"):
        assert_png(tmp_path / "report" / name)

    # the next stage ends: the report is regenerated in place (CLI), and now covers both
    write_stage(tmp_path, "second", start_loss=5.0, with_tokens=True)
    record = json.loads((tmp_path / "run_record.json").read_text())
    record["stages"]["second"] = stage_result("second", 1.5)
    (tmp_path / "run_record.json").write_text(json.dumps(record))
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps({"base": "demo", "name": RECIPE.name}))
    assert main(["--output-dir", str(tmp_path), "--recipe", str(recipe_file)]) == 0
    assert list(series(tmp_path)["stages"]) == ["asr", "second"]
    assert f"{100 * WER['second'][1]:.1f}%" in (tmp_path / "report.md").read_text()


def test_empty_run_dir_still_reports(tmp_path):
    report = write_report(tmp_path, RECIPE)  # called before any stage has logged a step
    assert report.is_file() and series(tmp_path)["stages"] == {}
    assert_png(tmp_path / "report" / "loss.png")
