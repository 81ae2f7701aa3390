"""The stage engine: one stage of the recipe under Accelerate, from its inputs to its export.

  context.py      what all stages of a run share (RunContext, the run record), the early endings
  launch.py       the Accelerator built from the recipe; launch/recipe checks
  sources.py      where data and pretrained parts come from (the one place the demo is reached)
  weights.py      where a stage's weights start (a Mini-Omni folder is imported on the way)
  prepare.py      row checks and the feature cache before a stage (--validate-data, --prepare)
  loaders.py      the stage's loaders and score floors
  budget.py       tokens_per_micro_batch "auto": the budget this process's GPU holds
  step.py         one optimizer step: global-token loss, non-finite skip, StepStats
  mfu.py          MFU: a step's FLOPs (model/flops.py) over the device's dense bf16 peak
  guards.py       stop signals, non-finite patience, early stopping
  checkpoints.py  atomic step checkpoints with file checksums, `latest`, damaged and abandoned ones
                  set aside, a full disk reported, resume fingerprints
  run_folder.py   when a finished stage in --output-dir may be reused; --resume PATH checked
  rank_zero.py    single-rank phases: rank 0 works while the others wait on the store, no collective
  faults.py       a failing rank's phase, stacks and exit code; the stack watchdog; the test fault hook
  boundary.py     export, held-out scores, record, WER gate, report at the stage's end
  stage.py        StageRun: setup / train / finish

May import every package below it (data, model, evaluation, speech, stages, common); only
sources.py imports the demo.
"""
