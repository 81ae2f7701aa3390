"""Several speech datasets in one run (`--dataset A --dataset B:0.3`, or a list in a recipe file).

Each dataset chooses its own splits and columns (training/data/sources.py); they are then joined
under the columns 'audio' and 'text': the training splits by weight (an epoch's rows, as many as
all training splits hold, shared out by the weights; each dataset's rows in a seeded permutation,
cycled when its share is larger than it is; fixed for the run, reshuffled every epoch by the
sampler), the held-out and dev splits whole, so the WER at a boundary covers every dataset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import datasets
import numpy as np

from training.data.batching import cycled_rows
from training.data.checks import SEGMENT_STRUCT, DataError
from training.data.sources import Chosen

TRAIN, HELDOUT, DEV = "train", "heldout", "dev"


def parse_entry(entry: str) -> tuple[str, float]:
    """'path_or_id' or 'path_or_id:weight' (weight > 0; default 1)."""
    where, _, weight = entry.rpartition(":")
    if where and weight:
        try:
            value = float(weight)
        except ValueError:
            return entry, 1.0  # a colon that is part of the name
        if not value > 0:
            raise DataError(f"dataset '{entry}': the weight after ':' must be > 0, got {weight}")
        return where, value
    return entry, 1.0


def dataset_entries(dataset: str | tuple[str, ...] | None) -> list[tuple[str, float]]:
    if dataset is None:
        return []
    return [parse_entry(e) for e in ((dataset,) if isinstance(dataset, str) else dataset)]


def mix(parts: list[tuple[str, float, Chosen]], seed: int, cache_dir: Path) -> Chosen:
    """One Chosen from several: (name, weight, that dataset's Chosen) each."""
    roles = {TRAIN: [], HELDOUT: [], DEV: []}
    for name, _, chosen in parts:
        spec = chosen.spec
        for role, split in ((TRAIN, spec.train_split), (HELDOUT, spec.heldout_split), (DEV, spec.dev_split)):
            if split is not None:
                ds = chosen.splits[split].select_columns([spec.audio_column, spec.text_column])
                roles[role].append((name, ds.rename_columns({spec.audio_column: "audio", spec.text_column: "text"})))
    features = _common_features([ds for group in roles.values() for _, ds in group])
    for group in roles.values():
        group[:] = [(name, _cast(ds, features, cache_dir)) for name, ds in group]

    weights = np.array([w for _, w, _ in parts])
    size = sum(len(ds) for _, ds in roles[TRAIN])
    rng = np.random.default_rng(seed)
    shares, notes = [], []
    for (name, ds), weight in zip(roles[TRAIN], weights):
        count = max(1, round(weight / weights.sum() * size))
        shares.append(ds.select(cycled_rows(rng, len(ds), count)))
        notes.append(f"{name}: {count:,} training rows per epoch (weight {weight:g}, {len(ds):,} rows)")
    splits = {TRAIN: datasets.concatenate_datasets(shares)}
    splits[HELDOUT] = datasets.concatenate_datasets([ds for _, ds in roles[HELDOUT]])
    if roles[DEV]:
        splits[DEV] = datasets.concatenate_datasets([ds for _, ds in roles[DEV]])
    spec = dataclasses.replace(
        parts[0][2].spec,
        train_split=TRAIN,
        heldout_split=HELDOUT,
        dev_split=DEV if roles[DEV] else None,
        audio_column="audio",
        text_column="text",
    )
    notes = [
        f"mixing {len(parts)} datasets: " + "; ".join(notes),
        *(note for _, _, chosen in parts for note in chosen.notes),
        f"mixed: train {len(splits[TRAIN]):,} rows, held-out {len(splits[HELDOUT]):,} rows"
        + (f", dev {len(splits[DEV]):,} rows" if DEV in splits else ", no dev split"),
    ]
    checked = {where: item for _, _, chosen in parts for where, item in chosen.checked.items()}
    return Chosen(splits, spec, notes, checked)


def _common_features(parts: list[datasets.Dataset]) -> datasets.Features:
    """The datasets' own features when they agree; else audio as a {bytes, path, offset, duration}
    struct (what every reader's audio fits in) and text as strings."""
    first = parts[0].features
    if all(ds.features == first for ds in parts):
        return first
    return datasets.Features({"audio": SEGMENT_STRUCT, "text": datasets.Value("string")})


def _cast(ds: datasets.Dataset, features: datasets.Features, cache_dir: Path) -> datasets.Dataset:
    if ds.features == features:
        return ds
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Written under the run's cache, never beside the user's data (where datasets would put it).
    return ds.cast(features, cache_file_name=str(cache_dir / f"mixed-{ds._fingerprint}.arrow"))
