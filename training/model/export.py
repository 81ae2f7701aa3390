"""Export a stage-final model (a `save_omni` folder) for Mini-Omni's inference code, or as a plain
Hugging Face folder; and read a Mini-Omni export back.

    python -m training.model.export --from runs/demo/final/final --to out/mini-omni --format mini-omni
    python -m training.model.export --from runs/demo/final/final --to out/hf --format hf
    python -m training.model.export --from out/mini-omni --to out/back --format omni   # the way back

`--format mini-omni` writes what Mini-Omni's `inference.py` loads (`Config.from_file(ckpt_dir +
"/model_config.yaml")`, `GPT(config)`, `load_state_dict(lazy_load(ckpt_dir + "/lit_model.pth"),
strict=True)`, `Tokenizer(ckpt_dir)`): `lit_model.pth` (their litgpt parameter names),
`model_config.yaml` (only keys their `Config` dataclass accepts), the LLM's tokenizer files, and
`omni_export.json` (ours: encoder reference and the original LLM config, for the way back).

Name mapping (L = layer index; shapes for Qwen2-0.5B + Mini-Omni's adapter):

| ours (save_omni folder)                          | lit_model.pth                        | shape          |
|--------------------------------------------------|--------------------------------------|----------------|
| llm: model.embed_tokens.weight                   | transformer.wte.weight               | [181120, 896]  |
| llm: lm_head.weight (same tensor when tied)      | lm_head.weight                       | [181120, 896]  |
| llm: model.layers.L.input_layernorm.weight       | transformer.h.L.norm_1.weight        | [896]          |
| llm: model.layers.L.self_attn.{q,k,v}_proj.weight| transformer.h.L.attn.attn.weight     | [1152, 896]    |
| llm: model.layers.L.self_attn.{q,k,v}_proj.bias  | transformer.h.L.attn.attn.bias       | [1152]         |
| llm: model.layers.L.self_attn.o_proj.weight      | transformer.h.L.attn.proj.weight     | [896, 896]     |
| llm: model.layers.L.post_attention_layernorm.weight | transformer.h.L.norm_2.weight     | [896]          |
| llm: model.layers.L.mlp.gate_proj.weight         | transformer.h.L.mlp.fc_1.weight      | [4864, 896]    |
| llm: model.layers.L.mlp.up_proj.weight           | transformer.h.L.mlp.fc_2.weight      | [4864, 896]    |
| llm: model.layers.L.mlp.down_proj.weight         | transformer.h.L.mlp.proj.weight      | [896, 4864]    |
| llm: model.norm.weight                           | transformer.ln_f.weight              | [896]          |
| adapter.safetensors: gate.weight                 | whisper_adapter.fc_1.weight          | [4864, 768]    |
| adapter.safetensors: up.weight                   | whisper_adapter.fc_2.weight          | [4864, 768]    |
| adapter.safetensors: down.weight                 | whisper_adapter.proj.weight          | [896, 4864]    |
| encoder (frozen, never trained)                  | not in the file: inference.py loads openai-whisper "small" itself |

Fused QKV (the litgpt version Mini-Omni ships views the projection as [groups, q_per_kv + 2,
head_size]): rows go group by group, each group holding its q_per_kv query heads, then its key
head, then its value head. Qwen2-0.5B: 2 groups x (7 q + 1 k + 1 v) x 64 = 1152 rows. Query head
h belongs to group h // q_per_kv, as in Hugging Face's repeat_kv. Biases are fused the same way.

Where the two models cannot agree, the export stops with an error naming the field instead of
writing something that would load and compute something else:
- adapter: theirs (`asr_adapter: llamamlp`, `whisperMLP`) is the same SwiGLU as ours, but its width
  is the LLM's `intermediate_size` and it reads one 768-wide Whisper frame per position, so we need
  adapter_hidden == intermediate_size and frame_stack == 1 (recipe `mini-omni` has both; `demo`
  stacks 4 frames and cannot be exported to this format);
- encoder: their inference always runs openai-whisper "small"; a model trained on another encoder
  (the demo's stand-in) is refused unless `--allow-encoder-mismatch`;
- LLM: SiLU MLP, no sliding window, default RoPE, q/k/v biases and no others (Qwen2 as published).
Every tensor of the LLM and the adapter is accounted for: an unmapped one is an error, not a drop.

`--format hf` copies the stage export as it is, which already is the plain Hugging Face form:
`llm/` loads with `Qwen2ForCausalLM.from_pretrained` / `AutoModelForCausalLM` (vocabulary 181,120;
rows past 151,935 are Mini-Omni's specials and audio codes), `adapter.safetensors` holds
gate/up/down, `omni_config.json` names the encoder and the adapter shape, and
`preprocessor_config.json` is the encoder's feature extractor. `training.model.load_omni` reads it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2ForCausalLM, WhisperFeatureExtractor

from training.model import (
    ADAPTER_WEIGHTS,
    OMNI_CONFIG,
    OmniConfig,
    OmniModel,
    is_omni_export,
    load_encoder,
    load_omni,
    outside_zero3_init,
)
from training.model.litgpt import (
    ADAPTER_NAMES,
    ExportError,
    check_compatible,
    hf_tensors,
    lit_config,
    lit_state_dict,
    qwen2_config,
)
from training.speech.layout import VocabLayout

LIT_WEIGHTS = "lit_model.pth"
LIT_CONFIG = "model_config.yaml"
SIDECAR = "omni_export.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)
DEFAULT_BLOCK_SIZE = 2048  # Mini-Omni's context; inference.py needs >= 2047, and a 131k one would


# make litgpt allocate a 131k x 131k mask when it sets up its KV cache
def _fresh_dir(path: Path) -> None:
    if path.exists() and any(path.iterdir()):
        raise ExportError(f"{path}: exists and is not empty; export into a new folder")
    path.mkdir(parents=True, exist_ok=True)


def export_mini_omni(
    source: Path, target: Path, block_size: int = DEFAULT_BLOCK_SIZE, allow_encoder_mismatch: bool = False
) -> list[str]:
    """Write lit_model.pth + model_config.yaml (+ tokenizer, sidecar) into target; return warnings."""
    source, target = Path(source), Path(target)
    if not is_omni_export(source):
        raise ExportError(f"{source}: not a stage export (no {OMNI_CONFIG}); give a folder like runs/demo/final/final")
    model, _, _ = load_omni(source)
    warnings = check_compatible(model, model.llm.config, allow_encoder_mismatch)
    state = lit_state_dict(model)
    _fresh_dir(target)
    torch.save({k: v.cpu() for k, v in state.items()}, target / LIT_WEIGHTS)  # .cpu() keeps a tied pair shared
    (target / LIT_CONFIG).write_text(yaml.safe_dump(lit_config(model, block_size), sort_keys=False))
    for name in TOKENIZER_FILES:
        if (source / "llm" / name).is_file():
            shutil.copy2(source / "llm" / name, target / name)
    if (source / "preprocessor_config.json").is_file():
        shutil.copy2(source / "preprocessor_config.json", target / "preprocessor_config.json")
    sidecar = {
        "format": "mini-omni",
        "encoder": model.config.encoder,
        "text_vocab": model.config.text_vocab,
        "llm_config": model.llm.config.to_dict(),
        "source": str(source),
        "warnings": warnings,
    }
    (target / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    return warnings


def export_hf(source: Path, target: Path) -> None:
    """The stage export is the Hugging Face form already (see the module docstring): copy it."""
    source, target = Path(source), Path(target)
    if not is_omni_export(source):
        raise ExportError(f"{source}: not a stage export (no {OMNI_CONFIG})")
    for needed in ("llm/config.json", ADAPTER_WEIGHTS):
        if not (source / needed).exists():
            raise ExportError(f"{source}: incomplete stage export, missing {needed}")
    config = OmniConfig(**json.loads((source / OMNI_CONFIG).read_text()))
    rows = json.loads((source / "llm" / "config.json").read_text()).get("vocab_size")
    if rows != VocabLayout(text_vocab=config.text_vocab).total:
        raise ExportError(f"{source / 'llm/config.json'}: vocab_size {rows} is not the grown Mini-Omni vocabulary")
    _fresh_dir(target)
    shutil.copytree(source, target, dirs_exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Mini-Omni -> our model


def _read_lit(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    for name in (LIT_WEIGHTS, LIT_CONFIG):
        if not (folder / name).is_file():
            raise ExportError(f"{folder}: no {name}; not a Mini-Omni checkpoint folder")
    lit = yaml.safe_load((folder / LIT_CONFIG).read_text()) or {}
    state = torch.load(folder / LIT_WEIGHTS, map_location="cpu", weights_only=True)
    sidecar = json.loads((folder / SIDECAR).read_text()) if (folder / SIDECAR).is_file() else {}
    if lit.get("asr_adapter", "llamamlp") != "llamamlp":
        raise ExportError(
            f"{folder / LIT_CONFIG}: asr_adapter {lit['asr_adapter']!r}; only llamamlp maps onto our gated adapter"
        )
    extra = sorted(k for k in state if k.startswith("transformer.post_adapter"))
    if extra:
        raise ExportError(f"{folder / LIT_WEIGHTS}: post-adapter tensors {extra[:3]}... have no place in our model")
    return lit, state, sidecar


def import_mini_omni(
    folder: Path,
    encoder: str | None = None,
) -> tuple[OmniModel, PreTrainedTokenizerBase, WhisperFeatureExtractor]:
    """Rebuild our model from a Mini-Omni checkpoint folder (one we wrote, or theirs given
    `encoder`, e.g. openai/whisper-small)."""
    folder = Path(folder)
    lit, state, sidecar = _read_lit(folder)
    encoder = encoder or sidecar.get("encoder")
    if not encoder:
        raise ExportError(f"{folder}: no {SIDECAR} naming the encoder; pass --encoder (e.g. openai/whisper-small)")
    config = qwen2_config(lit, sidecar)
    if config.vocab_size != lit["padded_vocab_size"]:
        raise ExportError(f"{folder / LIT_CONFIG}: padded_vocab_size {lit['padded_vocab_size']} != {config.vocab_size}")
    with outside_zero3_init():
        whisper, fe = load_encoder(encoder)
        llm = Qwen2ForCausalLM(config).to(state["transformer.wte.weight"].dtype)  # keep the stored precision
    used: set[str] = set()
    hf_state = {}
    for ours, tensor, theirs in hf_tensors(state, config):
        hf_state[ours] = tensor
        used.add(theirs)
    adapter_state = {
        f"{ours}.weight": state[f"whisper_adapter.{theirs}.weight"] for ours, theirs in ADAPTER_NAMES.items()
    }
    used |= {f"whisper_adapter.{t}.weight" for t in ADAPTER_NAMES.values()}
    left = sorted(set(state) - used)
    if left:
        raise ExportError(f"{folder / LIT_WEIGHTS}: tensors with no place in our model: {left}")
    missing, unexpected = llm.load_state_dict(hf_state, strict=False)
    if (
        unexpected
        or set(missing) - {"lm_head.weight"}
        or ("lm_head.weight" in missing and not config.tie_word_embeddings)
    ):
        raise ExportError(f"{folder}: LLM weights do not fit: missing {missing}, unexpected {unexpected}")
    text_vocab = sidecar.get("text_vocab", lit["text_vocab_size"] - VocabLayout().text_specials)
    omni = OmniConfig(
        encoder=encoder,
        text_vocab=text_vocab,
        frame_stack=1,
        adapter_in=lit["whisper_adapter_dim"],
        adapter_hidden=lit["intermediate_size"],
        adapter_out=lit["n_embd"],
    )
    model = OmniModel(whisper, llm, omni)
    model.adapter.load_state_dict(adapter_state)
    if (folder / "preprocessor_config.json").is_file():
        fe = WhisperFeatureExtractor.from_pretrained(folder)
    return model, AutoTokenizer.from_pretrained(folder), fe


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export a stage-final model to Mini-Omni's litgpt format or a "
        "Hugging Face folder, or import a Mini-Omni folder (--format omni)."
    )
    parser.add_argument(
        "--from", dest="source", type=Path, required=True, help="stage export (or Mini-Omni folder for omni)"
    )
    parser.add_argument("--to", dest="target", type=Path, required=True, help="new, empty output folder")
    parser.add_argument(
        "--format",
        required=True,
        choices=["mini-omni", "hf", "omni"],
        help="mini-omni: lit_model.pth + model_config.yaml; hf: plain HF folder; omni: import back",
    )
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="litgpt context length (mini-omni)")
    parser.add_argument(
        "--allow-encoder-mismatch",
        action="store_true",
        help="export although the encoder is not whisper-small (Mini-Omni's inference runs whisper-small)",
    )
    parser.add_argument("--encoder", help="omni: the Whisper encoder the checkpoint was trained with")
    args = parser.parse_args(argv)
    try:
        if args.format == "mini-omni":
            for warning in export_mini_omni(args.source, args.target, args.block_size, args.allow_encoder_mismatch):
                print(f"warning: {warning}", file=sys.stderr)
        elif args.format == "hf":
            export_hf(args.source, args.target)
        else:
            from training.model import save_omni

            _fresh_dir(args.target)
            model, tokenizer, fe = import_mini_omni(args.source, args.encoder)
            save_omni(model, args.target, tokenizer, fe)
    except (ExportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} export to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
