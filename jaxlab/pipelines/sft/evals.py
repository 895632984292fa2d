"""Stage `eval`: jaxlab.evals.run of the base (eval_base) and the trained model side by side,
on the same questions, samples and judge. Reads train/; writes answers/, scores/ and report/
(metrics.md, metrics.json, plots)."""
from __future__ import annotations

from etils import epath

from jaxlab.pipelines import stages
from jaxlab.pipelines.sft.study import eval_config


def eval_stage(config, workdir, log) -> epath.Path:
  from jaxlab.evals import run as evals_run
  ec = eval_config(config, workdir)
  return stages.run_stage(workdir, "eval", {"eval": ec.to_dict(),
                                            **stages.reads(tuned=str(epath.Path(workdir) / "train"))},
                          lambda f: evals_run.run(ec, str(f), log=log), log=log)
