"""One model pool for the studies: load a model (an HF folder, a jaxlab workdir or a steered
folder) in its own spec and layout, sample from it, score it (summed log-probability of given
completions; exact KL of a teacher under its own prompt against it).

Loaded models are kept (the last two: a scorer reads two at once), and one compiled sampler
and one compiled scorer per architecture are shared between models, so a study that samples
and scores many models of one architecture compiles once.

Two ways to load, set by the pool:
  tokenizer_path="DIR"  every model reads this tokenizer's ids (checked by content on each
                        model) and loads with jaxlab.train.runner.load_model_params at
                        config.teacher.dtype (the subliminal study);
  tokenizer_path=""     each model with its own tokenizer (jaxlab.evals.models), the EM study.
"""
from __future__ import annotations

import numpy as np

from jaxlab import console


class ModelPool:
  """Models of one study, loaded once each, with a shared sampler and scorer."""

  def __init__(self, config, *, tokenizer_path: str = "", devices=None,
               sampler_options: dict | None = None, keep: int = 2):
    from jaxlab import sharding as sharding_lib
    self.config = config
    self.tokenizer_path = tokenizer_path
    self._tokenizer = None
    self.mesh, self.rules = sharding_lib.mesh_and_rules(config, *([devices] if devices else []))
    self.sampler_options = dict(sampler_options or {})
    self._keep, self._loaded = keep, {}  # path -> (spec, trainable, frozen, tokenizer)
    self._sampler = None
    self._scorers = {}

  @property
  def tokenizer(self):
    """The shared tokenizer (None: each model's own), read when first used: a pipeline's
    settings check (`--plan`) makes a pool and names missing model folders without it."""
    if self._tokenizer is None and self.tokenizer_path:
      from jaxlab.models.hf_tokenizer import load_tokenizer
      self._tokenizer = load_tokenizer(self.tokenizer_path)
    return self._tokenizer

  # ---------------------------------------------------------------- loading

  def load(self, path: str):
    """(spec, trainable, frozen) of the model at `path`, loaded once (the last `keep` kept)."""
    return self._get(path)[:3]

  def tokenizer_of(self, path: str):
    return self._get(path)[3]

  def _get(self, path: str):
    if path in self._loaded:
      self._loaded[path] = self._loaded.pop(path)  # most recently used last
      return self._loaded[path]
    while len(self._loaded) >= self._keep:
      self._loaded.pop(next(iter(self._loaded)))
    self._loaded[path] = self._load_shared(path) if self.tokenizer_path \
        else self._load_own(path)
    return self._loaded[path]

  def _load_shared(self, path: str):
    from jaxlab.data.tokenizer import check_model_tokenizer
    from jaxlab.models.params import model_spec
    from jaxlab.train import runner
    # every model must read this tokenizer's ids (by content)
    check_model_tokenizer(self.tokenizer, repr(self.tokenizer_path), path, f"model {path}")
    dtype = self.config.teacher.get("dtype", "") or None
    cfg, tr, fr = runner.load_model_params(path, self.mesh, self.rules, key=f"model {path}",
                                           dtype=dtype, param_dtype=dtype)
    return model_spec(cfg.replace(remat=False)), tr, fr, self.tokenizer

  def _load_own(self, path: str):
    from jaxlab.evals.models import load_model_and_tokenizer
    m = load_model_and_tokenizer(path, self.config, self.mesh, self.rules)
    return m.spec, m.trainable, m.frozen, m.tokenizer

  def prompt_ids(self, messages, path: str = "") -> np.ndarray:
    """A chat's prompt ids (jaxlab.data.prompt_completion.encode_example) in the pool's shared
    tokenizer, or in the tokenizer of the model at `path`."""
    from jaxlab.data import prompt_completion as pc
    return pc.encode_example(self.tokenizer_of(path) if path else self.tokenizer,
                             messages).prompt

  # ---------------------------------------------------------------- sampling

  def sampler(self, path: str, batch_size: int):
    """The shared Sampler holding the model at `path` (recompiled only for another
    architecture, batch size, stop or pad token)."""
    from jaxlab.data.chat import end_of_turn_ids, pad_id
    from jaxlab.sample.engine import Sampler
    spec, tr, fr, tok = self._get(path)
    stop, pad = tuple(end_of_turn_ids(tok)), pad_id(tok)
    s = self._sampler
    if s is not None and (s.spec.cfg, s.stop_ids, s.pad_id, s.batch_size) == \
        (spec.cfg, stop, pad, batch_size):
      s.set_params(tr, fr)
    else:
      self._sampler = Sampler(spec, tr, fr, mesh=self.mesh, batch_size=batch_size,
                              stop_ids=stop, pad_id=pad, rules=self.rules,
                              **self.sampler_options)
    return self._sampler

  def generate(self, path: str, prompts, *, seed: int, max_new_tokens: int, batch_size: int,
               temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
    """One answer per prompt (token ids), decoded without the stop token."""
    s = self.sampler(path, batch_size)
    outs = s.generate(list(prompts), seed=seed, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, min_new_tokens=1)
    return s.decode(self.tokenizer_of(path), outs)

  # ---------------------------------------------------------------- scoring

  def _score_fn(self, spec, kind: str, teacher_spec=None):
    """jitted scorer for models of `spec` (and, for "kl", a teacher of `teacher_spec`: each
    model keeps its own spec and layout, e.g. a scanned teacher beside an unrolled base)."""
    import jax
    from jaxlab.train import losses
    from jaxlab.train.channels import common
    key = (spec.cfg, kind, teacher_spec.cfg if teacher_spec is not None else None)
    if key not in self._scorers:
      def logprob(tr, fr, b):  # summed log p(completion) per row
        model, x = common.completion_hidden(spec, tr, fr, b["prompt"], b["prompt_len"],
                                            b["completion"])
        lp = jax.nn.log_softmax(model.logits(x).astype("float32"), axis=-1)
        tok = jax.numpy.take_along_axis(lp, b["completion"][..., None], axis=-1)[..., 0]
        return (tok * b["loss_mask"]).sum(-1)

      def kl(tr, fr, ttr, tfr, b):  # KL(teacher || model) summed per row, and token counts
        model, x = common.completion_hidden(spec, tr, fr, b["prompt"], b["prompt_len"],
                                            b["completion"])
        tmodel, xt = common.completion_hidden(teacher_spec, ttr, tfr, b["teacher_prompt"],
                                              b["teacher_prompt_len"], b["completion"])
        d = losses.forward_kl(model.logits(x), tmodel.logits(xt))
        return (d * b["loss_mask"]).sum(-1), b["loss_mask"].sum(-1)
      self._scorers[key] = jax.jit(logprob if kind == "logprob" else kl)
    return self._scorers[key]

  def _batches(self, examples, batch_size: int, tokenizer):
    from jaxlab.data import prompt_completion as pc
    from jaxlab.data.chat import pad_id
    p = max(len(e.prompt) for e in examples)
    q = max(len(e.teacher_prompt) for e in examples)
    c = max(len(e.completion) for e in examples)
    lens = dict(prompt_len=-(-p // 32) * 32, teacher_prompt_len=-(-q // 32) * 32,
                completion_len=-(-c // 16) * 16)
    for s in range(0, len(examples), batch_size):
      rows = list(examples[s:s + batch_size])
      n = len(rows)
      rows += [rows[0]] * (batch_size - n)
      yield n, pc.make_batch(rows, pad_id=pad_id(tokenizer), **lens)

  def completion_logprobs(self, path: str, conversations, batch_size: int) -> np.ndarray:
    """log p(last assistant turn, end of turn included | the rest) per conversation."""
    from jaxlab.data import prompt_completion as pc
    spec, tr, fr, tok = self._get(path)
    fn = self._score_fn(spec, "logprob")
    exs = [pc.encode_example(tok, m) for m in conversations]
    out = []
    with console.Progress(len(exs), "score", "rows") as progress:
      for n, b in self._batches(exs, batch_size, tok):
        out.append(np.asarray(fn(tr, fr, b))[:n])
        progress.update(progress.n + n)
    return np.concatenate(out)

  def kl(self, teacher_path: str, system: str, model_path: str, rows, batch_size: int) -> float:
    """Mean per-token KL(teacher under `system` || model) on the rows' completions."""
    from jaxlab.data import prompt_completion as pc
    spec, tr, fr, tok = self._get(model_path)
    tspec, ttr, tfr, _ = self._get(teacher_path)
    fn = self._score_fn(spec, "kl", tspec)
    exs = [pc.encode_example(tok, r["messages"], teacher_system=system or None) for r in rows]
    total, count = 0.0, 0.0
    with console.Progress(len(exs), "score", "rows") as progress:
      for n, b in self._batches(exs, batch_size, tok):
        s, c = fn(tr, fr, ttr, tfr, b)
        total += float(np.asarray(s)[:n].sum())
        count += float(np.asarray(c)[:n].sum())
        progress.update(progress.n + n)
    return total / max(count, 1.0)
