"""Mini-Omni's litgpt checkpoint layout, both ways: parameter names, the fused grouped-query QKV
tensor, the adapter's names, the config keys their `Config` reads, and what cannot be mapped.
Folders and the CLI: training/model/export.py (its docstring has the full table)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import Qwen2Config

from training.model import OMNI_CONFIG, OmniModel
from training.speech.layout import N_AUDIO_LAYERS

WHISPER_SMALL = {
    "d_model": 768,
    "encoder_layers": 12,
    "encoder_attention_heads": 12,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
}
ADAPTER_NAMES = {"gate": "fc_1", "up": "fc_2", "down": "proj"}
LAYER_NAMES = {  # ours (under model.layers.L.) -> theirs (under transformer.h.L.), fused q/k/v apart
    "input_layernorm.weight": "norm_1.weight",
    "self_attn.o_proj.weight": "attn.proj.weight",
    "post_attention_layernorm.weight": "norm_2.weight",
    "mlp.gate_proj.weight": "mlp.fc_1.weight",
    "mlp.up_proj.weight": "mlp.fc_2.weight",
    "mlp.down_proj.weight": "mlp.proj.weight",
}


class ExportError(ValueError):
    """The model cannot be written in (or read from) the requested format; the message says why."""


# ---------------------------------------------------------------------------------------------
# Fused QKV, grouped-query layout


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int, n_groups: int) -> torch.Tensor:
    """[q; k; v] rows (weights [rows, d] or biases [rows]) -> litgpt's group-interleaved rows."""
    head = k.shape[0] // n_groups
    rest = q.shape[1:]
    per_group = [t.reshape(n_groups, -1, *rest) for t in (q, k, v)]  # q: [g, q_per_kv*hs], k/v: [g, hs]
    if per_group[0].shape[1] != (n_head // n_groups) * head:
        raise ExportError(f"q has {q.shape[0]} rows; expected {n_head} heads x {head}")
    return torch.cat(per_group, dim=1).reshape(-1, *rest).contiguous()


def split_qkv(fused: torch.Tensor, n_head: int, n_groups: int, head: int) -> tuple[torch.Tensor, ...]:
    """The inverse of fuse_qkv."""
    q_per_kv = n_head // n_groups
    rest = fused.shape[1:]
    grouped = fused.reshape(n_groups, (q_per_kv + 2) * head, *rest)
    q, k, v = grouped.split([q_per_kv * head, head, head], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


# ---------------------------------------------------------------------------------------------
# Our model -> Mini-Omni


def _llm_shape(config: Qwen2Config) -> tuple[int, int, int]:
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, groups, head


def check_compatible(model: OmniModel, llm_config: Qwen2Config, allow_encoder_mismatch: bool) -> list[str]:
    """Raise ExportError where Mini-Omni's model cannot hold ours; return warnings."""
    cfg = model.config
    problems = []
    if cfg.frame_stack != 1:
        problems.append(
            f"{OMNI_CONFIG} frame_stack is {cfg.frame_stack}: Mini-Omni's adapter reads one encoder frame "
            "per position (frame_stack 1)"
        )
    if cfg.adapter_hidden != llm_config.intermediate_size:
        problems.append(
            f"{OMNI_CONFIG} adapter_hidden is {cfg.adapter_hidden}: Mini-Omni's adapter (whisperMLP) is as "
            f"wide as the LLM's intermediate_size, {llm_config.intermediate_size}"
        )
    if llm_config.hidden_act != "silu":
        problems.append(f"llm/config.json hidden_act is {llm_config.hidden_act!r}; litgpt's LLaMAMLP uses silu")
    if getattr(llm_config, "use_sliding_window", False):
        problems.append("llm/config.json use_sliding_window is true; Mini-Omni's litgpt has no sliding window")
    rope = getattr(llm_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"llm/config.json rope type {rope.get('rope_type')!r}; Mini-Omni's litgpt has plain RoPE only")
    layer = model.llm.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    if (
        any(p.bias is None for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        or attn.o_proj.bias is not None
        or any(p.bias is not None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    ):
        problems.append("llm: Mini-Omni's config has biases on q/k/v only (add_qkv_bias), none elsewhere")
    if problems:
        raise ExportError("cannot export to Mini-Omni's format:\n  " + "\n  ".join(problems))
    warnings = []
    enc = model.encoder.config
    differs = {k: getattr(enc, k) for k, v in WHISPER_SMALL.items() if getattr(enc, k) != v}
    if differs:
        message = (
            f"encoder {cfg.encoder} is not whisper-small ({differs}); Mini-Omni's inference.py always runs "
            "openai-whisper 'small', so this export would see other features than it was trained on"
        )
        if not allow_encoder_mismatch:
            raise ExportError(message + " (pass --allow-encoder-mismatch to write it anyway)")
        warnings.append(message)
    return warnings


def lit_state_dict(model: OmniModel) -> dict[str, torch.Tensor]:
    """Our LLM + adapter under Mini-Omni's litgpt names. Every LLM and adapter tensor is used once
    (a tied output layer is the embedding); anything unmapped raises."""
    llm = model.llm
    heads, groups, _ = _llm_shape(llm.config)
    ours = dict(llm.named_parameters(remove_duplicate=False))
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return ours[name].detach()

    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": take("model.embed_tokens.weight"),
        "lm_head.weight": take("lm_head.weight"),
        "transformer.ln_f.weight": take("model.norm.weight"),
    }
    for i in range(llm.config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (take(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv")
            out[f"{dst}attn.attn.{kind}"] = fuse_qkv(q, k, v, heads, groups)
        for ours_name, theirs in LAYER_NAMES.items():
            out[dst + theirs] = take(src + ours_name)
    left = sorted(set(ours) - used)
    if left:
        raise ExportError(f"LLM tensors with no place in Mini-Omni's format (not written): {left}")
    adapter = dict(model.adapter.named_parameters())
    if set(adapter) != {f"{n}.weight" for n in ADAPTER_NAMES}:
        raise ExportError(f"adapter tensors {sorted(adapter)} do not map onto whisper_adapter.fc_1/fc_2/proj")
    for ours_name, theirs in ADAPTER_NAMES.items():
        out[f"whisper_adapter.{theirs}.weight"] = adapter[f"{ours_name}.weight"].detach()
    return out


def lit_config(model: OmniModel, block_size: int) -> dict:
    """model_config.yaml: only fields of Mini-Omni's litgpt Config dataclass (it rejects others)."""
    c = model.llm.config
    heads, groups, head = _llm_shape(c)
    layout = model.layout
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None))
    return {
        "name": "omni-stage-export",  # litgpt adds Gemma's norm offset when the name says Gemma
        "block_size": block_size,
        "vocab_size": layout.total,
        "padded_vocab_size": layout.total,
        "n_layer": c.num_hidden_layers,
        "n_head": heads,
        "n_query_groups": groups,
        "head_size": head,
        "n_embd": c.hidden_size,
        "rotary_percentage": 1.0,
        "rope_base": int(rope) if float(rope).is_integer() else float(rope),
        "parallel_residual": False,
        "shared_attention_norm": False,
        "bias": False,
        "add_qkv_bias": True,
        "lm_head_bias": False,
        "norm_class_name": "RMSNorm",
        "norm_eps": float(c.rms_norm_eps),
        "mlp_class_name": "LLaMAMLP",
        "intermediate_size": c.intermediate_size,
        "scale_embeddings": False,
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "text_vocab_size": layout.text_size,
        "audio_vocab_size": layout.audio_size,
        "cat_audio_vocab_size": N_AUDIO_LAYERS * layout.audio_size,
        "whisper_adapter_dim": model.config.adapter_in,
        "asr_adapter": "llamamlp",
        "post_adapter": False,
    }


def qwen2_config(lit: dict, sidecar: dict) -> Qwen2Config:
    if "llm_config" in sidecar:
        return Qwen2Config(**{k: v for k, v in sidecar["llm_config"].items() if k not in ("architectures",)})
    return Qwen2Config(
        vocab_size=lit["padded_vocab_size"],
        hidden_size=lit["n_embd"],
        intermediate_size=lit["intermediate_size"],
        num_hidden_layers=lit["n_layer"],
        num_attention_heads=lit["n_head"],
        num_key_value_heads=lit["n_query_groups"],
        rms_norm_eps=lit["norm_eps"],
        rope_theta=lit["rope_base"],
        tie_word_embeddings=lit.get("tie_word_embeddings", False),
        max_position_embeddings=lit["block_size"],
    )


def hf_tensors(state: dict[str, torch.Tensor], config: Qwen2Config) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(our name, tensor, their name) for every LLM tensor."""
    heads, groups, head = _llm_shape(config)
    yield "model.embed_tokens.weight", state["transformer.wte.weight"], "transformer.wte.weight"
    yield "lm_head.weight", state["lm_head.weight"], "lm_head.weight"
    yield "model.norm.weight", state["transformer.ln_f.weight"], "transformer.ln_f.weight"
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            name = f"{src}attn.attn.{kind}"
            for p, t in zip("qkv", split_qkv(state[name], heads, groups, head)):
                yield f"{dst}self_attn.{p}_proj.{kind}", t, name
        for ours, theirs in LAYER_NAMES.items():
            yield dst + ours, state[src + theirs], src + theirs
