"""Exact ids of the 8-stream layout (training/speech/layout.py's module docstring; README "Tasks,
speech output and QA data") and where the loss is taken."""

import torch

from training.speech.layout import IGNORE, TEXT_ROW, VocabLayout, speech_to_text_example


def test_vocabulary_is_mini_omnis():
    v = VocabLayout()
    assert (v.eot, v.pad_t, v.input_t, v.answer_t, v.asr) == (151_936, 151_937, 151_938, 151_939, 151_940)
    assert v.text_size == 152_000 and v.audio_size == 4_160 and v.total == 181_120
    assert v.audio_id(0, 0) == 152_000 and v.audio_id(4095, 6) == 152_000 + 6 * 4160 + 4095
    assert (v.eoa, v.pad_a, v.input_a, v.answer_a, v.split) == (4096, 4097, 4098, 4099, 4100)


def _audio(v, special, layer):
    return 152_000 + layer * 4160 + special


def test_asr_example_ids_and_labels():
    v = VocabLayout()
    ex = speech_to_text_example(v, n_audio=3, answer_ids=[11, 22], task="asr")
    # positions: input, 3 x speech, eoa/eot, task, answer 11, answer 22, eot
    expected_text = [v.input_t, v.pad_t, v.pad_t, v.pad_t, v.eot, v.asr, 11, 22, v.eot]
    assert ex.input_ids[TEXT_ROW].tolist() == expected_text
    for layer in range(7):
        expected = [_audio(v, s, layer) for s in (4098, 4097, 4097, 4097, 4096, 4097, 4097, 4097, 4097)]
        assert ex.input_ids[layer].tolist() == expected
    assert ex.audio_mask.tolist() == [False, True, True, True, False, False, False, False, False]
    assert ex.labels[TEXT_ROW].tolist() == [IGNORE] * 6 + [11, 22, v.eot]
    assert bool((ex.labels[:TEXT_ROW] == IGNORE).all())


def test_a1t2_example_differs_only_in_task_token():
    v = VocabLayout()
    asr = speech_to_text_example(v, 2, [5], task="asr")
    a1t2 = speech_to_text_example(v, 2, [5], task="a1t2")
    diff = (asr.input_ids != a1t2.input_ids).nonzero().tolist()
    assert diff == [[TEXT_ROW, 4]]  # the text-stream task token: asr vs answer_t
    assert a1t2.input_ids[TEXT_ROW, 4] == v.answer_t
    assert a1t2.input_ids[:TEXT_ROW, 4].tolist() == [_audio(v, v.pad_a, i) for i in range(7)]
    assert torch.equal(asr.labels, a1t2.labels)


def test_small_text_vocab_shifts_everything():
    v = VocabLayout(text_vocab=1024)
    assert v.eot == 1024 and v.text_size == 1088 and v.total == 1088 + 7 * 4160
    assert v.stream_slices()[TEXT_ROW] == (0, 1088) and v.stream_slices()[0] == (1088, 1088 + 4160)
