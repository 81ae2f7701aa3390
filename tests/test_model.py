"""The model on tiny random checkpoints loaded by path: vocabulary growth, loss masking, batched
greedy decoding, export round trip."""

import numpy as np
import pytest
import torch

from tests.helpers import every_task_rows, tiny_model
from training.data.batching import SpeechTextCollator
from training.model import load_omni, model_inputs, save_omni, set_trainable
from training.speech.layout import IGNORE, TEXT_ROW


@pytest.fixture()
def tiny(tiny_checkpoints):
    return tiny_model(tiny_checkpoints, frame_stack=4, seed=0)


def _batch(model, tokenizer, feature_extractor, texts=("the cat", "a dog ran on the mat"), seconds=(2.0, 1.2)):
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(int(16000 * s)).astype("float32") for s in seconds]
    feats = feature_extractor(waves, sampling_rate=16000, return_tensors="pt", padding="max_length").input_features
    states = model.encode(feats)
    rows = []
    for i, (text, s) in enumerate(zip(texts, seconds)):
        n = int(s * 1000 / 20) + 1
        rows.append(
            {
                "n_frames": n,
                "encoder_states": states[i, :n].numpy(),
                "text_ids": np.array(tokenizer(text).input_ids),
                "text": text,
            }
        )
    return SpeechTextCollator(model.layout, model.config.frame_stack)(rows)


def test_vocabulary_grows_to_mini_omni_layout(tiny):
    model, tokenizer, _ = tiny
    assert model.layout.text_vocab == 320
    assert model.llm.get_input_embeddings().weight.shape[0] == 320 + 64 + 7 * 4160
    assert model.llm.get_output_embeddings().weight.shape[0] == model.layout.total
    new_rows = model.llm.get_input_embeddings().weight[320:]
    assert torch.allclose(new_rows, new_rows[:1].expand_as(new_rows))  # mean-initialised


def test_loss_only_on_answer_positions(tiny):
    model, tokenizer, fe = tiny
    batch = _batch(model, tokenizer, fe)
    out = model(**model_inputs(batch))
    answer_tokens = sum(len(tokenizer(t).input_ids) + 1 for t in ("the cat", "a dog ran on the mat"))
    assert out["row_count"].sum(0).tolist() == [0] * 7 + [answer_tokens]
    assert torch.isfinite(out["loss"])
    # changing a prompt-position label target cannot change the loss; changing an answer id does
    labels = batch["labels"].clone()
    assert bool((labels[:, :TEXT_ROW] == IGNORE).all())
    batch2 = dict(batch, input_ids=batch["input_ids"].clone())
    answer_pos = (labels[0, TEXT_ROW] != IGNORE).nonzero()[0, 0]
    batch2["labels"] = labels.clone()
    batch2["labels"][0, TEXT_ROW, answer_pos] = (labels[0, TEXT_ROW, answer_pos] + 1) % 300
    assert not torch.isclose(model(**model_inputs(batch2))["loss"], out["loss"])


def test_export_reloads_by_path_with_same_loss(tiny, tmp_path):
    model, tokenizer, fe = tiny
    set_trainable(model, ["adapter", "llm"])
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(0.01)
    batch = _batch(model, tokenizer, fe)
    expected = model(**model_inputs(batch))["loss"]
    save_omni(model, tmp_path / "export", tokenizer, fe)
    again, tokenizer2, _ = load_omni(tmp_path / "export")
    assert torch.equal(again(**model_inputs(batch))["loss"], expected)
    assert tokenizer2("the cat").input_ids == tokenizer("the cat").input_ids


def test_set_trainable_freezes_encoder_always(tiny):
    model, _, _ = tiny
    for modules in (["adapter"], ["llm"], ["adapter", "llm"]):
        set_trainable(model, modules)
        assert not any(p.requires_grad for p in model.encoder.parameters())
        assert all(p.requires_grad == ("adapter" in modules) for p in model.adapter.parameters())
        assert all(p.requires_grad == ("llm" in modules) for p in model.llm.parameters())


def _every_task_batch(model, tokenizer):
    return SpeechTextCollator(model.layout, model.config.frame_stack)(every_task_rows(model, tokenizer))


def test_chunked_loss_equals_full_logits_loss_and_gradients(tiny):
    """The loss a few positions at a time (model/loss.py) gives every task's per-row, per-stream
    CE and accuracy, and every gradient, of the loss over all logits at once (fp32 round-off)."""
    model, tokenizer, _ = tiny
    set_trainable(model, ["adapter", "llm"])
    batch = model_inputs(_every_task_batch(model, tokenizer))
    results = {}
    for chunk in (0, 5):  # chunks of 5 positions of an audio stream (the tiny text stream is narrower)
        model.zero_grad()
        model.loss_chunk_mb = chunk * 4 * model.layout.audio_size / 2**20 if chunk else 0.0
        out = model(**batch)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[chunk] = (out, grads)
    (full, full_grads), (chunked, chunked_grads) = results[0], results[5]
    assert int(full["row_count"].sum()) > 5 * 8  # many chunks: every stream is scored somewhere
    assert bool((full["row_count"][:, 1:] > 0).any())  # audio streams (a1a2, t1a2) are in the batch
    for key in ("loss", "row_loss_sum", "row_count", "row_correct", "row_judged"):
        torch.testing.assert_close(chunked[key], full[key], rtol=0, atol=1e-5)
    assert full_grads.keys() == chunked_grads.keys() and len(full_grads) > 10
    for name, grad in full_grads.items():
        # fp32 round-off: the chunks' weight gradients are summed in another order (~5e-6 relative seen)
        torch.testing.assert_close(chunked_grads[name], grad, rtol=0, atol=2e-5 * float(grad.abs().max()), msg=name)
