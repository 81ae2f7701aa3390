"""Mini-Omni's three-stage training on Accelerate (+ DeepSpeed ZeRO).

Read it top down: run.py (the command line) hands each stage to engine/ (one stage under
Accelerate), which takes its batches from data/ and its model from model/, and scores it with
evaluation/; speech/ (audio, SNAC codes, the 8-stream layout) is the layer under all of them.
stages.py holds the stage table, the one source of every training number. The offline demo
(synthesized corpora, stand-in checkpoints) lives apart in demo/, reached only from
engine/sources.py.
"""
