"""MFU: the FLOPs a training step adds to the log (model/flops.py's count through engine/step.py)
against torch's FLOP counter on real steps, and the peak each GPU name gets (engine/mfu.py)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import every_task_rows, tiny_model
from training.data.batching import SpeechTextCollator
from training.engine.mfu import PEAK_ENV, StepFlops, device_peak_tflops, throughput
from training.engine.step import forward_backward, optimizer_step
from training.model import model_inputs, set_trainable
from training.stages import MINI_OMNI, STAGE_NAMES, TASKS


@pytest.fixture()
def tiny(tiny_checkpoints):
    model, tokenizer, _ = tiny_model(tiny_checkpoints, frame_stack=4, seed=0)
    model.llm.set_attn_implementation("eager")  # attention as matmuls the counter sees (CPU SDPA it does not)
    return model, tokenizer


def _on(device: torch.device, batch: dict) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _counted(model, batch: dict) -> int:
    """torch's FLOP counter over a plain forward and backward of `batch`, less the zero adapter
    frame a speechless batch runs where the adapter trains (omni.py's embed keeps every trainable
    parameter in the graph that way): no useful work, so the step's count leaves it out."""
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        model(**model_inputs(_on(device, batch)))["loss"].backward()
    touched = not bool(batch["audio_mask"].any()) and any(p.requires_grad for p in model.adapter.parameters())
    if touched:
        with FlopCounterMode(display=False) as touch:
            model.adapter(torch.zeros(1, 1, model.config.adapter_in, device=device)).sum().backward()
    model.zero_grad()
    return counter.get_total_flops() - (touch.get_total_flops() if touched else 0)


def _logged(model, batch: dict) -> float:
    """The FLOPs one real optimizer step over `batch` adds to the run's count (the log's MFU numerator)."""
    acc = Accelerator()
    model.to(acc.device)
    on_device = _on(acc.device, batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    run = SimpleNamespace(
        ctx=SimpleNamespace(recipe=SimpleNamespace(max_grad_norm=0.0), accelerator=acc),
        state={"step": 0},
        model=model,
        spec=MINI_OMNI.stage("final"),
        optimizer=torch.optim.SGD(trainable, lr=0.0),
        accumulate_step=lambda: forward_backward(acc, model, lambda: on_device, 1, "[test]", 1),
        step_flops=StepFlops.of(model),
        peak_tflops=None,
        trainable=trainable,
    )
    assert optimizer_step(run) is not None
    return run.state["model_flops"]


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_a_steps_flops_are_the_counted_matmuls(tiny, stage):
    """Each task's row alone (no padding): the step's count equals every FLOP torch's counter sees
    in its forward and backward, exactly, as each stage trains (frozen LLM, frozen adapter, both)."""
    model, tokenizer = tiny
    spec = MINI_OMNI.stage(stage)
    set_trainable(model, spec.trainable, spec.train_text_specials)
    collate = SpeechTextCollator(model.layout, model.config.frame_stack)
    for task, row in zip(TASKS, every_task_rows(model, tokenizer)):
        batch = collate([row])
        assert _logged(model, batch) == _counted(model, batch), task


def test_a_packed_rows_attention_is_each_samples_own(tiny):
    """Samples of very unequal lengths packed in one row attend only within themselves: the step's
    count is the sum of each sample's counted FLOPs alone (attention by each length squared; by the
    mean length it would fall ~10 % short here), and so is a padded batch's."""
    model, _ = tiny
    set_trainable(model, ["adapter", "llm"])
    rng = np.random.default_rng(0)
    dim = model.config.adapter_in // model.config.frame_stack
    rows = [
        {
            "n_frames": frames,
            "encoder_states": rng.standard_normal((frames, dim)).astype("float32"),
            "text_ids": np.arange(10, 10 + text_tokens),
            "text": "",
        }
        for frames, text_tokens in ((4, 2), (40, 10), (200, 60))
    ]
    alone = SpeechTextCollator(model.layout, model.config.frame_stack)
    lengths = [int(alone([row])["attention_mask"].sum()) for row in rows]
    assert max(lengths) > 10 * min(lengths)
    expected = sum(_counted(model, alone([row])) for row in rows)
    packed = SpeechTextCollator(model.layout, model.config.frame_stack, packed=True)(rows)
    assert packed["input_ids"].shape[0] == 1
    assert _logged(model, packed) == expected
    assert _logged(model, alone(rows)) == expected  # padded rows: their padding is no useful work


def test_encoder_forward_flops_are_the_counted(tiny):
    """The frozen encoder's forward over its window (the dry run's data cost): convolutions, layers
    and attention, every FLOP torch's counter sees."""
    from training.model.flops import encoder_forward_flops

    model, _ = tiny
    model.encoder.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        model.encode(torch.zeros(1, model.encoder.config.num_mel_bins, model.n_mel_frames))
    assert encoder_forward_flops(model.encoder) == counter.get_total_flops()


# Dense bf16 peaks from the datasheets, under the names torch.cuda.get_device_name gives the cards
NAMED_PEAKS = [
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40", 181.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H20", None),  # not an H200
    ("NVIDIA GeForce RTX 4090", None),
]


@pytest.mark.parametrize(("name", "peak"), NAMED_PEAKS)
def test_each_card_gets_its_own_peak(monkeypatch, name, peak):
    """Whole model names, a variant before its model: an L40 is not an L4, an H100 PCIe not an SXM
    H100; a card the table lacks gets no peak, so no MFU is logged for it."""
    monkeypatch.delenv(PEAK_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_tflops(torch.device("cuda", 0)) == peak
    assert ("mfu" in throughput(1e15, 1.0, 1, device_peak_tflops(torch.device("cuda", 0)))) == (peak is not None)
    assert device_peak_tflops(torch.device("cpu")) is None
    monkeypatch.setenv(PEAK_ENV, "100")  # the override, for a card the table lacks
    assert device_peak_tflops(torch.device("cuda", 0)) == 100.0
