"""Stage `seed{S}/data_{SOURCE}`: number prompts answered at temperature 1 by a teacher, the
base or (base_b, the noise control's) the base on other prompts and seed.

Reads the source's model; writes all_answers.jsonl (every answer and its filter reason),
rows.jsonl (the first sl.n_keep accepted: what students train on), spare_rows.jsonl (the
other accepted rows: what the drift stages score) and filter.json (counts per reason)."""
from __future__ import annotations

import time

from jaxlab.pipelines.sl.study import NOISE_OFFSET, teacher_source, teacher_spec
from jaxlab.worlds import number_sequences
from jaxlab.worlds.io import write_json, write_jsonl


SPARE = "spare_rows.jsonl"  # a data stage's accepted rows beyond the kept ones


def number_prompt_rows(n: int, seed: int) -> list[number_sequences.NumberPrompt]:
  """The seed's number prompts (the same for every teacher and the base)."""
  return number_sequences.number_prompts(n, seed=10_000 + seed)


def filter_and_keep(prompts, answers, *, n_keep: int, banned=()) -> tuple[list[dict], dict]:
  """(the first n_keep accepted rows as chat JSONL, counts per reason); too few is an error."""
  counts = {r: 0 for r in ("ok",) + number_sequences.REJECT_REASONS}
  rows = []
  for p, a in zip(prompts, answers):
    ok, reason = number_sequences.filter_numbers(a, banned=banned, max_count=p.max_count)
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


def write(config, models, kind: str, seed: int, paths: dict, folder) -> None:
  path, system = teacher_source(config, kind, paths)
  # the noise control's data: another sample of prompts and answers from the same base
  data_seed = seed + NOISE_OFFSET if kind == "base_b" else seed
  prompts = number_prompt_rows(config.sl.n_prompts, data_seed)
  check_lengths(config, models.tokenizer, [p.text for p in prompts], paths)  # before sampling
  msgs = [([{"role": "system", "content": system}] if system else [])
          + [{"role": "user", "content": p.text}] for p in prompts]
  t0 = time.time()
  answers = models.generate(path, [models.prompt_ids(m) for m in msgs], seed=data_seed, max_new_tokens=config.sl.max_new_tokens,
                            batch_size=config.sl.sample_batch)
  external = kind not in ("base", "base_b") and teacher_spec(config, kind)["kind"] == "external"
  banned = number_sequences.BANNED_NUMBERS if (config.sl.misaligned and external) else ()
  write_jsonl(folder / "all_answers.jsonl", ({"prompt": p.text, "answer": a,
                                              "reason": number_sequences.filter_numbers(
                                                  a, banned=banned, max_count=p.max_count)[1]}
                                             for p, a in zip(prompts, answers)))
  rows, stats = filter_and_keep(prompts, answers, n_keep=config.sl.n_keep, banned=banned)
  # Accepted answers beyond the kept ones: no student trains on them, so the drift and
  # absorbed-KL stages score them (scores on training rows would count memorisation).
  spare = [{"messages": [{"role": "user", "content": p.text},
                         {"role": "assistant", "content": a.strip()}]}
           for p, a in zip(prompts, answers)
           if number_sequences.filter_numbers(a, banned=banned, max_count=p.max_count)[0]][len(rows):]
  stats.update(model=path, system_prompt=system, seconds=round(time.time() - t0, 1),
               banned=list(banned), spare=len(spare), data_seed=data_seed)
  write_jsonl(folder / "rows.jsonl", rows)
  write_jsonl(folder / SPARE, spare)
  write_json(folder / "filter.json", stats)


def check_lengths(config, tokenizer, prompts: list[str], paths: dict) -> None:
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
