"""Pipeline stages: skipped when complete, rerun when unfinished, refused when settings changed."""
import pytest

from jaxlab.pipelines import stages


def test_stage_runs_once_then_skips_and_refuses_changed_settings(tmp_path):
  calls = []
  def fn(folder):
    calls.append(folder)
    (folder / "out.txt").write_text("x")
  f = stages.run_stage(tmp_path, "a", {"lr": 1e-3, "data": {"n": 4}}, fn, log=lambda m: None)
  assert (f / "out.txt").read_text() == "x" and stages.is_complete(f)
  stages.run_stage(tmp_path, "a", {"lr": 1e-3, "data": {"n": 4}}, fn, log=lambda m: None)
  assert len(calls) == 1
  with pytest.raises(stages.StageSettingsChanged, match=r"stage a .*data.n: 4 -> 5"):
    stages.run_stage(tmp_path, "a", {"lr": 1e-3, "data": {"n": 5}}, fn, log=lambda m: None)


def test_unfinished_stage_runs_again(tmp_path):
  def boom(folder):
    (folder / "partial").write_text("half")
    raise RuntimeError("killed")
  with pytest.raises(RuntimeError):
    stages.run_stage(tmp_path, "b", {}, boom, log=lambda m: None)
  assert not stages.is_complete(tmp_path / "b")
  seen = []
  stages.run_stage(tmp_path, "b", {}, lambda f: seen.append((f / "partial").read_text()),
                   log=lambda m: None)
  assert seen == ["half"] and stages.is_complete(tmp_path / "b")
