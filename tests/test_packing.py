"""Packing and token-budget micro-batches (data/packing.py): a packed row gives each sample what it
gets alone, attention never crosses samples, and no micro-batch exceeds its budget."""

import json

import datasets
import numpy as np
import pytest
import torch

from tests.helpers import asr_losses, asr_run_args, every_task_rows, recipe_variant, run_profile, scramble, tiny_model
from training.data.batching import SpeechTextCollator, TaskMixture, item_positions
from training.data.packing import TokenBudgetSampler
from training.engine.faults import InjectedFault
from training.model import model_inputs, set_trainable
from training.run import main
from training.stages import TASKS

PER_SAMPLE = ("row_loss_sum", "row_count", "row_correct", "row_judged")


@pytest.fixture()
def tiny(tiny_checkpoints):
    model, tokenizer, _ = tiny_model(tiny_checkpoints, frame_stack=4, seed=0)
    scramble(model)  # random grown rows: audio logits that differ between positions
    set_trainable(model, ["adapter", "llm"])
    return model, tokenizer


def _rows(model, tokenizer):
    """Every task once, then every task again with other lengths and codes (10 samples)."""
    return every_task_rows(model, tokenizer, seed=1) + every_task_rows(model, tokenizer, seed=2)


def test_packed_row_gives_every_sample_its_loss_alone(tiny):
    model, tokenizer = tiny
    rows = _rows(model, tokenizer)
    layout, k = model.layout, model.config.frame_stack
    packed_batch = SpeechTextCollator(layout, k, packed=True)(rows)
    assert packed_batch["input_ids"].shape[0] == 1  # one row holds all ten samples
    packed = model(**model_inputs(packed_batch))
    assert packed["row_loss_sum"].shape[0] == len(rows)
    for i, row in enumerate(rows):
        alone = model(**model_inputs(SpeechTextCollator(layout, k)([row])))
        for key in PER_SAMPLE:
            torch.testing.assert_close(packed[key][i], alone[key][0], rtol=0, atol=1e-5, msg=f"{TASKS[i % 5]} {key}")
    # the gradient of the packed loss is the gradient of the padded batch's (same global-token loss)
    padded = model(**model_inputs(SpeechTextCollator(layout, k)(rows)))
    torch.testing.assert_close(packed["loss"], padded["loss"], rtol=0, atol=1e-5)
    grads = []
    for out in (packed, padded):
        model.zero_grad()
        out["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=0, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_no_attention_across_packed_samples(tiny):
    """Changing one sample (its question tokens and speech) leaves every other sample's scores
    unchanged, and does change its own."""
    model, tokenizer = tiny
    rows = _rows(model, tokenizer)
    collate = SpeechTextCollator(model.layout, model.config.frame_stack, packed=True)
    with torch.no_grad():
        before = model(**model_inputs(collate(rows)))
        changed = [dict(r) for r in rows]
        victim = TASKS.index("a1a2")  # speech in, speech and text out
        changed[victim]["encoder_states"] = changed[victim]["encoder_states"][::-1].copy() * 3.0
        after = model(**model_inputs(collate(changed)))
        text_in = TASKS.index("t1t2")
        changed[text_in] = dict(rows[text_in], question_ids=rows[text_in]["question_ids"][::-1].copy())
        after_text = model(**model_inputs(collate(changed)))
    others = [i for i in range(len(rows)) if i != victim]
    for key in PER_SAMPLE:
        torch.testing.assert_close(after[key][others], before[key][others], rtol=0, atol=1e-6)
    assert not torch.allclose(after["row_loss_sum"][victim], before["row_loss_sum"][victim])
    untouched = [i for i in others if i != text_in]
    torch.testing.assert_close(
        after_text["row_loss_sum"][untouched], after["row_loss_sum"][untouched], rtol=0, atol=1e-6
    )
    assert not torch.allclose(after_text["row_loss_sum"][text_in], after["row_loss_sum"][text_in])


def _librispeech_like(n: int, seed: int = 0) -> np.ndarray:
    """Positions of n ASR rows of 1-30 s (log-normal around 12 s, as LibriSpeech's clips): 50 encoder
    frames per second stacked by 4, plus ~3 tokens per second of transcript and the prompt's 4."""
    seconds = np.clip(np.random.default_rng(seed).lognormal(np.log(12.0), 0.5, n), 1.0, 30.0)
    return (np.ceil(seconds * 50 / 4) + seconds * 3 + 4).astype(np.int64)


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_micro_batches_never_exceed_the_budget(packed):
    lengths = _librispeech_like(3_000)
    budget = 4_096
    for epoch in (0, 1):
        seen, n_batches = [], 0
        for rank in (0, 1):
            sampler = TokenBudgetSampler(lengths, budget, seed=7, packed=packed, num_processes=2, process_index=rank)
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) > 0
            n_batches += len(batches)
            for batch in batches:
                cost = lengths[batch].sum() if packed else len(batch) * lengths[batch].max()
                assert cost <= budget
            seen += [i for b in batches for i in b]
        assert len(seen) == len(set(seen))  # no item twice in an epoch, across both processes
        # every item but those of the last micro-batches (trimmed to a multiple of 2 processes)
        assert len(seen) > len(lengths) - 2 * budget / lengths.min()
        if packed:  # best fit from a bounded buffer leaves little of the budget unused
            assert lengths[seen].sum() / (budget * n_batches) > 0.97


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3)])
def test_budget_resume_on_another_number_of_processes(before, after):
    """A checkpoint's data position counts global micro-batches: resumed on another number of
    processes, the epoch goes on from the very next one, none read twice or skipped (but the
    trimmed tail), and the processes take equal numbers of steps."""
    lengths = _librispeech_like(1_000)

    def samplers(processes):
        out = [TokenBudgetSampler(lengths, 2_048, 7, True, processes, rank) for rank in range(processes)]
        for sampler in out:
            sampler.set_epoch(1)
        return out

    plan = samplers(1)[0].micro_batches()
    read = before * 5  # 5 steps on `before` processes
    first = [list(s)[:5] for s in samplers(before)]
    resumed = samplers(after)
    for sampler in resumed:
        sampler.resume_at(read)
        sampler.set_epoch(1)  # as Accelerate re-sets the epoch at each iteration: the position stays
    rest = [list(s) for s in resumed]
    assert len({len(r) for r in rest}) == 1 and all(len(r) == len(s) for r, s in zip(rest, resumed))
    # global order: step by step, rank by rank
    order = [b for step in zip(*first) for b in step] + [b for step in zip(*rest) for b in step]
    assert order == plan[: len(order)] and len(plan) - len(order) < after
    resumed[0].set_epoch(2)  # a new epoch starts from its beginning
    assert resumed[0].start == 0


def test_too_long_item_is_named():
    with pytest.raises(ValueError, match="training item 2 has 900 positions, more than data.tokens_per_micro_batch"):
        TokenBudgetSampler([10, 20, 900], 512, seed=0, packed=True)


def test_item_positions_are_the_collated_widths(tiny):
    """The widths the budget is planned with are the widths the collator lays out, for every task."""
    model, tokenizer = tiny
    rows = _rows(model, tokenizer)
    asr = datasets.Dataset.from_list(
        [{k: r[k] for k in ("n_frames", "encoder_states", "text_ids", "text")} for r in rows if r["task"] == "asr"]
    )
    qa_keys = ("n_frames", "encoder_states", "question_ids", "answer_ids", "codes", "question", "answer")
    qa_rows = [{k: r[k] for k in qa_keys} | {"n_codes": len(r["codes"]) // 7} for r in rows if r["task"] != "asr"]
    qa = datasets.Dataset.from_list(qa_rows).with_format("numpy")
    mixture = TaskMixture(asr.with_format("numpy"), qa, {t: 1.0 for t in TASKS}, seed=0, frame_stack=4)
    positions = item_positions(mixture, 4)
    collate = SpeechTextCollator(model.layout, 4)
    widths = [collate([mixture[i]])["input_ids"].shape[-1] for i in range(len(mixture))]
    assert positions.tolist() == widths


@pytest.mark.parametrize("packing", [True, False])
def test_token_budget_stage_trains_and_resumes_exactly(tmp_path, quick_recipe, cache_dir, monkeypatch, capsys, packing):
    recipe = recipe_variant(
        quick_recipe, tmp_path / "budget.json", tokens_per_micro_batch=1024, packing=packing, save_every=4
    )
    assert main(asr_run_args(recipe, cache_dir, tmp_path / "straight", 10)) == 0
    how = "packed into one row" if packing else "rows padded to the longest"
    assert f"micro-batches of up to 1,024 positions per process, {how}" in capsys.readouterr().out
    straight = asr_losses(tmp_path / "straight")
    assert np.mean(straight[-3:]) < 0.9 * np.mean(straight[:3])  # 6.4 -> 5.5 seen (warm-up, 10 steps)
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "asr" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["tokens"] <= 1024 for m in metrics)  # one process, grad_accum 1: one micro-batch per step
    if packing:
        assert all(m["padding"] == 0 for m in metrics)
    monkeypatch.setenv("OMNI_STAGE_FAULT", "crash@0:6")  # after step 6; step 4 was checkpointed
    with pytest.raises(InjectedFault):
        main(asr_run_args(recipe, cache_dir, tmp_path / "resumed", 10))
    monkeypatch.delenv("OMNI_STAGE_FAULT")
    assert main(asr_run_args(recipe, cache_dir, tmp_path / "resumed", 10)) == 0
    assert asr_losses(tmp_path / "resumed") == pytest.approx(straight, abs=1e-6)


def test_packed_stage_on_two_zero2_processes(distributed_recipe, cache_dir, tmp_path):
    """Each process reads its own packed micro-batches (Accelerate does not split them again) and
    DeepSpeed takes the loader without a fixed micro-batch size."""
    recipe = recipe_variant(distributed_recipe, tmp_path / "packed.json", tokens_per_micro_batch=512, packing=True)
    run = run_profile("cpu_zero2.yaml", recipe, cache_dir, tmp_path / "out", 6)
    assert "micro-batches of up to 512 positions per process, packed into one row" in run["output"]
    metrics = [json.loads(line) for line in (tmp_path / "out" / "asr" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6 and all(np.isfinite(m["loss"]) for m in metrics)
    assert all(512 < m["tokens"] <= 2 * 512 for m in metrics)  # two processes' micro-batches per step


def test_activation_checkpointing_and_eager_attention_keep_loss_and_gradients(tiny):
    """The recipe's attn_implementation and activation_checkpointing change memory and speed only:
    a packed batch's loss and gradients are those of the default (SDPA, no checkpointing)."""
    model, tokenizer = tiny
    batch = model_inputs(
        SpeechTextCollator(model.layout, model.config.frame_stack, packed=True)(_rows(model, tokenizer))
    )
    model.train()
    results = []
    for attention, checkpointing in (("sdpa", False), ("eager", False), ("sdpa", True)):
        model.set_llm_options(attention, checkpointing)
        model.zero_grad()
        out = model(**batch)
        out["loss"].backward()
        results.append(
            (out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    assert model.llm.model.gradient_checkpointing  # the last run recomputed its layers
    (loss, grads), others = results[0], results[1:]
    for other_loss, other_grads in others:
        torch.testing.assert_close(other_loss, loss, rtol=0, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, rtol=0, atol=1e-5 * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_layers_keep_loss_and_gradients(tiny, backend):
    """`torch_compile`: the LLM's decoder layers compiled give the eager loss and gradients, for a
    packed batch and padded batches of two lengths (dynamic shapes), and decoding runs them eager
    (its cached steps' shapes would otherwise recompile the layers until torch gives up)."""
    import copy
    import shutil

    from torch._dynamo.utils import counters

    from training.model.inference import generate

    if backend == "inductor" and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on the CPU needs a C++ compiler")
    model, tokenizer = tiny
    rows = _rows(model, tokenizer)
    layout, k = model.layout, model.config.frame_stack
    batches = [
        model_inputs(SpeechTextCollator(layout, k, packed=True)(rows)),
        model_inputs(SpeechTextCollator(layout, k)(rows)),
        model_inputs(SpeechTextCollator(layout, k)(rows[:3])),
    ]
    compiled = copy.deepcopy(model)
    compiled.set_llm_options("sdpa", False, backend)
    torch._dynamo.reset()
    counters.clear()
    for batch in batches:
        results = []
        for m in (model, compiled):
            m.train()
            m.zero_grad()
            out = m(**batch)
            out["loss"].backward()
            results.append(
                (out["loss"].detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
            )
        (loss, grads), (compiled_loss, compiled_grads) = results
        torch.testing.assert_close(compiled_loss, loss, rtol=0, atol=1e-5)
        assert compiled_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(
                compiled_grads[name], grad, rtol=0, atol=1e-5 * float(grad.abs().max()), msg=name
            )
    graphs = counters["stats"]["unique_graphs"]
    # the layers ran compiled, and both layers share their code: one graph for the first shape and
    # one with dynamic shapes after it (per layer and per shape would be 4 or more)
    assert 1 <= graphs <= 2
    compiled.eval()
    states, lengths = batches[1]["encoder_states"], batches[1]["encoder_lengths"]
    ours = generate(compiled, "asr", encoder_states=states, encoder_lengths=lengths, max_new_tokens=6)
    assert counters["stats"]["unique_graphs"] == graphs  # decoding compiled nothing
    model.eval()
    assert [g.text_ids for g in ours] == [
        g.text_ids for g in generate(model, "asr", encoder_states=states, encoder_lengths=lengths, max_new_tokens=6)
    ]
