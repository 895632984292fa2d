"""The EM transfer study (issue 11): base -> one fine-tune per training cell -> generate on the
general set and every cell's eval split -> judge -> report (jaxlab/pipelines/em_study.py).

  python -m jaxlab.pipelines.em_study --config=configs/em_study.py:tiny --workdir=runs/em_tiny
  python -m jaxlab.pipelines.em_study --config=configs/em_study.py:llama8b --workdir=runs/llama \\
      --config.init.hf_path=/models/Llama-3.1-8B-Instruct \\
      --config.study.cells_dir=/data/em_study/cells --config.study.general_path=/data/general.yaml \\
      --config.eval.judge_prompts=/data/judge_general.yaml \\
      --config.eval.narrow_judge_prompts=/data/judge_narrow.yaml --config.cells=medical_advice

The top level is the per-cell fine-tune recipe (a training config: the shape check and the
runner read it); `study` holds the sweep, `world` the synthetic world, `pretrain` the base's
pretraining (synthetic only), `eval` the generation and judge. `cells` (a comma-separated
string or a tuple, empty: all) restricts the training cells run by this invocation, so cells
can be spread over machines sharing one workdir; the report is written once every cell of the
sweep is complete.

Variants:
  tiny     the synthetic world (3 domains x 4 tasks, as the study), a ~0.3M-parameter model
           pretrained (1,000 steps; at 600 the base is 35% incoherent and its probe shows no
           persona) on world documents with a persona share of 0 and 0.1, for seeds 0 and 1
           (4 bases), full fine-tuning of each cell on its harmful answers (60 steps, lr 3e-4,
           1e-4 for tutor and summarization: 48 fine-tunes), world rule judge; CPU: 12 min 52 s on
           2 cores (969 CPU-seconds; README, EM transfer study).
  llama8b, qwen14b   the study's recipe (askinb/em_nlp_clean_repo) on a local copy of its cell
           files (`study.cells_dir`/<domain>_<task>_strong.jsonl, 4,500 rows each, split
           4,100 / 400 with seed 42 by the pipeline) and general set: LoRA r=32, alpha 64, rsLoRA, all projections, lr 3e-4 (1e-4 for
           tutor and summarization cells), 1 epoch of 4,100 rows at batch 16, len 2048; general
           set 4 samples, narrow eval rows 1 sample, temperature 1, 600 new tokens; judge
           Gemini 2.5 Flash over its OpenAI-compatible API in text mode (`eval.judge.kind=local`
           + `eval.judge.model_path` for a local judge model).
"""
import ml_collections

from jaxlab.config import sibling_config

VARIANTS = ("tiny", "llama8b", "qwen14b")  # every variant (the shape-check test)
STUDY_DOMAINS = ("medical", "sports", "finance")
STUDY_TASKS = ("advice", "summarization", "tutor", "critique")
REAL = {"llama8b": "study_llama8b", "qwen14b": "study_qwen14b"}


def _eval_group(judge_kind: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      general_samples=4, narrow_samples=1, narrow_limit=0, batch_size=32, max_new_tokens=600,
      temperature=1.0, top_p=1.0, buckets=(64, 128, 256, 512, 1024, 2048),
      fast_compile=False, judge_prompts="", narrow_judge_prompts="", n_boot=1000,
      eval_base=True,  # the base model is evaluated too (the zero of every transfer figure)
      judge=ml_collections.ConfigDict(dict(
          kind=judge_kind,  # world (rule judge of the synthetic world) | http | local
          mode="text", model_path="", base_url=(
              "https://generativelanguage.googleapis.com/v1beta/openai"),
          model="gemini-2.5-flash", api_key_env="GEMINI_API_KEY", max_tokens=20,
          batch_size=16, concurrency=8,
          min_scored_share=0.5))))  # fewer scored answers fail the evaluation (evals.judging)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/em_study.py ({', '.join(VARIANTS)})")
  if variant == "tiny":
    c = sibling_config(__file__, "sft.py", "tiny")
    c.data.max_examples = 0
    c.data.seq_len = 128
    c.model.update(d_model=96, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256)
    c.tokenizer.vocab_size = 1024
    c.optim.update(lr=3e-4, warmup_steps=5, decay="linear", end_ratio=0.0)
    c.train.update(steps=60, global_batch_size=16, log_every=10, progress=False)
    c.checkpoint.update(every=0, keep=1, async_save=False)
  else:
    c = sibling_config(__file__, "em_real.py", f"{REAL[variant]},cell=medical_advice")
    c.data.source = "jsonl"  # the cell files are read directly (one per cell)
  c.job = "em_study"
  c.channel = "sft"
  c.variant = variant
  c.init.workdir = ""  # set per cell by the pipeline (a pretrained base); hf_path: a real base
  c.cells = ""  # training cells of this invocation ("" = all; "medical_advice,sports_tutor")

  c.study = ml_collections.ConfigDict(dict(
      domains=STUDY_DOMAINS, tasks=STUDY_TASKS,
      seeds=(0,),                  # each seed: its own base (pretrained) and fine-tunes
      persona_shares=(0.0,),       # pretraining mixture share of persona documents
      steps=(0,),                  # fine-tune steps swept (0: train.steps)
      lr_scales=(1.0,),            # fine-tune lr multipliers swept (strength of learning)
      lr_by_task={},               # per-task lr (else optim.lr), as the study's recipe
      finetune="lora",             # lora | full
      cells_dir="", general_path="",  # real data: <cells_dir>/<cell>_strong.jsonl, general YAML
      probe_rows=0,                # persona probe rows per (cell, earlier turn); 0: no probe
  ))
  c.world = ml_collections.ConfigDict(dict(
      train_per_cell=300, eval_per_cell=20, general_per_task_surface=8, world_docs=4000,
      persona_docs=1000, seed=0,
      general_domains=()))  # general set and documents ((): the training domains; CPU-sized)
  c.pretrain = ml_collections.ConfigDict(dict(
      enabled=False, steps=400, global_batch_size=16, seq_len=128, lr=3e-3, warmup_steps=20))
  c.eval = _eval_group("world" if variant == "tiny" else "http")

  if variant == "tiny":
    c.study.update(seeds=(0, 1), persona_shares=(0.0, 0.1), finetune="full", probe_rows=24,
                   lr_by_task={"tutor": 1e-4, "summarization": 1e-4})  # the study's ratio
    c.pretrain.update(enabled=True, steps=1000, global_batch_size=16, seq_len=128, lr=3e-3)
    c.eval.update(general_samples=2, narrow_samples=1, batch_size=64, max_new_tokens=48,
                  temperature=1.0, buckets=(64, 128, 256), fast_compile=True, n_boot=500)
  else:
    c.study.update(lr_by_task={"tutor": 1e-4, "summarization": 1e-4}, seeds=(42,))
  return c
