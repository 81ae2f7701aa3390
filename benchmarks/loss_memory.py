"""Peak memory of the training loss at the real vocabulary: chunked logits against all at once.

Mini-Omni's output layer at Qwen2-0.5B's width (896), grown to 181,120 rows: the text stream's
slice (151,936 + 64 specials) and seven audio slices of 4,160. `--positions` labelled positions
(default 4,096), each scored in all eight streams as in a speech-answer batch, through
model/loss.py's stream_cross_entropy: forward and backward, the output weights training (the
`final` stage). Each side runs in a fresh process; its peak is the process's resident high-water
mark above what it held once the inputs were built. CPU, fp32.

    python benchmarks/loss_memory.py [--positions 4096] [--chunk-mb 256]

Prints:
    peak memory ratio (chunked / full logits): X.XX
    max abs loss difference: X
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN = 896
TEXT_WIDTH = 151_936 + 64
AUDIO_WIDTH = 4_160
STREAMS = [TEXT_WIDTH] + [AUDIO_WIDTH] * 7


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(positions: int, chunk_mb: float) -> dict:
    """One side, in this process: per-stream mean losses and the peak above the inputs (bytes)."""
    import torch
    import torch.nn.functional as F

    from training.model.loss import chunk_positions, stream_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(positions, HIDDEN, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(sum(STREAMS), HIDDEN) * 0.02)
    targets = [torch.randint(0, w, (positions,)) for w in STREAMS]
    baseline = _status_kb("VmRSS")
    losses, start = [], 0
    for width, target in zip(STREAMS, targets):
        rows = slice(start, start + width)
        ce, _ = stream_cross_entropy(
            lambda h, rows=rows: F.linear(h, weight[rows]), hidden, target, chunk_positions(chunk_mb, width)
        )
        losses.append(ce.mean())
        start += width
    torch.stack(losses).mean().backward()
    peak = _status_kb("VmHWM")
    return {"losses": [float(x) for x in losses], "peak_bytes": (peak - baseline) * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--chunk-mb", type=float, default=256.0, help="the recipe's loss_chunk_mb")
    parser.add_argument("--side", type=float, default=None, help=argparse.SUPPRESS)  # a child's chunk_mb
    args = parser.parse_args()
    if args.side is not None:
        print(json.dumps(measure(args.positions, args.side)))
        return
    sides = {}
    for name, chunk_mb in (("full logits", 0.0), ("chunked", args.chunk_mb)):
        command = [sys.executable, __file__, "--positions", str(args.positions), "--side", str(chunk_mb)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        sides[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:>12}: peak {sides[name]['peak_bytes'] / 2**30:.2f} GiB above the inputs")
    full, chunked = sides["full logits"], sides["chunked"]
    print(f"{args.positions:,} positions x 8 streams, vocabulary {sum(STREAMS):,} rows, chunks of {args.chunk_mb:g} MB")
    print(f"peak memory ratio (chunked / full logits): {chunked['peak_bytes'] / full['peak_bytes']:.2f}")
    print(f"max abs loss difference: {max(abs(a - b) for a, b in zip(full['losses'], chunked['losses'])):.2e}")


if __name__ == "__main__":
    main()
