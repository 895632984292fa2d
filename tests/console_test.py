"""What a newcomer sees while a pipeline runs (issue 24): a plan first, [k/N] stage lines with
their times and the time left, progress lines every ~10% off a terminal, no library warning
floods, and an ending with the report; `--plan` runs and writes nothing."""
import json
import os
import re
import subprocess
import sys

import pytest

from jaxlab import console
from jaxlab.pipelines import stages
from tests import subliminal_test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest subliminal run whose stages all do real work: subliminal_test's small world with
# a shorter base, a prompted teacher's and the base's numbers, one control student, their
# evaluations and drifts (seed 0); later overrides win.
SMALL = [*subliminal_test.SMALL, "--config.pretrain.steps=100", "--config.pretrain.chat_steps=30",
         "--config.sl.sample_batch=64", "--config.train.steps=10", "--config.seeds=(0,)",
         "--config.channel=control", "--config.teachers=('prompted',)"]
STAGES = 11  # world, base_pretrain, base, 2 data, control, 3 evals, 2 drifts


def _main(workdir, *extra):
  """`python -m jaxlab.main` on the small run, stderr a pipe (not a terminal)."""
  return subprocess.run(
      [sys.executable, "-m", "jaxlab.main", f"--config={ROOT}/configs/subliminal.py:tiny",
       f"--workdir={workdir}", *SMALL, *extra], cwd=ROOT, capture_output=True, text=True,
      timeout=900)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("console") / "w"
  proc = _main(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_a_pipeline_run_prints_a_plan_numbered_timed_stages_and_progress(small_run):
  _, proc = small_run
  err = proc.stderr.splitlines()
  # No library floods: Orbax / absl warnings, the setuptools banner, Python warnings. jaxlab's
  # own warnings (rows truncated) show once per process and kind: a few lines at most.
  ours = [l for l in err if l.startswith("jaxlab: warning: ")]
  assert len(ours) <= 4 and len(set(ours)) == len(ours), ours
  for bad in ("orbax", "absl", "CheckpointManagerOptions", "read only", "setuptools",
              "Warning:", "WARNING"):
    assert not [l for l in err if bad.lower() in l.lower() and l not in ours], \
        (bad, proc.stderr[-3000:])
  assert err[0].startswith(f"jaxlab: plan: {STAGES} stages in ") and "0 complete" in err[0]
  assert err[1].startswith("jaxlab: plan: to run: world, base_pretrain, base,")
  stage_lines = [l for l in err if " stage " in l]
  tags = [re.match(r"jaxlab: \[(\d+)/(\d+)\] stage ", l) for l in stage_lines]
  assert all(tags), [l for l, t in zip(stage_lines, tags) if not t]
  assert {int(t.group(2)) for t in tags} == {STAGES}
  done = [l for l in stage_lines if ": done in " in l]
  assert sorted(int(t.group(1)) for t, l in zip(tags, stage_lines) if ": done in " in l) \
      == list(range(1, STAGES + 1))
  assert all(re.search(r"done in [\d.]+ s|done in \d+ min", l) for l in done), done
  assert any("about" in l and "left" in l for l in done[:-1])  # the time left, from done stages
  assert done[-1].endswith(f"{STAGES}/{STAGES} stages complete")
  # Off a terminal: plain progress lines every ~10% of training, sampling and scoring.
  train = [l for l in err if l.startswith("jaxlab:   base_pretrain: train ")]
  assert [re.search(r"train (\d+)%", l).group(1) for l in train] == \
      [str(p) for p in range(10, 101, 10)], train
  assert all("steps/s" in l for l in train)
  assert any(re.match(r"jaxlab:   seed0/data_base: sample 100% \(128/128 samples, [\d.]+ "
                      r"samples/s\)", l) for l in err)
  assert any(l.startswith("jaxlab:   seed0/eval/control: score 100%") for l in err)
  assert not any("\r" in l or "it/s" in l for l in err)  # no bar off a terminal


def test_the_ending_gives_time_report_table_and_conclusions(small_run):
  workdir, proc = small_run
  out = proc.stdout
  assert re.search(r"done in .* wall \(\d+ s\), \d+ s CPU", out), out
  assert f"report: {workdir}/report.md" in out
  assert "| model | trait rate % [95% CI] |" in out and "| control |" in out
  md = (workdir / "report.md").read_text()
  conclusions = md.split("## Conclusions", 1)[1].split("\n## ", 1)[0].strip().splitlines()
  assert conclusions and all(c in out for c in conclusions if c.startswith("- "))


def _snapshot(folder):
  return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file()
                                       else None) for p in sorted(folder.rglob("*"))}


def test_plan_after_a_complete_run_marks_every_stage_complete_and_writes_nothing(small_run):
  workdir, _ = small_run
  before = _snapshot(workdir)
  proc = _main(workdir, "--plan")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _snapshot(workdir) == before
  lines = proc.stdout.splitlines()
  assert lines[0].startswith(f"jaxlab: plan: {STAGES} stages in ")
  assert f"{STAGES} complete (skipped), 0 to run" in lines[0]
  rows = [l for l in lines if re.match(r"\s+\[\d+/\d+\] ", l)]
  assert len(rows) == STAGES and all("complete, skipped (" in r for r in rows), rows
  assert "seed0/control" in proc.stdout and "<- base [complete], seed0/data_base [complete]" \
      in proc.stdout
  assert "stage" not in proc.stderr  # nothing ran


def test_plan_marks_a_complete_stage_that_a_changed_setting_would_refuse(small_run):
  workdir, _ = small_run
  before = _snapshot(workdir)
  proc = _main(workdir, "--plan", "--config.train.steps=11")  # the student's setting only
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _snapshot(workdir) == before
  assert "jaxlab: plan: 1 complete stage(s) would be REFUSED" in proc.stdout, proc.stdout
  rows = [l for l in proc.stdout.splitlines() if re.match(r"\s+\[\d+/\d+\] ", l)]
  refused = [r for r in rows if "REFUSED" in r]
  assert len(refused) == 1 and "seed0/control " in refused[0], refused
  assert "train.steps: 10 -> 11" in refused[0]
  assert sum("complete, skipped (" in r for r in rows) == STAGES - 1


def test_plan_of_a_new_workdir_lists_what_will_run_and_creates_nothing(tmp_path):
  from jaxlab.config import parse_argv
  from jaxlab.pipelines import subliminal
  config, _ = parse_argv([f"--config={ROOT}/configs/subliminal.py:tiny",
                          f"--workdir={tmp_path / 'w'}", *SMALL])
  text = subliminal.describe_plan(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()
  assert "settings compared up to stage world, the first to run" in text
  assert f"0 complete (skipped), {STAGES} to run" in text
  assert "seed0/eval/control" in text and "<- seed0/control [to run]" in text


def _stage(root, name, seconds):
  (root / name).mkdir(parents=True)
  (root / name / stages.MARKER).write_text(json.dumps({"settings": {}, "seconds": seconds}))


def test_a_rerun_estimates_the_time_left_from_recorded_stage_times(tmp_path):
  _stage(tmp_path, "base", 100.0)
  _stage(tmp_path, "seed0/train", 30.0)
  _stage(tmp_path, "seed0/eval", 10.0)
  plan = stages.Plan(tmp_path)
  for name in ("base", "seed0/train", "seed0/eval", "seed1/train", "seed1/eval", "report"):
    plan.add(name)
  # seed1's stages take what seed0's did; the report's kind has no recorded time: counted apart
  assert plan.eta_seconds() == pytest.approx(30 + 10) and plan.untimed == 1
  assert "about 40.0 s + 1 stage of kinds not timed yet (from the recorded stage times)" \
      in plan.summary()[0]
  assert plan.tag("seed1/eval") == "[5/6] "
  assert plan.tag("extra") == "[7/7] "  # a stage the plan missed still counts


def test_run_stage_lines_say_k_of_n_and_the_time(tmp_path):
  logs = []
  plan = stages.Plan(tmp_path)
  plan.add("a")
  plan.add("b", inputs=["a"])
  plan.start(logs.append)
  try:
    stages.run_stage(tmp_path, "a", {}, lambda f: None, log=logs.append)
    stages.run_stage(tmp_path, "a", {}, lambda f: None, log=logs.append)
  finally:
    stages.end_plan()
  assert logs[0] == f"jaxlab: plan: 2 stages in {tmp_path}: 0 complete (skipped), 2 to run"
  assert logs[2] == f"jaxlab: [1/2] stage a: running ({tmp_path / 'a'})"
  # b is of a kind not timed yet: no estimate rather than a guess from a's time
  assert re.fullmatch(r"jaxlab: \[1/2\] stage a: done in 0\.\d s; 1/2 stages complete",
                      logs[3]), logs[3]
  assert logs[4].startswith("jaxlab: [1/2] stage a: complete, skipped")
  assert "seconds" in json.loads((tmp_path / "a" / stages.MARKER).read_text())
  assert re.search(r"\[2/2\] b +will run  <- a \[complete\]", plan.describe())


def test_progress_lines_every_tenth_off_a_terminal_and_quiet_outside_a_stage(capfd):
  with console.Progress(50, "train", "steps") as p:  # no stage running: quiet
    for i in range(1, 51):
      p.update(i)
  assert capfd.readouterr().err == ""
  console.set_stage("s")
  try:
    with console.Progress(50, "train", "steps") as p:
      with console.Progress(5, "sample", "samples") as inner:  # inside another: quiet
        inner.update(5)
      for i in range(1, 51):
        p.update(i)
  finally:
    console.set_stage("")
  lines = capfd.readouterr().err.splitlines()
  assert [re.search(r"train (\d+)% \((\d+)/50", l).groups() for l in lines] == \
      [(str(10 * k), str(5 * k)) for k in range(1, 11)]
  assert all(l.startswith("jaxlab:   s: train ") and "steps/s)" in l for l in lines)


def test_workers_never_draw_bars(monkeypatch):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
  assert console.is_terminal()
  monkeypatch.setitem(console._state, "worker", True)  # pylint: disable=protected-access
  assert not console.is_terminal()


def test_durations_read_well():
  assert [console.duration(s) for s in (4.24, 185, 3725)] == ["4.2 s", "3 min 05 s",
                                                              "1 h 02 min"]


def test_warn_once_prints_one_whole_line_per_key(capfd):
  console.set_stage("seed0/eval/control")
  try:
    assert console.warn_once("k-test", "judge x could not score 3 of 10 answers")
    assert not console.warn_once("k-test", "judge x could not score 4 of 10 answers")
    assert console.warn_once("k-other", "another thing")
  finally:
    console.set_stage("")
  err = capfd.readouterr().err.splitlines()
  assert err == ["jaxlab: warning: seed0/eval/control: judge x could not score 3 of 10 answers",
                 "jaxlab: warning: seed0/eval/control: another thing"]


def test_a_judge_that_misses_some_answers_warns_once_and_one_that_misses_many_fails(capfd):
  from jaxlab.evals import judging
  answers = [{"question_id": "q", "paraphrase_index": 0, "sample_index": i} for i in range(10)]
  scores = [{"question_id": "q", "paraphrase_index": 0, "sample_index": i, "metric": "aligned",
             "score": None if i < 2 else 50.0, "status": "low_mass" if i < 2 else "ok"}
            for i in range(10)]
  for model in ("m1", "m2"):  # tolerated (80% >= 0.5): one warning for the judge, not per model
    judging.check_scored_share(answers, scores, 0.5, judge="local-test", model=model, path="p")
  warned = [l for l in capfd.readouterr().err.splitlines() if "warning" in l]
  assert len(warned) == 1 and "could not score 2 of 10 answers of model 'm1'" in warned[0]
  with pytest.raises(judging.ScoredShareError, match="below config key judge.min_scored_share"):
    judging.check_scored_share(answers, scores, 0.9, judge="local-test", model="m3", path="p")
