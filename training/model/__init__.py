"""The model: Whisper encoder + gated-MLP adapter + Qwen2 with Mini-Omni's 8-stream vocabulary.

  omni.py       the architecture and its loss (OmniModel, OmniConfig, model_inputs)
  build.py      building from pretrained parts, growing the vocabulary, saving/loading a stage
                export, what a stage trains (set_trainable, optimizer_groups)
  decoding.py   batched decoding of text + 7 SNAC streams with a KV cache (greedy or sampled,
                batch-parallel, our rules or Mini-Omni's)
  inference.py  one question answered: speech out as a WAV, whole or streamed (CLI)
  export.py     Mini-Omni's litgpt checkpoint and a Hugging Face folder, both ways (CLI)
  litgpt.py     Mini-Omni's litgpt names, fused QKV layout and config keys (used by export.py)
  dry_run.py    the model on the meta device: parameters, memory per GPU, tokens per step
  flops.py      the FLOPs of a training step (the MFU's count) and of the frozen encoder's forward
                (the dry run's data cost)
  memory.py     model states per profile, activations measured from the LLM's own layers, the
                largest token budget that fits
  untrained.py  random-weight checkpoints of given shapes, saved like real ones (tests, benchmarks)

May import training.stages, training.common and training.speech; never the engine, the data path
or the demo.
"""

from training.model.build import (
    ADAPTER_WEIGHTS,
    OMNI_CONFIG,
    build_model,
    grow_vocabulary,
    is_omni_export,
    load_encoder,
    load_omni,
    optimizer_groups,
    outside_zero3_init,
    parameter_summary,
    row_tables,
    save_omni,
    set_trainable,
)
from training.model.omni import MODEL_KEYS, GatedAdapter, OmniConfig, OmniModel, model_inputs

__all__ = [
    "ADAPTER_WEIGHTS",
    "MODEL_KEYS",
    "OMNI_CONFIG",
    "GatedAdapter",
    "OmniConfig",
    "OmniModel",
    "build_model",
    "grow_vocabulary",
    "is_omni_export",
    "load_encoder",
    "load_omni",
    "model_inputs",
    "optimizer_groups",
    "outside_zero3_init",
    "parameter_summary",
    "row_tables",
    "save_omni",
    "set_trainable",
]
