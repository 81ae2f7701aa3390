"""The one place that builds tiny models for tests: shapes of the random Whisper/Qwen2 checkpoints
saved by path (training.model.untrained), and the seeded build of the model on top of them; and the
arguments and per-step losses of a short `--stage asr` run, which the process-launching tests
(resume, distributed, SLURM) all compare.

Tests compare numbers, so what these build must stay bit-identical: the checkpoint weights depend
on `save_untrained_checkpoints`' own seed only, and `tiny_model` seeds the global RNG right before
`build_model` (the fresh adapter is drawn from it), exactly as the tests did inline.

Imported as `from tests.helpers import ...` (pyproject.toml puts the repository root on the path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from training.model import build_model
from training.model.untrained import save_untrained_checkpoints
from training.speech.layout import N_AUDIO_LAYERS
from training.stages import TASKS

# The shared tiny checkpoints (conftest.py's `tiny_checkpoints`): one key/value group, untied output.
TINY_WHISPER: dict[str, Any] = dict(
    d_model=32,
    encoder_layers=1,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    num_mel_bins=80,
    max_source_positions=200,
)
TINY_QWEN2: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=False,
)
TINY_FEATURES: dict[str, Any] = dict(feature_size=80, sampling_rate=16000, chunk_length=4)

# Qwen2-0.5B-like layout for export tests (test_export.py's `gqa_checkpoints`): 2 key/value groups,
# so the fused-QKV interleaving shows, and a tied output layer.
GQA_D, GQA_HEADS, GQA_GROUPS, GQA_HEAD, GQA_FFN, GQA_LAYERS = 32, 4, 2, 8, 64, 2
GQA_WHISPER: dict[str, Any] = dict(
    d_model=24,
    encoder_layers=1,
    encoder_attention_heads=2,
    encoder_ffn_dim=48,
    num_mel_bins=80,
    max_source_positions=200,
)
GQA_QWEN2: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=GQA_D,
    intermediate_size=GQA_FFN,
    num_hidden_layers=GQA_LAYERS,
    num_attention_heads=GQA_HEADS,
    num_key_value_heads=GQA_GROUPS,
    tie_word_embeddings=True,
)


def save_tiny_checkpoints(
    root: str | Path,
    whisper: dict[str, Any] = TINY_WHISPER,
    qwen2: dict[str, Any] = TINY_QWEN2,
    feature_extractor: dict[str, Any] = TINY_FEATURES,
) -> tuple[str, str]:
    """Random tiny Whisper and Qwen2 (with a BPE tokenizer) saved under `root` like real checkpoints;
    returns (encoder path, LLM path)."""
    return save_untrained_checkpoints(
        root, whisper=dict(whisper), qwen2=dict(qwen2), feature_extractor=dict(feature_extractor)
    )


def tiny_model(
    checkpoints: tuple[str, str], frame_stack: int = 4, adapter_hidden: int | None = None, seed: int | None = 0
):
    """build_model on saved tiny checkpoints after torch.manual_seed(seed) (no seeding if None);
    returns (model, tokenizer, feature_extractor) as build_model does."""
    if seed is not None:
        torch.manual_seed(seed)
    return build_model(*checkpoints, frame_stack=frame_stack, adapter_hidden=adapter_hidden)


def scramble(model, seed: int = 0) -> None:
    """Random rows for the grown vocabulary: mean-initialised rows all tie, so an untrained
    model's audio argmax would be the constant 0 and prove nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight):
            weight.add_(torch.randn(weight.shape, generator=g) * weight.std())
        for p in model.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def asr_run_args(recipe: str, cache_dir: Path, out: Path, steps: int) -> list[str]:
    """training/run.py's arguments for a `steps`-step asr stage of `recipe` into `out`."""
    return [
        "--stage",
        "asr",
        "--recipe",
        recipe,
        "--output-dir",
        str(out),
        "--cache-dir",
        str(cache_dir),
        "--max-steps",
        str(steps),
    ]


def asr_losses(out: Path) -> list[float]:
    """The per-step training losses an asr run wrote to its metrics.jsonl."""
    return [json.loads(line)["loss"] for line in (out / "asr" / "metrics.jsonl").read_text().splitlines()]


# Every process a test launches carries this variable (with a value of its own), so that the test
# can find and stop all of them, orphans included: the elastic agent starts ranks in sessions of
# their own, and a rank outlives its launcher when the launcher dies first.
LAUNCH_MARK = "OMNI_STAGE_TEST_LAUNCH"


@contextmanager
def launched(cmd: list[str], env: dict[str, str] | None = None, **popen: Any) -> Iterator[subprocess.Popen]:
    """Popen(cmd) with stdout+stderr captured as text; on leaving (a timeout, a failed assertion,
    or normally) every process it started is killed: nothing outlives the test."""
    mark = uuid.uuid4().hex
    env = {**os.environ, **(env or {}), LAUNCH_MARK: mark}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)
    proc.mark = mark  # type: ignore[attr-defined]  # for launched_processes(proc.mark)
    try:
        yield proc
    finally:
        kill_launched(mark)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def launched_processes(mark: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(LAUNCH_MARK) == mark:
                found.append(p)
        except psutil.Error:  # gone, or not ours to read
            continue
    return found


def kill_launched(mark: str) -> None:
    victims = launched_processes(mark)
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=30)


ROOT = Path(__file__).resolve().parent.parent
STEPS = 10  # the distributed and elastic tests' asr stage length


def write_tone_dataset(root: Path, clips: int = 40) -> Path:
    """`clips` tone clips (0.75-1.5 s, 16 kHz) and a train.jsonl manifest naming them, in `root`:
    a user's dataset small enough for a run on the tiny checkpoints (conftest.py's `small_run`)."""
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(clips):
        sf.write(root / f"{i}.wav", (0.1 * np.sin(np.arange(12000 + 300 * i) / (4 + i % 5))).astype("float32"), 16000)
        rows.append(json.dumps({"audio_filepath": f"{i}.wav", "text": "the cat sat" if i % 2 else "a dog ran"}))
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    return root


def with_arg(args: list[str], flag: str, value: str) -> list[str]:
    """A copy of `args` with `flag`'s value replaced."""
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def run_into(args: list[str], out: Path, steps: int) -> list[str]:
    """`args` (e.g. conftest.py's `small_run`) for a run of `steps` steps into `out`, its cache in `out/c`."""
    return [*args, "--max-steps", str(steps), "--output-dir", str(out), "--cache-dir", str(out / "c")]


def small_run_args(dataset: Path, recipe: Path, checkpoints: tuple[str, str], **recipe_fields: Any) -> list[str]:
    """training/run.py's arguments for an asr run of the tiny checkpoints on `dataset`; the recipe
    (8 rows a batch, a checkpoint every 4 steps, no WER gates, plus `recipe_fields`) is written to
    `recipe`. The caller adds --max-steps, --output-dir and --cache-dir."""
    no_gates = {stage: {"max_wer": None} for stage in ("asr", "second", "final")}
    fields = {"batch_size": 8, "eval_batch_size": 8, "save_every": 4, "stages": no_gates}
    recipe.write_text(json.dumps(fields | recipe_fields))
    enc, llm = checkpoints
    return ["--stage", "asr", "--recipe", str(recipe), "--dataset", str(dataset), "--encoder", enc, "--llm", llm,
            "--report-to", "none"]  # fmt: skip


def recipe_variant(base: str, path: Path, **changes: Any) -> str:
    """Recipe file `base` with `changes` to its top-level fields, written to `path`."""
    raw = json.loads(Path(base).read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))
    return str(path)


def profile_command(
    profile: str, recipe: str, cache_dir: Path, out: Path, steps: int, processes: int | None = None
) -> list[str]:
    """`accelerate launch` of an asr run under accelerate_configs/<profile> (with its process count,
    or `processes`)."""
    count = ["--num_processes", str(processes)] if processes else []
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / profile),
        *count,
        str(ROOT / "training" / "run.py"),
        *asr_run_args(recipe, cache_dir, out, steps),
    ]


def run_profile(
    profile: str, recipe: str, cache_dir: Path, out: Path, steps: int, processes: int | None = None
) -> dict:
    """A finished asr run: its per-step losses, record, output and folder. It must exit 0: a crash
    or hang in the teardown after the last step fails the test like any other."""
    with launched(profile_command(profile, recipe, cache_dir, out, steps, processes), cwd=ROOT) as proc:
        output, _ = proc.communicate(timeout=900)  # stopped whole on any exit
    assert proc.returncode == 0, output[-4000:]
    record = json.loads((out / "run_record.json").read_text())
    assert record["stages"]["asr"]["complete"], output[-4000:]
    return {"losses": asr_losses(out), "record": record["stages"]["asr"], "output": output, "dir": out}


def assert_same_losses(losses: list[float], reference: list[float], steps: int, tolerance: float) -> float:
    assert len(losses) == len(reference) == steps
    worst = max(abs(a - b) for a, b in zip(losses, reference))
    print(f"largest per-step loss difference: {worst:.2e}")
    assert worst < tolerance, (losses, reference)
    return worst


def every_task_rows(model, tokenizer, seed: int = 1) -> list[dict[str, Any]]:
    """One row per task (asr from a transcript row; the others from a question/answer row with
    SNAC codes), random encoder states."""
    rng = np.random.default_rng(seed)
    dim = model.config.adapter_in // model.config.frame_stack
    rows = []
    for task in TASKS:
        n = int(rng.integers(30, 60))
        row = {"n_frames": n, "encoder_states": rng.standard_normal((n, dim)).astype("float32"), "task": task}
        if task == "asr":
            row.update(text_ids=np.array(tokenizer("the cat sat").input_ids), text="the cat sat")
        else:
            codes = rng.integers(0, model.layout.audio_codes, size=(int(rng.integers(3, 9)), N_AUDIO_LAYERS))
            row.update(
                question_ids=np.array(tokenizer("where is the cat").input_ids),
                answer_ids=np.array(tokenizer("on the mat").input_ids),
                codes=codes.reshape(-1),
                question="where is the cat",
                answer="on the mat",
            )
        rows.append(row)
    return rows


# The listening page (report.html) in a real headless browser.
REQUIRE_BROWSER = "OMNI_STAGE_REQUIRE_BROWSER"  # set to 1 (.ci/run does): no Chromium fails instead of skipping
_DURATIONS_SCRIPT = """<script>
window.addEventListener('load', () => {
  const players = [...document.querySelectorAll('audio')];
  const report = () => document.body.setAttribute('data-players', JSON.stringify(
    players.map(p => ({src: p.getAttribute('src'), duration: p.duration, error: p.error && p.error.code}))));
  let left = players.length;
  if (!left) report();
  players.forEach(p => {
    const one = () => { if (--left === 0) report(); };
    p.addEventListener('loadedmetadata', one);
    p.addEventListener('error', one);
    p.load();
  });
});
</script>"""


def browser_players(page: Path) -> list[dict[str, Any]]:
    """Open `page` (served over HTTP on localhost from its folder) in headless Chromium and return
    each <audio> player's src, duration in seconds (None if the browser could not read it) and
    media error code, as the browser reports them once every player has loaded its metadata."""
    import functools
    import html
    import http.server
    import re
    import shutil
    import tempfile
    import threading

    import pytest

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get(REQUIRE_BROWSER) == "1":
            raise AssertionError("Chromium is required here (apt-get install chromium) and is not installed")
        pytest.skip("Chromium is not installed (.ci/run installs it)")
    harness = page.with_name(f".browser-{uuid.uuid4().hex}.html")  # the page plus a probe, beside it
    harness.write_text(page.read_text().replace("</body>", _DURATIONS_SCRIPT + "</body>"))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(page.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run(
                [
                    chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom",
                    f"http://127.0.0.1:{server.server_port}/{harness.name}",
                ],
                capture_output=True, text=True, timeout=120, check=True,
            ).stdout  # fmt: skip
    finally:
        server.shutdown()
        harness.unlink()
    found = re.search(r'data-players="([^"]*)"', dom)
    assert found, "the page's players never all loaded their metadata"
    return json.loads(html.unescape(found.group(1)))


def save_tiny_whisper_judge(path: Path, tokenizer_dir: str | Path) -> str:
    """A random-weight Whisper speech recognizer (encoder + decoder) saved by path with a feature
    extractor and the tiny BPE tokenizer: the ASR judge's loading and generation, not its hearing."""
    from transformers import AutoTokenizer, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start, end = len(tokenizer), len(tokenizer) + 1
    sizes = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2)
    config = WhisperConfig(
        vocab_size=len(tokenizer) + 8, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
        max_target_positions=64, decoder_start_token_id=start, bos_token_id=start, eos_token_id=end,
        pad_token_id=end, **sizes,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration(config)
    model.generation_config.update(decoder_start_token_id=start, eos_token_id=end, pad_token_id=end)
    model.save_pretrained(path)
    WhisperFeatureExtractor().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
