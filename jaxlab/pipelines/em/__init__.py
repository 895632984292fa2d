"""The EM transfer study's stages, one module each (jaxlab.pipelines.em_study composes them):

  study     what a config asks for: bases, cells, fine-tunes, the files of a cell
  data      data/: the synthetic world or the study's split of the real cell files
  training  bases/<base>/, finetunes/<base>/<ft>/: pretraining and fine-tuning (runner workdirs)
  evals     evals/<base>/<ft>/: answers on the general set and every cell's eval split, judged
  probes    probes/<base>/: the persona probe
"""
