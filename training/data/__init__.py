"""The data path: sources in, checked rows, cached encoder features, length-grouped 8-stream batches out.

  sources.py   one interface for a data source: a DatasetDict and a name; user datasets by path or
               hub id; the splits and columns a recipe names (the demo corpora come in the same way)
  checks.py    row checks before any encoding; DataError names the dataset, split, row and column
  features.py  decode, log-mel, frozen encoder states and token ids, cached with datasets.map
  batching.py  the stage's task mixture, length-grouped sampling, the 8-stream collator, loaders

May import training.stages, training.common and training.speech; never the engine, the model or
the demo.
"""
