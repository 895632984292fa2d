"""The study kit: what both pipelines (jaxlab.pipelines.subliminal, jaxlab.pipelines.em_study)
are built from, beside the stage runner (jaxlab.pipelines.stages).

  workers   chains of stages in parallel worker processes (config.workers)
  models    one model pool: load a workdir or HF folder once, sample, score, exact KL
  configs   the training config and the evaluation config of a stage
  main      the command line (`--plan`, errors, the summary) and the timed, planned run
"""
