"""The encoder in the step (data/stream.py): a training split read row by row from memory-mapped
shards, log-mel made by the loader, encoder states computed in the forward. Same batches, same
losses as cached states; resumes exactly."""

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


def _args(tmp_path, tiny_checkpoints, shards, mode: str, out: str) -> list[str]:
    recipe = tmp_path / f"{mode}.json"
    fields = {"batch_size": 8, "save_every": 2, "data": {"encoder_states": mode}, "stages": {"asr": {"max_wer": None}}}
    recipe.write_text(json.dumps(fields))
    enc, llm = tiny_checkpoints
    return [
        *("--stage", "asr", "--recipe", str(recipe), "--dataset", str(shards), "--encoder", enc, "--llm", llm),
        *("--max-steps", "6", "--output-dir", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache")),
        *("--report-to", "none"),
    ]


def test_encoder_in_the_step_gives_the_cached_losses(tmp_path, tiny_checkpoints, shards, capsys):
    """The demo recipe stacks 4 frames, so a clip's last group straddles its end: frames past it
    must be zero as in the cache, or the losses drift."""
    assert main(_args(tmp_path, tiny_checkpoints, shards, "cache", "cache")) == 0
    assert main(_args(tmp_path, tiny_checkpoints, shards, "step", "step")) == 0
    out = capsys.readouterr().out
    assert "split 'train': 42 rows read as training goes, the frozen encoder run in each step" in out
    assert (
        not list((tmp_path / "cache" / "features").glob("*"))
        or len(list((tmp_path / "cache" / "features").glob("prepared-*.arrow"))) == 3
    )  # train (cache run), heldout, dev: the step run adds no train cache
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


def test_a_stage_that_mixes_qa_rows_caches_the_training_split(tmp_path, tiny_checkpoints, shards, capsys):
    """Batches hold one kind of row: with spoken-QA rows (cached states) in the mix, the training
    split is cached too, and the run says so."""
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
    fields = {"batch_size": 8, "data": {"encoder_states": "step"}}
    fields["stages"] = {"asr": {"max_wer": None, "task_mix": {"asr": 0.5, "a1t2": 0.5}}}
    recipe.write_text(json.dumps(fields))
    enc, llm = tiny_checkpoints
    args = ["--stage", "asr", "--recipe", str(recipe), "--dataset", str(shards), "--qa-dataset", str(tmp_path / "qa")]
    args += ["--encoder", enc, "--llm", llm, "--max-steps", "2", "--output-dir", str(tmp_path / "o")]
    assert main([*args, "--cache-dir", str(tmp_path / "c"), "--report-to", "none"]) == 0
    out = capsys.readouterr().out
    assert "mixes spoken-QA rows into its batches: the training split's encoder states are cached" in out
