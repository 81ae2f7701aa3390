"""Speech output layout: SNAC frame order, answer_snac strings, the per-layer delay, and which
positions each of the five tasks scores (training/speech/layout.py's module docstring; README
"Tasks, speech output and QA data"). Expected matrices are written out literally, not recomputed
by the code under test."""

import pytest
import torch

from training.speech.layout import (
    IGNORE,
    TEXT_ROW,
    VocabLayout,
    delay_audio,
    speech_to_text_example,
    task_example,
    undelay_audio,
)
from training.speech.snac_codes import (
    SNAC_24KHZ_CONFIG,
    flatten_snac,
    format_answer_snac,
    parse_answer_snac,
    samples_per_frame,
    unflatten_snac,
)
from training.stages import TASKS

V = VocabLayout()

# a known 3-frame answer: 7 codes per frame (codebook edges 0 and 4095 included)
CODES = torch.tensor(
    [
        [0, 4095, 17, 300, 1234, 2048, 9],
        [1, 4094, 18, 301, 1235, 2049, 10],
        [2, 4093, 19, 302, 1236, 2050, 11],
    ]
)
CODES_STR = "# 0 4095 17 300 1234 2048 9 # 1 4094 18 301 1235 2049 10 # 2 4093 19 302 1236 2050 11"

# task_example(V, "a1a2", 1, [5, 6], CODES): 4 prompt columns | 11 answer columns (3 frames + 8)
A1A2_IDS = [
    # input_a pad_a  eoa  answer_a | layer i: (i+1) pad_a, 3 codes, eoa, (6-i) pad_a
    [
        156098,
        156097,
        156096,
        156099,
        156097,
        152000,
        152001,
        152002,
        156096,
        156097,
        156097,
        156097,
        156097,
        156097,
        156097,
    ],  # A0  # noqa: E501
    [
        160258,
        160257,
        160256,
        160259,
        160257,
        160257,
        160255,
        160254,
        160253,
        160256,
        160257,
        160257,
        160257,
        160257,
        160257,
    ],  # A1  # noqa: E501
    [
        164418,
        164417,
        164416,
        164419,
        164417,
        164417,
        164417,
        160337,
        160338,
        160339,
        164416,
        164417,
        164417,
        164417,
        164417,
    ],  # A2  # noqa: E501
    [
        168578,
        168577,
        168576,
        168579,
        168577,
        168577,
        168577,
        168577,
        164780,
        164781,
        164782,
        168576,
        168577,
        168577,
        168577,
    ],  # A3  # noqa: E501
    [
        172738,
        172737,
        172736,
        172739,
        172737,
        172737,
        172737,
        172737,
        172737,
        169874,
        169875,
        169876,
        172736,
        172737,
        172737,
    ],  # A4  # noqa: E501
    [
        176898,
        176897,
        176896,
        176899,
        176897,
        176897,
        176897,
        176897,
        176897,
        176897,
        174848,
        174849,
        174850,
        176896,
        176897,
    ],  # A5  # noqa: E501
    [
        181058,
        181057,
        181056,
        181059,
        181057,
        181057,
        181057,
        181057,
        181057,
        181057,
        181057,
        176969,
        176970,
        176971,
        181056,
    ],  # A6  # noqa: E501
    # input_t pad_t  eot  answer_t | 5, 6, eot, then pad_t
    [
        151938,
        151937,
        151936,
        151939,
        5,
        6,
        151936,
        151937,
        151937,
        151937,
        151937,
        151937,
        151937,
        151937,
        151937,
    ],  # text  # noqa: E501
]


# -- the delay ----------------------------------------------------------------------------------


def test_a1a2_three_frames_exact_ids_labels_and_mask():
    ex = task_example(V, "a1a2", 1, [5, 6], CODES)
    assert ex.input_ids.tolist() == A1A2_IDS
    expected_labels = [[IGNORE] * 4 + row[4:] for row in A1A2_IDS[:7]]  # every audio answer column
    expected_labels.append([IGNORE] * 4 + [5, 6, 151936] + [IGNORE] * 8)  # text + eot, not the pad_t
    assert ex.labels.tolist() == expected_labels
    assert ex.audio_mask.tolist() == [False, True] + [False] * 13


def test_delay_and_undelay_three_frames():
    block = torch.tensor(A1A2_IDS)[:7, 4:]
    assert delay_audio(V, CODES).tolist() == block.tolist()
    assert torch.equal(undelay_audio(V, block), CODES)
    assert torch.equal(undelay_audio(V, torch.tensor(A1A2_IDS)[:, 4:]), CODES)  # text row is ignored
    # what follows eoa is not read (a decoder stops there)
    junk = block.clone()
    junk[0, -1] = 152000 + 7
    assert torch.equal(undelay_audio(V, junk), CODES)


def test_undelay_rejects_malformed_blocks():
    block = delay_audio(V, CODES)
    short = block.clone()
    short[3, 3 + 1 + 2] = 164480 + 4096  # layer 3 ends one frame early
    with pytest.raises(ValueError, match=r"different numbers of codes \(layers 0..6: \[3, 3, 3, 2, 3, 3, 3\]\)"):
        undelay_audio(V, short)
    no_eoa = block.clone()
    no_eoa[3, 3 + 1 + 3] = 164480 + 5  # layer 3's eoa replaced by a code
    with pytest.raises(ValueError, match="audio layer 3"):
        undelay_audio(V, no_eoa)
    cut = block[:, :-1]  # layer 6 lost its eoa
    with pytest.raises(ValueError, match="audio layer 6 has no eoa"):
        undelay_audio(V, cut)
    assert torch.equal(undelay_audio(V, cut, require_eoa=False), CODES)
    assert torch.equal(undelay_audio(V, block[:, :-2], require_eoa=False), CODES[:2])
    early = block.clone()
    early[2, 0] = 160320 + 4  # a code where the delay needs pad_a
    with pytest.raises(ValueError, match="layer 2 must open with 3 pad_a"):
        undelay_audio(V, early)
    wrong_layer = block.clone()
    wrong_layer[1, 3] = 152000 + 4  # a layer-0 id inside layer 1
    with pytest.raises(ValueError, match="audio layer 1: id 152004 at answer column 3"):
        undelay_audio(V, wrong_layer)
    with pytest.raises(ValueError, match="shape"):
        undelay_audio(V, block[:5])
    with pytest.raises(ValueError, match="at least one SNAC frame"):
        delay_audio(V, torch.zeros((0, 7), dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 4096\)"):
        delay_audio(V, CODES + 1)


def test_undelay_of_immediate_eoa_is_no_frames():
    # a model that ends its speech at once: each layer's delay, eoa, then pads
    rows = [
        [152000 + 4160 * i + 4097] * (i + 1) + [152000 + 4160 * i + 4096] + [152000 + 4160 * i + 4097] * (6 - i)
        for i in range(7)
    ]
    assert undelay_audio(V, torch.tensor(rows)).shape == (0, 7)


# -- answer_snac strings -----------------------------------------------------------------------


def test_answer_snac_parses_to_the_known_codes():
    assert torch.equal(parse_answer_snac(CODES_STR, "row 0"), CODES)
    assert torch.equal(parse_answer_snac("\n" + CODES_STR.replace(" ", "  ") + " #\n", "row 0"), CODES)
    assert format_answer_snac(CODES) == CODES_STR


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "answer_snac is empty"),
        ("   ", "answer_snac is empty"),
        (None, "must be a string, got NoneType"),
        ("#", "holds no frames"),
        ("# 1 2 3 4 5 6 # 1 2 3 4 5 6 7", "frame 0 has 6 codes, expected 7"),
        ("# 1 2 3 4 5 6 7 # 1 2 3 4 5 6 7 8", "frame 1 has 8 codes, expected 7"),
        ("# 1 2 3 4 5 6 7 # # 1 2 3 4 5 6 7", "frame 1 has 0 codes"),
        ("# 1 2 x 4 5 6 7", "frame 0: 'x' is not an integer code"),
        ("# 1 2 3 4 5 6 2.5", "'2.5' is not an integer code"),
        ("# 1 2 3 4 5 6 7 # 1 2 3 4096 5 6 7", "frame 1: code 4096 outside"),
        ("# 1 2 3 4 5 6 -1", "frame 0: code -1 outside"),
        ("1 2 3 4 5 6 7", "must start with '#'"),
    ],
)
def test_bad_answer_snac_is_rejected_naming_the_row(text, problem):
    where = "dataset qa, row 12, column 'answer_snac'"
    with pytest.raises(ValueError) as err:
        parse_answer_snac(text, where)
    assert str(err.value).startswith(where + ":") and problem in str(err.value)


# -- SNAC levels <-> 7 codes per frame -----------------------------------------------------------


def test_flatten_order_is_l0_l1_l2_l2_l1_l2_l2():
    levels = [
        torch.tensor([[1, 2]]),
        torch.tensor([[10, 11, 12, 13]]),
        torch.tensor([[20, 21, 22, 23, 24, 25, 26, 27]]),
    ]
    flat = flatten_snac(levels)
    assert flat.tolist() == [[1, 10, 20, 21, 11, 22, 23], [2, 12, 24, 25, 13, 26, 27]]
    back = unflatten_snac(flat)
    assert [b.tolist() for b in back] == [lv.tolist() for lv in levels]


def test_flatten_unflatten_round_trip_and_checks():
    g = torch.Generator().manual_seed(0)
    n = 37
    levels = [torch.randint(0, 4096, (w * n,), generator=g) for w in (1, 2, 4)]
    back = unflatten_snac(flatten_snac(levels))
    assert all(torch.equal(b[0], lv) for b, lv in zip(back, levels))
    assert flatten_snac([lv.numpy() for lv in levels]).tolist() == flatten_snac(levels).tolist()
    with pytest.raises(ValueError, match="level 1 has 5 codes"):
        flatten_snac([levels[0][:2], levels[1][:5], levels[2][:8]])
    with pytest.raises(ValueError, match="3 SNAC levels"):
        flatten_snac(levels[:2])
    with pytest.raises(ValueError, match=r"level 2: codes must lie in \[0, 4096\)"):
        flatten_snac([levels[0][:1], levels[1][:2], torch.tensor([0, 1, 2, 4096])])


def test_real_snac_24khz_codec_round_trip():
    snac = pytest.importorskip("snac")
    torch.manual_seed(0)
    model = snac.SNAC(**SNAC_24KHZ_CONFIG).eval()  # seeded random weights: no download
    # the checkpoint's model card gives 19.8 M parameters; a wrong width would not match
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 19.8
    assert samples_per_frame() == 2048 == model.hop_length * model.vq_strides[0]
    t = torch.arange(24_000) / 24_000
    tone = (0.5 * torch.sin(2 * torch.pi * 220 * t))[None, None]  # 1 s, [B, 1, T]
    with torch.inference_mode():
        levels = model.encode(tone)
        assert [lv.shape[1] for lv in levels] == [12, 24, 48]  # 1 s padded to 12 frames of 2048
        codes = flatten_snac(levels)
        parsed = parse_answer_snac(format_answer_snac(codes), "tone")
        back = unflatten_snac(parsed)
        assert all(torch.equal(b, lv) for b, lv in zip(back, levels))
        assert torch.equal(undelay_audio(V, delay_audio(V, parsed)), codes)
        audio = model.decode(back)
    assert audio.shape == (1, 1, codes.shape[0] * samples_per_frame())


# -- labels per task -------------------------------------------------------------------------


def scored(ex):
    return {tuple(p) for p in (ex.labels != IGNORE).nonzero().tolist()}


def test_every_stage_task_has_a_layout():
    for task in TASKS:
        ex = task_example(V, task, 2 if task in ("asr", "a1t2", "a1a2") else [3, 4], [7, 8], CODES[:2])
        assert ex.input_ids.shape[0] == 8 and ex.labels.shape == ex.input_ids.shape
        assert bool((ex.labels[ex.labels != IGNORE] == ex.input_ids[ex.labels != IGNORE]).all())


@pytest.mark.parametrize("task", ["asr", "a1t2"])
def test_speech_to_text_tasks_score_only_text_answer(task):
    ex = task_example(V, task, 2, [7, 8])
    # input_a, 2 speech, eoa/eot, task token | 7, 8, eot
    assert scored(ex) == {(TEXT_ROW, 5), (TEXT_ROW, 6), (TEXT_ROW, 7)}
    assert ex.input_ids[TEXT_ROW, 4] == (V.asr if task == "asr" else V.answer_t)
    ref = speech_to_text_example(V, 2, [7, 8], task=task)  # the existing ASR path, unchanged
    assert torch.equal(ex.input_ids, ref.input_ids) and torch.equal(ex.labels, ref.labels)
    assert torch.equal(ex.audio_mask, ref.audio_mask)


def test_t1t2_layout_and_labels():
    ex = task_example(V, "t1t2", [3, 4], [7, 8], CODES)  # codes ignored by a text answer
    assert ex.input_ids[TEXT_ROW].tolist() == [151938, 3, 4, 151936, 151939, 7, 8, 151936]
    assert ex.input_ids[0].tolist() == [156097] * 8 and ex.input_ids[6].tolist() == [181057] * 8
    assert scored(ex) == {(TEXT_ROW, 5), (TEXT_ROW, 6), (TEXT_ROW, 7)}
    assert not bool(ex.audio_mask.any())


def test_t1a2_layout_and_labels():
    ex = task_example(V, "t1a2", [3, 4], [7], CODES[:2])
    # prompt: text [input_t, 3, 4, eot, answer_t]; audio [4 x pad_a, answer_a]; answer 2 + 8 columns
    assert ex.input_ids[TEXT_ROW].tolist() == [151938, 3, 4, 151936, 151939, 7, 151936] + [151937] * 8
    assert ex.input_ids[0].tolist()[:5] == [156097, 156097, 156097, 156097, 156099]
    assert ex.input_ids[6].tolist()[:5] == [181057, 181057, 181057, 181057, 181059]
    audio = {(row, col) for row in range(7) for col in range(5, 15)}
    assert scored(ex) == audio | {(TEXT_ROW, 5), (TEXT_ROW, 6)}
    assert not bool(ex.audio_mask.any())
    assert torch.equal(undelay_audio(V, ex.input_ids[:, 5:]), CODES[:2])


def test_a1a2_labels_and_a_text_longer_than_the_speech():
    ex = task_example(V, "a1a2", 2, [7], CODES[:2])  # prompt 5 columns, answer 10
    assert scored(ex) == {(row, col) for row in range(7) for col in range(5, 15)} | {(TEXT_ROW, 5), (TEXT_ROW, 6)}
    assert ex.audio_mask.tolist() == [False, True, True] + [False] * 12
    # 1 frame spans 9 columns; 10 text ids + eot span 11: the block widens, the 2 extra audio
    # columns hold pad_a and are not scored
    long = task_example(V, "a1a2", 2, list(range(10)), CODES[:1])
    assert long.input_ids.shape == (8, 5 + 11)
    assert scored(long) == (
        {(row, col) for row in range(7) for col in range(5, 14)} | {(TEXT_ROW, c) for c in range(5, 16)}
    )
    assert long.input_ids[:7, 14:].tolist() == [[152000 + 4160 * i + 4097] * 2 for i in range(7)]
    assert long.input_ids[6, 13] == 152000 + 6 * 4160 + 4096  # layer 6's eoa ends the block
    assert torch.equal(undelay_audio(V, long.input_ids[:, 5:]), CODES[:1])


def test_task_example_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="unknown task"):
        task_example(V, "tts", 2, [7])
    with pytest.raises(ValueError, match="needs answer_codes"):
        task_example(V, "a1a2", 2, [7])
    with pytest.raises(ValueError, match="question token ids"):
        task_example(V, "t1a2", 2, [7], CODES)
    with pytest.raises(ValueError, match="number of speech positions"):
        task_example(V, "a1t2", [3, 4], [7])
