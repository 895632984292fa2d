"""Per-step metrics to JSONL, TensorBoard event files and the console's progress (a bar on a
terminal, a line every ~10% elsewhere: jaxlab.console.Progress).

Only process 0 writes (every host computes the same global metrics). Opening the writer for a
run that resumes at step S drops the rows after S that a killed run had logged, so a resumed
run never repeats a step. Paths go through etils.epath; for a gs:// workdir the TensorBoard
events are written to a local folder and copied next to the metrics at every flush, and since an
object store neither appends nor uploads on a file's flush (gcsfs opens "a" as "w" and uploads
on close), the rows are kept in memory and the whole metrics object is rewritten at every flush.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any

from jaxlab import console
from jaxlab import paths


def _rows(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines() if line.strip()]


class MetricsWriter:
  """Appends {"step": s, ...} rows to workdir/metrics.jsonl and TensorBoard scalars."""

  def __init__(self, workdir, total_steps: int, start_step: int = 0, progress: bool = True):
    self.writer = paths.is_writer()
    self.path = paths.path(workdir, "metrics.jsonl")
    self._tb_dir = paths.path(workdir, "tb")
    # A pipeline stage always shows its training's progress (its stage line names the run).
    self._bar = console.Progress(total_steps, "train", "steps", initial=start_step,
                                 show=self.writer and (progress or bool(console.current_stage())))
    self._file = self._tb = self._local_tb = None
    self._lines, self._dirty = [], False  # an object store's rows (see the module docstring)
    if not self.writer:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():  # a resumed run re-logs the steps after its checkpoint
      keep = [r for r in _rows(self.path.read_text()) if start_step and r["step"] <= start_step]
      self._lines = [json.dumps(r) + "\n" for r in keep]
      paths.write_text(self.path, "".join(self._lines))
    if not paths.is_uri(workdir):
      self._file = self.path.open("a")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    if paths.is_uri(workdir):
      self._local_tb = tempfile.mkdtemp(prefix="jaxlab_tb_")
    self._tb = SummaryWriter(self._local_tb or str(self._tb_dir))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self.advance(step, row)
    if not self.writer:
      return
    if self._file is None:
      self._lines.append(json.dumps(row) + "\n")
      self._dirty = True
    else:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)

  def advance(self, step: int, metrics: dict[str, Any]) -> None:
    """Moves the progress display to `step` (every step, logged or not)."""
    self._bar.update(int(step), loss=f"{float(metrics.get('loss', float('nan'))):.4f}",
                     tok_s=f"{float(metrics.get('trained_tokens_per_s', 0)):.0f}")

  def flush(self) -> None:
    """Makes everything written so far durable (and copies staged TensorBoard events)."""
    if not self.writer:
      return
    if self._file is None:
      if self._dirty:
        paths.write_text(self.path, "".join(self._lines))
        self._dirty = False
    else:
      self._file.flush()
    self._tb.flush()
    if self._local_tb:
      self._tb_dir.mkdir(parents=True, exist_ok=True)
      for f in paths.path(self._local_tb).iterdir():
        f.copy(self._tb_dir / f.name, overwrite=True)

  def close(self) -> None:
    self._bar.close()
    if not self.writer:
      return
    self.flush()
    if self._file is not None:
      self._file.close()
    self._tb.close()
    if self._local_tb:
      shutil.rmtree(self._local_tb, ignore_errors=True)


def read_metrics(workdir) -> list[dict[str, Any]]:
  """Rows of workdir/metrics.jsonl (the last row per step wins, for files of older runs)."""
  text = paths.read_text(paths.path(workdir, "metrics.jsonl"))
  rows = {r["step"]: r for r in _rows(text or "")}
  return [rows[k] for k in sorted(rows)]
