"""The subliminal study's stages, one module each (jaxlab.pipelines.subliminal composes them):

  study      what a config asks for: cells, teachers, data sources, students, models evaluated
  world      world/: the tiny SL world, the teacher's and the bases' chat data, the tokenizer
  bases      base_pretrain/, base/ (and other_*): pretraining and chat tuning of a base
  teachers   teacher_{NAME}/: a fine-tuned or a steered teacher
  number_data seed{S}/data_{SOURCE}/: number answers of a teacher or the base, filtered
  students   seed{S}/{NAME}_{CELL}/: the training config of a student
  trait      seed{S}/eval/{MODEL}/: trait rate and exact target probability
  em_eval    seed{S}/em_eval/: the EM evaluation of every model
  drift      seed{S}/drift/{SOURCE}/, seed{S}/absorbed/{STUDENT}/: number KLs
"""
