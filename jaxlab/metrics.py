"""Per-step metrics to JSONL, TensorBoard event files and a console progress bar."""
from __future__ import annotations

import json
import os
from typing import Any

import tqdm
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Appends {"step": s, ...} rows to workdir/metrics.jsonl and TensorBoard scalars."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0, progress: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, disable=not progress,
                          dynamic_ncols=True)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)
    self._bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}",
                          tok_s=f"{row.get('trained_tokens_per_s', 0):.0f}")
    self._bar.update(int(step) - self._bar.n)

  def close(self) -> None:
    self._file.close()
    self._tb.close()
    self._bar.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Rows of workdir/metrics.jsonl; on a resumed run, the last row per step wins."""
  rows: dict[int, dict] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          rows[r["step"]] = r
  return [rows[k] for k in sorted(rows)]
