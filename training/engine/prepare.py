"""Before a stage trains: every split checked (a sample, or all rows for --validate-data) and encoded
into the feature cache (once for the whole run; --prepare does only that)."""

from __future__ import annotations

from typing import Any

from training.data.checks import DataError, ValidationReport, asr_row_check, qa_row_check, validate_split
from training.data.features import FeatureEncoder, prepare_qa_split, prepare_split
from training.data.stream import EncodeInStep, QAEncodeInStep
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


def prepared_splits(ctx: RunContext, model: OmniModel, feature_extractor, tokenizer) -> dict[str, Any]:
    """Every split's features: ASR splits by name, QA splits as "qa:<name>"; cached, except the
    training splits (ASR and QA alike: a batch holds one kind of row) when their encoder states are
    computed in the step (data/stream.py)."""
    spec = ctx.recipe.data
    encoder = FeatureEncoder(
        feature_extractor,
        tokenizer,
        encode=model.encode,
        encoder_key=encoder_key(model),
        n_mel_frames=model.n_mel_frames,
        cache_dir=ctx.cache_dir / "features",
        cache_dtype=spec.feature_cache_dtype,
    )
    out: dict[str, Any] = {}
    train, qa_train = ctx.splits[spec.train_split], ctx.qa_splits.get(spec.train_split)
    rows = len(train) + (len(qa_train) if qa_train is not None else 0)
    given = ctx.recipe.encoder is not None or ctx.init_from is not None
    if encode_in_step(spec, rows, given):
        n_mel = model.n_mel_frames
        where = f"dataset '{dataset_name(ctx)}', split '{spec.train_split}'"
        out[spec.train_split] = EncodeInStep(train, where, spec, feature_extractor, tokenizer, n_mel)
        if qa_train is not None:
            where = f"dataset '{qa_dataset_name(ctx)}', split '{spec.train_split}'"
            out[f"qa:{spec.train_split}"] = QAEncodeInStep(qa_train, where, spec, feature_extractor, tokenizer, n_mel)
        ctx.log(
            f"split '{spec.train_split}': {rows:,} rows read as training goes, the frozen encoder run in each step "
            f"(no feature cache; data.encoder_states '{spec.encoder_states}')"
        )
    else:
        ctx.log(
            f"split '{spec.train_split}': {rows:,} rows, encoder states computed once and cached in "
            f"{spec.feature_cache_dtype} (data.encoder_states '{spec.encoder_states}'; 'auto' computes them in the "
            f"step for a given --encoder or from {spec.encode_in_step_rows:,} rows)"
        )
    jobs = [(split, ds, dataset_name(ctx), prepare_split) for split, ds in ctx.splits.items()]
    jobs += [(f"qa:{split}", ds, qa_dataset_name(ctx), prepare_qa_split) for split, ds in ctx.qa_splits.items()]
    with rank_zero_first(ctx.accelerator, "filling the feature cache"):
        for name, ds, source, prepare in jobs:
            if name in out:
                continue
            split = name.removeprefix("qa:")
            out[name] = prepare(ds, f"dataset '{source}', split '{split}'", spec, encoder)
            if len(out[name]) < len(ds):
                ctx.skipped_rows[name] = len(ds) - len(out[name])
                ctx.log(f"split '{name}': left out {ctx.skipped_rows[name]} bad rows of {len(ds):,} (--skip-bad-rows)")
    return out


def encode_in_step(spec, train_rows: int, given_encoder: bool) -> bool:
    """Whether the training splits' encoder states are computed in the step (data.encoder_states):
    "auto" does so for a checkpoint the user gives (real data: no cache to fill or store) and for
    large sets; the demo's stand-ins on the built-in corpus are cached (three stages reuse them).
    A small set with --skip-bad-rows is cached too: only the cache leaves bad rows out."""
    if spec.encoder_states == "auto":
        # --skip-bad-rows: the cache leaves bad rows out and counts them (skipped_rows); the step can
        # only replace each as it is met, so a small set with it is cached
        small = train_rows < spec.encode_in_step_rows
        return not small or (given_encoder and not spec.skip_bad_rows)
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
