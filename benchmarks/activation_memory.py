"""The activation estimate (model/memory.py) against a real training step's peak memory, on the CPU.

Qwen2-0.5B's decoder layers (width 896, MLP 4,864, 14 heads, 2 key-value heads; `--layers` of its
24, default 4) and its text stream's output slice (151,936 + 64 rows), fp32, training: a micro-batch
of `--rows` x `--row-length` positions (default 4 x 256, the last position of each row padding)
goes forward through the layers and the chunked loss (model/loss.py, loss_chunk_mb 256), then
backward. The peak is the process's resident high-water mark above what it held with the model and
inputs built, less the parameters' gradients (model state, which the estimate counts apart).
Each side runs in a fresh process (`in_a_fresh_process`, which tests/test_memory.py also runs on
small configs), where malloc maps every block of 128 KiB or more on its own and unmaps it when
freed: the mark is then the live tensors' peak, as torch.cuda.max_memory_allocated is on a GPU,
not what malloc keeps for reuse (which varied by ~10 % from run to run; like the CUDA caching
allocator's, it is the budget's 10 % allowance's to cover).

    python benchmarks/activation_memory.py [--layers 4] [--rows 4] [--row-length 256] [--checkpointing]

Prints:
    estimated / measured peak activation memory: X.XX
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXT_WIDTH = 151_936 + 64
CHUNK_MB = 256.0


def qwen2_05b_layers(layers: int) -> dict:
    """Qwen2-0.5B's published config with `layers` of its decoder layers."""
    raw = json.loads((ROOT / "configs" / "qwen2-0.5b" / "config.json").read_text())
    raw.pop("layer_types", None)  # one per layer: rebuilt for the depth asked
    return raw | {"num_hidden_layers": layers}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(raw: dict, rows: int, row_length: int, checkpointing: bool, text_width: int = TEXT_WIDTH) -> int:
    """One real step in this process: peak bytes above the built model and inputs, less gradients."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, Qwen2Config

    from training.model.loss import chunk_positions, stream_cross_entropy

    torch.manual_seed(0)
    config = Qwen2Config(**raw)
    config.vocab_size = 64  # the input comes as embeddings; the output rows are `head` below
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    head = torch.nn.Parameter(torch.randn(text_width, config.hidden_size) * 0.02)
    x = torch.randn(rows, row_length, config.hidden_size, requires_grad=True)
    mask = torch.ones(rows, row_length, dtype=torch.long)
    mask[:, -1] = 0
    target = torch.randint(0, text_width, (rows * row_length,))
    trainable = sum(p.numel() for p in model.parameters()) + head.numel() + x.numel()
    baseline = _status_kb("VmRSS")
    hidden = model.model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
    ce, _ = stream_cross_entropy(
        lambda h: F.linear(h, head),
        hidden.reshape(-1, config.hidden_size),
        target,
        chunk_positions(CHUNK_MB, text_width),
    )
    ce.mean().backward()
    return (_status_kb("VmHWM") - baseline) * 1024 - 4 * trainable


def estimate(
    raw: dict, rows: int, row_length: int, checkpointing: bool, text_width: int = TEXT_WIDTH
) -> tuple[int, float]:
    """The estimate's peak activation bytes for the step `measure` runs, and its bytes per position."""
    import torch
    from transformers import Qwen2Config

    from training.model.memory import measure_activations

    activations = measure_activations(
        Qwen2Config(**raw), "sdpa", checkpointing, dtype=torch.float32, loss_chunk_mb=CHUNK_MB, text_width=text_width
    )
    return activations.bytes(rows * row_length, row_length), activations.per_position()


def in_a_fresh_process(
    side: str, raw: dict, rows: int, row_length: int, checkpointing: bool, text_width: int = TEXT_WIDTH
):
    """`measure` or `estimate` run by this script in a new process: a resident high-water mark
    that starts from nothing else this process did."""
    command = [sys.executable, __file__, "--side", side, "--config", json.dumps(raw), "--rows", str(rows)]
    command += ["--row-length", str(row_length), "--text-width", str(text_width)]
    command += ["--checkpointing"] if checkpointing else []
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # fixed: glibc raises it as blocks are freed
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--row-length", type=int, default=256)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--text-width", type=int, default=TEXT_WIDTH, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)  # a Qwen2 config as JSON, in place of --layers
    parser.add_argument("--side", choices=["measure", "estimate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    raw = json.loads(args.config) if args.config else qwen2_05b_layers(args.layers)
    shape = (raw, args.rows, args.row_length, args.checkpointing, args.text_width)
    if args.side:
        print(json.dumps({"measure": measure, "estimate": estimate}[args.side](*shape)))
        return
    (estimated, per_position), measured = (in_a_fresh_process(side, *shape) for side in ("estimate", "measure"))
    print(
        f"Qwen2-0.5B layers x {args.layers}, fp32, {args.rows} rows x {args.row_length} positions, "
        f"text output {TEXT_WIDTH:,} rows, loss_chunk_mb {CHUNK_MB:g}"
        + (", activation checkpointing" if args.checkpointing else "")
    )
    print(f"estimated: {estimated / 2**20:,.0f} MiB ({per_position / 2**10:,.1f} KiB per position + the loss's chunk)")
    print(f" measured: {measured / 2**20:,.0f} MiB (resident high-water mark, gradients excluded)")
    print(f"estimated / measured peak activation memory: {estimated / measured:.2f}")


if __name__ == "__main__":
    main()
