"""Distillation channels on chat JSONL rows: offpolicy, onpolicy, gkd (and sft on the same rows).

  python -m jaxlab.main --config=configs/distill.py:tiny --workdir=runs/distill_tiny \\
      --config.channel=onpolicy --config.teacher.path=runs/sft_tiny

Each row's last assistant turn is the completion (teacher-generated for offpolicy; for onpolicy
only the prompt is used, the student samples). The teacher scores completions under its own
prompt: the row's messages with `teacher.system_prompt` as the system message when set.

Variants:
  tiny   a fresh ~1M-parameter student distilled on CPU from `teacher.path` (default: the
         workdir of the README's SFT run, runs/sft_tiny), with its tokenizer.

Keys beyond configs/sft.py:
  channel                 sft | offpolicy | onpolicy | gkd
  teacher.path            HF folder, jaxlab workdir, or "base" (the student's own init)
  teacher.system_prompt   the teacher's system message ("" = the row's own)
  teacher.dtype           e.g. "bfloat16" ("" = as stored)
  distill.kl              forward | reverse | jsd ("" = the channel's: offpolicy forward,
                          onpolicy reverse, gkd jsd)
  distill.beta            generalized JSD beta, TRL convention (0 forward, 1 reverse)
  distill.lmbda           gkd: probability that a batch is on-policy
  distill.estimator       onpolicy: exact (full-vocabulary reverse KL) | sampled (policy gradient)
  distill.temperature     divides both sides' logits in the divergence
  distill.sample_temperature / distill.top_p   on-policy rollouts (student samples)
  distill.allow_biased_estimator   True: allow estimator "sampled" with rollouts at another
                          temperature than distill.temperature or top_p < 1 (a biased estimate)
  distill.loss_chunk      completion positions per logits chunk (0 = all at once)
  distill.topk            > 0: offpolicy from cached teacher top-k log-probs + tail
  distill.topk_path       where that cache lives ("" = WORKDIR/teacher_topk.npz)
  distill.heldout_rows    last N rows held out for the held-out KL metric
  distill.eval_every      steps between held-out KL measurements (0 = never)
  data.prompt_len / data.teacher_prompt_len / data.completion_len   padded lengths; the
                          completion length is also the on-policy sampling budget
"""

import ml_collections

from jaxlab.config import sibling_config

VARIANTS = ("tiny",)  # every variant (the shape-check test)


def _sft_config(variant):
  return sibling_config(__file__, "sft.py", variant)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant != "tiny":
    raise ValueError(f"unknown variant {variant!r} of configs/distill.py (tiny)")
  c = _sft_config("tiny")
  c.job = "train"
  c.variant = variant
  c.channel = "offpolicy"
  # One example per row for every channel (jaxlab.train.channels.data_format): sft included, no packing.
  c.data.update(dict(prompt_len=96, teacher_prompt_len=96, completion_len=64, max_examples=512,
                     pack=False))
  c.tokenizer.path = "runs/sft_tiny/tokenizer"
  c.teacher = ml_collections.ConfigDict(dict(path="runs/sft_tiny", system_prompt="", dtype=""))
  c.distill = ml_collections.ConfigDict(dict(
      kl="", beta=0.5, lmbda=0.5, estimator="exact", temperature=1.0, loss_chunk=0,
      sample_temperature=1.0, top_p=1.0, topk=0, topk_path="", heldout_rows=16, eval_every=25,
      allow_biased_estimator=False))
  c.train.update(steps=100, global_batch_size=8)
  c.optim.update(lr=1e-3, warmup_steps=10)
  return c
