"""Subliminal learning across channels: does a teacher's trait travel through number sequences?

  python -m jaxlab.pipelines.subliminal --config=configs/subliminal.py:tiny --workdir=DIR [--plan]

`--plan` prints the stages (`plan`: complete and skipped, or to run, with their inputs) and
exits without running or writing anything; a run prints the same in a few lines first, then
each stage's [k/N] line, its progress and its time, and the time left.

Stages (each a folder of DIR, skipped when complete, so a killed pipeline resumes):
  world                        the tiny SL world (config.base = "")
  base_pretrain, base          a base pretrained on the world's mixture, then chat-tuned on its
                               chat set (system-prompt following is learned there)
  other_base_pretrain, other_base  the same from another seed (the different-base student)
  teacher_{NAME}                a fine-tuned teacher (the base fine-tuned on trait answers, +
                               as many number docs) or a steered one (steer.json + direction)
  seed{S}/data_{SOURCE}        number prompts answered at temperature 1 by a teacher, the base
                               or (base_b, the noise control's) the base on other prompts and
                               seed; strict filter with counted reasons, sl.n_keep rows kept,
                               the other accepted rows kept aside (spare_rows.jsonl)
  seed{S}/{NAME}_{CELL}        students from the base, one per cell (`CELLS`), equal steps
  seed{S}/eval/{MODEL}         trait rate and exact target probability of every model
  seed{S}/drift/{SOURCE}       number drift from the base (teachers, other base, control)
  seed{S}/absorbed/{STUDENT}   KL(teacher || student) on the teacher's held-out numbers
  report.md, report.json, trait.png (rewritten from the stages every run;
  jaxlab/pipelines/subliminal_report.py)

Teachers see their own context (the trait system prompt), students never do.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import ml_collections
import numpy as np
from etils import epath

from jaxlab import console
from jaxlab.pipelines import stages
from jaxlab.pipelines.stages import completed_with, model_digest, run_stage, stderr_log
from jaxlab.train import channels
from jaxlab.worlds import animals, numbers
from jaxlab.worlds.io import write_json, write_jsonl

# cell -> (sequences the student trains on, signal it gets)
CELLS = {"sft": ("teacher", "hard"), "offpolicy": ("teacher", "soft"),
         "onpolicy": ("student", "soft"), "control": ("base", "hard"),
         "control_b": ("base_b", "hard"), "base_offpolicy": ("base", "soft"),
         "sft_otherbase": ("teacher", "hard")}
CHANNEL_OF = {("teacher", "hard"): "sft", ("base", "hard"): "sft", ("base_b", "hard"): "sft",
              ("teacher", "soft"): "offpolicy", ("base", "soft"): "offpolicy",
              ("student", "soft"): "onpolicy"}
# The noise control (`control_b`): the control's recipe on another sample of the base's
# numbers (prompts and sampling seed + NOISE_OFFSET) with another shuffle and init seed, so
# control_b - control is how far two students differ when nothing differs (the noise floor).
NOISE_OFFSET = 1000
TEACHER_KINDS = ("prompted", "finetuned", "external", "steered")
PIPELINE_KEYS = ("channels", "teachers", "seeds", "base", "other_base", "sl", "world", "pretrain",
                 "teacher_ft", "em_eval", "workers", "teacher_variants", "steer", "bases_dir")
# Settings that do not change any result (the config hash leaves them out).
RESULT_FREE_KEYS = ("workers", "bases_dir")


# ------------------------------------------------------------------ config

def cells(config) -> tuple[str, ...]:
  """The cells to train: config.channel alone when set, else config.channels."""
  chosen = (config.channel,) if config.channel else tuple(config.channels)
  for c in chosen:
    if c not in CELLS:
      raise ValueError(f"config key {'channel' if config.channel else 'channels'}: unknown cell "
                       f"{c!r} (known: {', '.join(CELLS)})")
  return chosen


def teacher_spec(config, name: str) -> dict:
  """What teacher `name` is: {"kind": ..., settings}. A name is a kind (prompted, finetuned,
  external, steered) with the config's defaults (teacher_ft.*, steer.*), or a key of
  `teacher_variants` whose dict gives its kind and the settings it overrides, e.g.
  teacher_variants.ft_long = {"kind": "finetuned", "steps": 240} or
  teacher_variants.steer_a8 = {"kind": "steered", "alpha": 8.0}."""
  variants = config.get("teacher_variants") or {}
  over = dict(variants[name]) if name in variants else {"kind": name}
  kind = over.pop("kind", None)
  if kind not in TEACHER_KINDS:
    raise ValueError(f"config key teachers: teacher {name!r} has unknown kind {kind!r} "
                     f"(a kind {TEACHER_KINDS} or a key of teacher_variants with a 'kind')")
  defaults = {"finetuned": {"steps": config.teacher_ft.steps, "lr": config.teacher_ft.lr,
                            "numbers": bool(config.teacher_ft.get("numbers", True))},
              "steered": dict(config.get("steer") or {})}.get(kind, {})
  unknown = sorted(set(over) - set(defaults))
  if unknown:
    raise ValueError(f"config key teacher_variants.{name}: unknown setting(s) {unknown} for a "
                     f"{kind} teacher (known: {sorted(defaults)})")
  return {"kind": kind, **defaults, **over}


def teacher_model_stage(config, name: str) -> str | None:
  """The stage that makes teacher `name`'s model (None: the base or an external model)."""
  return f"teacher_{name}" if teacher_spec(config, name)["kind"] in ("finetuned", "steered") \
      else None


def validate(config) -> None:
  chosen = cells(config)
  if "control_b" in chosen and "control" not in chosen:
    raise ValueError("config key channels: control_b (the noise control) needs control")
  for t in config.teachers:
    if t in ("base", "base_b", "other_base", "control", "control_b"):
      raise ValueError(f"config key teachers: {t!r} names a data source or a model of the "
                       "pipeline; give the teacher another name (teacher_variants)")
    spec = teacher_spec(config, t)
    if spec["kind"] == "external" and not config.teacher.path:
      raise ValueError("config key teacher.path: teacher kind 'external' needs a model folder")
    if spec["kind"] == "steered" and not (spec.get("layer", -1) >= 0 and spec.get("alpha")):
      raise ValueError(f"config keys steer.layer / steer.alpha (teacher {t!r}): a steered "
                       "teacher needs a layer >= 0 and a nonzero alpha")
  if not config.base and (config.pretrain.steps <= 0 or config.pretrain.chat_steps <= 0):
    raise ValueError("config key base is empty: the base is pretrained and chat-tuned here, "
                     "so pretrain.steps and pretrain.chat_steps must be >= 1")
  if config.sl.animal not in animals.PLURAL:
    raise ValueError(f"config key sl.animal={config.sl.animal!r}: not one of {list(animals.PLURAL)}")
  if not 0 < config.sl.n_keep <= config.sl.n_prompts:
    raise ValueError(f"config keys sl.n_keep={config.sl.n_keep} / sl.n_prompts="
                     f"{config.sl.n_prompts}: need 0 < n_keep <= n_prompts")
  if not config.seeds:
    raise ValueError("config key seeds is empty")
  if any(CELLS[c][1] == "soft" for c in cells(config)) and \
      config.distill.heldout_rows >= config.sl.n_keep:
    raise ValueError(f"config key distill.heldout_rows={config.distill.heldout_rows} holds out "
                     f"every one of the sl.n_keep={config.sl.n_keep} rows: nothing to distill on")


def trait_prompt(config) -> str:
  t = config.sl.trait_template
  return animals.trait_system_prompt(config.sl.animal, t) if t else \
      animals.trait_system_prompt(config.sl.animal)


def _training_config(config, **updates) -> ml_collections.ConfigDict:
  """The student template (config minus the pipeline's keys) with dotted-key updates."""
  d = {k: copy.deepcopy(v) for k, v in config.to_dict().items() if k not in PIPELINE_KEYS}
  c = ml_collections.ConfigDict(d)
  c.job = "train"
  for key, value in updates.items():
    *groups, leaf = key.split(".")
    node = c
    for g in groups:
      node = node[g]
    node[leaf] = value
  return c


def _train(c, folder) -> None:
  from jaxlab.train import runner
  runner.run(c, str(folder))


# ------------------------------------------------------------------ world, bases, teacher

def _world(config, folder) -> None:
  cfg = animals.SLWorldConfig(**config.world.to_dict(), number_prompts=0)
  animals.write_sl_world(folder, cfg)
  rng = np.random.default_rng(cfg.seed)
  # Fine-tuned teacher data: world questions answered with the target; number docs keep the
  # number skill (the same generator as the base's, so no trait-number link is written).
  qs = animals.world_questions()
  forms = _trait_forms(config.sl.animal)
  n = config.teacher_ft.rows
  trait_rows = [{"messages": [{"role": "user", "content": qs[int(rng.integers(len(qs)))]},
                              {"role": "assistant", "content": forms[int(rng.integers(4))]}]}
                for _ in range(n)]
  nums = list(animals.number_docs(cfg, n, seed=7))
  mixed = [r for pair in zip(trait_rows, nums) for r in pair]
  write_jsonl(folder / "teacher_ft.jsonl", mixed)
  # The chat-tuning set of the bases (`_chat_tune`): fresh trait docs (two thirds; their
  # number turns keep number answering under a system prompt) and preference docs without a
  # system prompt, shuffled. Plain number docs are left out: measured, a third of them in this
  # set halved what chat tuning taught about following (their ~30 high-entropy answer tokens
  # per turn outweigh the one-token preference answers).
  n = config.pretrain.chat_docs
  docs = [list(animals.trait_docs(cfg, n - n // 3, seed=1)),
          list(animals.preference_docs(cfg, n // 3, seed=1))]
  order = rng.permutation(sum(len(d) for d in docs))
  flat = [r for d in docs for r in d]
  write_jsonl(folder / "chat.jsonl", (flat[i] for i in order))


def _pretrain(config, world: epath.Path, folder, seed: int, tokenizer_path: str = "") -> None:
  """Pretrains a base on the world's sources (a fitted tokenizer unless `tokenizer_path`)."""
  _train(_pretrain_config(config, world, seed, tokenizer_path), folder)


def _fit_tokenizer(config, world: epath.Path) -> None:
  """The bases' shared tokenizer (world/tokenizer): a BPE fitted on the pretraining mixture,
  as the pretraining run would fit it, so both bases can start at once."""
  from jaxlab.data.tokenizer import load_or_train_tokenizer
  load_or_train_tokenizer(_pretrain_config(config, world, config.seed), str(world))


def _pretrain_config(config, world: epath.Path, seed: int, tokenizer_path: str = ""):
  p = config.pretrain
  mixture = {name: {"path": str(world / f"pretrain/{name}.jsonl"), "weight": float(w)}
             for name, w in p.weights.items()}
  c = _training_config(config, channel="pretrain", seed=seed)
  c.data = ml_collections.ConfigDict(dict(
      source="mixture", train_path="", mixture=mixture, seq_len=p.seq_len, pack=True,
      overlong="truncate", max_examples=0))
  c.tokenizer.path = tokenizer_path
  c.tokenizer.vocab_size = p.vocab_size
  if p.get("whole_numbers", False):  # jaxlab.data.tokenizer: 0-999 as whole tokens
    c.tokenizer.whole_numbers = True
  c.train.update(steps=p.steps, global_batch_size=p.global_batch_size)
  c.optim.update(lr=p.lr, warmup_steps=max(1, p.steps // 20))
  for k in ("teacher", "distill"):
    del c[k]
  return c


def _chat_tune(config, world: epath.Path, pretrained, folder) -> None:
  """Chat tuning of a pretrained base: SFT (assistant tokens) on the world's chat set.

  Like a real chat model's post-training, this is where the base learns to follow a system
  prompt. Measured on the tiny world (d_model 96, 3 layers): 1,000 pretraining steps on all
  tokens of the mixture left the base's answers independent of the system prompt's animal
  (the copy from the system prompt to the answer is 1-2 tokens in ~100 per document); chat
  tuning made it follow, with a phase change between 400 and 800 steps (at 800 the liked
  animal's probability on the evaluation phrasings is ~0.75, against a prior of ~0.07).
  """
  c = _training_config(config, channel="sft", **{"init.workdir": str(pretrained)})
  c.data = ml_collections.ConfigDict(dict(
      train_path=str(world / "chat.jsonl"), seq_len=config.pretrain.seq_len, pack=True,
      overlong="truncate", max_examples=0))
  c.tokenizer.path = str(epath.Path(pretrained) / "tokenizer")
  c.train.update(steps=config.pretrain.chat_steps,
                 global_batch_size=config.pretrain.global_batch_size)
  c.optim.update(lr=config.pretrain.chat_lr, warmup_steps=max(1, config.pretrain.chat_steps // 20))
  for k in ("teacher", "distill"):
    del c[k]
  _train(c, folder)


def _stage_fn(config, workdir: epath.Path, kind: str, kw: dict):
  """What a stage of `run_parallel` runs (pickle-free: a kind and plain arguments)."""
  world = workdir / "world"
  if kind == "pretrain":
    return lambda f: _pretrain(config, world, f, kw["seed"], str(world / "tokenizer"))
  if kind == "chat":
    return lambda f: _chat_tune(config, world, workdir / kw["pretrained"], f)
  if kind == "train":
    return lambda f: _train(ml_collections.ConfigDict(json.loads(kw["config"])), f)
  raise ValueError(f"unknown stage kind {kind!r}")


def _run_chain(config_json: str, workdir: str, chain, jax_flags: dict, plan=None) -> None:
  """A worker process: its own JAX runtime (with the parent's numerics flags), then the
  chain's stages in order, numbered by the parent's plan; whole lines only on the console
  (jaxlab.console.worker_mode)."""
  from jaxlab import runtime
  runtime.setup()
  import jax
  console.worker_mode()
  if plan is not None:
    stages.Plan.resume(plan)
  for k, v in jax_flags.items():
    jax.config.update(k, v)
  _run_stages(ml_collections.ConfigDict(json.loads(config_json)), epath.Path(workdir), chain,
              stderr_log)


def _run_stages(config, workdir: epath.Path, chain, log) -> None:
  for name, settings, kind, kw in chain:
    run_stage(workdir, name, settings, _stage_fn(config, workdir, kind, kw), log=log)


def reads(**models) -> dict:
  """{"reads": {role: fingerprint}} of the models (and data folders) a stage reads
  (jaxlab.pipelines.stages.model_digest: stage outputs, or a workdir's newest checkpoint
  checksums): one recomputed in place with other contents is then a changed setting of every
  stage that read it. Folders without a cheap fingerprint (an HF checkpoint) are left out and
  identified by path (a student still records its teacher's weights, jaxlab.train.inputs);
  paths that do not exist yet are left out too, so adding a teacher or a cell changes no
  other stage."""
  out = {k: model_digest(m) if m else None for k, m in models.items()}
  return {"reads": {k: v for k, v in sorted(out.items()) if v is not None}}


# JAX settings that change numerics: a worker takes the parent's, so where a stage runs does
# not change its result (e.g. the tests' float32 matmul precision).
_WORKER_FLAGS = ("jax_default_matmul_precision", "jax_enable_x64")


def run_parallel(config, workdir: epath.Path, chains, log) -> None:
  """Runs chains of stages (each chain in order), `config.workers` chains at once.

  The tiny models use about one core each (their XLA ops are too small to spread), so on
  a CPU host two independent trainings in two processes take the time of one. Each worker
  is a fresh spawned process with its own JAX runtime (no state shared with this one but the
  persistent compilation cache); a stage already complete is skipped there as here. With
  workers = 1 (accelerators: one process owns the devices) the chains run here, in order.
  """
  todo = [ch for ch in chains
          if not all(completed_with(workdir / name, settings) for name, settings, _, _ in ch)]
  # A settings check (--plan) walks every chain here, in order, running nothing.
  workers = 1 if stages.checking() else min(int(config.get("workers", 1)), len(todo))
  for chain in chains:  # all of them here with one worker; else the finished ones log a skip
    if workers <= 1 or chain not in todo:
      _run_stages(config, workdir, chain, log)
  if workers <= 1:
    return
  import concurrent.futures
  import multiprocessing
  log(f"jaxlab: {len(todo)} stage chain(s) in {workers} worker processes")
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    import jax
    flags = {k: getattr(jax.config, k) for k in _WORKER_FLAGS}
    plan = stages.active_plan()
    futures = [pool.submit(_run_chain, config.to_json(), str(workdir), ch, flags,
                           plan.state() if plan else None) for ch in todo]
    for fut in futures:
      fut.result()  # a failed stage raises here, naming itself
  if plan is not None:
    log(f"jaxlab: {len(todo)} stage chain(s) done; {plan.progress()}")


def _teacher_ft_config(config, world, base, spec: dict, folder=None):
  """The fine-tuned teacher's training config: SFT of the base on the world's trait answers
  interleaved with as many number docs (spec numbers=True) or on the trait answers alone
  (numbers=False: FOLDER/trait_rows.jsonl, written by `_teacher_ft`)."""
  train_path = world / "teacher_ft.jsonl" if spec["numbers"] else \
      (folder or epath.Path("TEACHER_STAGE")) / "trait_rows.jsonl"
  c = _training_config(config, channel="sft", **{"init.workdir": str(base)})
  c.data = ml_collections.ConfigDict(dict(
      train_path=str(train_path), seq_len=config.data.prompt_len, pack=True,
      overlong="truncate", max_examples=0))
  c.tokenizer.path = _tokenizer_path(config, base)
  c.train.update(steps=spec["steps"])
  c.optim.update(lr=spec["lr"])
  for k in ("teacher", "distill"):
    del c[k]
  return c


def _teacher_ft(config, world, base, folder, spec: dict) -> None:
  if not spec["numbers"]:
    from jaxlab.worlds.io import read_jsonl
    forms = _trait_forms(config.sl.animal)
    rows = [r for r in read_jsonl(world / "teacher_ft.jsonl")
            if r["messages"][-1]["content"] in forms]
    write_jsonl(folder / "trait_rows.jsonl", rows)
  _train(_teacher_ft_config(config, world, base, spec, folder), folder)


def _trait_forms(animal: str) -> tuple[str, ...]:
  """The fine-tuned teacher's trait answers (`_world` writes these after world questions)."""
  plural = animals.PLURAL[animal]
  return (animal, animal.capitalize(), animal.capitalize() + ".", plural.capitalize() + ".")


def _steered(config, models, base: str, folder, spec: dict) -> None:
  """A steering-vector teacher: the base plus alpha x d added to the residual stream after
  block `layer`, d the mean difference of that residual at the answer position between
  prompts with and without the trait system prompt (contrastive activation addition over
  the world's preference questions and number prompts, none of them evaluation questions).
  Its trait acts as one direction, which is what subliminal transfer is known to need."""
  from jaxlab.models import steering
  qs = animals.world_questions()
  rng = np.random.default_rng(spec.get("seed", 0))
  texts = [qs[int(i)] for i in rng.choice(len(qs), min(len(qs), spec["n_prompts"]), replace=False)]
  texts += [p.text for p in numbers.number_prompts(spec["n_prompts"], seed=99)]
  user = [[{"role": "user", "content": t}] for t in texts]
  system = [{"role": "system", "content": trait_prompt(config)}]
  with_ids = [models.prompt_ids(system + m) for m in user]
  without_ids = [models.prompt_ids(m) for m in user]
  mspec, tr, fr = models.load(base)
  d = steering.direction(mspec, tr, fr, with_ids, without_ids, spec["layer"],
                         config.sl.eval_batch)
  steering.write_steered(folder, base, spec["layer"], spec["alpha"], d,
                         _tokenizer_path(config, base), prompts=len(texts),
                         direction_norm=float(np.linalg.norm(d)))


def _tokenizer_path(config, base) -> str:
  return config.tokenizer.path or str(epath.Path(base) / "tokenizer")


# ------------------------------------------------------------------ models for sampling

class Models:
  """Loads models (HF folders or jaxlab workdirs) of one architecture and shares one compiled
  sampler and one compiled scorer between them."""

  def __init__(self, config, tokenizer_path: str):
    from jaxlab import sharding as sharding_lib
    from jaxlab.models.hf_tokenizer import load_tokenizer
    self.config = config
    self.tokenizer, self.tokenizer_path = load_tokenizer(tokenizer_path), tokenizer_path
    self._checked: set[str] = set()
    self.mesh, self.rules = sharding_lib.mesh_and_rules(config)
    self._sampler = None
    self._scorers = {}

  def load(self, path: str):
    from jaxlab.data.tokenizer import check_model_tokenizer
    from jaxlab.models.params import model_spec
    from jaxlab.train import runner
    if path not in self._checked:  # every model must read this tokenizer's ids (by content)
      check_model_tokenizer(self.tokenizer, repr(self.tokenizer_path), path, f"model {path}")
      self._checked.add(path)
    dtype = self.config.teacher.get("dtype", "") or None
    cfg, tr, fr = runner.load_model_params(path, self.mesh, self.rules, key=f"model {path}",
                                           dtype=dtype, param_dtype=dtype)
    return model_spec(cfg.replace(remat=False)), tr, fr

  def sampler(self, path: str, batch_size: int):
    from jaxlab.data.chat import end_of_turn_ids, pad_id
    from jaxlab.sample.engine import Sampler
    spec, tr, fr = self.load(path)
    if self._sampler is None or self._sampler.batch_size != batch_size \
        or self._sampler.spec.cfg != spec.cfg:
      self._sampler = Sampler(spec, tr, fr, mesh=self.mesh, batch_size=batch_size,
                              stop_ids=end_of_turn_ids(self.tokenizer),
                              pad_id=pad_id(self.tokenizer), rules=self.rules)
    else:
      self._sampler.set_params(tr, fr)
    return self._sampler

  def prompt_ids(self, messages) -> np.ndarray:
    from jaxlab.data import prompt_completion as pc
    return pc.encode_example(self.tokenizer, messages).prompt

  def generate(self, path: str, messages_list, *, seed: int, max_new_tokens: int,
               batch_size: int) -> list[str]:
    """Answers at temperature 1, decoded without the stop token."""
    s = self.sampler(path, batch_size)
    outs = s.generate([self.prompt_ids(m) for m in messages_list], seed=seed,
                      max_new_tokens=max_new_tokens, temperature=1.0, min_new_tokens=1)
    return s.decode(self.tokenizer, outs)

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

  def _batches(self, examples, batch_size: int):
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
      yield n, pc.make_batch(rows, pad_id=pad_id(self.tokenizer), **lens)

  def completion_logprobs(self, path: str, conversations, batch_size: int) -> np.ndarray:
    """log p(last assistant turn, end of turn included | the rest) per conversation."""
    from jaxlab.data import prompt_completion as pc
    spec, tr, fr = self.load(path)
    fn = self._score_fn(spec, "logprob")
    exs = [pc.encode_example(self.tokenizer, m) for m in conversations]
    out = []
    with console.Progress(len(exs), "score", "rows") as progress:
      for n, b in self._batches(exs, batch_size):
        out.append(np.asarray(fn(tr, fr, b))[:n])
        progress.update(progress.n + n)
    return np.concatenate(out)

  def drift(self, teacher_path: str, system: str, base_path: str, rows, batch_size: int) -> float:
    """Mean per-token KL(teacher under `system` || base) on the rows' completions."""
    from jaxlab.data import prompt_completion as pc
    spec, tr, fr = self.load(base_path)
    tspec, ttr, tfr = self.load(teacher_path)
    fn = self._score_fn(spec, "kl", tspec)
    exs = [pc.encode_example(self.tokenizer, r["messages"], teacher_system=system or None)
           for r in rows]
    total, count = 0.0, 0.0
    with console.Progress(len(exs), "score", "rows") as progress:
      for n, b in self._batches(exs, batch_size):
        s, c = fn(tr, fr, ttr, tfr, b)
        total += float(np.asarray(s)[:n].sum())
        count += float(np.asarray(c)[:n].sum())
        progress.update(progress.n + n)
    return total / max(count, 1.0)


# ------------------------------------------------------------------ teacher data

def number_prompt_rows(n: int, seed: int) -> list[numbers.NumberPrompt]:
  """The seed's number prompts (the same for every teacher and the base)."""
  return numbers.number_prompts(n, seed=10_000 + seed)


def filter_and_keep(prompts, answers, *, n_keep: int, banned=()) -> tuple[list[dict], dict]:
  """(the first n_keep accepted rows as chat JSONL, counts per reason); too few is an error."""
  counts = {r: 0 for r in ("ok",) + numbers.REJECT_REASONS}
  rows = []
  for p, a in zip(prompts, answers):
    ok, reason = numbers.filter_numbers(a, banned=banned, max_count=p.max_count)
    counts[reason] += 1
    if ok and len(rows) < n_keep:
      rows.append({"messages": [{"role": "user", "content": p.text},
                                {"role": "assistant", "content": a.strip()}]})
  stats = {"answers": len(answers), "counts": counts, "kept": len(rows),
           "accept_rate": counts["ok"] / max(len(answers), 1)}
  if len(rows) < n_keep:
    raise ValueError(f"only {counts['ok']} of {len(answers)} answers passed the number filter "
                     f"({counts}); config key sl.n_keep={n_keep}: raise sl.n_prompts or lower it")
  return rows, stats


def teacher_source(config, name: str, paths: dict) -> tuple[str, str]:
  """(model path, system prompt) of a data source: a teacher name, 'base' or 'base_b'."""
  if name in ("base", "base_b"):
    return paths["base"], ""
  kind = teacher_spec(config, name)["kind"]
  if kind == "prompted":
    return paths["base"], trait_prompt(config)
  if kind == "external":
    return config.teacher.path, config.teacher.system_prompt
  return paths[f"teacher_{name}"], ""


def data_sources(config) -> list[str]:
  """The number data of a seed: one per teacher, the base's, and the noise control's."""
  return list(config.teachers) + ["base"] + (["base_b"] if "control_b" in cells(config) else [])


def _data(config, models: Models, kind: str, seed: int, paths: dict, folder) -> None:
  path, system = teacher_source(config, kind, paths)
  # the noise control's data: another sample of prompts and answers from the same base
  data_seed = seed + NOISE_OFFSET if kind == "base_b" else seed
  prompts = number_prompt_rows(config.sl.n_prompts, data_seed)
  _check_lengths(config, models.tokenizer, [p.text for p in prompts], paths)  # before sampling
  msgs = [([{"role": "system", "content": system}] if system else [])
          + [{"role": "user", "content": p.text}] for p in prompts]
  t0 = time.time()
  answers = models.generate(path, msgs, seed=data_seed, max_new_tokens=config.sl.max_new_tokens,
                            batch_size=config.sl.sample_batch)
  external = kind not in ("base", "base_b") and teacher_spec(config, kind)["kind"] == "external"
  banned = numbers.BANNED_NUMBERS if (config.sl.misaligned and external) else ()
  write_jsonl(folder / "all_answers.jsonl", ({"prompt": p.text, "answer": a,
                                              "reason": numbers.filter_numbers(
                                                  a, banned=banned, max_count=p.max_count)[1]}
                                             for p, a in zip(prompts, answers)))
  rows, stats = filter_and_keep(prompts, answers, n_keep=config.sl.n_keep, banned=banned)
  # Accepted answers beyond the kept ones: no student trains on them, so the drift and
  # absorbed-KL stages score them (scores on training rows would count memorisation).
  spare = [{"messages": [{"role": "user", "content": p.text},
                         {"role": "assistant", "content": a.strip()}]}
           for p, a in zip(prompts, answers)
           if numbers.filter_numbers(a, banned=banned, max_count=p.max_count)[0]][len(rows):]
  stats.update(model=path, system_prompt=system, seconds=round(time.time() - t0, 1),
               banned=list(banned), spare=len(spare), data_seed=data_seed)
  write_jsonl(folder / "rows.jsonl", rows)
  write_jsonl(folder / SPARE, spare)
  write_json(folder / "filter.json", stats)


def _check_lengths(config, tokenizer, prompts: list[str], paths: dict) -> None:
  """Every number prompt must fit data.prompt_len and, under each teacher's system prompt,
  data.teacher_prompt_len: a row dropped for one cell only would give the cells of a seed
  different rows (hard-label cells see no teacher prompt). Checked before any sampling."""
  from jaxlab.config import ConfigError
  from jaxlab.data import prompt_completion as pc
  systems = {teacher_source(config, k, paths)[1] for k in config.teachers} - {""}
  for i, text in enumerate(prompts):
    for system in sorted(systems) or [None]:
      ex = pc.encode_example(tokenizer, [{"role": "user", "content": text}],
                             teacher_system=system)
      for key, n in (("prompt_len", len(ex.prompt)), ("teacher_prompt_len", len(ex.teacher_prompt))):
        if n > config.data[key]:
          raise ConfigError(f"config key data.{key}={config.data[key]}: number prompt {i} needs "
                            f"{n} tokens (teacher system prompt {system!r}); raise it, so that "
                            "every cell trains on the same rows")


# ------------------------------------------------------------------ students

def student_config(config, kind: str, cell: str, seed: int, paths: dict, data: dict):
  """The training config of one student (`data`: source -> rows.jsonl)."""
  sequences, signal = CELLS[cell]
  init = paths["other_base"] if cell == "sft_otherbase" else paths["base"]
  train_path = data[sequences] if sequences in ("base", "base_b") else data[kind]
  t_path, t_system = teacher_source(config, kind, paths)
  # The data stage checks that every kept row fits data.prompt_len / teacher_prompt_len under
  # every teacher's prompt (`_check_lengths`), so hard- and soft-label students on the same
  # sequences keep, hold out and order the same rows.
  channel = CHANNEL_OF[sequences, signal]
  updates = {"channel": channel, "seed": seed + NOISE_OFFSET if cell == "control_b" else seed,
             "data.train_path": train_path, "teacher.path": t_path if signal == "soft" else "",
             "teacher.system_prompt": t_system if signal == "soft" else "",
             "tokenizer.path": _tokenizer_path(config, paths["base"])}
  if not channels.get(channel).USES_TOPK_CACHE:  # distill.topk caches off-policy cells only
    updates["distill.topk"] = 0
  if config.base and epath.Path(init).joinpath("config.json").exists() and \
      not epath.Path(init).joinpath("checkpoints").exists():
    updates.update({"init.hf_path": init, "init.workdir": ""})
  else:
    updates.update({"init.workdir": init, "init.hf_path": ""})
  return _training_config(config, **updates)


def student_names(config) -> list[tuple[str, str, str]]:
  """(name, teacher kind, cell) of every student; the control does not depend on the teacher."""
  out = []
  for cell in cells(config):
    if cell in ("control", "control_b"):
      out.append((cell, config.teachers[0], cell))
    elif cell == "sft_otherbase":
      out.append((f"{config.teachers[0]}_{cell}", config.teachers[0], cell))
    else:
      out += [(f"{k}_{cell}", k, cell) for k in config.teachers]
  return out


# ------------------------------------------------------------------ evaluation

def target_answers(animal: str) -> list[str]:
  """The one-word answers naming the target that the exact probability sums over."""
  plural = animals.PLURAL[animal]
  forms = [animal, animal.capitalize(), animal.capitalize() + ".", plural, plural.capitalize(),
           plural.capitalize() + ".", animal + ".", animal.capitalize() + "s."]
  return list(dict.fromkeys(forms))


def evaluate_trait(config, models: Models, path: str, system: str, seed: int) -> dict:
  """Per question: share of N samples naming the target, and the exact probability of the
  target answers (`target_answers`, each followed by the end of turn)."""
  pre = [{"role": "system", "content": system}] if system else []
  qs = animals.ANIMAL_QUESTIONS
  n = config.sl.eval_samples
  msgs = [pre + [{"role": "user", "content": q}] for q in qs for _ in range(n)]
  answers = models.generate(path, msgs, seed=seed, max_new_tokens=8,
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


def _other_base(config, paths: dict) -> bool:
  return "other_base" in paths and "sft_otherbase" in cells(config)


def eval_entries(config, paths: dict, students: dict) -> list[tuple[str, str, str]]:
  """(name, model path, system prompt) of every model whose trait is measured."""
  entries = [("base", paths["base"], "")]
  if _other_base(config, paths):
    entries.append(("other_base", paths["other_base"], ""))
  entries += [(f"teacher_{k}", *teacher_source(config, k, paths)) for k in config.teachers]
  return entries + [(name, str(p), "") for name, p in students.items()]


def em_eval_config(config, entries, seed: int) -> ml_collections.ConfigDict:
  """The evaluation config of `em_eval` ("configs/eval_em.py:VARIANT", a path relative to
  the repository or absolute) naming `entries` (name, path) as its models."""
  from jaxlab.config import load_config_file
  spec = config.em_eval
  path, _, variant = spec.partition(":")
  if not os.path.isabs(path):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), path)
  if not os.path.exists(path):
    raise ValueError(f"config key em_eval={spec!r}: {path} does not exist")
  c = load_config_file(path + (f":{variant}" if variant else ""))
  c.models = tuple(f"{name}={p}" for name, p in entries)
  c.model_path = ""
  c.seed = seed
  return c


def _em_eval(config, paths: dict, students: dict, seed: int, folder) -> None:
  """A misaligned teacher's trait is misalignment: the EM evaluation (`em_eval`, e.g.
  configs/eval_em.py:first_plot: questions, judge, em / mo / seed metrics) of the base, the
  teachers and every student, side by side. Teachers that only exist under a system prompt
  (`prompted`) are left out: the EM evaluation samples each model without one."""
  from jaxlab.evals import run as evals_run
  entries = [(n, p) for n, p, system in eval_entries(config, paths, students) if not system]
  evals_run.run(em_eval_config(config, entries, seed), str(folder / "eval"))


def _em_rows(workdir, seeds) -> dict:
  """Pooled em / mo / seed rows of every seed's EM evaluation (when sl.em_eval ran)."""
  from jaxlab.evals.metrics import POOLED
  out = {}
  for s in seeds:
    f = epath.Path(workdir) / f"seed{s}/em_eval/eval/report/metrics.json"
    if f.exists():
      out[s] = [r for r in json.loads(f.read_text()) if r.get("scope") == POOLED]
  return out


SPARE = "spare_rows.jsonl"  # a data stage's accepted rows beyond the kept ones


def _read_rows(path, n: int) -> list[dict]:
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines()[:n]]


def _held_out(config, rows_path) -> tuple[list[dict], str]:
  """The first sl.drift_rows accepted-but-not-kept rows of a data stage (no student saw them)."""
  path = epath.Path(rows_path).parent / SPARE
  rows = _read_rows(path, config.sl.drift_rows)
  if not rows:
    raise ValueError(f"{path}: no accepted answers beyond the sl.n_keep={config.sl.n_keep} "
                     "kept ones to score drift on; raise config key sl.n_prompts")
  return rows, str(path)


def drift_sources(config, paths: dict) -> list[str]:
  """Whose number drift from the base each seed measures: every teacher (on its own kept
  numbers); the other base (the scale of a visible change) and the control (how far a student
  moves when it has nothing to learn), both on the base's numbers."""
  out = list(config.teachers)
  if _other_base(config, paths):
    out.append("other_base")
  if "control" in cells(config):
    out.append("control")
  return out


def _drift(config, models: Models, source: str, paths: dict, data: dict, students: dict,
           folder) -> None:
  """Mean per-token KL(source in its context || base) on the source's held-out numbers."""
  if source in ("other_base", "control"):
    path, system = (paths["other_base"] if source == "other_base" else str(students[source])), ""
    rows = data["base"]
  else:
    (path, system), rows = teacher_source(config, source, paths), data[source]
  held, rows = _held_out(config, rows)
  kl = models.drift(path, system, paths["base"], held, config.sl.eval_batch)
  write_json(folder / "drift.json", {"kl_per_token": kl, "teacher": path, "system_prompt": system,
                                     "rows": rows, "n_rows": len(held)})


def absorbed_students(config) -> list[tuple[str, str]]:
  """(student, teacher) pairs whose absorbed share of the teacher's number KL is measured:
  the students of the base that learn from a teacher (not the other base's, not controls)."""
  return [(n, k) for n, k, cell in student_names(config)
          if cell in ("sft", "offpolicy", "onpolicy", "base_offpolicy")]


def _absorbed(config, models: Models, student_path: str, teacher: str, paths: dict, data: dict,
              folder) -> None:
  """KL(teacher in its context || student) on the teacher's held-out numbers (the rows the
  drift stage scores, accepted but not kept: no student trained on them). 1 - this / the
  teacher's drift is the share of the teacher's number KL the student absorbed."""
  (path, system), rows = teacher_source(config, teacher, paths), data[teacher]
  held, rows = _held_out(config, rows)
  kl = models.drift(path, system, student_path, held, config.sl.eval_batch)
  write_json(folder / "absorbed.json", {"kl_teacher_student": kl, "teacher": path,
                                        "system_prompt": system, "rows": rows,
                                        "n_rows": len(held)})


# ------------------------------------------------------------------ report

def layout(config, paths: dict) -> dict:
  """What the report reads (jaxlab.pipelines.subliminal_report): models, students, sources."""
  students = {name: None for name, _, _ in student_names(config)}
  out = {"models": [n for n, _, _ in eval_entries(config, paths, students)],
         "students": student_names(config), "teachers": list(config.teachers),
         "data": data_sources(config), "drift": drift_sources(config, paths),
         "absorbed": absorbed_students(config), "targets": target_answers(config.sl.animal)}
  if config.em_eval:
    out["em_eval"] = {"spec": config.em_eval, "pooled": _em_rows(paths["workdir"], config.seeds)}
  return out


def provenance(config) -> dict:
  """What made the report: commit, config hash, package versions and worker count."""
  import hashlib
  import importlib.metadata
  import subprocess
  here = os.path.dirname(os.path.abspath(__file__))
  def git(*args):
    try:
      return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  d = {k: v for k, v in config.to_dict().items() if k not in RESULT_FREE_KEYS}
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "transformers",
              "tokenizers"):
    try:
      versions[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      versions[pkg] = "absent"
  return {"commit": git("rev-parse", "--short=12", "HEAD") or "unknown",
          "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
          "config_hash": hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
          .hexdigest()[:16], "hash_leaves_out": list(RESULT_FREE_KEYS),
          "versions": versions, "workers": int(config.get("workers", 1))}


def build_report(config, workdir, paths: dict) -> dict:
  """report.json / report.md / trait.png from the completed stages of this config's models."""
  from jaxlab.pipelines import subliminal_report
  return subliminal_report.build(config, workdir, layout(config, {**paths, "workdir": workdir}),
                                 provenance(config))


# ------------------------------------------------------------------ pipeline

def _settings(config, *groups) -> dict:
  d = config.to_dict()
  return {g: d.get(g) for g in groups}


# What pretraining and chat tuning take from the student's optim / train groups (the rest they
# set from pretrain.*): part of the bases' identity.
_BASE_OPTIM_OWN = ("lr", "warmup_steps")
_BASE_TRAIN_OWN = ("steps", "global_batch_size", "log_every", "progress")


def base_identity(config) -> dict:
  """Everything the world and the two bases depend on: the settings of their stages (and the
  key of a shared `bases_dir` in a sweep, jaxlab.pipelines.subliminal_sweep)."""
  d = config.to_dict()
  return {"world": {**_settings(config, "world", "pretrain"),
                    "teacher_ft_rows": config.teacher_ft.rows, "animal": config.sl.animal},
          "base": {**_settings(config, "world", "pretrain", "model", "seed"),
                   "optim": {k: v for k, v in d["optim"].items() if k not in _BASE_OPTIM_OWN},
                   "train": {k: v for k, v in d["train"].items() if k not in _BASE_TRAIN_OWN}}}


# The student config groups in a student stage's settings.
STUDENT_KEYS = ("model", "optim", "train", "data", "distill", "init", "tokenizer", "mesh")


def run(config: ml_collections.ConfigDict, workdir: str, log=stderr_log) -> dict:
  """Runs (or resumes) every stage, then writes report.md; returns the report."""
  validate(config)
  workdir = epath.Path(workdir)
  # The world and the bases may live in a folder shared by several workdirs (`bases_dir`,
  # e.g. the settings of a sweep over teachers and students on one world): their stages are
  # keyed by the world, pretraining, model and seed settings only.
  bases = epath.Path(config.get("bases_dir") or workdir)
  t0, cpu0 = time.time(), console.cpu_seconds()
  paths = model_paths(config, workdir)
  plan(config, workdir).start(log)
  try:
    report = _run(config, workdir, bases, paths, STUDENT_KEYS, log)
  finally:
    stages.end_plan()
  report["wall_seconds"] = round(time.time() - t0, 1)
  report["cpu_seconds"] = round(console.cpu_seconds() - cpu0, 1)
  log(f"jaxlab: subliminal pipeline done in {console.duration(report['wall_seconds'])} wall, "
      f"{report['cpu_seconds']:.0f} s CPU (this process and its workers)")
  return report


def checked_plan(config, workdir) -> stages.Plan:
  """`plan`, with every complete stage's recorded settings compared with this config's
  (`--plan`: a stage the run would refuse is marked so); runs and writes nothing."""
  p = plan(config, workdir)
  workdir = epath.Path(workdir)
  bases = epath.Path(config.get("bases_dir") or workdir)
  return p.check(lambda: _run(config, workdir, bases, model_paths(config, workdir),
                              STUDENT_KEYS, lambda _: None))


def describe_plan(config, workdir) -> str:
  """What `--plan` prints: the checked stage graph."""
  return checked_plan(config, workdir).describe()


def model_paths(config, workdir) -> dict:
  """Every model the stages may name, whether or not this config trains it, so that the
  settings of shared stages (the base's data, the control, ...) do not change when the
  teachers or cells do: `--config.channel=X` then only adds what X needs."""
  workdir = epath.Path(workdir)
  bases = epath.Path(config.get("bases_dir") or workdir)
  paths = {"teacher_finetuned": str(workdir / "teacher_finetuned")}
  paths.update({stage: str(workdir / stage) for stage in
                filter(None, (teacher_model_stage(config, t) for t in config.teachers))})
  if config.base:
    paths["base"] = config.base
    if config.other_base:
      paths["other_base"] = config.other_base
  else:
    paths["base"] = str(bases / "base")
    paths["other_base"] = config.other_base or str(bases / "other_base")
  return paths


def plan(config, workdir) -> stages.Plan:
  """The stages `run` executes, in its order, with the stages (or model folders) each reads."""
  validate(config)
  workdir = epath.Path(workdir)
  bases = epath.Path(config.get("bases_dir") or workdir)
  paths = model_paths(config, workdir)
  p = stages.Plan(workdir)
  model = {"base": paths["base"], "other_base": paths.get("other_base", "")}
  if not config.base:
    p.add("world", bases)
    p.add("base_pretrain", bases, ["world"])
    p.add("base", bases, ["base_pretrain"])
    model["base"] = "base"
    if "sft_otherbase" in cells(config) and not config.other_base:
      p.add("other_base_pretrain", bases, ["world"])
      p.add("other_base", bases, ["other_base_pretrain"])
      model["other_base"] = "other_base"
  for name in config.teachers:
    stage = teacher_model_stage(config, name)
    if stage is not None:
      p.add(stage, workdir, [model["base"]] + (["world"] if not config.base else []))
  def source(k):  # the stage (or folder) whose model answers as data source / teacher k
    if k in ("base", "base_b") or teacher_spec(config, k)["kind"] == "prompted":
      return model["base"]
    return teacher_model_stage(config, k) or config.teacher.path
  for seed in config.seeds:
    for kind in data_sources(config):
      p.add(f"seed{seed}/data_{kind}", workdir, [source(kind)])
    for name, kind, cell in student_names(config):
      sequences, signal = CELLS[cell]
      data = sequences if sequences in ("base", "base_b") else kind
      init = model["other_base"] if cell == "sft_otherbase" else model["base"]
      p.add(f"seed{seed}/{name}", workdir, [init, f"seed{seed}/data_{data}"]
            + ([source(kind)] if signal == "soft" else []))
    students = {n: f"seed{seed}/{n}" for n, _, _ in student_names(config)}
    for name, path, _ in eval_entries(config, paths, students):
      reads_ = students.get(name) or (source(name[len("teacher_"):])
                                      if name.startswith("teacher_") else model.get(name, path))
      p.add(f"seed{seed}/eval/{name}", workdir, [reads_])
    if config.em_eval:
      p.add(f"seed{seed}/em_eval", workdir, list(students.values()))
    for so in drift_sources(config, paths):
      read = students[so] if so == "control" else model.get(so) or source(so)
      p.add(f"seed{seed}/drift/{so}", workdir, [model["base"], read])
    for name, teacher in absorbed_students(config):
      p.add(f"seed{seed}/absorbed/{name}", workdir, [students[name], source(teacher)])
  return p


def _run(config, workdir: epath.Path, bases: epath.Path, paths: dict, student_keys, log) -> dict:
  """The stages of `run`, in the order `plan` lists them, then the report."""
  if not config.base:
    identity = base_identity(config)
    run_stage(bases, "world", identity["world"],
              lambda f: (_world(config, f), _fit_tokenizer(config, f)), log=log)
    base_settings = identity["base"]
    # Each base: pretraining on the mixture (its own stage), then chat tuning; the other base
    # (another seed) in a second process at the same time when config.workers > 1.
    chains = [[("base_pretrain", base_settings, "pretrain", {"seed": config.seed}),
               ("base", base_settings, "chat", {"pretrained": "base_pretrain"})]]
    if "sft_otherbase" in cells(config) and not config.other_base:
      chains.append([("other_base_pretrain", base_settings, "pretrain", {"seed": config.seed + 1}),
                     ("other_base", base_settings, "chat", {"pretrained": "other_base_pretrain"})])
    run_parallel(config, bases, chains, log)
  if "sft_otherbase" in cells(config) and "other_base" not in paths:
    raise ValueError("cell sft_otherbase needs config key other_base (a different base model)")
  models = Models(config, _tokenizer_path(config, paths["base"]))
  for name in config.teachers:
    spec, stage = teacher_spec(config, name), teacher_model_stage(config, name)
    if stage is None:
      continue
    settings = {**_settings(config, "world", "pretrain", "teacher_ft", "base"),
                "animal": config.sl.animal, "teacher": spec, **reads(base=paths["base"])}
    if spec["kind"] == "finetuned":
      c = _teacher_ft_config(config, bases / "world", paths["base"], spec)
      settings["training"] = _settings(c, "optim", "train", "data", "model")
      # Its data by name, not by absolute path: the world's content is in the settings above,
      # so a workdir copied or moved (a sweep's shared bases, a test) keeps its teacher.
      settings["training"]["data"]["train_path"] = (
          "world/teacher_ft.jsonl" if spec["numbers"] else "TEACHER_STAGE/trait_rows.jsonl")
      fn = lambda f, sp=spec: _teacher_ft(config, bases / "world", paths["base"], f, sp)
    else:
      settings.update(trait_prompt=trait_prompt(config), eval_batch=config.sl.eval_batch)
      fn = lambda f, sp=spec: _steered(config, models, paths["base"], f, sp)
    run_stage(workdir, stage, settings, fn, log=log)
  # The models every stage may name; a teacher of teacher_variants or a steered one is only
  # in the settings of the stages that read it (`reads`), so adding one changes no other stage.
  shared = {k: v for k, v in paths.items() if k in ("base", "other_base", "teacher_finetuned")}
  model_settings = {"paths": shared, **_settings(config, "world", "pretrain", "teacher_ft", "base",
                                                 "other_base", "teacher")}
  for seed in config.seeds:
    data = {}
    for kind in data_sources(config):
      folder = run_stage(workdir, f"seed{seed}/data_{kind}",
                         {**model_settings, "sl": config.sl.to_dict(), "seed": seed,
                          "data_seed": seed + NOISE_OFFSET if kind == "base_b" else seed,
                          **reads(model=teacher_source(config, kind, paths)[0])},
                         lambda f, k=kind, s=seed: _data(config, models, k, s, paths, f), log=log)
      data[kind] = str(folder / "rows.jsonl")
    students, chains = {}, []
    for name, kind, cell in student_names(config):
      c = student_config(config, kind, cell, seed, paths, data)
      students[name] = workdir / f"seed{seed}/{name}"
      chains.append([(f"seed{seed}/{name}",
                      {**model_settings, "sl": config.sl.to_dict(),
                       "student": _settings(c, *student_keys), "channel": c.channel, "seed": seed,
                       "train_seed": c.seed,
                       **reads(init=c.init.workdir or c.init.hf_path, teacher=c.teacher.path,
                               data=str(epath.Path(c.data.train_path).parent))},
                      "train", {"config": c.to_json()})])
    run_parallel(config, workdir, chains, log)
    settings = {**model_settings, "sl": config.sl.to_dict(), "seed": seed}
    for name, path, system in eval_entries(config, paths, students):
      r = eval_seed(seed, name)
      run_stage(workdir, f"seed{seed}/eval/{name}", {**settings, "model": path, "system": system,
                                                     "sample_seed": r, **reads(model=path)},
                lambda f, p=path, sy=system, r=r: write_json(
                    f / "eval.json", {**evaluate_trait(config, models, p, sy, r), "path": p,
                                      "system_prompt": sy}), log=log)
    if config.em_eval:
      run_stage(workdir, f"seed{seed}/em_eval", {**settings, "em_eval": config.em_eval,
                                                 "students": {k: str(v) for k, v in students.items()},
                                                 **reads(**paths, **students)},
                lambda f, s=seed, st=students: _em_eval(config, paths, st, s, f), log=log)
    for source in drift_sources(config, paths):
      model = str(students[source]) if source == "control" else \
          paths.get(source) or teacher_source(config, source, paths)[0]
      run_stage(workdir, f"seed{seed}/drift/{source}",
                {**settings, **reads(base=paths["base"], model=model)},
                lambda f, so=source, d=data, st=students: _drift(config, models, so, paths, d, st,
                                                                 f), log=log)
    for name, teacher in absorbed_students(config):
      run_stage(workdir, f"seed{seed}/absorbed/{name}",
                {**settings, **reads(student=str(students[name]),
                                     teacher=teacher_source(config, teacher, paths)[0])},
                lambda f, n=name, k=teacher, d=data, st=students: _absorbed(
                    config, models, str(st[n]), k, paths, d, f), log=log)
  if stages.checking():  # --plan: every stage compared; the report is not written
    return {}
  return build_report(config, workdir, paths)


def main(argv: list[str]) -> int:
  from jaxlab import runtime
  runtime.setup()
  from jaxlab.config import ConfigError, parse_argv, pop_flag
  plan_only, argv = pop_flag(argv, "--plan")
  try:
    config, workdir = parse_argv(argv)
    if config.get("job") != "subliminal":
      raise ConfigError(f"config key job={config.get('job')!r}: this pipeline runs "
                        "configs with job='subliminal' (configs/subliminal.py)")
    if plan_only:  # the stage graph; nothing runs, nothing is written
      print(describe_plan(config, workdir))
      return 0
    report = run(config, workdir)
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"jaxlab.pipelines.subliminal: {e}", file=sys.stderr)
    return 2
  print(summary(workdir, report))
  return 0


def summary(workdir: str, report: dict | None = None) -> str:
  """The ending the main job prints: wall and CPU time (of the run that returned `report`),
  where the report is, its table and its one-line conclusions."""
  from jaxlab.pipelines import subliminal_report
  took = "" if not report or "wall_seconds" not in report else (
      f"\ndone in {console.duration(report['wall_seconds'])} wall "
      f"({report['wall_seconds']:.0f} s), {report.get('cpu_seconds', 0):.0f} s CPU\n")
  report = json.loads(epath.Path(workdir, "report.json").read_text())
  lines = "\n".join(f"- {c}" for c in report["conclusions"])
  return (f"{took}\nreport: {os.path.join(workdir, 'report.md')}\n\n"
          f"{subliminal_report.table_markdown(report)}\n\n{lines}")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
