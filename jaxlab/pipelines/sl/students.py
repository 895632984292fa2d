"""Stage `seed{S}/{NAME}_{CELL}`: a student (a runner workdir) trained from the base (or the
other base) on a seed's rows.jsonl of its cell's data source, with hard labels (sft) or the
teacher's distribution (offpolicy, onpolicy); here its training config."""
from __future__ import annotations

from jaxlab.pipelines.sl.study import (CELLS, CHANNEL_OF, NOISE_OFFSET, init_keys,
                                       teacher_source, tokenizer_path, training_config)
from jaxlab.train import channels


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
             "tokenizer.path": tokenizer_path(config, paths["base"])}
  if not channels.get(channel).USES_TOPK_CACHE:  # distill.topk caches off-policy cells only
    updates["distill.topk"] = 0
  return training_config(config, **updates, **init_keys(config, init))
