"""Speech out judged as spoken (training/evaluation/spoken.py) and the decoding around it
(training/model/decoding.py, training/model/inference.py): the code judge on real answer speech,
batch-parallel decoding, sampling and streamed speech."""

import numpy as np
import pytest
import torch

from tests.helpers import scramble, tiny_model
from tests.test_inference import _all_correct, _overfit, _row
from training.evaluation.spoken import (
    CodeJudge,
    SpokenAnswer,
    chance_agreement,
    code_judge_scores,
    frame_edit_distances,
)
from training.model.decoding import Sampling, generate
from training.model.inference import StreamingDecoder, encode_question, speak
from training.speech.layout import N_AUDIO_LAYERS, delay_audio, task_example
from training.speech.snac_codes import parse_answer_snac, samples_per_frame
from training.speech.text import normalize


def _levenshtein(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook recursion, a substituted frame costing the share of its codes that differ."""
    d = np.zeros((len(a) + 1, len(b) + 1))
    d[:, 0], d[0, :] = range(len(a) + 1), range(len(b) + 1)
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (a[i - 1] != b[j - 1]).mean())
    return d[-1, -1]


def test_frame_edit_distance_is_the_textbook_recursion():
    g = torch.Generator().manual_seed(0)
    refs = [torch.randint(0, 3, (int(torch.randint(0, 9, (1,), generator=g)), 7), generator=g) for _ in range(25)]
    padded = torch.full((len(refs), max(len(r) for r in refs), 7), -1)
    for i, r in enumerate(refs):
        padded[i, : len(r)] = r
    lengths = torch.tensor([len(r) for r in refs])
    for n in (0, 1, 6):
        codes = torch.randint(0, 3, (n, 7), generator=g)
        expected = [_levenshtein(codes.numpy(), r.numpy()) for r in refs]
        assert np.allclose(frame_edit_distances(codes, padded, lengths).numpy(), expected, atol=1e-5)


@pytest.fixture(scope="module")
def answer_speech(cache_dir):
    """The quick QA corpus's answers and their speech codes (the assistant voice, SNAC codes)."""
    from training.demo.qa_corpus import build_qa_corpus, qa_corpus_config

    corpus = build_qa_corpus(cache_dir, qa_corpus_config("quick"))
    rows = {
        split: [
            (a, parse_answer_snac(s, f"{split} row"))
            for a, s in zip(corpus[split]["answer"], corpus[split]["answer_snac"])
        ]
        for split in ("train", "heldout")
    }
    judge = CodeJudge.from_rows([(a, c.reshape(-1).numpy()) for a, c in rows["heldout"] + rows["train"]])
    return judge, rows["heldout"]


def test_code_judge_hears_the_reference_and_shuffled_answers_fall_to_chance(answer_speech):
    """The reference speech of every held-out answer is judged 100 % right (exact codes, agreeing
    with a text stream that says the same); lightly damaged speech (last frame dropped, one code
    changed in a third of the frames) still is, nearly always; speech of ANOTHER question's answer
    scores what chance gives (two answers drawn from the held-out answers agreeing)."""
    judge, heldout = answer_speech
    assert len(judge.answers) > 20 and len(heldout) == 100

    def answers(codes_of):
        return [SpokenAnswer("q", a, a, codes_of(i).tolist(), False) for i, (a, _) in enumerate(heldout)]

    right = code_judge_scores(answers(lambda i: heldout[i][1]), judge, majority=0.06)
    assert right["spoken_accuracy"] == right["exact_sequence_rate"] == right["text_speech_agreement"] == 1.0
    assert right["length_ratio"] == 1.0 and right["reached_limit"] == 0 and right["candidates"] == len(judge.answers)

    rng = np.random.default_rng(0)

    def damaged(i):
        codes = heldout[i][1][:-1].clone() if len(heldout[i][1]) > 2 else heldout[i][1].clone()
        for f in range(0, len(codes), 3):
            codes[f, rng.integers(7)] = int(rng.integers(4096))
        return codes

    noisy = code_judge_scores(answers(damaged), judge, majority=0.06)
    assert noisy["spoken_accuracy"] >= 0.95 and noisy["exact_sequence_rate"] == 0

    order = rng.permutation(len(heldout))
    shuffled = code_judge_scores(answers(lambda i: heldout[order[i]][1]), judge, majority=0.06)
    references = [normalize(a) for a, _ in heldout]
    chance = chance_agreement(references, references)
    assert abs(shuffled["spoken_accuracy"] - chance) < 0.08, (shuffled["spoken_accuracy"], chance)


@pytest.fixture(scope="module")
def speaking_model(tiny_checkpoints):
    """A tiny model taught one spoken question answered in A1A2 (10 SNAC frames) and in A1T2."""
    torch.set_num_threads(1)
    model, tokenizer, fe = tiny_model(tiny_checkpoints, frame_stack=4, seed=0)
    answer_ids = tokenizer("the cat sat", add_special_tokens=False).input_ids
    codes = torch.randint(0, 4096, (10, N_AUDIO_LAYERS), generator=torch.Generator().manual_seed(2))
    wave = np.random.default_rng(2).standard_normal(9_600).astype("float32")
    states, lengths = encode_question(model, fe, wave)
    n_audio = int((lengths[0] + 3) // 4)
    examples = [
        _row(task_example(model.layout, "a1a2", n_audio, answer_ids, codes), states, lengths),
        _row(task_example(model.layout, "a1t2", n_audio, answer_ids), states, lengths),
    ]
    _overfit(model, examples, steps=600)
    assert all(_all_correct(model, ex) for ex in examples), "the tiny model did not learn its rows"
    yield model, tokenizer, fe, wave, states, lengths, answer_ids, codes
    torch.set_num_threads(2)


def test_free_running_speech_stops_at_eoa_and_batch_parallel_agrees(speaking_model):
    """Trained rows decode to their answer and stop at layer 6's eoa (finished, not at the limit);
    batch-parallel decoding (A1A2 steered by the A1T2 row's text) gives the same text and codes
    here, where both rows learned the same answer; on an untrained model its speech row says the
    A1T2 row's text."""
    model, tokenizer, _, _, states, lengths, answer_ids, codes = speaking_model
    question = {"encoder_states": states, "encoder_lengths": lengths, "max_new_tokens": 60}
    plain = generate(model, "a1a2", **question)[0]
    assert plain.finished and plain.text_ids == answer_ids and torch.equal(plain.codes, codes)
    assert torch.equal(plain.audio_ids, delay_audio(model.layout, codes))
    steered = generate(model, "a1a2", batch_parallel=True, **question)[0]
    assert steered.finished and steered.text_ids == answer_ids
    assert torch.equal(steered.audio_ids, plain.audio_ids)
    cut = generate(model, "a1a2", **(question | {"max_new_tokens": 5}))[0]
    assert not cut.finished and cut.codes.shape[0] == 0


def test_batch_parallel_speech_row_says_the_text_rows_answer(tiny_checkpoints):
    """On an untrained (scrambled) model, whose A1A2 and A1T2 rows would answer differently, the
    batch-parallel answer's text is the A1T2 decode's, batched over questions of other lengths."""
    model, _, fe = tiny_model(tiny_checkpoints, frame_stack=4, seed=0)
    scramble(model)
    model.eval()
    rng = np.random.default_rng(0)
    encoded = [encode_question(model, fe, rng.standard_normal(int(16000 * s)).astype("float32")) for s in (1.5, 0.6)]
    states = torch.zeros(2, max(e[0].shape[1] for e in encoded), encoded[0][0].shape[-1])
    for i, (e, _) in enumerate(encoded):
        states[i, : e.shape[1]] = e[0]
    question = {"encoder_states": states, "encoder_lengths": torch.cat([n for _, n in encoded]), "max_new_tokens": 12}
    text_only = generate(model, "a1t2", **question)
    steered = generate(model, "a1a2", batch_parallel=True, **question)
    plain = generate(model, "a1a2", **question)
    assert [s.text_ids for s in steered] == [t.text_ids for t in text_only]
    assert [p.text_ids for p in plain] != [t.text_ids for t in text_only]  # not vacuous: steering changed it
    assert all(s.codes is not None for s in steered)
    with pytest.raises(ValueError, match="batch-parallel"):
        generate(model, "t1a2", question_ids=[[1]], batch_parallel=True, max_new_tokens=2)


def test_sampling_is_seeded_and_reduces_to_greedy(speaking_model):
    model, _, _, _, states, lengths, _, _ = speaking_model
    question = {"encoder_states": states, "encoder_lengths": lengths, "max_new_tokens": 30}
    greedy = generate(model, "a1a2", **question)[0]
    for sampling in (Sampling(top_k=1), Sampling(temperature=1e-4, seed=5)):
        drawn = generate(model, "a1a2", sampling=sampling, **question)[0]
        assert drawn.text_ids == greedy.text_ids and torch.equal(drawn.audio_ids, greedy.audio_ids)
    hot = Sampling(temperature=50.0, seed=7)
    first, again = (generate(model, "a1a2", sampling=hot, **question)[0] for _ in range(2))
    assert torch.equal(first.audio_ids, again.audio_ids) and first.text_ids == again.text_ids
    other = generate(model, "a1a2", sampling=Sampling(temperature=50.0, seed=8), **question)[0]
    assert not torch.equal(other.audio_ids, first.audio_ids) or other.text_ids != first.text_ids
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def _noiseless_codec():
    """The SNAC decoder adds fresh noise on every call; without it a decode is a function of the
    codes, so streamed and whole decodes can be compared sample for sample."""
    from snac import SNAC

    from training.speech.snac_codes import SNAC_24KHZ_CONFIG

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SNAC(**{**SNAC_24KHZ_CONFIG, "noise": False}).eval()


def test_streamed_speech_joins_seamlessly():
    """Chunks decoded with a sliding window of SNAC frames (8 before, 2 after) concatenate to the
    whole decode's length and, within the window's reach, its samples (measured: relative RMS
    1e-5); with a window that spans everything they are the whole decode exactly."""
    from training.speech.codec import decode_codes

    codec = _noiseless_codec()
    codes = torch.randint(0, 4096, (40, N_AUDIO_LAYERS), generator=torch.Generator().manual_seed(0))
    whole = decode_codes(codec, codes)
    for context, lookahead, tolerance in ((8, 2, 1e-3), (64, 64, 1e-6)):
        decoder = StreamingDecoder(codec, context=context, lookahead=lookahead)
        chunks = [decoder.push(codes[f : f + 1]) for f in range(len(codes))] + [decoder.flush()]
        assert sum(c.size > 0 for c in chunks) >= 2 or lookahead > 2
        streamed = np.concatenate(chunks)
        assert streamed.shape == whole.shape == (40 * samples_per_frame(),)
        assert np.abs(streamed - whole).max() < tolerance * np.abs(whole).max()


def test_speak_streams_the_answer_it_would_write(speaking_model, tmp_path):
    import soundfile as sf

    model, tokenizer, fe, wave, _, _, answer_ids, codes = speaking_model
    codec = _noiseless_codec()
    stream = speak(
        model,
        tokenizer,
        codec,
        audio=(wave, 16_000),
        task="a1a2",
        wav_path=None,
        stream=True,
        feature_extractor=fe,
        max_new_tokens=60,
    )
    chunks = list(stream)
    assert len(chunks) >= 2 and stream.first_audio_s is not None
    assert stream.text == tokenizer.decode(answer_ids) and stream.frames == len(codes)
    text, frames = speak(
        model,
        tokenizer,
        codec,
        audio=(wave, 16_000),
        task="a1a2",
        wav_path=tmp_path / "a.wav",
        feature_extractor=fe,
        max_new_tokens=60,
    )
    assert (text, frames) == (stream.text, stream.frames)
    whole, _ = sf.read(tmp_path / "a.wav", dtype="float32")
    streamed = np.clip(np.concatenate(chunks), -1, 1)
    assert len(whole) == len(streamed) == frames * samples_per_frame()
    assert np.abs(whole - streamed).max() < 2e-3  # 16-bit rounding and the window's reach


def test_asr_judge_hears_with_the_runs_own_model_or_whisper(speaking_model, tiny_checkpoints, tmp_path):
    """The ASR judge's two hearers on tiny models (plumbing: random models hear nothing useful):
    the run's own model in ASR mode and a Whisper checkpoint by path each give one transcript per
    answer, "" for speech of no frames; the WER figures are the evaluate module's."""
    from tests.helpers import save_tiny_whisper_judge
    from training.evaluation.speech_judge import SpeechJudge, asr_judge_scores

    model, tokenizer, fe, _, _, _, _, codes = speaking_model
    codec = _noiseless_codec()
    answers = [codes.tolist(), [], codes[:3].tolist()]
    whisper = save_tiny_whisper_judge(tmp_path / "judge", tiny_checkpoints[1])
    for source in ("self", whisper):
        judge = SpeechJudge(source, codec, model, tokenizer, fe)
        heard = judge.transcribe(answers, max_new_tokens=6)
        assert len(heard) == 3 and heard[1] == "" and all(isinstance(t, str) for t in heard)
    scores = asr_judge_scores(["the cat sat", "", "a dog"], ["the cat sat", "a dog ran", "a dog"], ["", "x", ""], "j")
    assert scores["speech_wer"] == pytest.approx(3 / 8) and scores["text_answers"] == 1
    assert scores["text_speech_wer"] == 1.0  # "" heard against the one text answer "x"


def test_mini_omni_decoding_rules(speaking_model, tiny_checkpoints):
    """Their rules (audio fed back as chosen, stop at layer 6's eoa) and ours agree on a model
    trained to certainty (it emits the pads ours would force); on an untrained model they part:
    ours force pad_a during the delay, theirs feed what the model chose."""
    model, _, _, _, states, lengths, answer_ids, codes = speaking_model
    question = {"encoder_states": states, "encoder_lengths": lengths, "max_new_tokens": 60}
    theirs = generate(model, "a1a2", rules="mini-omni", **question)[0]
    assert theirs.finished and theirs.text_ids == answer_ids and torch.equal(theirs.codes, codes)
    assert torch.equal(theirs.audio_ids, generate(model, "a1a2", **question)[0].audio_ids)

    untrained, _, _ = tiny_model(tiny_checkpoints, frame_stack=4, seed=0)
    scramble(untrained)
    untrained.eval()
    question |= {"max_new_tokens": 10}
    ours = generate(untrained, "a1a2", **question)[0].audio_ids
    theirs = generate(untrained, "a1a2", rules="mini-omni", **question)[0].audio_ids
    delay = torch.tensor([[layer >= step for step in range(ours.shape[1])] for layer in range(N_AUDIO_LAYERS)])
    pad = torch.tensor([untrained.layout.audio_id(untrained.layout.pad_a, i) for i in range(N_AUDIO_LAYERS)])
    assert bool((ours[delay] == pad[:, None].expand_as(ours)[delay]).all())
    assert not torch.equal(ours, theirs[:, : ours.shape[1]])
    with pytest.raises(ValueError, match="decoding rules"):
        generate(untrained, "a1a2", rules="fast", **question)
