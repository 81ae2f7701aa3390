"""Evaluation: the held-out scores a stage boundary records, and the run report.

  scores.py     WER (greedy decoding through training.model.inference), answer accuracy,
                audio-token accuracy, held-out loss
  report.py     report.md and its plots from a run directory (CLI)
  metrics/wer/  the local `evaluate` WER module (loads offline)

May import training.stages, training.common, training.speech and training.model; never the engine,
the data path or the demo.
"""
