"""The data path: sources in, checked rows, cached encoder features, length-grouped 8-stream batches out.

  formats.py   readers for the formats speech data is kept in (audiofolder, manifests, save_to_disk,
               Parquet), each a Source: named splits read on demand, their fingerprints following
               the audio files; which reading a folder gets (data.format)
  sources.py   a user dataset by path or hub id; the run's splits and columns, chosen and checked
               (the demo corpora come in the same way)
  splits.py    which split trains, which is held out, which stops early (names or seeded slices)
  columns.py   which column holds the audio and which the transcript
  mixing.py    several datasets in one run, by weight
  checks.py    row checks before any encoding; DataError names the dataset, split, row and column
  features.py  decode, log-mel, frozen encoder states and token ids, cached with datasets.map
  batching.py  the stage's task mixture, length-grouped sampling, the 8-stream collator, loaders
  stream.py    the training split read row by row, log-mel made by the loader, the encoder in the step
  shard.py     the shard converter (python -m training.data.shard; its plan keeps reruns and array
               tasks to one source and one size) and the memory-mapped shard reader

May import training.stages, training.common and training.speech; never the engine, the model or
the demo.
"""
