"""The shard converter: any source becomes memory-mapped Arrow shards that reproduce its rows,
written in parallel, resumable, split across array tasks, and read back by `--dataset`."""

from __future__ import annotations

import json

import numpy as np

from tests.test_formats import nemo_manifests, utterances  # noqa: F401 - the fixture is used by name
from training.data.formats import Source
from training.data.shard import MANIFEST, main, read_shards
from training.data.sources import asr_splits, load_source
from training.speech.audio import decode_audio
from training.stages import DataSpec


def _chosen(dataset):
    return asr_splits(load_source(str(dataset)), DataSpec(), seed=1234)


def test_shards_reproduce_the_source_rows(tmp_path, utterances):  # noqa: F811
    source = nemo_manifests(tmp_path / "nemo", utterances)  # with a long recording cut by offset
    to = tmp_path / "shards"
    assert main(["--dataset", str(source), "--to", str(to), "--rows-per-shard", "10", "--num-proc", "2"]) == 0
    manifest = json.loads((to / MANIFEST).read_text())
    chosen = _chosen(source)
    spec = chosen.spec
    roles = {"train": spec.train_split, "heldout": spec.heldout_split, "dev": spec.dev_split}
    shards = read_shards(to)
    for role, name in roles.items():
        original = chosen.splits[name]
        assert manifest["splits"][role]["rows"] == len(original) == len(shards[role])
        assert len(manifest["splits"][role]["shards"]) == -(-len(original) // 10)
        for row, copy in zip(original, shards[role]):
            assert copy["text"] == row[spec.text_column]
            a, rate_a = decode_audio(row[spec.audio_column])
            b, rate_b = decode_audio(copy["audio"])
            assert rate_a == rate_b and np.array_equal(a, b)
            assert copy["seconds"] == np.float32(len(a) / rate_a)
    hours = sum(s["hours"] for s in manifest["splits"].values())
    assert abs(hours - sum(sum(shards[r]["seconds"]) for r in shards) / 3600) < 1e-3

    # read back as a dataset: the splits are recognized by their role names
    chosen_again = asr_splits(Source.of(shards, "shards", "shards"), DataSpec(), seed=1234)
    assert (chosen_again.spec.train_split, chosen_again.spec.heldout_split, chosen_again.spec.dev_split) == (
        "train",
        "heldout",
        "dev",
    )


def test_sharding_resumes_and_splits_across_tasks(tmp_path, utterances, capsys):  # noqa: F811
    source = nemo_manifests(tmp_path / "nemo", utterances)
    to = tmp_path / "shards"
    args = ["--dataset", str(source), "--to", str(to), "--rows-per-shard", "8", "--num-proc", "1"]
    assert main([*args, "--task", "0/2"]) == 0
    assert not (to / MANIFEST).exists()  # task 1's shards are missing yet
    assert "the last task to finish writes the manifest" in capsys.readouterr().out
    first = {p: p.stat().st_mtime_ns for p in to.rglob("*.arrow")}
    assert main([*args, "--task", "1/2"]) == 0
    assert (to / MANIFEST).is_file()
    written = {p: p.stat().st_mtime_ns for p in to.rglob("*.arrow")}
    assert all(written[p] == t for p, t in first.items()) and len(written) > len(first)
    capsys.readouterr()
    assert main(args) == 0  # everything is there: nothing is written again
    assert "already written" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in to.rglob("*.arrow")} == written


def test_a_bad_task_or_source_is_one_message(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--dataset", "x", "--to", str(tmp_path), "--task", "2/2"])
    assert main(["--dataset", str(tmp_path / "missing"), "--to", str(tmp_path / "s")]) == 2
    assert "no such folder or file" in capsys.readouterr().err
