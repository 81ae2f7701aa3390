"""Export to Mini-Omni's litgpt checkpoint and to a Hugging Face folder, on tiny models: names and
shapes per the mapping table, the fused-QKV layout as litgpt reads it, refusals, round trips."""

import json

import pytest
import torch
import yaml

from tests.helpers import (
    GQA_D,
    GQA_FFN,
    GQA_GROUPS,
    GQA_HEAD,
    GQA_HEADS,
    GQA_LAYERS,
    GQA_QWEN2,
    GQA_WHISPER,
    save_tiny_checkpoints,
    tiny_model,
)
from training.model import load_omni, save_omni
from training.model.export import export_hf, export_mini_omni, import_mini_omni, main
from training.model.litgpt import ExportError, split_qkv
from training.speech.layout import n_adapter_frames, speech_to_text_example

D, HEADS, GROUPS, HEAD, FFN, LAYERS = GQA_D, GQA_HEADS, GQA_GROUPS, GQA_HEAD, GQA_FFN, GQA_LAYERS


@pytest.fixture(scope="module")
def gqa_checkpoints(tmp_path_factory):
    """Like the shared tiny_checkpoints, but with 2 key/value groups (so the interleaving shows)
    and a tied output layer, as Qwen2-0.5B has (shapes: tests/helpers.py's GQA_*)."""
    return save_tiny_checkpoints(tmp_path_factory.mktemp("gqa"), whisper=GQA_WHISPER, qwen2=GQA_QWEN2)


def _trained_export(checkpoints, path, adapter_hidden, frame_stack=1):
    """A save_omni folder whose weights are all distinct (norms and biases moved off their init)."""
    model, tokenizer, fe = tiny_model(checkpoints, frame_stack=frame_stack, adapter_hidden=adapter_hidden, seed=0)
    with torch.no_grad():
        for p in [*model.llm.parameters(), *model.adapter.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    save_omni(model, path, tokenizer, fe)
    return load_omni(path)[0]


def _outputs(model):
    """LLM logits on text ids and the full speech-in loss."""
    torch.manual_seed(1)
    layout = model.layout
    features = torch.randn(1, 80, model.n_mel_frames)
    states = model.encode(features)
    n = 30
    ex = speech_to_text_example(layout, n_adapter_frames(n, model.config.frame_stack), [5, 6, 7, 8])
    with torch.no_grad():
        loss = model(
            input_ids=ex.input_ids[None],
            labels=ex.labels[None],
            attention_mask=torch.ones(1, ex.input_ids.shape[1], dtype=torch.long),
            audio_mask=ex.audio_mask[None],
            encoder_states=states,
            encoder_lengths=torch.tensor([n]),
        )["loss"]
        logits = model.llm(input_ids=torch.tensor([[1, 2, 3, layout.eot, layout.audio_id(7, 3)]])).logits
    return logits, loss


def expected_table(vocab, adapter_in):
    """The module docstring's mapping table, for this tiny shape."""
    shapes = {
        "transformer.wte.weight": (vocab, D),
        "lm_head.weight": (vocab, D),
        "transformer.ln_f.weight": (D,),
        "whisper_adapter.fc_1.weight": (FFN, adapter_in),
        "whisper_adapter.fc_2.weight": (FFN, adapter_in),
        "whisper_adapter.proj.weight": (D, FFN),
    }
    for i in range(LAYERS):
        h = f"transformer.h.{i}."
        shapes |= {
            h + "norm_1.weight": (D,),
            h + "norm_2.weight": (D,),
            h + "attn.attn.weight": ((HEADS + 2 * GROUPS) * HEAD, D),
            h + "attn.attn.bias": ((HEADS + 2 * GROUPS) * HEAD,),
            h + "attn.proj.weight": (D, HEADS * HEAD),
            h + "mlp.fc_1.weight": (FFN, D),
            h + "mlp.fc_2.weight": (FFN, D),
            h + "mlp.proj.weight": (D, FFN),
        }
    return shapes


def test_mini_omni_names_shapes_and_round_trip(gqa_checkpoints, tmp_path):
    model = _trained_export(gqa_checkpoints, tmp_path / "final", adapter_hidden=FFN)
    with pytest.raises(ExportError, match="not whisper-small"):
        export_mini_omni(tmp_path / "final", tmp_path / "refused")
    warnings = export_mini_omni(tmp_path / "final", tmp_path / "lit", allow_encoder_mismatch=True)
    assert warnings and "whisper-small" in warnings[0]

    state = torch.load(tmp_path / "lit" / "lit_model.pth", weights_only=True)
    table = expected_table(model.layout.total, adapter_in=24)
    assert {k: tuple(v.shape) for k, v in state.items()} == table
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])  # tied, both names present
    assert torch.equal(state["whisper_adapter.fc_1.weight"], model.adapter.gate.weight)
    assert torch.equal(state["transformer.h.1.mlp.proj.weight"], model.llm.model.layers[1].mlp.down_proj.weight)

    config = yaml.safe_load((tmp_path / "lit" / "model_config.yaml").read_text())
    assert config["padded_vocab_size"] == model.layout.total and config["text_vocab_size"] == 320 + 64
    assert (config["n_head"], config["n_query_groups"], config["head_size"]) == (HEADS, GROUPS, HEAD)
    assert config["intermediate_size"] == FFN and config["whisper_adapter_dim"] == 24
    assert config["audio_vocab_size"] == 4160 and config["cat_audio_vocab_size"] == 7 * 4160
    assert (tmp_path / "lit" / "tokenizer.json").is_file()

    # the fused projection read the way litgpt reads it gives Hugging Face's per-head q, k, v
    attn = model.llm.model.layers[0].self_attn
    x = torch.randn(3, D)
    fused = x @ state["transformer.h.0.attn.attn.weight"].T + state["transformer.h.0.attn.attn.bias"]
    grouped = fused.view(3, GROUPS, HEADS // GROUPS + 2, HEAD)
    q_lit, k_lit, v_lit = grouped[:, :, :-2], grouped[:, :, -2], grouped[:, :, -1]
    with torch.no_grad():
        q_hf = attn.q_proj(x).view(3, GROUPS, HEADS // GROUPS, HEAD)  # query head h is in group h // q_per_kv
        k_hf, v_hf = attn.k_proj(x).view(3, GROUPS, HEAD), attn.v_proj(x).view(3, GROUPS, HEAD)
    for a, b in ((q_lit, q_hf), (k_lit, k_hf), (v_lit, v_hf)):
        torch.testing.assert_close(a, b)

    back, tokenizer, _ = import_mini_omni(tmp_path / "lit")
    for (name, a), (name_b, b) in zip(
        [*model.llm.named_parameters(), *model.adapter.named_parameters()],
        [*back.llm.named_parameters(), *back.adapter.named_parameters()],
    ):
        assert name == name_b and torch.equal(a, b), name
    logits, loss = _outputs(model)
    logits_back, loss_back = _outputs(back)
    assert torch.equal(logits, logits_back) and torch.equal(loss, loss_back)
    assert tokenizer("the cat").input_ids


def test_untied_single_group_round_trip_through_the_cli(tiny_checkpoints, tmp_path):
    model = _trained_export(tiny_checkpoints, tmp_path / "final", adapter_hidden=64)
    assert (
        main(
            [
                "--from",
                str(tmp_path / "final"),
                "--to",
                str(tmp_path / "lit"),
                "--format",
                "mini-omni",
                "--allow-encoder-mismatch",
            ]
        )
        == 0
    )
    state = torch.load(tmp_path / "lit" / "lit_model.pth", weights_only=True)
    assert not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    assert main(["--from", str(tmp_path / "lit"), "--to", str(tmp_path / "back"), "--format", "omni"]) == 0
    back = load_omni(tmp_path / "back")[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert torch.equal(_outputs(model)[1], _outputs(back)[1])


def test_hf_export_is_the_stage_export(tiny_checkpoints, tmp_path):
    model = _trained_export(tiny_checkpoints, tmp_path / "final", adapter_hidden=None, frame_stack=4)
    export_hf(tmp_path / "final", tmp_path / "hf")
    back = load_omni(tmp_path / "hf")[0]
    assert torch.equal(_outputs(model)[1], _outputs(back)[1])
    assert json.loads((tmp_path / "hf" / "llm" / "config.json").read_text())["vocab_size"] == model.layout.total
    with pytest.raises(ExportError, match="not empty"):
        export_hf(tmp_path / "final", tmp_path / "hf")


def test_shapes_that_cannot_agree_are_refused(tiny_checkpoints, tmp_path):
    _trained_export(tiny_checkpoints, tmp_path / "stacked", adapter_hidden=None, frame_stack=4)
    with pytest.raises(ExportError) as err:
        export_mini_omni(tmp_path / "stacked", tmp_path / "out", allow_encoder_mismatch=True)
    assert "frame_stack is 4" in str(err.value) and "adapter_hidden is 128" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_split_inverts_fuse():
    from training.model.litgpt import fuse_qkv

    q, k, v = torch.randn(14 * 4, 3), torch.randn(2 * 4, 3), torch.randn(2 * 4, 3)
    fused = fuse_qkv(q, k, v, n_head=14, n_groups=2)
    assert fused.shape == (18 * 4, 3)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, 14, 2, 4), (q, k, v)))
    assert torch.equal(fused[7 * 4 : 8 * 4], k[:4]) and torch.equal(fused[9 * 4 : 16 * 4], q[7 * 4 :])


def test_real_recipe_shapes_on_the_meta_device():
    """The mapping table's shape column: the mini-omni recipe (shipped configs, meta device, nothing
    allocated) passes every compatibility check and yields exactly those shapes."""
    from training.model.dry_run import build_meta_model, config_folder
    from training.model.litgpt import check_compatible, lit_config, lit_state_dict
    from training.stages import MINI_OMNI

    model, _ = build_meta_model(
        config_folder(MINI_OMNI.encoder, "encoder")[0],
        config_folder(MINI_OMNI.llm, "llm")[0],
        MINI_OMNI.frame_stack,
        MINI_OMNI.adapter_hidden,
        MINI_OMNI.encoder,
    )
    assert check_compatible(model, model.llm.config, allow_encoder_mismatch=False) == []
    shapes = {k: tuple(v.shape) for k, v in lit_state_dict(model).items()}
    assert len(shapes) == 3 + 24 * 8 + 3
    assert shapes["transformer.wte.weight"] == shapes["lm_head.weight"] == (181_120, 896)
    assert shapes["transformer.h.23.attn.attn.weight"] == (1152, 896)
    assert shapes["transformer.h.0.attn.attn.bias"] == (1152,)
    assert shapes["transformer.h.0.attn.proj.weight"] == (896, 896)
    assert shapes["transformer.h.0.mlp.fc_1.weight"] == (4864, 896)
    assert shapes["transformer.h.0.mlp.proj.weight"] == (896, 4864)
    assert shapes["whisper_adapter.fc_1.weight"] == (4864, 768) and shapes["whisper_adapter.proj.weight"] == (896, 4864)
    config = lit_config(model, 2048)
    assert config | {"name": None} == config | {
        "name": None,
        "n_layer": 24,
        "n_head": 14,
        "n_query_groups": 2,
        "head_size": 64,
        "n_embd": 896,
        "intermediate_size": 4864,
        "rope_base": 1_000_000,
        "norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "text_vocab_size": 152_000,
        "padded_vocab_size": 181_120,
        "whisper_adapter_dim": 768,
        "block_size": 2048,
    }


def test_fine_tune_from_a_mini_omni_folder_on_user_data(tiny_checkpoints, tmp_path, capsys):
    """--init-from accepts a Mini-Omni litgpt folder: imported once into the cache, then trained."""
    import json

    import numpy as np
    import soundfile as sf

    from training.run import main as run_main

    _trained_export(tiny_checkpoints, tmp_path / "final", adapter_hidden=64)
    export_mini_omni(tmp_path / "final", tmp_path / "mini-omni", allow_encoder_mismatch=True)
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(40):
        sf.write(data / f"{i}.wav", (0.1 * np.sin(np.arange(16000 + 400 * i) / (5 + i % 4))).astype("float32"), 16000)
        rows.append(json.dumps({"audio_filepath": f"{i}.wav", "text": "the cat sat" if i % 2 else "a dog ran"}))
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    enc, llm = tiny_checkpoints
    args = ["--stage", "second", "--init-from", str(tmp_path / "mini-omni"), "--dataset", str(data)]
    args += ["--encoder", enc, "--llm", llm, "--max-steps", "2", "--cache-dir", str(tmp_path / "cache")]
    for run in ("first", "again"):
        code = run_main([*args, "--output-dir", str(tmp_path / run)])
        out = capsys.readouterr().out
        assert code in (0, 3), out  # 3: the stage's WER gate, after two steps
        assert json.loads((tmp_path / run / "run_record.json").read_text())["stages"]["second"]["steps"] == 2
        assert ("a Mini-Omni checkpoint; importing it" in out) == (run == "first"), out
    assert len(list((tmp_path / "cache" / "imports").iterdir())) == 1
