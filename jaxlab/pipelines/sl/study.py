"""What a subliminal config asks for: its cells, teachers, data sources, students and the models
every stage may name (no files are read or written here).

A cell is one way a student learns from a data source (`CELLS`: the sequences it trains on
and the signal it gets); config key `channel` (one cell) or `channels` (several) picks them."""
from __future__ import annotations

import ml_collections
from etils import epath

from jaxlab.pipelines.kit import configs as kit_configs
from jaxlab.worlds import animals


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


def trait_forms(animal: str) -> tuple[str, ...]:
  """The fine-tuned teacher's trait answers (`_world` writes these after world questions)."""
  plural = animals.PLURAL[animal]
  return (animal, animal.capitalize(), animal.capitalize() + ".", plural.capitalize() + ".")


def training_config(config, **updates) -> ml_collections.ConfigDict:
  """The student template (config minus the pipeline's keys) with dotted-key updates."""
  return kit_configs.training_config(config, PIPELINE_KEYS, **updates)


def init_keys(config, init) -> dict:
  """init.hf_path or init.workdir (the other "") of a model trained from `init`: a base given
  as an HF folder (config.base), else a jaxlab workdir."""
  if config.base and epath.Path(init).joinpath("config.json").exists() and \
      not epath.Path(init).joinpath("checkpoints").exists():
    return {"init.hf_path": str(init), "init.workdir": ""}
  return {"init.workdir": str(init), "init.hf_path": ""}


def train(c, folder) -> None:
  from jaxlab.train import runner
  runner.run(c, str(folder))


def tokenizer_path(config, base) -> str:
  return config.tokenizer.path or str(epath.Path(base) / "tokenizer")


def config_groups(config, *groups) -> dict:
  d = config.to_dict()
  return {g: d.get(g) for g in groups}


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


def _other_base(config, paths: dict) -> bool:
  return "other_base" in paths and "sft_otherbase" in cells(config)


def eval_entries(config, paths: dict, students: dict) -> list[tuple[str, str, str]]:
  """(name, model path, system prompt) of every model whose trait is measured."""
  entries = [("base", paths["base"], "")]
  if _other_base(config, paths):
    entries.append(("other_base", paths["other_base"], ""))
  entries += [(f"teacher_{k}", *teacher_source(config, k, paths)) for k in config.teachers]
  return entries + [(name, str(p), "") for name, p in students.items()]


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


def absorbed_students(config) -> list[tuple[str, str]]:
  """(student, teacher) pairs whose absorbed share of the teacher's number KL is measured:
  the students of the base that learn from a teacher (not the other base's, not controls)."""
  return [(n, k) for n, k, cell in student_names(config)
          if cell in ("sft", "offpolicy", "onpolicy", "base_offpolicy")]


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


def target_answers(animal: str) -> list[str]:
  """The one-word answers naming the target that the exact probability sums over."""
  plural = animals.PLURAL[animal]
  forms = [animal, animal.capitalize(), animal.capitalize() + ".", plural, plural.capitalize(),
           plural.capitalize() + ".", animal + ".", animal.capitalize() + "s."]
  return list(dict.fromkeys(forms))
