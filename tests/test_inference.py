"""training.model.inference on tiny random checkpoints: agreement with uncached greedy decoding, batched
== one at a time, stop ids, and an overfitted tiny model decoding its training answer (text, SNAC
codes, WAV) exactly."""

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.helpers import scramble, tiny_model
from training.model import save_omni, set_trainable
from training.model.inference import build_prompts, encode_question, generate, main, speak
from training.speech.layout import N_AUDIO_LAYERS, delay_audio, strip_text_answer, task_example
from training.speech.snac_codes import samples_per_frame


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread beats two (no sync cost, no fight over a shared CPU)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    model, tokenizer, fe = tiny_model(tiny_checkpoints, frame_stack=4, seed=0)
    scramble(model)  # random rows for the grown vocabulary (see tests/helpers.py)
    return model.eval(), tokenizer, fe


def _speech_batch(model, fe, seconds=(2.0, 1.2, 0.5)):
    """Padded encoder states [B, F, d] and lengths, as the evaluation collator gives them."""
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(int(16000 * s)).astype("float32") for s in seconds]
    states, lengths = zip(*(encode_question(model, fe, w) for w in waves))
    width = max(s.shape[1] for s in states)
    padded = torch.zeros(len(states), width, states[0].shape[-1])
    for i, s in enumerate(states):
        padded[i, : s.shape[1]] = s[0]
    return padded, torch.cat(lengths)


@pytest.mark.parametrize("task", ["asr", "a1t2"])
def test_batched_text_generation_equals_one_at_a_time(tiny, task):
    """Left-padded rows of different lengths decode as they do alone; a stop id ends a row early
    (cut there, like eot) without changing the others."""
    model, _, fe = tiny
    states, lengths = _speech_batch(model, fe)

    def alone(i, stops=()):
        return generate(
            model,
            task,
            encoder_states=states[i : i + 1, : int(lengths[i])],
            encoder_lengths=lengths[i : i + 1],
            max_new_tokens=12,
            stop_ids=stops,
        )[0]

    together = generate(model, task, encoder_states=states, encoder_lengths=lengths, max_new_tokens=12)
    assert [g.text_ids for g in together] == [alone(i).text_ids for i in range(3)]
    assert all(g.audio_ids is None and g.codes is None for g in together)
    assert sum(len(g.text_ids) >= 3 for g in together) >= 2  # not vacuous: real tokens were compared
    long = max(range(3), key=lambda i: len(together[i].text_ids))
    stop = together[long].text_ids[2]
    stopped = generate(model, task, encoder_states=states, encoder_lengths=lengths, max_new_tokens=12, stop_ids=[stop])
    for i in range(3):
        ids = together[i].text_ids
        assert stopped[i].text_ids == (ids[: ids.index(stop)] if stop in ids else ids)
        assert stopped[i].text_ids == alone(i, [stop]).text_ids


def test_text_out_matches_uncached_recompute(tiny):
    """asr / a1t2 / t1t2: the KV-cache decoder equals greedy decoding that re-runs the whole
    sequence at every step."""
    model, _, fe = tiny
    layout = model.layout
    states, lengths = _speech_batch(model, fe, seconds=(0.7,))
    speech = {"encoder_states": states, "encoder_lengths": lengths}
    for task, kwargs in (("asr", speech), ("a1t2", speech), ("t1t2", {"question_ids": [[5, 9, 17, 3]]})):
        ours = generate(model, task, max_new_tokens=8, **kwargs)[0]
        n_audio = [int((lengths[0] + 3) // 4)] if task != "t1t2" else None
        seq = build_prompts(layout, task, n_audio=n_audio, question_ids=kwargs.get("question_ids"))[0][None]
        mask = torch.zeros(1, seq.shape[2], dtype=torch.bool)
        if task != "t1t2":
            mask[0, 1 : 1 + n_audio[0]] = True
        tokens = []
        with torch.no_grad():
            for _ in range(8):
                x = model.embed(seq, mask, kwargs.get("encoder_states"), kwargs.get("encoder_lengths"))
                hidden = model.llm.model(inputs_embeds=x).last_hidden_state[:, -1]
                token = int(model.stream_logits(hidden, 0, layout.text_size).argmax(-1))
                tokens.append(token)
                if token == layout.eot:
                    break
                column = torch.tensor([layout.audio_id(layout.pad_a, i) for i in range(7)] + [token])
                seq = torch.cat([seq, column[None, :, None]], dim=2)
                mask = torch.cat([mask, torch.zeros(1, 1, dtype=torch.bool)], dim=1)
        assert ours.text_ids == strip_text_answer(layout, tokens)
        assert ours.audio_ids is None


@pytest.mark.parametrize("task", ["a1a2", "t1a2"])
def test_batched_speech_generation_equals_one_at_a_time(tiny, task):
    model, _, fe = tiny
    layout = model.layout
    if task == "a1a2":
        states, lengths = _speech_batch(model, fe)
        rows = [
            {"encoder_states": states[i : i + 1, : int(lengths[i])], "encoder_lengths": lengths[i : i + 1]}
            for i in range(3)
        ]
        together_kwargs = {"encoder_states": states, "encoder_lengths": lengths}
    else:
        questions = [[5, 9, 17, 3, 44, 2], [7], [100, 101, 102]]
        rows = [{"question_ids": [q]} for q in questions]
        together_kwargs = {"question_ids": questions}
    calls = []

    def lockstep(local: bool) -> bool:  # another rank that needs all 16 steps
        calls.append(local)
        return len(calls) >= 16

    together = generate(model, task, max_new_tokens=16, all_finished=lockstep, **together_kwargs)
    assert len(calls) == 16
    for i, kwargs in enumerate(rows):
        alone = generate(model, task, max_new_tokens=16, **kwargs)[0]
        assert together[i].text_ids == alone.text_ids
        assert torch.equal(together[i].audio_ids, alone.audio_ids)
        assert torch.equal(together[i].codes, alone.codes)
        ids = alone.audio_ids
        assert ids.shape[0] == N_AUDIO_LAYERS
        for layer in range(N_AUDIO_LAYERS):  # the delay is forced, the rest lies in the layer's block
            assert set(ids[layer, : layer + 1].tolist()) == {layout.audio_id(layout.pad_a, layer)}
            assert bool(
                (
                    (ids[layer] >= layout.audio_offset(layer))
                    & (ids[layer] < layout.audio_offset(layer) + layout.audio_size)
                ).all()
            )
            local = ids[layer, layer + 1 :] - layout.audio_offset(layer)
            ends = (local >= layout.audio_codes).nonzero()
            if len(ends):  # a layer that ended (eoa or a stray special) is held at pad_a
                assert set(local[int(ends[0]) + 1 :].tolist()) <= {layout.pad_a}
        assert alone.codes.shape[1] == 7 and alone.codes.shape[0] <= ids.shape[1] - N_AUDIO_LAYERS
    # not vacuous: the scrambled model speaks (codes) and writes text
    assert any(g.codes.shape[0] > 0 for g in together) and any(g.text_ids for g in together)


def _overfit(model, examples, steps: int = 400) -> None:
    """Teach the tiny model its few training rows until every scored argmax is right."""
    set_trainable(model, ["adapter", "llm"])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        loss = sum(model(**ex)["loss"] for ex in examples)
        loss.backward()
        optimizer.step()
        if step % 10 == 9 and all(_all_correct(model, ex) for ex in examples):
            break
    model.eval()


@torch.no_grad()
def _all_correct(model, ex) -> bool:
    x = model.embed(ex["input_ids"], ex["audio_mask"], ex.get("encoder_states"), ex.get("encoder_lengths"))
    hidden = model.llm.model(inputs_embeds=x).last_hidden_state[0, :-1]
    targets = ex["labels"][0, :, 1:]
    for stream, (start, end) in enumerate(model.layout.stream_slices()):
        keep = targets[stream] != -100
        predicted = model.stream_logits(hidden[keep], start, end).argmax(-1) + start
        if not torch.equal(predicted, targets[stream, keep]):
            return False
    return True


def _row(example, states=None, lengths=None) -> dict:
    return {
        "input_ids": example.input_ids[None],
        "labels": example.labels[None],
        "attention_mask": torch.ones(1, example.input_ids.shape[1], dtype=torch.long),
        "audio_mask": example.audio_mask[None],
        "encoder_states": states,
        "encoder_lengths": lengths,
    }


def test_overfitted_model_decodes_its_answer_and_writes_the_wav(tiny_checkpoints, tmp_path, capsys):
    from training.speech.codec import load_codec

    model, tokenizer, fe = tiny_model(tiny_checkpoints, frame_stack=4, seed=0)
    layout = model.layout
    question = "a dog ran"
    answer_ids = tokenizer("the cat sat", add_special_tokens=False).input_ids
    codes = torch.randint(0, 4096, (3, N_AUDIO_LAYERS), generator=torch.Generator().manual_seed(1))
    wave = np.random.default_rng(1).standard_normal(9_600).astype("float32")  # 0.6 s spoken question
    states, lengths = encode_question(model, fe, wave)
    n_audio = int((lengths[0] + 3) // 4)
    t1a2 = task_example(layout, "t1a2", tokenizer(question, add_special_tokens=False).input_ids, answer_ids, codes)
    a1a2 = task_example(layout, "a1a2", n_audio, answer_ids, codes)
    examples = [_row(t1a2), _row(a1a2, states, lengths)]
    _overfit(model, examples)
    assert all(_all_correct(model, ex) for ex in examples), "the tiny model did not learn its rows"

    question_ids = tokenizer(question, add_special_tokens=False).input_ids
    for kwargs, task in (
        ({"question_ids": [question_ids]}, "t1a2"),
        ({"encoder_states": states, "encoder_lengths": lengths}, "a1a2"),
    ):
        out = generate(model, task, max_new_tokens=40, **kwargs)[0]
        assert out.text_ids == answer_ids
        assert torch.equal(out.codes, codes)
        # the whole delayed block, pads and eoa included, as training laid it out; decoding
        # stopped at layer 6's eoa (the text is shorter than the block)
        assert torch.equal(out.audio_ids, delay_audio(layout, codes))
        assert torch.equal(out.audio_ids, t1a2.input_ids[:N_AUDIO_LAYERS, -out.audio_ids.shape[1] :])

    # batched beside a longer, untrained question: the trained row finishes early (then sits on
    # forced pads while the other row decodes on) and both rows equal their one-at-a-time runs
    other = tokenizer("the mat on the cat sat a dog", add_special_tokens=False).input_ids
    together = generate(model, "t1a2", question_ids=[question_ids, other], max_new_tokens=30)
    assert together[0].text_ids == answer_ids and torch.equal(together[0].codes, codes)
    for i, q in enumerate((question_ids, other)):
        alone = generate(model, "t1a2", question_ids=[q], max_new_tokens=30)[0]
        assert together[i].text_ids == alone.text_ids
        assert torch.equal(together[i].audio_ids, alone.audio_ids) and torch.equal(together[i].codes, alone.codes)

    codec = load_codec(None, log=lambda _: None)
    expected_text = tokenizer.decode(answer_ids)
    wav_path = tmp_path / "answer.wav"
    text, frames = speak(
        model, tokenizer, codec, text=question, task="t1a2", wav_path=wav_path, max_new_tokens=40, feature_extractor=fe
    )
    assert (text, frames) == (expected_text, 3)
    samples, rate = sf.read(wav_path)
    info = sf.info(wav_path)
    assert rate == 24_000 and info.subtype == "PCM_16" and samples.ndim == 1
    assert len(samples) == frames * samples_per_frame() == 3 * 2048
    assert np.abs(samples).max() > 0

    # the speech question, given as samples and as a file at another rate (float WAV: no rounding)
    question_wav = tmp_path / "question.wav"
    sf.write(question_wav, wave, 16_000, subtype="FLOAT")
    for audio in ((wave, 16_000), question_wav):
        out_path = tmp_path / "spoken.wav"
        text, frames = speak(
            model,
            tokenizer,
            codec,
            audio=audio,
            task="a1a2",
            wav_path=out_path,
            max_new_tokens=40,
            feature_extractor=fe,
        )
        assert (text, frames) == (expected_text, 3)
        assert sf.info(out_path).frames == 3 * 2048

    # the CLI on a stage export of the same model
    save_omni(model, tmp_path / "export", tokenizer, fe)
    capsys.readouterr()
    assert (
        main(
            [
                "--model",
                str(tmp_path / "export"),
                "--task",
                "a1a2",
                "--audio",
                str(question_wav),
                "--out",
                str(tmp_path / "cli.wav"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == expected_text.strip()
    assert sf.info(tmp_path / "cli.wav").frames == 3 * 2048 and sf.info(tmp_path / "cli.wav").samplerate == 24_000


def test_inputs_are_checked(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="unknown task"):
        generate(model, "tts", question_ids=[[1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="speech question"):
        generate(model, "a1a2", question_ids=[[1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="text question"):
        generate(model, "t1a2", max_new_tokens=2)
    with pytest.raises(SystemExit):
        main(["--model", "x", "--task", "a1a2", "--audio", "q.wav"])  # speech out needs --out
