"""Before a stage trains: every split checked (a sample, or all rows for --validate-data) and encoded
into the feature cache (once for the whole run; --prepare does only that)."""

from __future__ import annotations

from typing import Any

from training.data.checks import DataError, ValidationReport, asr_row_check, qa_row_check, validate_split
from training.data.features import FeatureEncoder, prepare_qa_split, prepare_split
from training.data.stream import EncodeInStep
from training.engine.context import RunContext
from training.engine.rank_zero import rank_zero_first
from training.engine.sources import audio_window, dataset_name, load_data, load_data_and_pretrained, qa_dataset_name
from training.engine.weights import PRETRAINED, encoder_key, make_model
from training.model import OmniModel


def validate_splits(ctx: RunContext, sr: int, window: int, max_rows: int | None) -> dict[str, ValidationReport]:
    """Check rows of every split before any encoding (all rows, or max_rows spread over each), at
    the encoder's sampling rate `sr` and window of `window` samples. Bad rows stop the run naming
    them, unless the data spec says to skip them."""
    spec = ctx.recipe.data
    reports = {}
    checks = [(where, ds, asr_row_check(own, sr, window)) for where, (ds, own) in ctx.checked_splits.items()]
    checks += [(where, ds, qa_row_check(own, sr, window)) for where, (ds, own) in ctx.checked_qa_splits.items()]
    for where, ds, check in checks:
        report = validate_split(ds, where, check, max_rows)
        ctx.log(report.summary(sr))
        if report.bad and not spec.skip_bad_rows:
            shown = "\n  ".join(report.bad[:10])
            raise DataError(
                f"{len(report.bad)} bad rows in {report.where} (of {report.checked:,} checked):\n  "
                f"{shown}\nFix them, or pass --skip-bad-rows to leave them out (they are counted)"
            )
        reports[where] = report
    return reports


def prepared_splits(
    ctx: RunContext, model: OmniModel, feature_extractor, tokenizer, mixes_qa: bool = False
) -> dict[str, Any]:
    """Every split's features: ASR splits by name, QA splits as "qa:<name>"; cached, except a
    training split whose encoder states are computed in the step (data/stream.py). A stage that
    mixes QA rows (cached) into its batches (`mixes_qa`) caches the training split too: a batch
    holds one kind of row."""
    encoder = FeatureEncoder(
        feature_extractor,
        tokenizer,
        encode=model.encode,
        encoder_key=encoder_key(model),
        n_mel_frames=model.n_mel_frames,
        cache_dir=ctx.cache_dir / "features",
    )
    spec = ctx.recipe.data
    out: dict[str, Any] = {}
    train = ctx.splits[spec.train_split]
    in_step = encode_in_step(spec, len(train))
    if in_step and mixes_qa:
        in_step = False
        ctx.log("this stage mixes spoken-QA rows into its batches: the training split's encoder states are cached")
    if in_step:
        where = f"dataset '{dataset_name(ctx)}', split '{spec.train_split}'"
        out[spec.train_split] = EncodeInStep(train, where, spec, feature_extractor, tokenizer, model.n_mel_frames)
        ctx.log(
            f"split '{spec.train_split}': {len(train):,} rows read as training goes, the frozen encoder run in "
            "each step (no feature cache; data.encoder_states)"
        )
    else:
        ctx.log(
            f"split '{spec.train_split}': {len(train):,} rows, encoder states computed once and cached "
            f"(data.encoder_states '{spec.encoder_states}'; in the step from {spec.encode_in_step_rows:,} rows)"
        )
    jobs = [(split, ds, dataset_name(ctx), prepare_split) for split, ds in ctx.splits.items() if split not in out]
    jobs += [(f"qa:{split}", ds, qa_dataset_name(ctx), prepare_qa_split) for split, ds in ctx.qa_splits.items()]
    with rank_zero_first(ctx.accelerator, "filling the feature cache"):
        for name, ds, source, prepare in jobs:
            split = name.removeprefix("qa:")
            out[name] = prepare(ds, f"dataset '{source}', split '{split}'", ctx.recipe.data, encoder)
            if len(out[name]) < len(ds):
                ctx.skipped_rows[name] = len(ds) - len(out[name])
                ctx.log(f"split '{name}': left out {ctx.skipped_rows[name]} bad rows of {len(ds):,} (--skip-bad-rows)")
    return out


def encode_in_step(spec, train_rows: int) -> bool:
    """Whether the training split's encoder states are computed in the step (data.encoder_states)."""
    if spec.encoder_states == "auto":
        return train_rows >= spec.encode_in_step_rows
    return spec.encoder_states == "step"


def validate_only(ctx: RunContext) -> int:
    """--validate-data: every row of every split, then exit (0 clean or skipping, 2 bad rows)."""
    try:
        load_data(ctx)  # nothing is built or trained: the rows are checked at the encoder's window
        reports = validate_splits(ctx, *audio_window(ctx), max_rows=None)
    except DataError as err:
        ctx.log(f"error: {err}")
        return 2
    bad = sum(len(r.bad) for r in reports.values())
    for report in reports.values():
        for message in report.bad[:20]:
            ctx.log(f"  skipped: {message}")
    ctx.log(
        f"data valid: {sum(r.checked for r in reports.values()):,} rows checked"
        + (f", {bad} bad rows would be left out (--skip-bad-rows)" if bad else ", no bad rows")
    )
    return 0


def prepare_only(ctx: RunContext) -> int:
    """--prepare: check a sample of every split, encode all of them into the feature cache and exit
    (0, or 2 on bad data). The frozen encoder and the tokenizer are the same in all three stages,
    so one preparation serves the whole run; the stages then load the cache and encode nothing."""
    try:
        load_data_and_pretrained(ctx)
        model, tokenizer, feature_extractor = make_model(ctx, str(ctx.init_from) if ctx.init_from else PRETRAINED)
        prepared = prepared_splits(ctx, model, feature_extractor, tokenizer)
    except DataError as err:
        ctx.log(f"error: {err}")
        return 2
    ctx.log(
        "prepared: "
        + ", ".join(f"{name} {len(ds):,} rows" for name, ds in prepared.items())
        + f"; features cached in {ctx.cache_dir / 'features'}"
    )
    return 0
