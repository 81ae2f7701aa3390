"""The stage boundary: the export (written first: a crash in evaluation must not lose the weights),
the held-out scores (WER, answer and audio-token accuracy, loss), the run record, the WER gate, and
the run report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator

from training.common import atomic_dir
from training.engine.context import RunContext, WerGateFailed
from training.engine.loaders import StageLoaders
from training.engine.mfu import throughput
from training.engine.weights import write_export_id
from training.evaluation.listening import write_listening_audio
from training.evaluation.report import write_report
from training.evaluation.scores import (
    all_ranks_finished,
    answer_accuracy,
    audio_token_scores,
    evaluate_wer,
    heldout_loss,
)
from training.evaluation.speech_judge import SpeechJudge, asr_judge_scores
from training.evaluation.spoken import SAMPLES_KEPT, SPOKEN_FIGURES, code_judge_scores, describe_spoken, speak_heldout
from training.model import save_omni
from training.speech.codec import load_codec
from training.stages import STAGE_NAMES

if TYPE_CHECKING:
    from training.engine.stage import StageRun


class StageEvaluation:
    """The held-out scores of a (prepared) model on a stage's evaluation loaders."""

    def __init__(
        self,
        ctx: RunContext,
        model: Any,
        tokenizer: Any,
        loaders: StageLoaders,
        log,
        stage_dir: Path,
        feature_extractor: Any = None,
    ) -> None:
        self.acc: Accelerator = ctx.accelerator
        self.recipe, self.model, self.tokenizer, self.loaders, self.log = ctx.recipe, model, tokenizer, loaders, log
        self.ctx, self.stage_dir, self.feature_extractor = ctx, stage_dir, feature_extractor
        self.codec, self.speech_judge = None, None  # loaded at the first boundary that needs them

    def heldout_loss(self, split: str | None = None) -> float:
        return heldout_loss(self.acc, self.model, self.loaders.evals[split or self.recipe.data.heldout_split])

    def wer(self) -> dict[str, Any]:
        out = {}
        for split, loader in self.loaders.evals.items():
            scores, pairs = evaluate_wer(self.acc, self.model, loader, self.tokenizer, self.recipe.max_new_tokens)
            out[split] = scores
            for ref, hyp in pairs[:2]:
                self.log(f"[{split}] ref: {ref}")
                self.log(f"[{split}] hyp: {hyp}")
        return out

    def qa(self) -> dict[str, Any]:
        """Held-out spoken questions: A1T2 answer accuracy and, with answer speech, the audio
        layers' teacher-forced code accuracy and CE (chance: 1/4096)."""
        out, qa = {}, self.loaders.qa
        if "answer" in qa:
            scores, pairs = answer_accuracy(
                self.acc, self.model, qa["answer"], self.tokenizer, self.recipe.max_new_tokens
            )
            out["answer"] = scores
            if self.loaders.majority_answer_accuracy is not None:
                out["answer"]["majority"] = self.loaders.majority_answer_accuracy
            for ref, hyp in pairs[:2]:
                self.log(f"[answer] ref: {ref}  hyp: {hyp}")
        if "speech" in qa:
            out["audio_tokens"] = audio_token_scores(self.acc, self.model, qa["speech"])
            out["audio_tokens"]["majority"] = self.loaders.majority_code_accuracy
        return out

    def spoken(self) -> dict[str, Any]:
        """Free-running speech answers of the held-out questions, judged (evaluation/spoken.py),
        per speech-out task the stage trains; a few kept for the listening page."""
        out = {}
        for key, loader in self.loaders.qa.items():
            if not key.startswith("spoken:"):
                continue
            task = key.removeprefix("spoken:")
            limit = self.loaders.speech_max_new_tokens
            answers = speak_heldout(self.acc, self.model, loader, self.tokenizer, task, limit)
            scores = code_judge_scores(answers, self.loaders.judge, self.loaders.majority_answer_accuracy)
            scores["max_new_tokens"] = limit
            scores["samples"] = [vars(a) | {"judged": self.loaders.judge(a.codes)} for a in answers[:SAMPLES_KEPT]]
            if self.recipe.data.speech_judge:
                self.hear(answers, scores)
            if self.acc.is_main_process:  # files only: no collective in here
                self.write_listening(task, scores["samples"])
            out[task] = scores
            self.log(f"[spoken {task}] {describe_spoken(scores)}")
        return {"spoken": out} if out else {}

    def hear(self, answers: list[Any], scores: dict[str, Any]) -> None:
        """The ASR judge (evaluation/speech_judge.py): every rank transcribes every answer, the same
        work in the same order, so that the run's own model as judge gathers ZeRO-3 shards in step."""
        source = self.recipe.data.speech_judge
        if self.speech_judge is None:
            if self.recipe.data.codec is None:
                self.log("warning: --speech-judge with the random-weight codec: the speech is not intelligible")
            own = (self.acc.unwrap_model(self.model), self.tokenizer, self.feature_extractor)
            self.speech_judge = SpeechJudge(source, self.listening_codec(), *own, device=self.acc.device)
        self.model.eval()
        sync = all_ranks_finished(self.acc)
        heard = self.speech_judge.transcribe([a.codes for a in answers], self.recipe.max_new_tokens, sync)
        self.model.train()
        scores["asr_judge"] = asr_judge_scores(heard, [a.reference for a in answers], [a.text for a in answers], source)
        for sample, transcript in zip(scores["samples"], heard):
            sample["transcript"] = transcript

    def listening_codec(self) -> Any:
        if self.codec is None:
            self.codec = load_codec(self.recipe.data.codec, log=lambda _: None)
        return self.codec

    def write_listening(self, task: str, samples: list[dict[str, Any]]) -> None:
        """WAVs of the kept samples for the listening page (evaluation/listening.py); a failure
        here costs the page, never the run."""
        data = self.recipe.data
        try:
            codec = self.listening_codec()
            questions = self.ctx.qa_splits.get(data.heldout_split)
            write_listening_audio(
                self.stage_dir, task, samples, codec, self.loaders.judge, questions,
                data.question_column, data.question_audio_column,
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - the scores are already computed
            self.log(f"warning: could not write the listening WAVs: {type(err).__name__}: {err}")

    def before_training(self) -> dict[str, Any]:
        """The untrained pipeline's scores (the "before" row of the run record)."""
        return {"complete": True, "heldout_loss": self.heldout_loss(), "wer": self.wer(), **self.qa()}


def export_stage(run: StageRun) -> Path:
    """Stage-final weights in Hugging Face form, written atomically, with an id of their own (the
    next stage's fingerprint names it: a retrained stage is never mistaken for the one it replaced)."""
    acc = run.ctx.accelerator
    final_dir = run.dir / "final"
    state_dict = acc.get_state_dict(run.model)  # gathers ZeRO-3 shards: every process takes part
    if acc.is_main_process:
        part = lambda prefix: {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}  # noqa: E731
        with atomic_dir(final_dir) as tmp:
            save_omni(
                acc.unwrap_model(run.model),
                tmp,
                run.tokenizer,
                run.feature_extractor,
                llm_state=part("llm."),
                adapter_state=part("adapter."),
            )
            write_export_id(tmp, run.stage, run.state["step"])
    acc.wait_for_everyone()
    return final_dir


def stage_throughput(run: StageRun) -> dict[str, float]:
    """The stage's mean over its training steps (engine/mfu.py); nothing if it trained no step."""
    seconds = run.state.get("step_seconds", 0.0)
    if not seconds:
        return {}
    return throughput(run.state["model_flops"], seconds, run.ctx.accelerator.num_processes, run.peak_tflops)


def finish_stage(run: StageRun) -> dict[str, Any]:
    """Export first, then the held-out scores, the record, the report and the gate."""
    recipe, spec, state = run.ctx.recipe, run.spec, run.state
    final_dir = export_stage(run)
    run.save_checkpoint()
    tail = state["losses"][-recipe.log_every :]
    wer = run.evaluation.wer()
    result = {
        "complete": True,
        "steps": state["step"],
        "stop_reason": run.stop_reason,
        "final_train_loss": sum(tail) / max(1, len(tail)),
        "heldout_loss": run.evaluation.heldout_loss(),
        "wer": wer,
        **run.evaluation.qa(),
        **run.evaluation.spoken(),
        "seconds": round(run.elapsed(), 1),
        "export": str(final_dir),
        "tokens": state.get("tokens", 0),
        **stage_throughput(run),
        "skipped_steps": state["skipped_steps"],
        "skipped_rows": dict(run.ctx.skipped_rows),
        "fingerprint": run.fingerprint,  # a rerun into this folder reuses the stage only if both match
        "data": run.data,
    }
    run.ctx.update_record(run.stage, result)
    write_run_report(run.ctx)
    log_boundary(run, result)
    heldout = wer[recipe.data.heldout_split]["wer"]
    if spec.max_wer is not None and heldout > spec.max_wer:
        raise WerGateFailed(
            f"[{run.stage}] {recipe.data.heldout_split} WER {heldout:.3f} is above the stage's gate "
            f"{spec.max_wer:.3f}; "
            f"stopping here (the checkpoint and export in {run.dir} are kept)"
        )
    for task, scores in result.get("spoken", {}).items():
        if spec.min_spoken_accuracy is not None and scores["spoken_accuracy"] < spec.min_spoken_accuracy:
            raise WerGateFailed(
                f"[{run.stage}] {task} spoken-answer accuracy {scores['spoken_accuracy']:.3f} is below the "
                f"stage's gate {spec.min_spoken_accuracy:.3f}; stopping here (the checkpoint and export in "
                f"{run.dir} are kept)"
            )
    return result


def log_boundary(run: StageRun, result: dict[str, Any]) -> None:
    """The boundary's scores to the trackers and the log."""
    wer, stage = result["wer"], run.stage
    boundary = {f"{stage}/eval/wer_{split}": v["wer"] for split, v in wer.items()}
    if "answer" in result:
        boundary[f"{stage}/eval/answer_accuracy"] = result["answer"]["accuracy"]
    if "audio_tokens" in result:
        boundary[f"{stage}/eval/audio_token_accuracy"] = result["audio_tokens"]["accuracy"]
        boundary[f"{stage}/eval/audio_token_ce"] = result["audio_tokens"]["ce"]
    for task, scores in result.get("spoken", {}).items():
        for name in SPOKEN_FIGURES:
            boundary[f"{stage}/eval/{task}_{name}"] = scores[name]
    run.ctx.accelerator.log(boundary | {f"{stage}/eval/heldout_loss": result["heldout_loss"]}, step=run.state["step"])
    run.log(
        "done: "
        + ", ".join(f"{s} WER {v['wer']:.3f}" for s, v in wer.items())
        + (f", answer accuracy {result['answer']['accuracy']:.3f}" if "answer" in result else "")
        + (f", audio-token accuracy {result['audio_tokens']['accuracy']:.3f}" if "audio_tokens" in result else "")
        + "".join(f", {t} spoken accuracy {v['spoken_accuracy']:.3f}" for t, v in result.get("spoken", {}).items())
    )


def write_run_report(ctx: RunContext) -> None:
    """report.md + plots in the run directory (main process). A failure here never costs the run."""
    if not ctx.accelerator.is_main_process:
        return
    try:
        ctx.log(f"report: {write_report(ctx.output_dir, ctx.recipe)}")
    except Exception as err:  # noqa: BLE001 - the weights and record are already safe on disk
        ctx.log(f"warning: could not write the run report: {type(err).__name__}: {err}")


def format_wer_table(record: dict[str, Any], splits: list[str]) -> str:
    """WER per split, and (with QA data) answer accuracy, audio-token accuracy and the spoken-answer
    accuracy of free-running a1a2 speech (code judge), per boundary."""
    entries = [(key, record["stages"][key]) for key in ("before", *STAGE_NAMES) if record["stages"].get(key)]
    qa = any("answer" in e for _, e in entries)
    spoken = any("a1a2" in e.get("spoken", {}) for _, e in entries)
    header = f"{'after':<8}" + "".join(f"{s + ' WER':>14}" for s in splits)
    if qa:
        header += f"{'answer acc':>12}{'audio acc':>11}"
    if spoken:
        header += f"{'spoken acc':>12}"
    rows = [header + f"{'steps':>8}{'seconds':>9}"]
    percent = lambda value, width: f"{value * 100:>{width - 1}.1f}%"  # noqa: E731
    for key, entry in entries:
        cells = "".join(percent(entry["wer"][s]["wer"], 14) if s in entry["wer"] else f"{'-':>14}" for s in splits)
        if qa:
            cells += percent(entry["answer"]["accuracy"], 12) if "answer" in entry else f"{'-':>12}"
            cells += percent(entry["audio_tokens"]["accuracy"], 11) if "audio_tokens" in entry else f"{'-':>11}"
        if spoken:
            a1a2 = entry.get("spoken", {}).get("a1a2")
            cells += percent(a1a2["spoken_accuracy"], 12) if a1a2 else f"{'-':>12}"
        rows.append(f"{key:<8}{cells}{entry.get('steps', 0):>8}{entry.get('seconds', 0):>9.0f}")
    return "\n".join(rows)
