"""Stage `teacher_{NAME}`: a fine-tuned teacher (a runner workdir: the base fine-tuned on the
world's trait answers, world/teacher_ft.jsonl, with or without its number docs; without, or
for a base given as a model folder (no world), it writes its rows first: `finetune_data`) or
a steered one (steer.json + the direction file:
jaxlab.models.steering) made from the base."""
from __future__ import annotations

import ml_collections
import numpy as np
from etils import epath

from jaxlab.pipelines.sl.study import (init_keys, tokenizer_path, train, training_config,
                                       trait_forms, trait_prompt)
from jaxlab.pipelines.sl.world import teacher_ft_rows
from jaxlab.worlds import animals, number_sequences
from jaxlab.worlds.io import write_jsonl


def finetune_data(config, world, spec: dict, folder=None) -> epath.Path:
  """The fine-tuned teacher's rows (jaxlab.pipelines.sl.world.teacher_ft_rows): the world's
  teacher_ft.jsonl (trait answers and number docs, spec numbers=True), else a file the teacher
  stage writes in its FOLDER: the trait answers alone (trait_rows.jsonl), or, for a base given
  as a model folder (no world: config.base), the same rows made from config.world's
  generators."""
  stage = epath.Path(folder or "TEACHER_STAGE")
  if config.base:
    return stage / ("teacher_ft.jsonl" if spec["numbers"] else "trait_rows.jsonl")
  return epath.Path(world) / "teacher_ft.jsonl" if spec["numbers"] else stage / "trait_rows.jsonl"


def finetune_config(config, world, base, spec: dict, folder=None):
  """The fine-tuned teacher's training config: SFT of the base on `finetune_data`."""
  train_path = finetune_data(config, world, spec, folder)
  c = training_config(config, channel="sft", **init_keys(config, base))
  c.data = ml_collections.ConfigDict(dict(
      train_path=str(train_path), seq_len=config.data.prompt_len, pack=True,
      overlong="truncate", max_examples=0))
  c.tokenizer.path = tokenizer_path(config, base)
  c.train.update(steps=spec["steps"])
  c.optim.update(lr=spec["lr"])
  for k in ("teacher", "distill"):
    del c[k]
  return c


def finetune(config, world, base, folder, spec: dict) -> None:
  data = finetune_data(config, world, spec, folder)
  if data.parent == epath.Path(folder):  # this stage's own rows
    from jaxlab.worlds.io import read_jsonl
    if config.base:  # no world: the rows its generators would have written
      cfg = animals.SLWorldConfig(**config.world.to_dict(), number_prompts=0)
      rows = teacher_ft_rows(config, cfg, np.random.default_rng(cfg.seed))
    else:
      rows = list(read_jsonl(world / "teacher_ft.jsonl"))
    if not spec["numbers"]:
      forms = trait_forms(config.sl.animal)
      rows = [r for r in rows if r["messages"][-1]["content"] in forms]
    write_jsonl(data, rows)
  train(finetune_config(config, world, base, spec, folder), folder)


def steer(config, models, base: str, folder, spec: dict) -> None:
  """A steering-vector teacher: the base plus alpha x d added to the residual stream after
  block `layer`, d the mean difference of that residual at the answer position between
  prompts with and without the trait system prompt (contrastive activation addition over
  the world's preference questions and number prompts, none of them evaluation questions).
  Its trait acts as one direction, which is what subliminal transfer is known to need."""
  from jaxlab.models import steering
  qs = animals.world_questions()
  rng = np.random.default_rng(spec.get("seed", 0))
  texts = [qs[int(i)] for i in rng.choice(len(qs), min(len(qs), spec["n_prompts"]), replace=False)]
  texts += [p.text for p in number_sequences.number_prompts(spec["n_prompts"], seed=99)]
  user = [[{"role": "user", "content": t}] for t in texts]
  system = [{"role": "system", "content": trait_prompt(config)}]
  with_ids = [models.prompt_ids(system + m) for m in user]
  without_ids = [models.prompt_ids(m) for m in user]
  mspec, tr, fr = models.load(base)
  d = steering.direction(mspec, tr, fr, with_ids, without_ids, spec["layer"],
                         config.sl.eval_batch)
  steering.write_steered(folder, base, spec["layer"], spec["alpha"], d,
                         tokenizer_path(config, base), prompts=len(texts),
                         direction_norm=float(np.linalg.norm(d)))
