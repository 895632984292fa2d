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


def _quiet(*a, **k):
  return stages.run_stage(*a, **k, log=lambda m: None)


def test_a_complete_stage_whose_outputs_were_edited_is_refused_naming_the_file(tmp_path):
  def fn(folder):
    (folder / "rows.jsonl").write_text("1\n2\n3\n4\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "stats.json").write_text("{}")
  _quiet(tmp_path, "data", {"n": 4}, fn)
  _quiet(tmp_path, "data", {"n": 4}, fn)  # intact: skipped
  (tmp_path / "data" / "rows.jsonl").write_text("1\n2\n")  # cut from 4 rows to 2
  with pytest.raises(stages.StageOutputsChanged,
                     match=rf"stage data: {tmp_path}/data/rows.jsonl changed since the stage "
                           "completed \\(fingerprint [0-9a-f]+ -> [0-9a-f]+\\)"):
    _quiet(tmp_path, "data", {"n": 4}, fn)
  (tmp_path / "data" / "rows.jsonl").write_text("1\n2\n3\n4\n")
  (tmp_path / "data" / "sub" / "stats.json").unlink()
  with pytest.raises(stages.StageOutputsChanged, match=r"sub/stats.json changed .*\(missing\)"):
    _quiet(tmp_path, "data", {"n": 4}, fn)


def test_a_stage_recomputed_in_place_changes_the_settings_of_its_readers(tmp_path):
  import shutil
  write = lambda text: (lambda f: (f / "weights.bin").write_text(text))
  teacher = _quiet(tmp_path, "teacher", {"lr": 1}, write("a"))
  reader = lambda: {"reads": stages.output_digest(teacher)}
  _quiet(tmp_path, "student", reader(), lambda f: None)
  _quiet(tmp_path, "student", reader(), lambda f: None)  # same teacher: skipped
  shutil.rmtree(teacher)
  _quiet(tmp_path, "teacher", {"lr": 1}, write("b"))  # same settings, other weights
  with pytest.raises(stages.StageSettingsChanged, match=r"stage student .*reads: '[0-9a-f]+' -> "):
    _quiet(tmp_path, "student", reader(), lambda f: None)


def test_checkpoints_are_fingerprinted_by_their_checksum_records_only(tmp_path):
  d = tmp_path / "run"
  (d / "checkpoints/8/state").mkdir(parents=True)
  (d / "checkpoints/8/fingerprint").mkdir(parents=True)
  (d / "checkpoints/8/state/array.bin").write_bytes(b"big")
  (d / "checkpoints/8/fingerprint/metadata").write_text("{}")
  (d / "metrics.jsonl").write_text("{}\n")
  (d / "other_stage").mkdir()
  (d / "other_stage" / stages.MARKER).write_text("{}")
  assert sorted(stages.outputs(d)) == ["checkpoints/8/fingerprint/metadata", "metrics.jsonl"]


def test_model_digest_of_a_workdir_follows_its_newest_checkpoint_record(tmp_path):
  w = tmp_path / "teacher"
  assert stages.model_digest(w) is None  # nothing there yet: left out of readers' settings
  for step, record in ((5, '{"a": [1, 2]}'), (10, '{"a": [3, 4]}')):
    (w / f"checkpoints/{step}/fingerprint").mkdir(parents=True)
    (w / f"checkpoints/{step}/fingerprint/metadata").write_text(record)
  first = stages.model_digest(w)
  (w / "checkpoints/10/fingerprint/metadata").write_text('{"a": [3, 5]}')  # retrained in place
  assert first is not None and stages.model_digest(w) != first
  assert stages.model_digest(tmp_path / "hf_folder") is None


def test_reads_names_the_models_with_a_fingerprint_only(tmp_path):
  teacher = _quiet(tmp_path, "teacher", {"lr": 1}, lambda f: (f / "w.bin").write_text("a"))
  (tmp_path / "hf").mkdir()  # an HF folder: identified by its path, not read here
  got = stages.reads(teacher=str(teacher), base=str(tmp_path / "hf"), later=str(tmp_path / "x"),
                     none="")
  assert got == {"reads": {"teacher": stages.output_digest(teacher)}}


def test_a_summary_starts_with_the_time_of_the_run_that_returned_it():
  from jaxlab.pipelines.kit import main as kit_main
  assert kit_main.took({"wall_seconds": 125.0, "cpu_seconds": 230.4}) == \
      "\ndone in 2 min 05 s wall (125 s), 230 s CPU\n"
  assert kit_main.took(None) == kit_main.took({"report": "x"}) == ""  # no run: no time
