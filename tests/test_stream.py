"""The encoder in the step (data/stream.py): training splits (ASR and spoken QA) read row by row,
log-mel made by the loader, encoder states computed in the forward. Same batches, same losses as
cached states; resumes exactly. And the cache itself, in bf16 by default."""

from __future__ import annotations

import json

import pytest

from tests.helpers import asr_losses
from tests.test_formats import nemo_manifests, utterances  # noqa: F401 - the fixture is used by name
from training.data.shard import main as shard_main
from training.engine.faults import InjectedFault
from training.run import main
from training.stages import DataSpec


@pytest.fixture(scope="module")
def shards(tmp_path_factory, utterances):  # noqa: F811
    root = tmp_path_factory.mktemp("stream")
    source = nemo_manifests(root / "nemo", utterances)
    assert shard_main(["--dataset", str(source), "--to", str(root / "shards"), "--rows-per-shard", "16"]) == 0
    return root / "shards"


def _args(tmp_path, tiny_checkpoints, shards, mode: str, out: str, dtype: str = "fp32") -> list[str]:
    recipe = tmp_path / f"{mode}-{dtype}.json"
    data = {"encoder_states": mode, "feature_cache_dtype": dtype}
    fields = {"batch_size": 8, "save_every": 2, "data": data, "stages": {"asr": {"max_wer": None}}}
    recipe.write_text(json.dumps(fields))
    enc, llm = tiny_checkpoints
    return [
        *("--stage", "asr", "--recipe", str(recipe), "--dataset", str(shards), "--encoder", enc, "--llm", llm),
        *("--max-steps", "6", "--output-dir", str(tmp_path / out), "--cache-dir", str(tmp_path / f"cache-{dtype}")),
        *("--report-to", "none"),
    ]


def test_encoder_in_the_step_gives_the_cached_losses(tmp_path, tiny_checkpoints, shards, capsys):
    """The demo recipe stacks 4 frames, so a clip's last group straddles its end: frames past it
    must be zero as in the cache, or the losses drift."""
    assert main(_args(tmp_path, tiny_checkpoints, shards, "cache", "cache")) == 0
    assert main(_args(tmp_path, tiny_checkpoints, shards, "step", "step")) == 0
    out = capsys.readouterr().out
    assert "split 'train': 42 rows read as training goes, the frozen encoder run in each step" in out
    # train (cache run), heldout, dev: the step run adds no train cache
    assert len(list((tmp_path / "cache-fp32" / "features").glob("prepared-*.arrow"))) == 3
    assert asr_losses(tmp_path / "step") == pytest.approx(asr_losses(tmp_path / "cache"), abs=1e-5)


def test_encoder_in_the_step_resumes_exactly(tmp_path, tiny_checkpoints, shards, monkeypatch):
    args = _args(tmp_path, tiny_checkpoints, shards, "step", "straight")
    assert main(args) == 0
    straight = asr_losses(tmp_path / "straight")
    resumed = _args(tmp_path, tiny_checkpoints, shards, "step", "resumed")
    monkeypatch.setenv("OMNI_STAGE_FAULT", "crash@0:5")  # after step 5; step 4 was checkpointed
    with pytest.raises(InjectedFault):
        main(resumed)
    monkeypatch.delenv("OMNI_STAGE_FAULT")
    assert main(resumed) == 0
    assert asr_losses(tmp_path / "resumed") == pytest.approx(straight, abs=1e-6)


def test_every_row_once_per_epoch_across_ranks_and_workers(tmp_path, tiny_checkpoints):
    """2 processes x 2 loader workers over shards: each rank takes its half of every global batch
    (Accelerate's split_batches, as in a launch), and every epoch reads every row exactly once."""
    from accelerate.data_loader import prepare_data_loader

    from tests.test_formats import _jsonl, _tone
    from training.data.batching import train_loader
    from training.data.shard import read_shards
    from training.data.stream import EncodeInStep
    from training.model import build_model

    clips = [_tone(tmp_path / "d" / f"{i}.wav", 0.5 + i / 50).name for i in range(42)]
    rows = [{"audio_filepath": clip, "text": f"row {i}"} for i, clip in enumerate(clips)]
    _jsonl(tmp_path / "d" / "train.jsonl", rows)
    _jsonl(tmp_path / "d" / "test.jsonl", rows[:2])
    assert shard_main(["--dataset", str(tmp_path / "d"), "--to", str(tmp_path / "s"), "--rows-per-shard", "10"]) == 0
    model, tokenizer, fe = build_model(*tiny_checkpoints, frame_stack=1)
    split = read_shards(tmp_path / "s")["train"]
    spec = DataSpec(audio_column="audio", text_column="text")
    data = EncodeInStep(split, "shards", spec, fe, tokenizer, model.n_mel_frames)
    for epoch in (0, 1):
        seen = {}
        for rank in (0, 1):
            loader = train_loader(data, model.layout, 1, batch_size=8, seed=3, num_workers=2)
            shard = prepare_data_loader(loader, num_processes=2, process_index=rank, split_batches=True)
            shard.set_epoch(epoch)
            seen[rank] = [t for batch in shard for t in batch["texts"]]
        both = seen[0] + seen[1]
        assert len(seen[0]) == len(seen[1]) == 20  # 5 global batches of 8, half each
        # 42 rows, 2 carved out as dev: the 40 left are 5 global batches, each row read once
        assert len(set(both)) == len(both) == len(split) == 40


def test_a_given_encoder_streams_a_stage_that_mixes_qa_rows(tmp_path, tiny_checkpoints, shards, capsys):
    """'auto' runs the encoder in the step for a checkpoint given by path, and a stage that mixes
    spoken-QA rows into its batches streams those too: only the evaluation splits are cached."""
    from tests.test_formats import _jsonl, _tone

    qa = [
        {
            "question_audio": _tone(tmp_path / "qa" / f"q{i}.wav", 1 + i / 20).name,
            "question": "what is the opposite of hot",
            "answer": "cold",
        }
        for i in range(20)
    ]
    _jsonl(tmp_path / "qa" / "qa.jsonl", qa)
    recipe = tmp_path / "mixed.json"
    fields = {"batch_size": 8}
    fields["stages"] = {"asr": {"max_wer": None, "task_mix": {"asr": 0.5, "a1t2": 0.5}}}
    recipe.write_text(json.dumps(fields))
    enc, llm = tiny_checkpoints
    args = ["--stage", "asr", "--recipe", str(recipe), "--dataset", str(shards), "--qa-dataset", str(tmp_path / "qa")]
    args += ["--encoder", enc, "--llm", llm, "--max-steps", "2", "--output-dir", str(tmp_path / "o")]
    assert main([*args, "--cache-dir", str(tmp_path / "c"), "--report-to", "none"]) == 0
    out = capsys.readouterr().out
    assert "split 'train': 61 rows read as training goes, the frozen encoder run in each step" in out
    # 42 ASR rows + 19 QA rows (one carved out as held-out); cached: the ASR held-out and dev
    # splits and the QA held-out split, nothing of either training split
    assert "task mix: asr 30, a1t2 30 items per epoch" in out
    cached = [p.name.rsplit("-", 1)[0] for p in (tmp_path / "c" / "features").glob("*.arrow")]
    assert sorted(cached) == ["prepared", "prepared", "prepared-qa"]
    metrics = [json.loads(line) for line in (tmp_path / "o" / "asr" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["loss"] > 0 for m in metrics)


@pytest.fixture(scope="module")
def qa_rows(cache_dir):
    """Twelve rows of the embedded spoken-QA corpus (espeak-ng questions, answers as SNAC codes)."""
    from training.demo.qa_corpus import build_qa_corpus, qa_corpus_config

    return build_qa_corpus(cache_dir, qa_corpus_config("quick"))["train"].select(range(12))


def _feature_encoder(model, tokenizer, fe, cache, dtype):
    from training.data.features import FeatureEncoder

    return FeatureEncoder(fe, tokenizer, model.encode, "tiny", model.n_mel_frames, cache, cache_dtype=dtype)


def test_qa_rows_made_in_the_step_equal_the_cached_rows(tmp_path, tiny_checkpoints, qa_rows):
    """For every task a QA row serves: the same layout, labels and (with the encoder run in the
    forward) the same losses as the row's cached fp32 states; the answer_snac frame count the
    sampler groups by is exact before any row is read."""
    import torch

    from training.data.batching import SpeechTextCollator
    from training.data.features import prepare_qa_split
    from training.data.stream import QAEncodeInStep
    from training.model import build_model
    from training.model.omni import model_inputs

    model, tokenizer, fe = build_model(*tiny_checkpoints, frame_stack=2)
    model.eval()
    spec = DataSpec(feature_cache_dtype="fp32")
    cached = prepare_qa_split(qa_rows, "qa", spec, _feature_encoder(model, tokenizer, fe, tmp_path, "fp32"))
    streamed = QAEncodeInStep(qa_rows, "qa", spec, fe, tokenizer, model.n_mel_frames)
    assert streamed.estimates["n_codes"].tolist() == list(cached["n_codes"])
    assert min(cached["n_codes"]) > 0
    for task in ("a1t2", "t1t2", "a1a2", "t1a2", "asr"):
        collate = SpeechTextCollator(model.layout, 2, task)
        a = collate([cached[i] for i in range(len(qa_rows))])
        b = collate([streamed[i] for i in range(len(qa_rows))])
        for key in ("input_ids", "labels", "attention_mask", "audio_mask", "encoder_lengths"):
            assert torch.equal(a[key], b[key]), (task, key)
        assert a["texts"] == b["texts"]
        with torch.no_grad():
            loss_a, loss_b = model(**model_inputs(a))["loss"], model(**model_inputs(b))["loss"]
        assert float(loss_a) == pytest.approx(float(loss_b), abs=1e-5), task


def test_the_feature_cache_is_bf16_by_default(tmp_path, tiny_checkpoints, qa_rows):
    """Half the disk of fp32, and widened back to exactly the bf16 rounding of the fp32 states."""
    import torch

    from training.data.features import prepare_qa_split, widened
    from training.model import build_model

    model, tokenizer, fe = build_model(*tiny_checkpoints, frame_stack=1)
    assert DataSpec().feature_cache_dtype == "bf16"
    prepared, sizes = {}, {}
    for dtype in ("fp32", "bf16"):
        cache = tmp_path / dtype
        encoder = _feature_encoder(model, tokenizer, fe, cache, dtype)
        prepared[dtype] = prepare_qa_split(qa_rows, "qa", DataSpec(feature_cache_dtype=dtype), encoder)
        sizes[dtype] = sum(p.stat().st_size for p in cache.glob("*.arrow"))
    for full, half in zip(prepared["fp32"]["encoder_states"], prepared["bf16"]["encoder_states"]):
        exact = torch.from_numpy(full).to(torch.bfloat16).float()
        assert torch.equal(widened(half), exact) and widened(half).dtype == torch.float32
    states_bytes = sum(s.size * 4 for s in prepared["fp32"]["encoder_states"])
    assert sizes["fp32"] - sizes["bf16"] == pytest.approx(states_bytes / 2, rel=0.02)
