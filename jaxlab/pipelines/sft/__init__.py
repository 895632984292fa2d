"""The sft_eval pipeline's stages, one module each (jaxlab.pipelines.sft_eval composes them):

  study     what a config asks for: the training run, the base, the evaluation config
  training  train/: the training runner's workdir
  evals     eval/: the evaluation (jaxlab.evals.run) of the base and the trained model
  report    report.md: the evaluation's table, the judge's scored shares, the training's loss
"""
