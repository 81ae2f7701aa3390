"""MFU: a training step's model FLOPs per second over the devices' dense bf16 peak.

The FLOPs are model/flops.py's count (StepFlops), the one the dry run uses too: the useful work,
without padding, the embedding lookup or the frozen encoder. The peak comes from a small table by
device name, or from OMNI_STAGE_PEAK_TFLOPS (TFLOP/s per device) for a device it lacks; without a
peak (CPU, or a GPU the table lacks) only the achieved TFLOP/s is logged.
"""

from __future__ import annotations

import os
import re

import torch

from training.model.flops import StepFlops

__all__ = ["PEAK_BF16_TFLOPS", "PEAK_ENV", "StepFlops", "device_peak_tflops", "peak_tflops_of", "throughput"]

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, keyed by the words of a device name that
# identify the model: every word must appear whole in the name, so an L40 is not taken for an L4
# nor an H20 for an H200; a key of more words (a variant) wins over its model's plain key.
PEAK_BF16_TFLOPS: dict[tuple[str, ...], float] = {
    ("B200",): 2250.0,
    ("GH200",): 989.0,
    ("H200",): 989.0,
    ("H200", "NVL"): 835.0,
    ("H100",): 989.0,
    ("H100", "PCIE"): 756.0,
    ("H100", "NVL"): 835.0,
    ("H800",): 989.0,
    ("H800", "PCIE"): 756.0,
    ("A100",): 312.0,
    ("A800",): 312.0,
    ("L40S",): 362.0,
    ("L40",): 181.0,
    ("L4",): 121.0,
}
PEAK_ENV = "OMNI_STAGE_PEAK_TFLOPS"


def peak_tflops_of(device_name: str) -> float | None:
    """Dense bf16 peak of the GPU torch.cuda.get_device_name names ("NVIDIA H100 80GB HBM3",
    "NVIDIA A100-SXM4-80GB", "NVIDIA L40S"), TFLOP/s; None for a name the table lacks."""
    words = set(re.split(r"[^0-9A-Z]+", device_name.upper()))
    matches = [key for key in PEAK_BF16_TFLOPS if words.issuperset(key)]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None


def device_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of one device, TFLOP/s; None when unknown (CPU, or a GPU not in the table)."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


def throughput(flops: float, seconds: float, processes: int, peak_tflops: float | None) -> dict[str, float]:
    """Model TFLOP/s per device over `seconds`, and MFU where the device's peak is known."""
    tflops = flops / seconds / processes / 1e12
    return {"model_tflops_per_s": tflops, **({"mfu": tflops / peak_tflops} if peak_tflops else {})}
