"""Building, loading and saving the Omni model, and choosing what a stage trains.

The pretrained parts load by local path or hub id through transformers, the same way for the
real checkpoints (openai/whisper-small, Qwen/Qwen2-0.5B) and for the demo's tiny stand-ins.
A stage-final export (``save_omni``) reloads with ``load_omni``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2ForCausalLM, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from training.model.omni import OmniConfig, OmniModel
from training.speech.layout import VocabLayout

OMNI_CONFIG = "omni_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


@contextmanager
def outside_zero3_init() -> Iterator[None]:
    """Load whole weights even under a ZeRO-3 launch (no deepspeed.zero.Init): Whisper's weight
    init computes its sinusoidal positions from the parameter's shape, which is empty once
    partitioned, and growing the vocabulary reads the pretrained rows. Whisper-small and
    Qwen2-0.5B fit any host; accelerator.prepare() then shards them across ranks."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_encoder(path: str) -> tuple[WhisperEncoder, WhisperFeatureExtractor]:
    """A Whisper encoder and its feature extractor from a checkpoint folder or hub id."""
    whisper = WhisperModel.from_pretrained(path)
    encoder = whisper.get_encoder()
    del whisper.decoder
    return encoder, WhisperFeatureExtractor.from_pretrained(path)


def row_tables(llm: Qwen2ForCausalLM) -> list[torch.Tensor]:
    """The input embedding and output projection weights, once each (Qwen2-0.5B ties them)."""
    weights = (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight)
    return list({id(w): w for w in weights}.values())


def grow_vocabulary(llm: Qwen2ForCausalLM, layout: VocabLayout) -> None:
    """Grow the LLM's embedding and output rows to Mini-Omni's vocabulary. New rows start at the
    mean of the pretrained rows: a neutral point that keeps the first steps' logits sane."""
    old = llm.get_input_embeddings().weight.shape[0]
    if old == layout.total:
        return
    if old != layout.text_vocab:
        raise ValueError(f"LLM has {old} embedding rows; expected {layout.text_vocab} (text) or {layout.total} (grown)")
    llm.resize_token_embeddings(layout.total, mean_resizing=False)
    with torch.no_grad():
        for weight in row_tables(llm):
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)


def build_model(
    encoder_path: str,
    llm_path: str,
    frame_stack: int,
    adapter_hidden: int | None = None,
) -> tuple[OmniModel, PreTrainedTokenizerBase, WhisperFeatureExtractor]:
    """The untrained pipeline: pretrained encoder and LLM (grown vocab), fresh adapter."""
    with outside_zero3_init():
        encoder, feature_extractor = load_encoder(encoder_path)
        llm = Qwen2ForCausalLM.from_pretrained(llm_path)
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    text_vocab = llm.config.vocab_size
    layout = VocabLayout(text_vocab=text_vocab)
    grow_vocabulary(llm, layout)
    config = OmniConfig.for_parts(
        str(encoder_path), encoder.config.d_model, text_vocab, llm.config.hidden_size, frame_stack, adapter_hidden
    )
    return OmniModel(encoder, llm, config), tokenizer, feature_extractor


def save_omni(
    model: OmniModel,
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    feature_extractor: WhisperFeatureExtractor,
    llm_state: dict | None = None,
    adapter_state: dict | None = None,
) -> None:
    """Hugging Face-style export: llm/ (grown vocab) + tokenizer, adapter weights, the encoder's
    reference and feature extractor, and omni_config.json describing the whole model.
    llm_state/adapter_state: whole weights gathered from a sharded (ZeRO-3) model."""
    path.mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(path / "llm", state_dict=llm_state)
    tokenizer.save_pretrained(path / "llm")
    feature_extractor.save_pretrained(path)
    adapter_state = model.adapter.state_dict() if adapter_state is None else adapter_state
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state.items()}, path / ADAPTER_WEIGHTS)
    (path / OMNI_CONFIG).write_text(json.dumps(asdict(model.config), indent=2))


def is_omni_export(path: str | Path) -> bool:
    return (Path(path) / OMNI_CONFIG).is_file()


def load_omni(path: str | Path) -> tuple[OmniModel, PreTrainedTokenizerBase, WhisperFeatureExtractor]:
    """Reload a stage-final export (model, tokenizer, feature extractor)."""
    path = Path(path)
    if not is_omni_export(path):
        raise FileNotFoundError(f"{path}: not a stage export (no {OMNI_CONFIG})")
    config = OmniConfig(**json.loads((path / OMNI_CONFIG).read_text()))
    with outside_zero3_init():
        encoder, _ = load_encoder(config.encoder)
        llm = Qwen2ForCausalLM.from_pretrained(path / "llm")
    model = OmniModel(encoder, llm, config)
    model.adapter.load_state_dict(load_file(path / ADAPTER_WEIGHTS))
    return model, AutoTokenizer.from_pretrained(path / "llm"), WhisperFeatureExtractor.from_pretrained(path)


def set_trainable(model: OmniModel, modules: Iterable[str], train_text_specials: bool = False) -> None:
    """requires_grad per module; the encoder is frozen in every stage.

    train_text_specials (with the LLM frozen): the embedding and output rows of the 64 new text
    specials train too; a gradient mask zeroes every other row's gradient, and with no weight decay
    on embeddings (see optimizer_groups) Adam leaves those rows bit-identical.
    """
    modules = set(modules)
    model.encoder.requires_grad_(False)
    model.adapter.requires_grad_("adapter" in modules)
    model.llm.requires_grad_("llm" in modules)
    if train_text_specials and "llm" not in modules:
        layout = model.layout
        for weight in row_tables(model.llm):
            mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
            mask[layout.text_vocab : layout.text_size] = 1
            weight.requires_grad_(True)
            weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))
    model.special_rows_only = train_text_specials and "llm" not in modules


def parameter_summary(model: OmniModel) -> dict[str, tuple[int, int]]:
    """module -> (total, trainable) parameter counts (masked rows do not count as trainable)."""
    out = {}
    for name in ("encoder", "adapter", "llm"):
        params = list(getattr(model, name).parameters())
        out[name] = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
    if getattr(model, "special_rows_only", False):
        rows = model.layout.text_size - model.layout.text_vocab
        out["llm"] = (out["llm"][0], sum(rows * w.shape[1] for w in row_tables(model.llm)))
    return out


def optimizer_groups(model: OmniModel, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only; no decay on norms, biases and embeddings; no empty groups."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = "embed_tokens" in name or "lm_head" in name
        (no_decay if param.ndim < 2 or is_embedding else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
