"""Speech and its tokens: the bottom layer every other package builds on.

  audio.py       decoding (soundfile) and resampling (soxr) of audio cells and files, WAV bytes
  text.py        transcript normalization (Whisper's English normalizer)
  snac_codes.py  SNAC's 7-codes-per-frame order and the answer_snac string form
  codec.py       the SNAC 24 kHz codec: speech <-> 7-code frames
  layout.py      Mini-Omni's vocabulary and the 8-stream prompt/label layout of the five tasks

May import training.stages and training.common only.
"""
