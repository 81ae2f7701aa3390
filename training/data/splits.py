"""Which split trains, which is held out, which stops early: the names given, the names commonly
used, or seeded slices of train. The held-out split is never read while training; early stopping
reads the dev split only.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

from training.data.checks import DataError
from training.data.formats import Source, splits_listed

# Recognized names, in order of preference (a name already given another role is skipped).
TRAIN_NAMES = ("train",)
HELDOUT_NAMES = ("heldout", "test", "validation", "dev", "eval")
DEV_NAMES = ("dev", "validation", "valid", "val")
NO_DEV = "none"  # dev_split "none": no dev split, so no early stopping


@dataclass
class SplitChoice:
    """The chosen split names (carved slices have their own), their datasets, and what was done."""

    train: str
    heldout: str
    dev: str | None
    splits: dict[str, datasets.Dataset]
    notes: list[str]
    source_names: list[str]  # the source's splits these come from (what row checks read)


def choose_splits(
    source: Source,
    train: str | None,
    heldout: str | None,
    dev: str | None,
    seed: int,
    fraction: float,
    max_rows: int,
    with_dev: bool = True,
) -> SplitChoice:
    """Resolve the roles; a missing held-out or dev split is a seeded slice of train (`fraction`
    of its rows, 1 to `max_rows`), taken out of train so that it is never trained on."""
    names = source.split_names
    if not names:
        raise DataError(f"dataset '{source.name}': no split to train on ({splits_listed(source)})")
    for given, flag in ((train, "--train-split"), (heldout, "--heldout-split"), (dev, "--dev-split")):
        if given is not None and given != NO_DEV and given not in names:
            raise DataError(f"dataset '{source.name}': no split '{given}' ({flag}); {splits_listed(source)}")
    train = train or _first(names, TRAIN_NAMES, ()) or (names[0] if len(names) == 1 else None)
    if train is None:
        raise DataError(
            f"dataset '{source.name}': no split named 'train' among {names}; name the training split with --train-split"
        )
    heldout = heldout or _first(names, HELDOUT_NAMES, (train,))
    want_dev = with_dev and dev != NO_DEV
    dev = (dev or _first(names, DEV_NAMES, (train, heldout))) if want_dev else None
    choice = SplitChoice(train, "", None, {train: source.split(train)}, [], [train])
    for name in (heldout, dev):
        if name is not None:
            choice.splits[name] = source.split(name)
            choice.source_names.append(name)
    choice.heldout = heldout or _carve(choice, "heldout", "held-out", seed, fraction, max_rows)
    if want_dev:
        choice.dev = dev or _carve(choice, "dev", "dev", seed + 1, fraction, max_rows)
    elif with_dev:
        choice.notes.append("no dev split (dev_split 'none'): early stopping is off")
    return choice


def _first(names: list[str], preferred: tuple[str, ...], taken: tuple[str | None, ...]) -> str | None:
    return next((n for n in preferred if n in names and n not in taken), None)


def _carve(choice: SplitChoice, base: str, role: str, seed: int, fraction: float, max_rows: int) -> str:
    """Move a seeded slice of train into a new split named '<train>-<base>'; returns its name."""
    train = choice.splits[choice.train]
    n = min(max(1, round(fraction * len(train))), max_rows)
    if len(train) - n < 1:
        raise DataError(
            f"split '{choice.train}' has {len(train)} rows: too few to hold out a {role} slice; "
            f"add rows or give a {role} split"
        )
    order = np.random.default_rng(seed).permutation(len(train))
    name = f"{choice.train}-{base}"
    choice.splits[name] = train.select(np.sort(order[:n]))
    choice.splits[choice.train] = train.select(np.sort(order[n:]))
    choice.notes.append(
        f"no {role} split: holding out {n:,} of {len(train):,} rows of '{choice.train}' as '{name}' "
        f"(seed {seed}; {len(train) - n:,} rows left to train on)"
    )
    return name
