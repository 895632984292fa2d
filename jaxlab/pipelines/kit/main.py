"""What both pipelines' command lines and runs share: `--plan`, the job check, errors as one
line and exit status 2, the summary; and a run timed (wall and CPU) under its stage plan."""
from __future__ import annotations

import sys
import time
from typing import Callable

from jaxlab import console
from jaxlab.pipelines import stages


def main(argv: list[str], *, prog: str, describe_plan: Callable, run: Callable,
         summary: Callable, job: tuple[str, str] | None = None) -> int:
  """python -m PROG --config=... --workdir=... [--plan]: `describe_plan(config, workdir)` (the
  stage graph, complete stages' settings checked) is printed and nothing runs; else `run(config, workdir)`, then `summary(workdir, result)` is printed.
  `job` = (name, config file): configs of another job are refused."""
  from jaxlab import runtime
  runtime.setup()  # before JAX starts: host allocator, compilation cache, multi-host init
  from jaxlab.config import ConfigError, parse_argv, pop_flag
  plan_only, argv = pop_flag(argv, "--plan")
  try:
    config, workdir = parse_argv(argv)
    if job is not None and config.get("job") != job[0]:
      raise ConfigError(f"config key job={config.get('job')!r}: this pipeline runs "
                        f"configs with job={job[0]!r} ({job[1]})")
    if plan_only:  # the stage graph; nothing runs, nothing is written
      print(describe_plan(config, workdir))
      return 0
    out = run(config, workdir)
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"{prog}: {e}", file=sys.stderr)
    return 2
  print(summary(workdir, out))
  return 0


def run_planned(plan: stages.Plan, body: Callable[[], dict], log, *, name: str,
                note: str = "") -> dict:
  """body() with `plan` active (its stages numbered, the time left estimated); the result
  gains wall_seconds and cpu_seconds (this process and its workers)."""
  t0, cpu0 = time.time(), console.cpu_seconds()
  plan.start(log)
  try:
    out = body()
  finally:
    stages.end_plan()
  out["wall_seconds"] = round(time.time() - t0, 1)
  out["cpu_seconds"] = round(console.cpu_seconds() - cpu0, 1)
  log(f"jaxlab: {name} done in {console.duration(out['wall_seconds'])} wall, "
      f"{out['cpu_seconds']:.0f} s CPU{note}")
  return out


def took(out: dict | None) -> str:
  """A summary's first line: the wall and CPU time `run_planned` added to `out` ("" when it
  has none: a summary of a run that did not just happen)."""
  if not out or "wall_seconds" not in out:
    return ""
  return (f"\ndone in {console.duration(out['wall_seconds'])} wall "
          f"({out['wall_seconds']:.0f} s), {out.get('cpu_seconds', 0):.0f} s CPU\n")
