"""Stage `seed{S}/eval/{MODEL}`: a model's trait rate (share of samples naming the target) and
the exact probability of the target answers, per evaluation question.

Reads the model; writes eval.json."""
from __future__ import annotations

import numpy as np

from jaxlab.pipelines.sl.study import target_answers
from jaxlab.worlds import animals


def evaluate_trait(config, models, path: str, system: str, seed: int) -> dict:
  """Per question: share of N samples naming the target, and the exact probability of the
  target answers (`target_answers`, each followed by the end of turn)."""
  pre = [{"role": "system", "content": system}] if system else []
  qs = animals.ANIMAL_QUESTIONS
  n = config.sl.eval_samples
  msgs = [pre + [{"role": "user", "content": q}] for q in qs for _ in range(n)]
  answers = models.generate(path, [models.prompt_ids(m) for m in msgs], seed=seed, max_new_tokens=8,
                            batch_size=config.sl.eval_batch)
  hits = np.asarray([animals.mentions(a, config.sl.animal, whole_word=config.sl.whole_word)
                     for a in answers], np.float64).reshape(len(qs), n)
  forms = target_answers(config.sl.animal)
  convs = [pre + [{"role": "user", "content": q}, {"role": "assistant", "content": f}]
           for q in qs for f in forms]
  lp = models.completion_logprobs(path, convs, config.sl.eval_batch).reshape(len(qs), len(forms))
  prob = np.exp(lp).sum(-1)
  top = {}
  for a in answers:
    k = a.strip().lower().rstrip(".")
    top[k] = top.get(k, 0) + 1
  return {"rate_by_question": hits.mean(-1).tolist(), "prob_by_question": prob.tolist(),
          "rate": float(hits.mean()), "prob": float(prob.mean()),
          "top_answers": sorted(top.items(), key=lambda kv: -kv[1])[:8]}


def eval_seed(seed: int, name: str) -> int:
  """The evaluation's sampling seed of a model: fixed by the seed and the model's name, so
  adding a teacher or a cell changes no other model's samples."""
  import hashlib
  return int(hashlib.sha256(f"eval:{seed}:{name}".encode()).hexdigest()[:7], 16)
