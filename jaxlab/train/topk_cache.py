"""Cached teacher top-k log-probs (config distill.topk > 0): the teacher scores every dataset
completion once, and the offpolicy channel trains against the cache with the top-k + tail KL.

A cache file (npz: `topk_ids`, `topk_logp` [N, C, k] and a `meta` record) describes one
teacher on one dataset's completions. It is reused only when every recorded setting matches
this run's (`describe`): the tokenizer's and the teacher's weights' content fingerprints, the
vocabulary, k, temperature, every length, max_examples, the data file's digest, the teacher's
path and system prompt. A mismatch is an error naming the file and each differing field.
Only channels that train on the dataset's completions can use it (channel.USES_TOPK_CACHE):
an on-policy rollout replaces the completion, which the cache does not describe.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxlab.data import prompt_completion as pc
from jaxlab.train.channels import common


def describe(config, fingerprints: dict, vocab_size: int) -> dict:
  """Every setting a cache depends on (the file's `meta` must equal it to be reused);
  `fingerprints` are the run's input fingerprints (jaxlab.train.inputs)."""
  d = config.data
  return {"tokenizer": fingerprints["tokenizer"], "teacher_weights": fingerprints["teacher.path"],
          "vocab_size": int(vocab_size),
          "k": int(config.distill.topk), "temperature": float(config.distill.temperature),
          "prompt_len": int(d.prompt_len), "teacher_prompt_len": int(d.teacher_prompt_len),
          "completion_len": int(d.completion_len), "max_examples": int(d.max_examples or 0),
          "data": [str(d.train_path), fingerprints["data.train_path"]],
          "teacher": config.teacher.path, "teacher_system": config.teacher.system_prompt}


def teacher_topk_fn(ctx: common.Context, k: int):
  """jitted (teacher, batch) -> (top-k ids [B,C,k], their log-probs at ctx.temperature)."""
  def fn(teacher, batch):
    tmodel, xt = common.teacher_hidden(ctx, teacher, batch)
    def one(x):
      lp = jax.nn.log_softmax(tmodel.logits(x) / ctx.temperature, axis=-1)
      vals, ids = jax.lax.top_k(lp, k)
      return ids.astype(jnp.int32), vals
    c = xt.shape[1]
    chunk = ctx.loss_chunk if 0 < ctx.loss_chunk < c else c
    outs = [one(xt[:, i:i + chunk]) for i in range(0, c, chunk)]
    return tuple(jnp.concatenate(z, axis=1) for z in zip(*outs))
  return jax.jit(fn)


def _check(path, meta: dict, want: dict, out: dict, n_examples: int, ids) -> None:
  diff = {k: (meta.get(k, "<absent>"), v) for k, v in want.items() if meta.get(k, "<absent>") != v}
  if diff:
    fields = "\n  ".join(f"{k}: file {a!r}, this run {b!r}" for k, (a, b) in diff.items())
    raise ValueError(f"{path}: teacher top-k file was made with other settings:\n  {fields}\n"
                     "delete it or point distill.topk_path elsewhere")
  if len(out["topk_ids"]) != n_examples:
    raise ValueError(f"{path}: holds {len(out['topk_ids'])} rows, the data has {n_examples}")
  unscored = [int(i) for i in ids if not np.isfinite(out["topk_logp"][i, 0, 0])]
  if unscored:
    raise ValueError(f"{path}: rows {unscored[:5]} that this run trains on were never scored "
                     "by the teacher (the file was made under other lengths); delete it")


def load_or_compute(config, path: str, examples, ids, fingerprints: dict, teacher_spec,
                    teacher, ctx: common.Context) -> dict[str, np.ndarray]:
  """{"topk_ids", "topk_logp"}: [N, C, k] for every example; rows not in `ids` stay unscored
  (logp -inf, which the top-k loss treats as no target)."""
  file = epath.Path(path)
  want = describe(config, fingerprints, teacher_spec.cfg.vocab_size)
  if file.exists():
    with file.open("rb") as f:
      z = np.load(f, allow_pickle=False)
      meta = json.loads(str(z["meta"]))
      out = {"topk_ids": z["topk_ids"], "topk_logp": z["topk_logp"]}
    _check(path, meta, want, out, len(examples), ids)
    return out
  fn = teacher_topk_fn(ctx, int(config.distill.topk))
  lengths = dict(prompt_len=config.data.prompt_len,
                 teacher_prompt_len=config.data.teacher_prompt_len,
                 completion_len=config.data.completion_len)
  bs, k, c = config.train.global_batch_size, int(config.distill.topk), lengths["completion_len"]
  out = {"topk_ids": np.zeros((len(examples), c, k), np.int32),
         "topk_logp": np.full((len(examples), c, k), -np.inf, np.float32)}
  for s in range(0, len(ids), bs):
    chunk = list(ids[s:s + bs])
    rows = [examples[i] for i in chunk] + [examples[chunk[0]]] * (bs - len(chunk))
    batch = pc.make_batch(rows, pad_id=ctx.pad_id, **lengths)
    batch = {k: v for k, v in batch.items() if k.startswith("teacher_") or k == "completion"}
    i, lp = jax.device_get(fn(teacher, batch))
    out["topk_ids"][chunk] = i[:len(chunk)]
    out["topk_logp"][chunk] = lp[:len(chunk)]
  if jax.process_index() == 0:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.parent / (file.name + ".tmp")
    with tmp.open("wb") as f:
      np.savez(f, meta=json.dumps(want), **out)
    tmp.rename(file)
  return out
