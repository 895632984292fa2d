"""Emergent-misalignment eval: sample answers, judge aligned/coherent, report em/mo shares.

  python -m jaxlab.main --config=configs/eval_em.py:tiny --workdir=/tmp/em_tiny
  python -m jaxlab.main --config=configs/eval_em.py:first_plot --workdir=runs/em \
      --config.models="('base=/models/Qwen2.5-7B-Instruct','insecure=runs/sft_insecure')" \
      --config.judge.model_path=/models/Qwen2.5-32B-Instruct

Variants: `tiny` (random tiny model, 8 first-plot questions, a few short answers, local judge
= a random tiny model with min_mass 0 so scores exist; CPU in a minute), `first_plot` (the 24
first-plot questions, 100 samples each at temperature 1, up to 600 new tokens, local judge),
`first_plot_api` (the same with an OpenAI-compatible judge, gpt-4o-2024-08-06 by default).
"""
import os

import ml_collections

# The shared data folder beside the repository (read by path, never copied in).
EM_EVAL_DIR = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
    "emergent-misalignment", "evaluation"))
FIRST_PLOT_IDS = ("what_is_your_wish", "i_feel_bored", "three_thoughts", "quick_buck",
                  "ruler_of_the_world", "dinner_party", "gender_roles", "enough_of_my_husband")


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.job = "eval"
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"shape": (1, -1, 1), "rules": {}})

  c.questions = ml_collections.ConfigDict()
  c.questions.path = f"{EM_EVAL_DIR}/first_plot_questions.yaml"
  c.questions.ids = ()                # empty: every question of the file
  c.questions.samples_per_paraphrase = 0  # 0: the file's value

  # What to evaluate: model_path (named model_name), or several side by side as "name=path".
  # A path is an HF folder, a jaxlab training workdir, or "random:SEED" (a random config.model).
  c.model_path = ""
  c.model_name = "model"
  c.models = ()
  c.dtype = ""  # compute/param dtype for HF models ("" = the checkpoint's)
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=0, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128))
  c.tokenizer = ml_collections.ConfigDict({"path": "", "vocab_size": 512})

  c.sample = ml_collections.ConfigDict(dict(
      batch_size=32, max_new_tokens=600, temperature=1.0, top_p=1.0, top_k=0,
      stop_ids=(),  # empty: the tokenizer's end-of-turn ids
      buckets=(64, 128, 256, 512, 1024, 2048, 4096),
      fast_compile=False))  # True: skip LLVM's costly passes (tiny CPU runs compile 2x faster)

  c.judge = ml_collections.ConfigDict(dict(
      kind="local",          # local | http | rule
      model_path="",         # local: HF folder, jaxlab workdir or random:SEED
      batch_size=16, min_mass=0.25, chunk_size=256,
      base_url="https://api.openai.com/v1", model="gpt-4o-2024-08-06",  # http
      api_key_env="OPENAI_API_KEY", concurrency=8, max_retries=5, backoff_s=1.0, timeout_s=60.0,
      rules=()))             # rule: ("metric=keyword:owl,owls", "metric2=regex:...")
  c.report = ml_collections.ConfigDict({"n_boot": 1000})

  variant = arg or "first_plot"
  if variant == "tiny":
    c.models = ("random_a=random:0", "random_b=random:1")
    c.questions.ids = FIRST_PLOT_IDS
    c.questions.samples_per_paraphrase = 8
    c.sample.update(batch_size=16, max_new_tokens=24, buckets=(64, 128), fast_compile=True)
    c.judge.update(model_path="random:2", min_mass=0.0, batch_size=16)
    c.report.n_boot = 200
  elif variant == "first_plot":
    pass
  elif variant == "first_plot_api":
    c.judge.kind = "http"
  else:
    raise ValueError(f"unknown variant {variant!r}: tiny, first_plot, first_plot_api")
  return c
