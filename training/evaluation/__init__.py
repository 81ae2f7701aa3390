"""Evaluation: the held-out scores a stage boundary records, and the run report.

  scores.py     WER (greedy decoding through training.model.decoding), answer accuracy,
                audio-token accuracy, held-out loss
  spoken.py     free-running speech answers of the held-out questions, judged by their codes
  speech_judge.py  the ASR judge of answer speech (Whisper by path, or the run's own model)
  report.py     report.md and its plots from a run directory (CLI)
  listening.py  the listening page (report.html) and the WAVs it plays
  metrics/wer/  the local `evaluate` WER module (loads offline)

May import training.stages, training.common, training.speech and training.model; never the engine,
the data path or the demo.
"""
