"""Training-step throughput and peak memory at Mini-Omni's real size.

Builds whisper-small's encoder and Qwen2-0.5B from their published configs (random weights: no
download), grows the vocabulary to 181,120 rows, and runs real optimizer steps of a stage through
Accelerate (+ DeepSpeed when launched with a DeepSpeed config) on synthetic encoder states of a
given length. Prints steps/s, tokens/s (all 8-stream positions), model TFLOP/s and MFU
(engine/mfu.py over model/flops.py: the count the training log uses) and peak accelerator memory.

The recipe's speed knobs, to compare on one warm machine: `--packed` (each process's rows end to
end in one row, as `packing: true` lays them out), `--attn {sdpa,eager,flash_attention_2}`,
`--checkpointing` (activation checkpointing of the LLM's layers), `--loss-chunk-mb` (0 = all
logits at once), `--compile BACKEND` (torch.compile of the LLM's layers, e.g. inductor). It also
prints the memory estimate `tokens_per_micro_batch: auto` would use (model/memory.py) beside the
measured peak, so each GPU run calibrates it.

    accelerate launch --use_deepspeed --deepspeed_config_file ds_configs/zero2.json \
        --num_processes 1 --mixed_precision bf16 benchmarks/stage_steps.py --stage final

On CPU, `--tiny` swaps in small configs so the script itself can be checked quickly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from training.data.batching import SpeechTextCollator  # noqa: E402
from training.engine.budget import device_capacity, step_estimate  # noqa: E402
from training.engine.launch import make_accelerator  # noqa: E402
from training.engine.mfu import device_peak_tflops, throughput  # noqa: E402
from training.model import build_model, model_inputs, optimizer_groups, parameter_summary, set_trainable  # noqa: E402
from training.model.flops import StepFlops, squared_sample_lengths  # noqa: E402
from training.model.memory import largest_budget  # noqa: E402
from training.model.untrained import save_untrained_checkpoints  # noqa: E402
from training.speech.layout import IGNORE  # noqa: E402
from training.stages import MINI_OMNI, lr_at  # noqa: E402

WHISPER_SMALL = dict(
    d_model=768,
    encoder_layers=12,
    encoder_attention_heads=12,
    encoder_ffn_dim=3072,
    num_mel_bins=80,
    max_source_positions=1500,
)
QWEN2_05B = dict(
    vocab_size=151_936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32_768,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    tie_word_embeddings=True,
)
TINY_WHISPER = dict(
    d_model=64,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=128,
    num_mel_bins=80,
    max_source_positions=1500,
)
TINY_QWEN2 = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def sample_positions(model, seconds: float, answer_tokens: int) -> int:
    """Positions of one synthetic row: the collated width of an asr sample of this length."""
    frames = int(seconds * 1000 / 20) + 1
    row = {"n_frames": frames, "encoder_states": np.zeros((frames, 1), np.float32), "text": ""}
    row["text_ids"] = np.zeros(answer_tokens, np.int64)
    return SpeechTextCollator(model.layout, model.config.frame_stack)([row])["input_ids"].shape[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="final", choices=["asr", "second", "final"])
    parser.add_argument(
        "--batch-size", default="8", help="rows per process, or 'auto': as many as the memory estimate fits"
    )
    parser.add_argument("--device-memory-gib", type=float, help="GiB 'auto' may fill (default: the GPU's own)")
    parser.add_argument("--seconds", type=float, default=10.0, help="speech per utterance")
    parser.add_argument("--answer-tokens", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", type=Path, help="append the figures here as one JSON line")
    parser.add_argument("--packed", action="store_true", help="each process's rows packed into one row")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the LLM")
    parser.add_argument("--loss-chunk-mb", type=float, default=MINI_OMNI.loss_chunk_mb)
    parser.add_argument("--compile", default=None, help="torch.compile backend for the LLM's layers (inductor)")
    args = parser.parse_args()

    accelerator = make_accelerator(MINI_OMNI)
    spec = MINI_OMNI.stage(args.stage)
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_untrained_checkpoints(
            Path(tmp) / f"rank{accelerator.process_index}",
            TINY_WHISPER if args.tiny else WHISPER_SMALL,
            TINY_QWEN2 if args.tiny else QWEN2_05B,
        )
        model, _, _ = build_model(*paths, frame_stack=MINI_OMNI.frame_stack)
    set_trainable(model, spec.trainable, spec.train_text_specials)
    model.loss_chunk_mb = args.loss_chunk_mb
    model.set_llm_options(args.attn, args.checkpointing, args.compile)
    knobs = dataclasses.replace(
        MINI_OMNI,
        attn_implementation=args.attn,
        activation_checkpointing=args.checkpointing,
        packing=args.packed,
        loss_chunk_mb=args.loss_chunk_mb,
    )
    states, activations = step_estimate(accelerator, knobs, model)
    budget = None
    if args.batch_size == "auto":  # the micro-batch tokens_per_micro_batch: auto would choose, in whole rows
        capacity, _ = device_capacity(accelerator, dataclasses.replace(knobs, device_memory_gib=args.device_memory_gib))
        length = sample_positions(model, args.seconds, args.answer_tokens)
        budget = largest_budget(capacity, states.gpu_total, activations, None if args.packed else length)
        args.batch_size = max(1, budget // length)
    args.batch_size = int(args.batch_size)
    step_flops = StepFlops.of(model)  # before ZeRO-3 shards it
    summary = parameter_summary(model)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, MINI_OMNI.weight_decay), lr=lr_at(spec, 0), betas=MINI_OMNI.adam_betas, fused=True
    )
    collate = SpeechTextCollator(model.layout, model.config.frame_stack)
    packed_collate = SpeechTextCollator(model.layout, model.config.frame_stack, packed=True)
    frames = int(args.seconds * 1000 / 20) + 1
    rng = np.random.default_rng(0)
    dim = model.encoder.config.d_model

    rows = [
        {
            "n_frames": frames,
            "encoder_states": rng.standard_normal((frames, dim), dtype=np.float32),
            "text_ids": rng.integers(0, 1000, args.answer_tokens),
            "text": "",
        }
        for _ in range(2 * args.batch_size * accelerator.num_processes)
    ]
    # Batches are global and split across processes (as in training); DeepSpeed's "auto"
    # micro-batch reads the dataloader's integer batch_size. Packed: each process's share of the
    # batch in one row (its rows are all of one length, so only the layout differs).
    loader = torch.utils.data.DataLoader(
        rows, batch_size=args.batch_size * accelerator.num_processes, collate_fn=collate
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if args.packed:
        mine = rows[accelerator.process_index :: accelerator.num_processes]
        device_batches = [
            {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in packed_collate(part).items()}
            for part in (mine[: args.batch_size], mine[args.batch_size : 2 * args.batch_size])
        ]
    else:
        device_batches = list(loader)
    positions = device_batches[0]["input_ids"].shape[-1] * device_batches[0]["input_ids"].shape[0]
    row_length = device_batches[0]["input_ids"].shape[-1]
    labels = device_batches[0]["labels"][:, :, 1:]
    stream_tokens = [float((labels[:, s] != IGNORE).sum()) for s in range(labels.shape[1])]
    speech_positions = float(device_batches[0]["audio_mask"].sum())
    squared_lengths = float(squared_sample_lengths(device_batches[0]).sum())
    step_times = []
    for step in range(args.warmup + args.steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(**model_inputs(device_batches[step % 2]))
        accelerator.backward(out["loss"])
        optimizer.step()
        optimizer.zero_grad()
        loss = float(out["loss"].detach())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
    seconds = float(np.median(step_times))
    flops = step_flops.of_step(
        positions=positions,
        squared_lengths=squared_lengths,
        stream_tokens=stream_tokens,
        speech_positions=speech_positions,
    )
    rates = throughput(flops, seconds, 1, device_peak_tflops(accelerator.device))  # per process
    figures = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "processes": accelerator.num_processes,
        "distributed": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "stage": args.stage,
        "params": {k: {"total": t, "trainable": n} for k, (t, n) in summary.items()},
        "batch_per_process": args.batch_size,
        "batch_from_memory_estimate": budget is not None,
        "estimated_budget_positions": budget,
        "packed": args.packed,
        "attn": args.attn,
        "checkpointing": args.checkpointing,
        "compile": args.compile,
        "loss_chunk_mb": args.loss_chunk_mb,
        "positions_per_sample": positions // args.batch_size,
        "step_seconds_median": seconds,
        "tokens_per_second_per_process": positions / seconds,
        "model_tflops_per_s_per_process": rates["model_tflops_per_s"],
        "mfu": rates.get("mfu"),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "estimated_peak_gib": (states.gpu_total + activations.bytes(positions, row_length)) / 2**30,
        "estimate_profile": states.profile,
        "last_loss": loss,
    }
    if accelerator.is_main_process:
        print(json.dumps(figures, indent=2))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
