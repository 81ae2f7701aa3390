"""The Qwen2 LLM stand-in: a byte-level BPE tokenizer and a small Qwen2ForCausalLM trained on a
mix of plain LM, a copy task and question answering.

The copy task is there because an adapter-only alignment stage only learns when the LLM can repeat
a prefix it is given; the QA share because a pretrained LLM already knows the facts a spoken
question asks for.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from training.common import LogFn
from training.demo.standins.config import StandinConfig
from training.demo.standins.optim import bf16_autocast, lr_at, set_lr

__all__ = ["QAPair", "train_llm"]

QAPair = tuple[str, str]  # (question, answer) text

# Qwen2's pre-tokenizer split. transformers 5 loads any tokenizer saved next to a qwen2 config as
# Qwen2Tokenizer, which rebuilds the pipeline around this regex from vocab + merges; training
# with the very same pipeline keeps the ids identical however the folder is loaded.
_QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _train_tokenizer(texts: list[str], config: StandinConfig) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = [config.eos_token, config.bos_token, config.pad_token, config.sep_token, config.answer_token]
    trainer = trainers.BpeTrainer(
        vocab_size=config.tokenizer_vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=config.bos_token,
        eos_token=config.eos_token,
        pad_token=config.pad_token,
        sep_token=config.sep_token,
    )


def _lm_example(ids: list[int], copy: bool, bos: int, eos: int, sep: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 = not scored) for one LM or copy-task sequence."""
    if copy:
        tokens = [bos, *ids, sep, *ids, eos]
        labels = [-100] * (len(ids) + 2) + [*ids, eos]
    else:
        tokens = [bos, *ids, eos]
        labels = [-100, *ids, eos]
    return tokens, labels


def _qa_example(question: list[int], answer: list[int], bos: int, eos: int, marker: int) -> tuple[list[int], list[int]]:
    """bos + question + marker + answer + eos, scored on the answer and its eos."""
    return [bos, *question, marker, *answer, eos], [-100] * (len(question) + 2) + [*answer, eos]


def _lm_batch(examples: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(tokens) for tokens, _ in examples)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (tokens, target) in enumerate(examples):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, : len(target)] = torch.tensor(target)
        mask[row, : len(tokens)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _token_losses(model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> torch.Tensor:
    """Per-sequence mean next-token loss over the scored positions."""
    with bf16_autocast(bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    scored = (labels != -100).float()
    return (losses * scored).sum(1) / scored.sum(1).clamp(min=1)


@torch.no_grad()
def _exact_continuations(
    model: Qwen2ForCausalLM, cases: list[tuple[list[int], list[int]]], eos: int, pad: int
) -> float:
    """Share of (prompt, target) cases whose greedy continuation of the prompt is exactly target + eos."""
    model.eval()
    correct = 0
    for prompt_ids, target in cases:
        prompt = torch.tensor([prompt_ids])
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=len(target) + 1,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
            # The stand-ins are built by one rank alone: never let generate synchronize with other
            # ranks (under ZeRO-3 it would, and wait forever for ranks that are not generating).
            synced_gpus=False,
        )
        correct += out[0, prompt.shape[1] :].tolist() == [*target, eos]
    return correct / max(1, len(cases))


def train_llm(
    texts: list[str],
    heldback_texts: list[str],
    out_dir: Path,
    config: StandinConfig,
    log: LogFn,
    qa_pairs: Sequence[QAPair] = (),
    qa_heldback: Sequence[QAPair] = (),
) -> dict[str, float]:
    started = time.perf_counter()
    tokenizer = _train_tokenizer(texts + [t for pair in qa_pairs for t in pair], config)
    bos, eos, pad, sep, marker = (
        tokenizer.convert_tokens_to_ids(t)
        for t in (config.bos_token, config.eos_token, config.pad_token, config.sep_token, config.answer_token)
    )
    for sample in texts[:200]:
        # NFC-normalized text must come back unchanged (the normalizer rewrites anything else).
        if unicodedata.normalize("NFC", sample) == sample and tokenizer.decode(tokenizer.encode(sample)) != sample:
            raise RuntimeError(f"the trained tokenizer does not round-trip {sample!r}")
    vocab_size = -(-len(tokenizer) // config.vocab_multiple) * config.vocab_multiple
    encoded = [tokenizer.encode(t) for t in texts]
    words = [t.split(" ") for t in texts]
    encoded_check = [tokenizer.encode(t) for t in heldback_texts]
    encode_pairs = lambda pairs: [(tokenizer.encode(q), tokenizer.encode(a)) for q, a in pairs]  # noqa: E731
    encoded_qa, encoded_qa_check = encode_pairs(qa_pairs), encode_pairs(qa_heldback)
    longest = max(2 * len(ids) + 3 for ids in encoded)
    if longest > config.max_position_embeddings:
        raise ValueError(
            f"a copy-task sequence has {longest} tokens, over max_position_embeddings={config.max_position_embeddings}"
        )

    torch.manual_seed(config.seed)
    model_config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=config.llm_hidden,
        num_hidden_layers=config.llm_layers,
        num_attention_heads=config.llm_heads,
        num_key_value_heads=config.llm_kv_heads,
        intermediate_size=config.llm_intermediate,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    model = Qwen2ForCausalLM(model_config)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = bos, eos
    model.generation_config.pad_token_id = pad
    n_params = sum(p.numel() for p in model.parameters())
    n_copy = round(config.lm_batch_size * config.copy_fraction)
    n_qa = round(config.lm_batch_size * config.qa_fraction) if encoded_qa else 0
    log(
        f"stand-in LLM: tokenizer {len(tokenizer)} tokens (vocab_size {vocab_size}), {n_params / 1e6:.2f} M "
        f"parameters, {config.lm_steps} steps of batch {config.lm_batch_size} ({n_copy} copy task, "
        f"{n_qa} question answering over {len(encoded_qa)} pairs), peak LR {config.lm_lr:g}"
    )

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lm_lr, betas=(0.9, 0.98), weight_decay=config.lm_weight_decay
    )
    rng = np.random.default_rng(config.seed)
    recent_lm: list[float] = []
    recent_copy: list[float] = []
    recent_qa: list[float] = []
    final: dict[str, float] = {}
    t0 = time.perf_counter()
    model.train()
    for step in range(config.lm_steps):
        # rows in batch order: copy task, question answering, plain LM
        examples = []
        for i in rng.integers(0, len(encoded), size=n_copy).tolist():
            ids = encoded[i]
            if rng.random() < config.copy_shuffle_fraction:
                ids = tokenizer.encode(" ".join(rng.permutation(words[i]).tolist()))
            examples.append(_lm_example(ids, True, bos, eos, sep))
        examples += [
            _qa_example(*encoded_qa[i], bos, eos, marker) for i in rng.integers(0, len(encoded_qa) or 1, size=n_qa)
        ]
        examples += [
            _lm_example(encoded[i], False, bos, eos, sep)
            for i in rng.integers(0, len(encoded), size=config.lm_batch_size - n_copy - n_qa)
        ]
        batch = _lm_batch(examples, pad)
        set_lr(optimizer, lr_at(step, config.lm_steps, config.lm_warmup_steps, config.lm_lr, config.lr_floor_ratio))
        per_sequence = _token_losses(model, batch, config.bf16)
        loss = per_sequence.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.lm_grad_clip)
        optimizer.step()
        for recent, rows in (
            (recent_copy, per_sequence[:n_copy]),
            (recent_qa, per_sequence[n_copy : n_copy + n_qa]),
            (recent_lm, per_sequence[n_copy + n_qa :]),
        ):
            if len(rows):
                recent.append(rows.mean().item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.lm_steps:
            mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
            final = {
                "lm_train_loss": mean(recent_lm),
                "copy_train_loss": mean(recent_copy),
                "qa_train_loss": mean(recent_qa),
            }
            log(
                f"stand-in LLM: step {step + 1}/{config.lm_steps} lm loss {final['lm_train_loss']:.3f} "
                f"copy loss {final['copy_train_loss']:.3f} qa loss {final['qa_train_loss']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
            recent_lm, recent_copy, recent_qa = [], [], []
    train_seconds = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        check_lm = _lm_batch([_lm_example(ids, False, bos, eos, sep) for ids in encoded_check], pad)
        check_copy = _lm_batch([_lm_example(ids, True, bos, eos, sep) for ids in encoded_check], pad)
        lm_loss = _token_losses(model, check_lm, config.bf16).mean().item()
        copy_loss = _token_losses(model, check_copy, config.bf16).mean().item()
    accuracy = _exact_continuations(model, [([bos, *ids, sep], ids) for ids in encoded_check], eos, pad)
    qa_accuracy = (
        _exact_continuations(model, [([bos, *q, marker], a) for q, a in encoded_qa_check], eos, pad)
        if encoded_qa_check
        else float("nan")
    )
    log(
        f"stand-in LLM: held-back lm loss {lm_loss:.3f}, copy loss {copy_loss:.3f}, exact copies "
        f"{accuracy:.0%} of {len(encoded_check)} unseen sentences"
        + (
            f", right answers to {qa_accuracy:.0%} of {len(encoded_qa_check)} unseen questions"
            if encoded_qa_check
            else ""
        )
    )

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 loads a tokenizer that sits next to a qwen2 config as Qwen2Tokenizer; make sure
    # that reload tokenizes exactly like the tokenizer the model was trained with.
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    for sample in [*texts[:50], *heldback_texts[:10]]:
        if reloaded.encode(sample) != tokenizer.encode(sample):
            raise RuntimeError(
                f"the saved tokenizer reloads as {type(reloaded).__name__} with different ids for {sample!r}"
            )
    return {
        "llm_train_seconds": train_seconds,
        "llm_total_seconds": time.perf_counter() - started,
        "llm_params": float(n_params),
        "tokenizer_size": float(len(tokenizer)),
        "llm_vocab_size": float(vocab_size),
        **final,
        "lm_heldback_loss": lm_loss,
        "copy_heldback_loss": copy_loss,
        "copy_heldback_exact": accuracy,
        "qa_heldback_exact": qa_accuracy,
    }
