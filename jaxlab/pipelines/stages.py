"""Stages of a pipeline: each writes under its own folder of the workdir and is skipped when
complete, so a killed study resumes where it stopped.

A stage is complete when its folder holds `_COMPLETE.json`, written last (atomically, by process
0) with the settings the stage ran with. Rerunning with the same settings skips it; with other
settings it is an error naming the stage and the changed keys (a cached result is keyed by every
setting that changes it: put everything that changes a stage's output into its settings,
including the settings of the stages it reads from). A folder without the marker is an
unfinished stage: it runs again, and its function must tolerate what a killed run left (the
training runner resumes from its checkpoints; writers should write whole files atomically).

The marker also records a content fingerprint of every file the stage wrote (`outputs`;
checkpoints by the per-array checksums each carries). A complete stage is verified each time
it would be skipped: a file edited, truncated or removed since is an error naming it, so a
later stage never reads damaged outputs beside results made from the intact ones. A stage
that reads another's outputs can put `output_digest(folder)` (or `model_digest(path)` for any
model folder) into its settings: a stage recomputed in place with other outputs (a teacher
retrained) is then a changed setting.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable

from etils import epath

# The per-file fingerprints of a complete stage and the digests of model folders: their module.
from jaxlab.pipelines.stage_outputs import (  # noqa: F401  (part of this module's interface)
    MARKER, StageOutputsChanged, model_digest, output_digest, outputs, reads, steered_digest,
    verify_outputs)


class StageSettingsChanged(ValueError):
  pass


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _diff(va, vb, f"{prefix}{k}.")
    elif va != vb:
      out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
  return out


def is_complete(folder) -> bool:
  return (epath.Path(folder) / MARKER).exists()


def completed_with(folder, settings: dict) -> bool:
  """Whether the stage in `folder` is complete with exactly these settings (it would be
  skipped)."""
  marker = epath.Path(folder) / MARKER
  return marker.exists() and json.loads(marker.read_text())["settings"] == _jsonable(settings)


def run_stage(workdir, name: str, settings: dict, fn: Callable[[epath.Path], Any], *,
              log=print) -> epath.Path:
  """Runs fn(folder) unless workdir/name is complete with these settings; returns the folder.

  Its lines say [k/N] (the stage's place in the active `Plan`), and, when it finishes, its
  wall time (recorded in the marker) and the time left."""
  import jax
  folder = epath.Path(workdir) / name
  settings = _jsonable(settings)
  if _CHECK[0] is not None:  # `Plan.check`: compare, never run
    return _CHECK[0].checked(name, folder, settings)
  marker = folder / MARKER
  plan = _ACTIVE[0]
  tag = plan.tag(name) if plan else ""
  if marker.exists():
    done = json.loads(marker.read_text())
    if done["settings"] == settings:
      verify_outputs(folder, name)
      log(f"jaxlab: {tag}stage {name}: complete, skipped ({folder})")
      return folder
    changed = _diff(done["settings"], settings)
    raise StageSettingsChanged(
        f"stage {name} in {folder} was completed with other settings ({'; '.join(changed)}); "
        "use a new workdir, or delete that folder to recompute it")
  folder.mkdir(parents=True, exist_ok=True)
  log(f"jaxlab: {tag}stage {name}: running ({folder})")
  from jaxlab import console  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  console.set_stage(name)
  try:
    fn(folder)
  finally:
    console.set_stage("")
  seconds = round(time.time() - t0, 1)
  if jax.process_index() == 0:
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"settings": settings, "seconds": seconds,
                               "outputs": outputs(folder)}, indent=2, sort_keys=True))
    tmp.rename(marker)
  left = plan.finished(name, seconds) if plan else ""
  log(f"jaxlab: {tag}stage {name}: done in {console.duration(seconds)}{left}")
  return folder


def recorded_seconds(folder) -> float | None:
  """The wall time a complete stage's marker records (None: not complete, or not recorded)."""
  marker = epath.Path(folder) / MARKER
  if not marker.exists():
    return None
  s = json.loads(marker.read_text()).get("seconds")
  return None if s is None else float(s)


# ------------------------------------------------------------------ the plan of a run

_ACTIVE: list = [None]  # the Plan whose stages this process runs (`Plan.start`)
_CHECK: list = [None]  # the Plan whose settings check is under way (`Plan.check`)


class _CheckStop(Exception):
  """A settings check reached a stage that must run first."""


def checking() -> bool:
  """Whether a settings check (`Plan.check`, for `--plan`) is under way: a pipeline walks its
  stages without running any, and writes nothing (no report) after them."""
  return _CHECK[0] is not None


def _kind(name: str) -> str:
  """A stage's name without its seed folder: seeds' stages of one kind take alike times."""
  head, _, rest = name.partition("/")
  return rest if head.startswith("seed") and head[4:].isdigit() and rest else name


class Plan:
  """The stages a run will execute, in order, listed before any runs (a pipeline's `plan`).

  It numbers stage lines [k/N], estimates the time left from the stages done (this run's and
  the times recorded in finished stages' markers), and describes the stage graph: which
  stages are complete and will be skipped, which will run, and the status of their inputs.
  """

  def __init__(self, workdir):
    self.workdir = str(workdir)
    self.stages: list[dict] = []  # {"name", "folder", "inputs"}
    self._seconds: dict[str, float] = {}  # complete stages' recorded times
    self._ran: dict[str, float] = {}  # stages finished by this run (this process)
    self._t0 = time.time()
    self._owner = False
    self._at_start: set[str] | None = None  # stages complete when the run started
    self.untimed = 0  # stages left of kinds without a recorded time (`eta_seconds`)
    self.verdicts: dict[str, str] = {}  # `check`: complete stages' settings compared
    self.unchecked_after = ""  # `check`: the first stage to run (later ones not compared)

  def add(self, name: str, root=None, inputs=()) -> None:
    """Stage `name` (a folder of `root`, default the workdir) reading `inputs`: names of
    earlier stages of the plan, or paths outside it (an HF model folder)."""
    if any(s["name"] == name for s in self.stages):
      return
    self.stages.append({"name": name, "folder": str(epath.Path(root or self.workdir) / name),
                        "inputs": list(dict.fromkeys(str(i) for i in inputs if i))})

  def names(self) -> list[str]:
    return [s["name"] for s in self.stages]

  def tag(self, name: str) -> str:
    names = self.names()
    if name not in names:  # a stage the plan missed: counted, so N stays right
      self.add(name)
      names.append(name)
    return f"[{names.index(name) + 1}/{len(names)}] "

  def status(self, name: str) -> str:
    """'complete' (will be skipped) or 'to run'."""
    s = next(s for s in self.stages if s["name"] == name)
    return "complete" if is_complete(s["folder"]) else "to run"

  def _input_status(self, inp: str) -> str:
    if inp in self.names():
      return self.status(inp)
    return "exists" if epath.Path(inp).exists() else "missing"

  def _recorded(self) -> dict[str, float]:
    out = {}
    for s in self.stages:
      if s["name"] in self._ran:
        out[s["name"]] = self._ran[s["name"]]
      elif s["name"] in self._seconds or is_complete(s["folder"]):
        if s["name"] not in self._seconds:
          sec = recorded_seconds(s["folder"])
          if sec is None:
            continue
          self._seconds[s["name"]] = sec
        out[s["name"]] = self._seconds[s["name"]]
    return out

  def eta_seconds(self) -> float | None:
    """Seconds left for the stages to run whose kind has a recorded time: each takes the mean
    recorded time of its kind (the same stage of another seed), else of its group (eval/*,
    drift/*); scaled by this run's wall time over the summed times of the stages it finished
    (parallel workers). Stages of kinds not timed yet are left out (`untimed` counts them:
    a guess from unrelated stages, e.g. a base's minutes for each of 180 small stages, would
    mislead more than it tells). None: no stage left has a timed kind."""
    done = self._recorded()
    left = [s["name"] for s in self.stages if not is_complete(s["folder"])]
    self.untimed = 0
    if not left:
      return 0.0
    groups: dict[str, list[float]] = {}
    for n, sec in done.items():
      for key in {_kind(n), _kind(n).split("/")[0] + "/*"}:
        groups.setdefault(key, []).append(sec)

    def estimate(n):
      for key in (_kind(n), _kind(n).split("/")[0] + "/*"):
        if key in groups:
          return sum(groups[key]) / len(groups[key])
      return None
    known = [e for e in map(estimate, left) if e is not None]
    self.untimed = len(left) - len(known)
    if not known:
      return None
    ran = sum(v for n, v in done.items() if self._at_start is not None
              and n not in self._at_start)
    scale = min(max((time.time() - self._t0) / ran, 0.25), 2.0) if ran > 1 else 1.0
    return sum(known) * scale

  def _eta_text(self, eta: float) -> str:
    from jaxlab import console  # pylint: disable=g-import-not-at-top
    more = (f" + {self.untimed} stage{'s' if self.untimed > 1 else ''} of kinds not timed yet"
            if self.untimed else "")
    return f"about {console.duration(eta)}{more}"

  def progress(self) -> str:
    """'5/12 stages complete, about 3 min 10 s left'."""
    n_done = sum(is_complete(s["folder"]) for s in self.stages)
    eta = self.eta_seconds()
    left = "" if eta is None or n_done == len(self.stages) else \
        f", {self._eta_text(eta)} left"
    return f"{n_done}/{len(self.stages)} stages complete{left}"

  def finished(self, name: str, seconds: float) -> str:
    """Records a stage this process finished; '; 5/12 stages complete, about ... left' for
    the plan's owner (a worker's lines leave the estimate to the parent)."""
    self._ran[name] = seconds
    return f"; {self.progress()}" if self._owner else ""

  def check(self, walk: Callable[[], Any]) -> "Plan":
    """Compares each complete stage's recorded settings with the ones this config gives it,
    by `walk()`ing the pipeline's stage sequence with `run_stage` running nothing (and the
    pipeline writing nothing: `checking()`), up to the first stage that must run, since later
    stages' settings may depend on its outputs. A complete stage with other settings (or
    damaged outputs) is one the run would refuse: `describe` says so and why."""
    self.verdicts, self.unchecked_after = {}, ""
    _CHECK[0] = self
    try:
      walk()
    except _CheckStop:
      pass
    finally:
      _CHECK[0] = None
    return self

  def checked(self, name: str, folder: epath.Path, settings: dict) -> epath.Path:
    """run_stage during `check`: the stage's verdict; stops the walk at a stage to run."""
    marker = folder / MARKER
    if not marker.exists():
      self.unchecked_after = name
      raise _CheckStop
    changed = _diff(json.loads(marker.read_text())["settings"], settings)
    if changed:
      more = f"; {len(changed) - 2} more" if len(changed) > 2 else ""
      self.verdicts[name] = ("REFUSED: complete with other settings (" + "; ".join(changed[:2])
                             + more + "): delete the folder or use a new workdir")
      return folder
    try:
      verify_outputs(folder, name)
      self.verdicts[name] = "ok"
    except StageOutputsChanged as e:
      self.verdicts[name] = f"REFUSED: {str(e).split(': ', 1)[1].split(';')[0]}"
    return folder

  def summary(self) -> list[str]:
    """The few lines a run prints first: counts, the estimate and the stages to run."""
    todo = [s["name"] for s in self.stages if not is_complete(s["folder"])]
    eta = self.eta_seconds()
    est = "" if not todo or eta is None else \
        f"; {self._eta_text(eta)} (from the recorded stage times)"
    out = [f"jaxlab: plan: {len(self.stages)} stages in {self.workdir}: "
           f"{len(self.stages) - len(todo)} complete (skipped), {len(todo)} to run{est}"]
    if todo:
      shown = ", ".join(todo[:8]) + (f" and {len(todo) - 8} more" if len(todo) > 8 else "")
      out.append(f"jaxlab: plan: to run: {shown}")
    return out

  def describe(self) -> str:
    """The stage graph (`--plan`): every stage's status, recorded time and inputs."""
    from jaxlab import console  # pylint: disable=g-import-not-at-top
    rec = self._recorded()
    width = max([len(n) for n in self.names()] + [10])
    tag = 2 * len(str(len(self.stages))) + 3
    lines = self.summary()
    refused = [n for n, v in self.verdicts.items() if v != "ok"]
    if refused:
      lines.append(f"jaxlab: plan: {len(refused)} complete stage(s) would be REFUSED (settings "
                   f"or outputs changed): {', '.join(refused[:8])}")
    if self.unchecked_after:
      lines.append(f"jaxlab: plan: settings compared up to stage {self.unchecked_after}, the "
                   "first to run (later stages' settings depend on its outputs)")
    for k, s in enumerate(self.stages, 1):
      status = self.status(s["name"])
      what = (f"complete, skipped ({console.duration(rec[s['name']])})" if s["name"] in rec
              else "complete, skipped") if status == "complete" else "will run"
      if self.verdicts.get(s["name"], "ok") != "ok":
        what = self.verdicts[s["name"]]
      ins = ", ".join(f"{i} [{self._input_status(i)}]" for i in s["inputs"])
      lines.append(f"  {f'[{k}/{len(self.stages)}]':>{tag}} {s['name']:<{width}}  {what}"
                   + (f"  <- {ins}" if ins else ""))
    return "\n".join(lines)

  def start(self, log=None) -> "Plan":
    """Makes this the plan of the stages this process runs; prints the summary."""
    self._t0, self._owner = time.time(), True
    self._at_start = {s["name"] for s in self.stages if is_complete(s["folder"])}
    _ACTIVE[0] = self
    for line in self.summary() if log else ():
      log(line)
    return self

  def state(self) -> dict:
    """What a worker process needs to number its stage lines (`Plan.resume`)."""
    return {"workdir": self.workdir, "stages": self.stages}

  @classmethod
  def resume(cls, state: dict) -> "Plan":
    """A worker's copy of its parent's plan, made active (no estimates: the parent's)."""
    p = cls(state["workdir"])
    p.stages = [dict(s) for s in state["stages"]]
    _ACTIVE[0] = p
    return p


def active_plan() -> Plan | None:
  return _ACTIVE[0]


def end_plan() -> None:
  _ACTIVE[0] = None


def stderr_log(msg: str) -> None:
  """One whole line to stderr (a single write: worker processes' lines never interleave)."""
  from jaxlab import console  # pylint: disable=g-import-not-at-top
  console.emit(msg)
