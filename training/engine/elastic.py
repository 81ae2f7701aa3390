"""Resuming a checkpoint on a different number of processes than wrote it (N -> M).

What carries over, and how:
- The data position: `batches_in_epoch` counts GLOBAL batches (batch_size is global and split
  across processes), and the sampler's order depends on (seed, epoch) only, so the rest of the
  epoch is each remaining row exactly once whatever the world size.
- The LR: a function of the step, as on any resume.
- Model and optimizer state. Without DeepSpeed (one process or DDP) every process holds the whole
  model and optimizer, and `save_state` wrote one copy: it loads on any number of processes.
  Under ZeRO-2/3 each rank wrote its own shard of the optimizer (ZeRO-3: of the weights too), which
  DeepSpeed refuses to load on another world size. The checkpoint is converted once, by rank 0, to
  DeepSpeed's universal checkpoint (one file per parameter and state, unpartitioned), written beside
  the shards in `<checkpoint>/universal/`, and every rank loads its new shard from it.
- Random states: a rank that did not exist when the checkpoint was written starts its own (the
  training step draws no random numbers: dropout is off in every stage).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from training.common import LogFn
from training.engine.context import StageOrderError
from training.engine.rank_zero import rank_zero_first

DEEPSPEED_TAG = "pytorch_model"  # the folder accelerate's save_state gives the DeepSpeed engine's checkpoint
UNIVERSAL = "universal"


def saved_world_size(path: Path, state: dict) -> int:
    """Processes that wrote checkpoint `path` (recorded; for older checkpoints, their RNG files)."""
    return int(state.get("num_processes") or len(list(path.glob("random_states_*.pkl"))) or 1)


def check_same_engine(accelerator: Accelerator, path: Path) -> None:
    """A ZeRO checkpoint needs a DeepSpeed profile to resume, and a plain one a non-DeepSpeed profile."""
    written_by_deepspeed = (path / DEEPSPEED_TAG).is_dir()
    running_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if written_by_deepspeed != running_deepspeed:
        was, now = ("DeepSpeed ZeRO", "a non-DeepSpeed") if written_by_deepspeed else ("a non-DeepSpeed", "DeepSpeed")
        raise StageOrderError(
            f"checkpoint {path} was written by {was} profile and this run uses {now} one: resume it with "
            f"the profile that wrote it (any number of processes), or start the stage afresh in a new --output-dir"
        )


def load_on_new_world_size(accelerator: Accelerator, path: Path, saved: int, log: LogFn) -> None:
    """`accelerator.load_state(path)` for a checkpoint written by `saved` processes (!= this run's)."""
    now = accelerator.num_processes
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        log(f"resuming a checkpoint of {saved} process(es) on {now}: model and optimizer are whole in it")
        accelerator.load_state(str(path))
        return
    universal = path / UNIVERSAL
    with rank_zero_first(accelerator, f"converting {path.name} to a universal checkpoint"):
        if accelerator.is_main_process and not (universal / DEEPSPEED_TAG).is_dir():
            log(f"resuming a ZeRO checkpoint of {saved} process(es) on {now}: converting it to a universal checkpoint")
            _convert(path, universal)
    engines = [m for m in accelerator._models if hasattr(m, "load_universal_checkpoint")]
    # ZeRO-3's universal load gives every param group the first group's hyperparameters (so the
    # no-decay group would decay); the recipe fixes them and the fingerprint check kept it unchanged,
    # so the values this run built are put back
    hyperparameters = [[_hyper(g) for g in opt.param_groups] for opt in accelerator._optimizers]
    for engine in engines:  # DeepSpeed reads this flag when it loads
        engine._config.load_universal_checkpoint = True
    try:
        accelerator.load_state(str(universal))
    finally:
        for engine in engines:  # later loads are of ordinary checkpoints
            engine._config.load_universal_checkpoint = False
    for opt, groups in zip(accelerator._optimizers, hyperparameters):
        for group, values in zip(opt.param_groups, groups):
            group.update(values)
        # ... and hands every parameter partition one shared `step` tensor, which fused Adam then
        # increments once per partition and step: each gets its own
        for state in _torch_optimizer(opt).state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
    log(f"model and optimizer state re-partitioned over {now} process(es) from {universal}")


def _torch_optimizer(opt) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's and DeepSpeed's wrappers."""
    while not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def _convert(path: Path, universal: Path) -> None:
    """DeepSpeed's own converter, in a child process; written to a temporary folder, then renamed."""
    tmp = universal.with_name(f".{UNIVERSAL}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(path / DEEPSPEED_TAG),
        "--output_folder",
        str(tmp / DEEPSPEED_TAG),
        "--inject_missing_state",  # a model outside Megatron carries no universal-checkpoint info
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise StageOrderError(f"converting {path} to a universal checkpoint failed:\n{tail}")
    for rng in path.glob("random_states_*.pkl"):  # the ranks that existed keep their random states
        shutil.copy2(rng, tmp / rng.name)
    shutil.rmtree(universal, ignore_errors=True)
    tmp.rename(universal)
