"""CLI: python -m jaxlab.main --config=configs/NAME.py:VARIANT --workdir=DIR [--config.key=value]
[--plan].

The config's `job` field picks what runs: 'train' (alias 'sft': the training runner, any
`channel`), 'eval', or a staged pipeline: 'subliminal' (configs/subliminal.py), 'em_study'
(configs/em_study.py) or 'sft_eval' (train, then evaluate: configs/sft.py:smollm_insecure), the
same as `python -m jaxlab.pipelines.NAME`. `--plan` prints a
pipeline's stages (complete and skipped, or to run, with their inputs) and exits without
running or writing anything. On multi-host TPU
VMs set JAXLAB_DISTRIBUTED=1 so every host calls jax.distributed.initialize(). On the
CPU backend the host allocator is tuned for XLA (see `jaxlab.runtime`;
JAXLAB_HOST_MALLOC=default opts out).
"""
from __future__ import annotations

import sys

from jaxlab.config import ConfigError, parse_argv, pop_flag


def main(argv: list[str]) -> int:
  plan_only, argv = pop_flag(argv, "--plan")
  try:
    config, workdir = parse_argv(argv)
  except ConfigError as e:
    print(f"jaxlab: {e}", file=sys.stderr)
    return 2
  if plan_only:
    return _print_plan(config, workdir)
  from jaxlab import runtime
  runtime.setup()  # before anything starts JAX (see jaxlab.runtime)
  import jax
  from jaxlab.checkpoint import CheckpointError, NonFiniteStateError
  from jaxlab.data.errors import DataError
  from jaxlab.train.loop import NonFiniteError
  try:
    return _run_job(config, workdir, jax)
  except (ConfigError, DataError) as e:  # bad input: the message names the key / file / line
    print(f"jaxlab: {e}", file=sys.stderr)
    return 2
  except (NonFiniteError, NonFiniteStateError, CheckpointError) as e:
    print(f"jaxlab: {e}", file=sys.stderr)
    return 1


PIPELINES = {"subliminal": "jaxlab.pipelines.subliminal", "em_study": "jaxlab.pipelines.em_study",
             "subliminal_sweep": "jaxlab.pipelines.subliminal_sweep",
             "sft_eval": "jaxlab.pipelines.sft_eval"}


def _print_plan(config, workdir: str) -> int:
  """--plan: the pipeline's stage graph on stdout; nothing runs, nothing is written."""
  import importlib
  module = importlib.import_module(PIPELINES[config.job]) if config.job in PIPELINES else None
  if module is None:
    print(f"jaxlab: --plan: config key job={config.job!r} has no stage plan (pipelines with "
          f"one: {', '.join(PIPELINES)})", file=sys.stderr)
    return 2
  try:
    print(module.describe_plan(config, workdir))
  except ValueError as e:  # a pipeline's config check names the key
    print(f"jaxlab: {e}", file=sys.stderr)
    return 2
  return 0


def _run_job(config, workdir: str, jax) -> int:
  if config.job in ("sft", "train"):
    from jaxlab.train.runner import run
    out = run(config, workdir)
    print(f"jaxlab: finished step {int(jax.device_get(out['state'].step))}, "
          f"loss {out['metrics'].get('loss', float('nan')):.4f}; outputs in {workdir}")
  elif config.job == "eval":
    from jaxlab.evals.run import run as run_eval
    run_eval(config, workdir)
  elif config.job in PIPELINES:  # a staged pipeline (configs/subliminal.py, configs/em_study.py)
    import importlib
    module = importlib.import_module(PIPELINES[config.job])
    try:
      out = module.run(config, workdir)
    except ValueError as e:  # a pipeline's config check names the key
      print(f"jaxlab: {e}", file=sys.stderr)
      return 2
    if hasattr(module, "summary"):
      print(module.summary(workdir, out))
    else:
      print(f"jaxlab: {config.job} pipeline done; report in {workdir}")
  else:
    print(f"jaxlab: config key job={config.job!r}: expected 'train' (alias 'sft'), 'eval' or "
          f"a pipeline ({', '.join(PIPELINES)})", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
