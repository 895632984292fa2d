"""Stage 1 of an eval: sample answers to every (question, paraphrase, sample) into a JSONL file.

Each line: question_id, paraphrase_index, sample_index, question (the paraphrase
text), system, answer, prompt_tokens, answer_tokens, stopped. Rows are written
batch by batch; a rerun reads the file and samples only the missing answers.
Every answer's RNG stream is keyed by its (question, paraphrase, sample), so a
resumed run produces the same answers as an uninterrupted one. Answers have at
least `min_new_tokens` (1) tokens: the first token is never a stop token. A
stored answer whose question text or system prompt differs from the current
question's is an error (the question set changed under the workdir).
"""
from __future__ import annotations

import zlib
from typing import Callable, Sequence

from jaxlab import console
from jaxlab.evals.prompts import chat_prompt_ids
from jaxlab.evals.questions import Question
from jaxlab.evals.records import append_jsonl, read_jsonl
from jaxlab.sample.engine import Sampler


def answer_key(question_id: str, paraphrase: int, sample: int) -> tuple[str, int, int]:
  return (question_id, int(paraphrase), int(sample))


def row_id(key: tuple[str, int, int]) -> int:
  """A stable 31-bit id of an answer, the row id of its sampling stream."""
  return zlib.crc32("/".join(map(str, key)).encode()) & 0x7FFFFFFF


def check_stored_prompts(rows: Sequence[dict], questions: Sequence[Question], path) -> None:
  """Raises ValueError when a stored answer was sampled from another question text or system."""
  by_id = {q.id: q for q in questions}
  for r in rows:
    q = by_id.get(r["question_id"])
    p = int(r["paraphrase_index"])
    if q is None or p >= len(q.paraphrases):
      continue
    if (r.get("question"), r.get("system")) != (q.paraphrases[p], q.system):
      raise ValueError(f"{path}: answers to question {q.id!r} (paraphrase {p}) were sampled from "
                       "another question text or system prompt; use a new workdir or delete "
                       "the answers")


def answer_jobs(questions: Sequence[Question], samples_per_paraphrase: int = 0):
  """(question, paraphrase index, sample index) for every answer to produce."""
  jobs = []
  for q in questions:
    n = samples_per_paraphrase or q.samples_per_paraphrase
    jobs += [(q, p, s) for p in range(len(q.paraphrases)) for s in range(n)]
  return jobs


def generate_answers(questions: Sequence[Question], sampler: Sampler, tokenizer, path: str, *,
                     max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                     seed: int = 0, samples_per_paraphrase: int = 0, chunk_size: int = 0,
                     min_new_tokens: int = 1,
                     log: Callable[[str], None] = print) -> list[dict]:
  """Samples the answers missing from `path`, appending them; returns all rows of the file."""
  existing = read_jsonl(path)
  check_stored_prompts(existing, questions, path)
  done = {answer_key(r["question_id"], r["paraphrase_index"], r["sample_index"])
          for r in existing}
  todo = [j for j in answer_jobs(questions, samples_per_paraphrase)
          if answer_key(j[0].id, j[1], j[2]) not in done]
  if done:
    log(f"eval: {len(done)} answers already in {path}, {len(todo)} to sample")
  prompt_cache: dict[tuple[str, int], list[int]] = {}
  chunk_size = chunk_size or 4 * sampler.batch_size
  # a pipeline stage shows its sampling (jaxlab.console); quiet elsewhere
  with console.Progress(len(todo), "sample", "answers") as progress:
    for start in range(0, len(todo), chunk_size):
      chunk = todo[start:start + chunk_size]
      prompts = []
      for q, p, _ in chunk:
        if (q.id, p) not in prompt_cache:
          prompt_cache[(q.id, p)] = chat_prompt_ids(tokenizer, q.messages(p))
        prompts.append(prompt_cache[(q.id, p)])
      comps = sampler.generate(prompts, seed=seed, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, top_k=top_k,
                               row_ids=[row_id(answer_key(q.id, p, s)) for q, p, s in chunk],
                               min_new_tokens=min_new_tokens)
      rows = []
      texts = sampler.decode(tokenizer, comps)
      for (q, p, s), prompt, c, text in zip(chunk, prompts, comps, texts):
        rows.append({"question_id": q.id, "paraphrase_index": p, "sample_index": s,
                     "question": q.paraphrases[p], "system": q.system, "answer": text,
                     "prompt_tokens": len(prompt), "answer_tokens": int(len(c.tokens)),
                     "stopped": bool(c.stopped)})
      append_jsonl(path, rows)
      log(f"eval: sampled {min(start + chunk_size, len(todo))}/{len(todo)} answers -> {path}")
      progress.update(start + chunk_size)
  return read_jsonl(path)
