"""The subliminal sweep (jaxlab.pipelines.subliminal_sweep): groups share bases they would train
identically, and an independent-seeds group gives every seed its own bases and teachers and
one report over them whose per-seed values are those of the seeds' own runs."""
import json
import os

import pytest

from jaxlab.config import parse_argv
from jaxlab.pipelines import subliminal_sweep as sweep
from tests import subliminal_test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [*subliminal_test.SMALL, "--config.pretrain.steps=100", "--config.pretrain.chat_steps=30",
         "--config.sl.sample_batch=64", "--config.seeds=(0,1)", "--config.teachers=('prompted',)",
         "--config.channels=('sft','control','control_b')", "--config.workers=1"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep") / "w"
  config, workdir = parse_argv([f"--config={ROOT}/configs/subliminal_sweep.py",
                                f"--workdir={root}", *SMALL])
  with config.unlocked():
    config.sweep.groups = {"plain": {"teachers": ("prompted",)},
                           "indep": {"teachers": ("prompted",), "independent_seeds": True}}
    config.sweep.order = ("plain", "indep")
    config.sweep.only = ""
  return config, root, sweep.run(config, workdir, log=lambda _: None)


def test_independent_seeds_have_their_own_bases_and_one_report_over_them(swept):
  _, root, out = swept
  # plain shares its bases with the independent group's seed 0 (the same base seed);
  # seed 1 pretrained its own (seed 10): two bases folders, not three
  assert len(list((root / "bases").iterdir())) == 2
  runs = {s: json.loads((root / "indep" / f"run{s}" / "report.json").read_text())
          for s in (0, 1)}
  assert runs[0]["seeds"] == [0] and runs[1]["seeds"] == [1]
  combined = json.loads((root / "indep" / "report.json").read_text())
  assert combined["independent_seeds"] and combined["seeds"] == [0, 1]
  for name in ("base", "teacher_prompted", "prompted_sft", "control", "control_b"):
    for s in (0, 1):
      assert combined["models"][name]["seeds"][str(s)] == runs[s]["models"][name]["seeds"][str(s)]
  # the two seeds' bases differ: their base rates (or answers) are not one model's
  assert runs[0]["models"]["base"]["top_answers"] != runs[1]["models"]["base"]["top_answers"] \
      or runs[0]["models"]["base"]["seeds"]["0"] != runs[1]["models"]["base"]["seeds"]["1"]
  assert "include their variance" in (root / "indep" / "report.md").read_text()
  assert "conditional on this workdir's base" in (root / "plain" / "report.md").read_text()
  assert [r["group"] for r in out["rows"]] == ["plain", "indep"]
  assert "| indep | prompted |" in (root / "sweep.md").read_text()


def test_sweep_plan_after_the_run_marks_every_stage_complete(swept, capsys):
  config, root, _ = swept
  text = sweep.describe_plan(config, str(root))
  heads = [l for l in text.splitlines() if l.startswith("# group ")]
  assert heads == [f"# group plain ({root / 'plain'})", f"# group indep ({root / 'indep/run0'})",
                   f"# group indep ({root / 'indep/run1'})"]
  assert "0 to run" in text and "to run:" not in text and "REFUSED" not in text


def test_main_pipeline_with_independent_seeds_equals_the_sweeps_independent_group(
    swept, tmp_path):
  """`--config.independent_seeds=True` on the main pipeline: every seed a run of its own in
  WORKDIR/run{s} (its own bases from seed 10 s) and one report over them, whose per-seed values
  are the sweep's independent group's (the same configs, bases trained in another folder);
  `--plan` lists each seed's run; an HF base is refused (there are no bases to train)."""
  from jaxlab.pipelines import subliminal
  _, root, _ = swept
  workdir = tmp_path / "w"
  config, _ = parse_argv([f"--config={ROOT}/configs/subliminal.py:tiny", f"--workdir={workdir}",
                          *SMALL, "--config.independent_seeds=True",
                          f"--config.bases_dir={tmp_path / 'ignored'}"])
  plan = subliminal.describe_plan(config, str(workdir))
  assert f"independent seed 0 ({workdir / 'run0'})" in plan
  assert f"independent seed 1 ({workdir / 'run1'})" in plan
  out = subliminal.run(config, str(workdir), log=lambda _: None)
  assert sorted(p.name for p in workdir.iterdir() if p.is_dir()) == ["run0", "run1"]
  for s in (0, 1):  # each seed's bases in its own run folder, whatever bases_dir says
    assert (workdir / f"run{s}" / "base" / "_COMPLETE.json").exists()
  assert not (tmp_path / "ignored").exists()
  combined = json.loads((workdir / "report.json").read_text())
  assert combined["independent_seeds"] and combined["seeds"] == [0, 1]
  assert out["wall_seconds"] > 0 and out["cpu_seconds"] > 0
  group = json.loads((root / "indep" / "report.json").read_text())
  for name in ("base", "teacher_prompted", "prompted_sft", "control", "control_b"):
    assert combined["models"][name]["seeds"] == group["models"][name]["seeds"], name
  assert "include their variance" in (workdir / "report.md").read_text()
  with config.unlocked():
    config.base = str(tmp_path / "some_hf_folder")
  with pytest.raises(ValueError, match="independent_seeds"):
    subliminal.describe_plan(config, str(workdir))
