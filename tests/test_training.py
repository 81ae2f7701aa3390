"""Real short runs on the synthesized corpus with the (quick) demo stand-ins."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import QUICK
from safetensors.torch import load_file

from training.engine.context import RunContext
from training.engine.sources import load_data_and_pretrained
from training.engine.stage import StageRun
from training.model import load_omni
from training.recipe_file import load_recipe
from training.run import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def three_stages(quick_recipe, cache_dir, tmp_path_factory) -> Path:
    """`--stage all` once for the session; tests read its run directory."""
    out = tmp_path_factory.mktemp("run-all")
    code = main(["--stage", "all", "--recipe", quick_recipe, "--output-dir", str(out), "--cache-dir", str(cache_dir)])
    assert code == 0
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def test_all_stages_record_and_lower_heldout_loss(three_stages):
    record = json.loads((three_stages / "run_record.json").read_text())
    stages = record["stages"]
    assert list(stages) == ["before", "asr", "second", "final"]
    for name in ("asr", "second", "final"):
        entry = stages[name]
        steps = QUICK["stages"][name]
        assert entry["complete"] and steps["min_steps"] <= entry["steps"] <= steps["max_steps"] and entry["seconds"] > 0
        assert set(entry["wer"]) == {"heldout", "dev"}
        assert entry["wer"]["heldout"]["utterances"] == 40
    # the asr stage lowers held-out (ASR) loss against the untrained pipeline, and the later stages,
    # which give ASR a fifth of their steps, keep it: within 2 % of the asr stage's (measured: 0.1-0.5 %
    # above or below it, by run)
    assert stages["asr"]["heldout_loss"] < stages["before"]["heldout_loss"]
    assert stages["final"]["heldout_loss"] < 1.02 * stages["asr"]["heldout_loss"]
    assert stages["final"]["wer"]["heldout"]["wer"] < stages["before"]["wer"]["heldout"]["wer"]
    losses = [json.loads(line)["loss"] for line in (three_stages / "final" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == stages["final"]["steps"]


def test_stages_train_only_their_modules(three_stages):
    asr, second, final = (three_stages / s / "final" for s in ("asr", "second", "final"))
    llm = lambda p: _state(p / "llm" / "model.safetensors")  # noqa: E731
    adapter = lambda p: _state(p / "adapter.safetensors")  # noqa: E731
    # every export references the same frozen encoder (asr itself is checked in memory below)
    encoders = {json.loads((p / "omni_config.json").read_text())["encoder"] for p in (asr, second, final)}
    assert len(encoders) == 1
    # second trains the LLM only: adapter bit-identical to asr's, LLM changed
    assert all(torch.equal(v, adapter(second)[k]) for k, v in adapter(asr).items())
    assert any(not torch.equal(v, llm(second)[k]) for k, v in llm(asr).items())
    # final trains both
    assert any(not torch.equal(v, adapter(final)[k]) for k, v in adapter(second).items())
    assert any(not torch.equal(v, llm(final)[k]) for k, v in llm(second).items())


def test_asr_stage_keeps_encoder_and_llm_bit_identical(quick_recipe, cache_dir, tmp_path):
    """asr trains the adapter (and, by the stage table, only the text-special rows of the LLM's
    embedding and output layer); every other weight is bit-identical afterwards."""
    ctx = RunContext(
        recipe=load_recipe(quick_recipe),
        output_dir=tmp_path,
        cache_dir=cache_dir,
        accelerator=Accelerator(),
        max_steps=10,
    )
    load_data_and_pretrained(ctx)
    run = StageRun(ctx, "asr")
    assert run.spec.train_text_specials
    run.setup()
    model = ctx.accelerator.unwrap_model(run.model)
    specials = slice(model.layout.text_vocab, model.layout.text_size)
    row_tables = {"llm.model.embed_tokens.weight", "llm.lm_head.weight"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run.train()
    after = model.state_dict()
    for name, tensor in before.items():
        if name.startswith("adapter."):
            assert not torch.equal(tensor, after[name]), name
        elif name in row_tables:
            outside = torch.ones(tensor.shape[0], dtype=torch.bool)
            outside[specials] = False
            assert torch.equal(tensor[outside], after[name][outside]), name
            assert not torch.equal(tensor[specials], after[name][specials]), name
        else:
            assert torch.equal(tensor, after[name]), name  # encoder and the rest of the LLM
    # the optimizer holds the adapter and the two row tables, nothing else
    held = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    expected = {id(p) for p in model.adapter.parameters()}
    expected |= {id(model.llm.get_input_embeddings().weight), id(model.llm.get_output_embeddings().weight)}
    assert held == expected


def test_export_reloads_with_same_heldout_loss(three_stages, quick_recipe, cache_dir, tmp_path):
    ctx = RunContext(
        recipe=load_recipe(quick_recipe),
        output_dir=tmp_path,
        cache_dir=cache_dir,
        accelerator=Accelerator(),
        init_from=three_stages / "final" / "final",
    )
    load_data_and_pretrained(ctx)
    run = StageRun(ctx, "final")
    run.setup()
    record = json.loads((three_stages / "run_record.json").read_text())
    assert run.evaluation.heldout_loss() == pytest.approx(record["stages"]["final"]["heldout_loss"], abs=1e-6)
    model, _, _ = load_omni(three_stages / "final" / "final")
    assert model.layout.total == model.llm.get_input_embeddings().weight.shape[0]


def test_stage_without_previous_checkpoint_fails_clearly(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "accelerate_configs" / "cpu.yaml"),
            str(ROOT / "training" / "run.py"),
            "--stage",
            "final",
            "--output-dir",
            str(tmp_path / "empty"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "stage 'final' starts from stage 'second''s final checkpoint, but there is none at" in out
    assert "--init-from" in out


def test_wer_gate_stops_a_multi_stage_run(quick_recipe, cache_dir, tmp_path, capsys):
    """A stage above its WER gate stops `--stage all` with exit 3 and keeps its export."""
    raw = json.loads(Path(quick_recipe).read_text())
    raw["stages"]["asr"].update(max_wer=0.01, max_steps=5, min_steps=5, warmup_steps=2)
    recipe = tmp_path / "gated.json"
    recipe.write_text(json.dumps(raw))
    code = main(
        [
            "--stage",
            "all",
            "--recipe",
            str(recipe),
            "--output-dir",
            str(tmp_path / "run"),
            "--cache-dir",
            str(cache_dir),
        ]
    )
    out = capsys.readouterr().out
    assert code == 3
    assert "heldout WER" in out and "above the stage's gate 0.010" in out
    assert (tmp_path / "run" / "asr" / "final" / "omni_config.json").is_file()
    assert not (tmp_path / "run" / "second").exists()


@pytest.mark.parametrize(
    "stage, previous, frozen", [("second", "asr", ("encoder.", "adapter.")), ("final", "second", ("encoder.",))]
)
def test_later_stages_keep_their_frozen_modules(
    three_stages, quick_recipe, cache_dir, tmp_path, stage, previous, frozen
):
    ctx = RunContext(
        recipe=load_recipe(quick_recipe),
        output_dir=tmp_path,
        cache_dir=cache_dir,
        accelerator=Accelerator(),
        max_steps=5,
        init_from=three_stages / previous / "final",
    )
    load_data_and_pretrained(ctx)
    run = StageRun(ctx, stage)
    run.setup()
    model = ctx.accelerator.unwrap_model(run.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run.train()
    after = model.state_dict()
    changed = {name for name, tensor in before.items() if not torch.equal(tensor, after[name])}
    assert not {name for name in changed if name.startswith(frozen)}
    trained_modules = {name.split(".")[0] for name in changed}
    assert trained_modules == {"adapter", "llm"} - {m.rstrip(".") for m in frozen}
    held = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if not n.startswith(frozen)}


def test_run_report_and_tensorboard_scalars(three_stages):
    """report.md with its plots, the plotted series equal to the logged steps, and TensorBoard
    scalars for training (loss per stream and task, LR, grad norm, tokens/s, padding) and for
    the stage boundaries (WER, held-out loss)."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    report = (three_stages / "report.md").read_text()
    series = json.loads((three_stages / "report" / "series.json").read_text())
    for png in ("loss.png", "lr.png", "wer.png"):
        assert f"report/{png}" in report
        assert (three_stages / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("asr", "second", "final"):
        logged = (three_stages / stage / "metrics.jsonl").read_text().splitlines()
        assert len(series["stages"][stage]["loss"]) == len(series["stages"][stage]["lr"]) == len(logged) > 0
        assert f"| {stage} |" in report
    runs = EventMultiplexer().AddRunsFromDirectory(str(three_stages / "tensorboard"))
    runs.Reload()
    tags = {tag for run in runs.Runs().values() for tag in run["scalars"]}
    for stage in ("asr", "second", "final"):
        train = {"loss", "loss_text", "loss_task_asr", "lr", "grad_norm", "tokens_per_s", "padding"}
        assert {f"{stage}/train/{t}" for t in train} <= tags
        assert {f"{stage}/eval/wer_heldout", f"{stage}/eval/wer_dev", f"{stage}/eval/heldout_loss"} <= tags
    assert {"final/eval/a1a2_spoken_accuracy", "final/eval/t1a2_text_speech_agreement"} <= tags


def test_final_stage_learns_speech_answers_and_speaks(three_stages, tmp_path):
    """The quick run's final stage (a1a2 and t1a2 in its mix) lifts held-out audio-token accuracy
    far above chance (1/4096) and above always emitting each layer's commonest code, answers some
    held-out spoken questions exactly (the untrained pipeline none), and the exported model answers
    a question through the inference helper: a 24 kHz WAV of exactly frames x 2048 samples."""
    import soundfile as sf

    from training.model.inference import speak
    from training.speech.codec import load_codec
    from training.speech.snac_codes import samples_per_frame

    stages = json.loads((three_stages / "run_record.json").read_text())["stages"]
    before, final = stages["before"]["audio_tokens"], stages["final"]["audio_tokens"]
    assert final["codes"] > 0 and final["chance"] == 1 / 4096
    assert final["accuracy"] > 0.2 > 100 * final["chance"] and final["accuracy"] > before["accuracy"]
    assert 0 < final["majority"] < final["accuracy"]  # the random codec uses few codes: beat the commonest
    assert final["ce"] < before["ce"]
    # A1T2 on 100 held-out spoken questions (new phrasings, unseen voices), every one scored once.
    # The untrained pipeline answers none; always giving the commonest training answer scores 6 %
    # (recorded as "majority"), and that is the floor: a model no better than a constant answer
    # fails. The quick run answers 9 % (2 CPU cores; 6-12 % over seeds and stand-in sizes), the
    # demo's longer run 33 %; the next test checks what a short run does learn from the speech.
    answer = stages["final"]["answer"]
    assert answer["questions"] == 100 and 0 < answer["majority"] < 0.1
    assert answer["accuracy"] > answer["majority"] > stages["before"]["answer"]["accuracy"], answer
    losses = [json.loads(line) for line in (three_stages / "final" / "metrics.jsonl").read_text().splitlines()]
    # per-stream and per-task losses (a batch logs the tasks it holds; length grouping mixes few)
    assert {"loss_audio0", "loss_audio6", "loss_text", "loss_task_a1a2", "loss_task_t1a2"} <= set().union(*losses)

    model, tokenizer, _ = load_omni(three_stages / "final" / "final")
    wav = tmp_path / "answer.wav"
    text, frames = speak(
        model,
        tokenizer,
        load_codec(None),
        text="what is the opposite of hot",
        task="t1a2",
        wav_path=wav,
        max_new_tokens=40,
    )
    samples, rate = sf.read(wav)
    # A 150-step model may still end every layer early (frames can be 0); tests/test_inference.py
    # decodes a model trained to certainty, frame for frame.
    assert rate == 24_000 and len(samples) == frames * samples_per_frame()


def test_final_stage_speech_is_judged_as_spoken_and_listenable(three_stages):
    """The final boundary decodes every held-out question freely in speech (a1a2 and t1a2, both in
    its mix), judges the codes against the answers' reference speech, records each figure beside
    its floor (also in TensorBoard and report.md), and report.html holds players for the kept
    questions that a real browser loads: every file it links has a duration > 0."""
    from tests.helpers import browser_players

    final = json.loads((three_stages / "run_record.json").read_text())["stages"]["final"]
    assert set(final["spoken"]) == {"a1a2", "t1a2"}
    for task, scores in final["spoken"].items():
        assert scores["questions"] == 100 and scores["judge"] == "codes" and scores["candidates"] > 20
        for name in ("spoken_accuracy", "text_speech_agreement", "agreement_floor", "exact_sequence_rate"):
            assert 0 <= scores[name] <= 1, (task, name)
        # the quick run's free speech is mostly cut short (length ratio 0.0-0.09 over corpus builds:
        # espeak-ng's output varies from build to build), so only its range is checked here; that
        # a short run learns the speech is checked by teacher forcing above, and at length in the demo
        assert 0 < scores["majority"] < 0.1 and scores["length_ratio"] >= 0 and 0 <= scores["reached_limit"] <= 1
        assert len(scores["samples"]) == 4 and all(s["question"] for s in scores["samples"])
    assert "| final | a1a2 |" in (three_stages / "report.md").read_text()
    players = browser_players(three_stages / "report.html")
    spoken = [s for t in ("a1a2", "t1a2") for s in final["spoken"][t]["samples"]]
    expected = sum(len(s["wavs"]) for s in spoken)
    assert len(players) == expected >= 4 * 2 + 4  # references of both tasks, questions of a1a2 (+ answers)
    assert all(p["error"] is None and p["duration"] and p["duration"] > 0 for p in players), players
    assert sum("question" in p["src"] for p in players) == 4


def test_speech_judge_runs_end_to_end_at_the_boundary(three_stages, quick_recipe, cache_dir, tmp_path):
    """Plumbing only (tiny random models hear nothing): a final stage started from the quick run's
    second-stage export, with a Whisper checkpoint by path as --speech-judge, decodes its answer
    speech with the codec, transcribes it and records speech WER against the references and
    against the model's own text, beside the code judge's figures, and the transcripts."""
    from tests.helpers import save_tiny_whisper_judge

    judge = save_tiny_whisper_judge(tmp_path / "judge", three_stages / "second" / "final" / "llm")
    out = tmp_path / "run"
    args = ["--stage", "final", "--recipe", quick_recipe, "--output-dir", str(out), "--cache-dir", str(cache_dir)]
    args += ["--init-from", str(three_stages / "second" / "final"), "--max-steps", "3", "--speech-judge", judge]
    assert main(args) == 0
    spoken = json.loads((out / "run_record.json").read_text())["stages"]["final"]["spoken"]
    for task in ("a1a2", "t1a2"):
        heard = spoken[task]["asr_judge"]
        assert heard["judge"] == judge and heard["words"] > 0 and heard["speech_wer"] > 0
        assert heard["text_speech_wer"] is None or heard["text_speech_wer"] >= 0
        assert all(isinstance(s["transcript"], str) for s in spoken[task]["samples"])
        assert 0 <= spoken[task]["spoken_accuracy"] <= 1


def test_final_stage_hears_what_kind_of_question_is_asked(three_stages, cache_dir):
    """Exact answers to unseen spoken questions are rare after a few hundred steps (the quick run
    mostly mishears the keyword: 'opposite of small' -> 'big'); what it must already get from the
    speech is the KIND of question. Answered through the inference helper, most held-out answers
    belong to the asked relation (a colour to a colour question, a number to a count question),
    far more than any one constant answer could."""
    from training.demo.qa_corpus import build_qa_corpus, qa_corpus_config
    from training.model.inference import speak
    from training.speech.audio import decode_audio
    from training.speech.text import normalize

    corpus = build_qa_corpus(cache_dir, qa_corpus_config("quick"))
    answers_of: dict[str, set[str]] = {}
    for relation, answer in zip(corpus["train"]["relation"], corpus["train"]["answer"]):
        answers_of.setdefault(relation, set()).add(normalize(answer))
    heldout = corpus["heldout"]
    # the best any constant answer can do: the share of questions whose relation admits it
    constant = max(sum(a in answers_of[r] for r in heldout["relation"]) for a in set().union(*answers_of.values()))
    model, tokenizer, _ = load_omni(three_stages / "final" / "final")
    in_relation = exact = 0
    for i, row in enumerate(heldout):
        mono, rate = decode_audio(row["question_audio"], f"heldout row {i}")
        answer, _ = speak(model, tokenizer, None, audio=(mono, rate), task="a1t2", wav_path=None, max_new_tokens=8)
        in_relation += normalize(answer) in answers_of[row["relation"]]
        exact += normalize(answer) == normalize(row["answer"])
    record = json.loads((three_stages / "run_record.json").read_text())["stages"]["final"]["answer"]
    # the helper answers as evaluation did (one at a time here, batched there: rare argmax flips)
    assert abs(exact - round(record["accuracy"] * len(heldout))) <= 2
    # measured: 65-84 of 100 in the asked relation; the best constant answer (a number: three
    # relations answer with numbers) covers 38
    assert in_relation >= constant + 20, (in_relation, constant)
