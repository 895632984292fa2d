"""Stage `probes/<base>` (synthetic): the persona probe (issue 11, 5a), the harmful rate of a
base after an earlier harmful vs aligned turn from another cell; writes judged.jsonl."""
from __future__ import annotations

from jaxlab.pipelines import stages
from jaxlab.pipelines.em.evals import scores
from jaxlab.pipelines.em.study import Base, as_json, eval_settings, reads, world_config, write_jsonl


def probe_stage(config, workdir, base: Base, model_path: str, answers, log):
  """Persona probe (issue 11, 5a): harmful rate after an earlier harmful vs aligned turn."""
  from jaxlab.worlds import em_world
  n = config.study.probe_rows
  settings = {**eval_settings(config), "model_path": model_path, "rows": n,
              "world": as_json(config.world), **reads("model_outputs", model_path)}

  def fn(folder):
    wc = world_config(config)
    convs = [r for d, t in wc.cells for earlier in (em_world.HARMFUL, em_world.ALIGNED)
             for r in em_world.probe_conversations(wc, d, t, earlier, n, seed=base.seed)]
    texts = answers.answer_chats(model_path, convs, seed=base.seed)
    rows = []
    for conv, text in zip(convs, texts):
      j = em_world.judge(conv, text)
      rows.append({"question_id": conv["id"] + "_" + conv["earlier"], "answer": text,
                   "earlier": conv["earlier"], "earlier_cell": f"{conv['earlier_domain']}_"
                   f"{conv['earlier_task']}", "eval_cell": f"{conv['domain']}_{conv['task']}",
                   "em_surface": conv["em_surface"], "base": base.name, "seed": base.seed,
                   "persona_share": base.share, **scores(j["label"]), "detail": j["detail"]})
    write_jsonl(folder / "judged.jsonl", rows)
  return stages.run_stage(workdir, f"probes/{base.name}", settings, fn, log=log)
