"""Stage `eval`: jaxlab.evals.run of the base (eval_base) and the trained model side by side,
on the same questions, samples and judge. Reads train/; writes answers/, scores/ and report/
(metrics.md, metrics.json, plots)."""
from __future__ import annotations

from etils import epath

from jaxlab.pipelines import stages
from jaxlab.pipelines.sft.study import eval_config


def settings(ec) -> dict:
  """The eval stage's recorded settings: the eval config, with its question file recorded by
  name and content digest, not by path. The packaged EM eval config finds its questions
  beside the checkout (../shared/data), so the resolved path differs between two checkouts of
  the same commit; recorded as a path, it made a complete eval stage look changed (refused)
  when the same workdir was run from another checkout. A changed file still changes the digest."""
  from jaxlab.fingerprint import file_digest  # pylint: disable=g-import-not-at-top
  d = ec.to_dict()
  q = d.get("questions", {})
  if q.get("path"):
    q["path"] = {"name": epath.Path(q["path"]).name,
                 "sha256": file_digest(q["path"])["sha256"][:16]}
  return d


def eval_stage(config, workdir, log) -> epath.Path:
  from jaxlab.evals import run as evals_run
  ec = eval_config(config, workdir)
  return stages.run_stage(workdir, "eval", {"eval": settings(ec),
                                            **stages.reads(tuned=str(epath.Path(workdir) / "train"))},
                          lambda f: evals_run.run(ec, str(f), log=log), log=log)
