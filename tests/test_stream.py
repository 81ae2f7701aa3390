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
