"""What a run prints while it works: progress of a long loop and the durations of stage lines.

A long loop (training steps, sampled or scored rows) reports through `Progress`: a tqdm bar
with its rate (steps/s, samples/s) when stderr is a terminal, else a plain line every ~10%
(CI, log files). Only one display is active at a time: a loop inside another stays quiet.

Worker processes of a pipeline (jaxlab.pipelines.kit.workers.run_parallel) share the parent's
stderr: after `worker_mode()` they never draw a bar and write whole lines only, each with one
write(2) call and prefixed with their stage's name, so two workers reporting at once cannot
garble each other's lines.
"""
from __future__ import annotations

import os
import sys
import time

_state = {"worker": False, "stage": "", "active": None, "warned": set()}


def worker_mode() -> None:
  """This process is a pipeline worker: plain whole lines only, never a bar."""
  _state["worker"] = True


def set_stage(name: str) -> None:
  """The stage now running in this process ('' when none): progress lines name it."""
  _state["stage"] = name


def current_stage() -> str:
  return _state["stage"]


def is_terminal() -> bool:
  """Whether progress draws bars: stderr is a terminal and this is not a worker process."""
  try:
    return sys.stderr.isatty() and not _state["worker"]
  except (AttributeError, ValueError):  # a closed or replaced stderr
    return False


def emit(line: str) -> None:
  """Writes one whole line to stderr in a single write (atomic among processes)."""
  active = _state["active"]
  if active is not None and active._bar is not None:  # pylint: disable=protected-access
    active._bar.write(line.rstrip("\n"), file=sys.stderr)  # pylint: disable=protected-access
    return
  sys.stderr.flush()
  data = (line.rstrip("\n") + "\n").encode()
  try:
    fd = sys.stderr.fileno()
  except (AttributeError, ValueError, OSError):  # stderr replaced (pytest capsys): no fd
    sys.stderr.write(data.decode())
    sys.stderr.flush()
    return
  while data:
    data = data[os.write(fd, data):]


def warn_once(key: str, message: str) -> bool:
  """Prints 'jaxlab: warning: MESSAGE' (naming the running stage) the first time `key` is
  seen in this process, and nothing after: a warning the user can act on (rows truncated, a
  judge that could not score some answers) shows once, never as a flood. Returns whether it
  printed."""
  if key in _state["warned"]:
    return False
  _state["warned"].add(key)
  stage = current_stage()
  emit(f"jaxlab: warning: {stage + ': ' if stage else ''}{message}")
  return True


def duration(seconds: float) -> str:
  """'4.2 s', '3 min 05 s', '1 h 02 min'."""
  s = max(float(seconds), 0.0)
  if s < 60:
    return f"{s:.1f} s"
  if s < 3600:
    return f"{int(s // 60)} min {int(s % 60):02d} s"
  return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its finished children (workers)."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


class Progress:
  """Progress of one loop of `total` units (`what`: 'train', 'sample', 'score').

  show=None: shown while a pipeline stage runs (`set_stage`), quiet otherwise; an inner
  Progress while another is open is quiet. Call update(position) with the units done so far,
  then close(); `postfix` adds fields to the bar (loss, tokens/s).
  """

  def __init__(self, total: int, what: str, unit: str, *, initial: int = 0,
               show: bool | None = None):
    self.total, self.what, self.unit = max(int(total), 0), what, unit
    self.n = self._start = int(initial)
    self._t0 = time.perf_counter()
    self._next = self._mark(self.n)
    self._bar = None
    shown = (bool(current_stage()) if show is None else show) and self.total > 0
    self.on = shown and _state["active"] is None
    if not self.on:
      return
    _state["active"] = self
    if is_terminal():
      import tqdm  # pylint: disable=g-import-not-at-top
      stage = current_stage()
      self._bar = tqdm.tqdm(total=self.total, initial=self.n, unit=f" {unit}",
                            desc=f"{stage}: {what}" if stage else what, dynamic_ncols=True,
                            leave=False, file=sys.stderr)

  def _mark(self, n: int) -> int:
    """The next position at which a plain line is due (every ~10%)."""
    step = max(self.total // 10, 1)
    return (n // step + 1) * step

  def rate(self) -> float:
    return (self.n - self._start) / max(time.perf_counter() - self._t0, 1e-9)

  def line(self) -> str:
    stage = current_stage()
    return (f"jaxlab:   {stage + ': ' if stage else ''}{self.what} "
            f"{100 * self.n // max(self.total, 1)}% ({self.n}/{self.total} {self.unit}, "
            f"{self.rate():.1f} {self.unit}/s)")

  def update(self, n: int, **postfix) -> None:
    if not self.on:
      return
    n = min(int(n), self.total)
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(n - self.n)
      self.n = n
      return
    self.n = n
    if n >= self._next and n < self.total:
      emit(self.line())
      self._next = self._mark(n)

  def close(self) -> None:
    if not self.on:
      return
    self.on = False
    _state["active"] = None
    if self._bar is not None:
      self._bar.close()
    elif self.n > self._start:
      emit(self.line())  # the last line: 100% (or where it stopped) and the mean rate

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
