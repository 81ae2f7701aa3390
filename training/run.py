"""Train Mini-Omni's three stages: `accelerate launch training/run.py --stage all`.

Exit codes: 0 done; 2 bad input or stage order; 3 a WER gate stopped the run; 4 the loss stayed
non-finite (checkpoint saved); 70 a rank failed in a multi-process run (its rank, phase and every
stack are in the log); 74 a checkpoint did not fit on the disk (the previous one is kept); 75
stopped on a signal with a checkpoint saved (rerun the same command to resume). `accelerate launch`
reports any of them as 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch training/run.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.recipe_file import load_recipe  # noqa: E402
from training.stages import DATA_FORMATS, RECIPES, STAGE_NAMES, Recipe, RecipeError, format_stage_table  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("OMNI_STAGE_CACHE", Path.home() / ".cache" / "omni-stage"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    tables = "\n\n".join(f"recipe '{name}':\n{format_stage_table(r)}" for name, r in RECIPES.items())
    parser = argparse.ArgumentParser(
        description="Mini-Omni three-stage training (Whisper encoder + adapter + Qwen2) under Accelerate.",
        epilog=f"stage table (steps: min-max; the LR schedule spans max):\n\n{tables}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--stage",
        choices=[*STAGE_NAMES, "all"],
        help="stage to run, or all three in order (required unless --dry-run, where it defaults to all)",
    )
    parser.add_argument("--recipe", default="demo", help=f"built-in recipe {sorted(RECIPES)} or a JSON recipe file")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("runs/demo"), help="run directory (checkpoints, exports, record)"
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        help="start the (first) stage from this stage export, or a Mini-Omni checkpoint folder "
        "(lit_model.pth + model_config.yaml; with --encoder naming its Whisper when the folder does not)",
    )
    parser.add_argument("--encoder", help="Whisper checkpoint (path or hub id); overrides the recipe")
    parser.add_argument("--llm", help="Qwen2 checkpoint (path or hub id); overrides the recipe")
    parser.add_argument(
        "--dataset",
        action="append",
        help="speech data: a save_to_disk folder, an audiofolder, a JSONL/CSV/TSV manifest or a folder of "
        "them (NeMo, Common Voice), Parquet files, or a hub id (README: Bring your own data); repeat to "
        "mix datasets, each PATH:WEIGHT (default weight 1)",
    )
    parser.add_argument(
        "--format",
        choices=DATA_FORMATS,
        help="how each --dataset folder is read (default auto: recognized; a folder that reads two ways "
        "is refused, both readings named)",
    )
    parser.add_argument("--audio-column", help="audio column (default: recognized: audio, audio_filepath, path, file)")
    parser.add_argument(
        "--text-column", help="transcript column (default: recognized: text, sentence, transcription, ...)"
    )
    parser.add_argument("--train-split", help="training split (default: 'train', or the only split)")
    parser.add_argument(
        "--heldout-split",
        help="held-out split, never read while training (default: heldout, test, validation or dev; "
        "else a seeded slice of train)",
    )
    parser.add_argument(
        "--dev-split",
        help="early-stopping split (default: dev, validation or valid; else a seeded slice of train); "
        "'none': no early stopping",
    )
    parser.add_argument(
        "--qa-dataset",
        help="spoken QA source for the later stages' tasks (our schema or "
        "VoiceAssistant-400K's), or 'none'; default: the embedded QA corpus with the embedded ASR corpus",
    )
    parser.add_argument(
        "--codec", help="SNAC 24 kHz checkpoint (path or hub id) to encode answer audio; default: seeded random weights"
    )
    parser.add_argument(
        "--speech-judge",
        help="transcribe the answer speech generated at each boundary: a Whisper checkpoint (path or hub id) "
        "or 'self' (the run's own model); meaningful with a real --codec",
    )
    parser.add_argument("--max-steps", type=int, help="cap every stage at this many optimizer steps")
    parser.add_argument(
        "--dist-timeout-minutes",
        type=float,
        help="end the run (every rank's stack in the log) when a collective waits this long (recipe default 10)",
    )
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto: continue from the newest intact checkpoint; never: refuse a run dir that has one; "
        "or the path of a step checkpoint (<output-dir>/<stage>/checkpoints/step-N) to continue from",
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="corpus, stand-ins and feature cache")
    parser.add_argument(
        "--validate-data",
        action="store_true",
        help="check every row of every split (columns, audio, rates, lengths, transcripts) and exit",
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="encode every split into the feature cache (what the stages would do first) and exit",
    )
    parser.add_argument("--skip-bad-rows", action="store_true", help="leave out (and count) rows that fail the checks")
    parser.add_argument(
        "--report-to",
        default="tensorboard",
        help="Accelerate trackers: tensorboard (default), wandb, mlflow, ..., comma-separated, or none",
    )
    dry = parser.add_argument_group("dry run (no launcher needed, nothing trained or downloaded)")
    dry.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model on the meta device, print parameters, memory per GPU and tokens per step, exit",
    )
    dry.add_argument("--gpus", type=int, default=8, help="GPUs per node to size for (default 8)")
    dry.add_argument("--nodes", type=int, default=1, help="nodes to size for (default 1)")
    dry.add_argument("--speech-seconds", type=float, help="typical utterance length (default 10)")
    dry.add_argument(
        "--speech-hours", type=float, help="hours of speech to size the encoder-state cache for (default 1)"
    )
    dry.add_argument(
        "--gpu-memory", type=float, default=80.0, help="GiB per GPU to size token budgets for (default 80, an H100)"
    )
    dry.add_argument("--text-tokens", type=int, help="typical answer length in tokens (default 3 per second of speech)")
    args = parser.parse_args(argv)
    if args.stage is None and not (args.dry_run or args.validate_data or args.prepare):
        parser.error("the following arguments are required: --stage")
    if args.resume not in ("auto", "never") and not (Path(args.resume) / "trainer_state.json").is_file():
        parser.error(f"--resume {args.resume}: expected auto, never, or a step checkpoint folder (trainer_state.json)")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be >= 1")
    if (args.encoder is None) != (args.llm is None) and not (args.init_from and args.llm is None):
        parser.error("--encoder and --llm go together (--encoder alone names the encoder of an --init-from model)")
    return args


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The named recipe with the command line's data and checkpoint flags applied (RecipeError if bad)."""
    recipe = load_recipe(args.recipe)
    flags = {
        "dataset": None if not args.dataset else args.dataset[0] if len(args.dataset) == 1 else tuple(args.dataset),
        "format": args.format,
        "audio_column": args.audio_column,
        "text_column": args.text_column,
        "train_split": args.train_split,
        "heldout_split": args.heldout_split,
        "dev_split": args.dev_split,
        "qa_dataset": args.qa_dataset,
        "codec": args.codec,
        "speech_judge": args.speech_judge,
    }
    data_changes = {k: v for k, v in flags.items() if v is not None}
    if args.skip_bad_rows:
        data_changes["skip_bad_rows"] = True
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, **data_changes))
    if args.dist_timeout_minutes is not None:
        if not args.dist_timeout_minutes > 0:
            raise RecipeError(f"--dist-timeout-minutes must be > 0, got {args.dist_timeout_minutes}")
        recipe = dataclasses.replace(recipe, dist_timeout_minutes=args.dist_timeout_minutes)
    if args.encoder:
        recipe = dataclasses.replace(recipe, encoder=args.encoder, llm=args.llm)
    return recipe


def train_stages(ctx, stages: list[str]) -> int:
    """Run the stages in order; the exit code says how the run ended (see the module docstring)."""
    from training.data.checks import DataError
    from training.engine.checkpoints import DISK_FULL_EXIT_CODE, CheckpointSaveFailed
    from training.engine.context import REQUEUE_EXIT_CODE, NonFiniteLoss, Preempted, StageOrderError, WerGateFailed
    from training.engine.faults import fail_rank
    from training.engine.run_folder import check_finished_stages, check_resume_path
    from training.engine.sources import load_data_and_pretrained
    from training.engine.stage import run_stage
    from training.engine.weights import initial_weights

    try:
        check_resume_path(ctx, stages)  # a --resume PATH that would be ignored is refused
        initial_weights(ctx, stages[0])  # fail before any data work if the stage has nothing to start from
        load_data_and_pretrained(ctx, check=lambda ctx: check_finished_stages(ctx, stages))
        for i, stage in enumerate(stages):
            if i > 0:
                ctx.init_from = None  # later stages chain from the previous export
            run_stage(ctx, stage)
    except (StageOrderError, DataError, RecipeError) as err:
        ctx.log(f"error: {err}")
        return 2
    except WerGateFailed as err:
        ctx.log(f"stopped: {err}")
        return 3
    except NonFiniteLoss as err:
        ctx.log(f"stopped: {err}")
        return 4
    except CheckpointSaveFailed as err:
        ctx.log(f"error: {err}")
        return DISK_FULL_EXIT_CODE
    except Preempted:
        return REQUEUE_EXIT_CODE
    except Exception as err:
        if ctx.accelerator.num_processes == 1:
            raise  # one process: the traceback says it all
        fail_rank(ctx.accelerator, ctx.phase, err)  # prints rank, phase, stacks; never returns
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = recipe_from_args(args)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:  # before any Accelerator exists: plain `python training/run.py --dry-run` works
        from training.model.dry_run import main_dry_run

        return main_dry_run(
            recipe,
            args.stage or "all",
            args.gpus,
            args.nodes,
            args.speech_seconds,
            args.text_tokens,
            args.speech_hours,
            args.gpu_memory,
        )

    # Heavy imports only once the arguments are known to be good.
    from training.engine.boundary import format_wer_table, write_run_report
    from training.engine.context import RunContext
    from training.engine.faults import Phase, leave_together
    from training.engine.launch import make_accelerator
    from training.engine.prepare import prepare_only, validate_only

    accelerator = make_accelerator(
        recipe, "none" if args.validate_data or args.prepare else args.report_to, args.output_dir
    )
    ctx = RunContext(
        recipe=recipe,
        output_dir=args.output_dir,
        cache_dir=args.cache_dir,
        accelerator=accelerator,
        init_from=args.init_from,
        max_steps=args.max_steps,
        resume=args.resume,
        phase=Phase(accelerator, recipe.dist_timeout_minutes * 60),
    )
    stages = list(STAGE_NAMES) if args.stage in ("all", None) else [args.stage]
    ctx.log(
        f"recipe '{recipe.name}', stages {stages}, output {args.output_dir}\n"
        f"{accelerator.num_processes} processes ({accelerator.distributed_type.value}), "
        f"precision {accelerator.mixed_precision}, "
        f"global batch {recipe.batch_size} x {recipe.grad_accum} accumulation\n"
        f"{format_stage_table(recipe)}"
    )
    if args.validate_data:
        return validate_only(ctx)
    if args.prepare:
        return prepare_only(ctx)
    # Trackers (TensorBoard by default: <output-dir>/tensorboard) get scalars only.
    accelerator.init_trackers(
        "tensorboard", config={k: v for k, v in recipe.to_dict().items() if isinstance(v, (int, float, str, bool))}
    )
    code = train_stages(ctx, stages)
    record, data = ctx.record(), ctx.recipe.data
    if data.heldout_split is None:  # stopped before choosing splits: the ones the folder's runs chose
        data = dataclasses.replace(data, **{k: record.get("data", {}).get(k) for k in ("heldout_split", "dev_split")})
    splits = [s for s in (data.heldout_split, data.dev_split) if s]
    if record["stages"]:
        ctx.log("\nWER per stage boundary\n" + format_wer_table(record, splits))
        write_run_report(ctx)
    return leave_together(accelerator, code)  # ends the trackers and the process group


if __name__ == "__main__":
    sys.exit(main())
