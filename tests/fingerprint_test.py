"""Content fingerprints (issue: nothing stale goes unnoticed): a teacher with another tokenizer
of the same size, data edited under a resumed run, a teacher retrained in place."""
import json
import os

import pytest

from jaxlab import fingerprint
from jaxlab.config import parse_argv
from jaxlab.run_metrics import read_metrics
from jaxlab.train import runner
from tests import tokenizers_util
from tests.channels_run_test import ROOT, _common, _distill_args, _rows, _write, world  # noqa: F401


def _sft_args(world, workdir, steps, extra=()):
  return ["--config=" + os.path.join(ROOT, "configs/sft.py:tiny"),
          f"--config.data.train_path={world['data']}", "--config.data.seq_len=64",
          *_common(world["tok"], workdir, steps), "--config.checkpoint.every=1", *extra]


def test_tokenizer_digest_tells_apart_same_size_tokenizers(world, tmp_path):
  from jaxlab.models.hf_tokenizer import load_tokenizer
  texts = [m["content"] + " zebra quartz" for r in _rows(40, 7) for m in r["messages"]]
  tokenizers_util.make_chatml_tokenizer(tmp_path / "tok2", texts=texts, vocab_size=300)
  a, b = load_tokenizer(world["tok"]), load_tokenizer(str(tmp_path / "tok2"))
  assert len(a) == len(b)
  assert fingerprint.tokenizer_digest(a) != fingerprint.tokenizer_digest(b)
  assert fingerprint.tokenizer_digest(a) == fingerprint.tokenizer_digest(load_tokenizer(world["tok"]))


def test_tokenizer_digest_is_the_same_for_a_fitted_tokenizer_and_its_saved_copies(tmp_path):
  # A run fitting its own BPE digests the object in memory; its resume digests the folder.
  from jaxlab.data.tokenizer import load_tokenizer_dir, train_chat_tokenizer
  texts = [m["content"] for r in _rows(40, 2) for m in r["messages"]]
  fitted = train_chat_tokenizer(texts, 300, out_dir=str(tmp_path / "a"))
  again = load_tokenizer_dir(str(tmp_path / "a"))
  again.save_pretrained(str(tmp_path / "b"))
  digests = {fingerprint.tokenizer_digest(t) for t in
             (fitted, again, load_tokenizer_dir(str(tmp_path / "b")))}
  assert len(digests) == 1


def test_teacher_with_another_tokenizer_of_the_same_size_is_refused(world, tmp_path):
  texts = [m["content"] + " zebra quartz" for r in _rows(40, 7) for m in r["messages"]]
  tok2 = tokenizers_util.make_chatml_tokenizer(tmp_path / "tok2", texts=texts, vocab_size=300)
  teacher = tmp_path / "teacher2"
  config, workdir = parse_argv(_sft_args(world, teacher, 1,
                                         extra=(f"--config.tokenizer.path={tmp_path / 'tok2'}",)))
  runner.run(config, workdir)
  config, workdir = parse_argv(_distill_args(world, tmp_path / "w", "offpolicy", steps=2,
                                             extra=(f"--config.teacher.path={teacher}",)))
  with pytest.raises(ValueError, match=rf"config key teacher.path='{teacher}': the model's "
                                       r"tokenizer .* differs from the one this run uses"):
    runner.run(config, workdir)
  assert not (tmp_path / "w" / "config.json").exists()  # refused before anything was written
  del tok2


def test_resume_on_edited_data_is_refused_naming_the_file(world, tmp_path):
  data = _write(tmp_path / "data.jsonl", _rows(64, 3))
  w = tmp_path / "w"
  # A run of 2 steps extended to 4 (the step count is allowed to change; the data is not).
  args = lambda steps, allow="": _sft_args(world, w, steps, extra=(
      f"--config.data.train_path={data}",
      f"--config.resume.allow_changes=train.steps{allow}"))
  runner.run(*parse_argv(args(2)))
  before = fingerprint.file_digest(data)["sha256"][:16]
  _write(tmp_path / "data.jsonl", _rows(64, 4))  # same row count, other rows
  after = fingerprint.file_digest(data)["sha256"][:16]
  with pytest.raises(ValueError, match=rf"(?s)other inputs.*data.train_path \({data}\): "
                                       rf"fingerprint {before} -> {after}"):
    runner.run(*parse_argv(args(4)))
  assert [r["step"] for r in read_metrics(str(w)) if "loss" in r] == [1, 2]  # nothing trained
  # Another row count names the data file too (not the iterator state).
  _write(tmp_path / "data.jsonl", _rows(50, 4))
  with pytest.raises(ValueError, match=rf"data.train_path \({data}\): fingerprint {before}"):
    runner.run(*parse_argv(args(4)))
  # Accepted by name, a changed row count still cannot restore the data position: named too.
  with pytest.raises(ValueError, match=rf"data position cannot be restored on this run's data "
                                       rf"\(data.train_path='{data}'\)"):
    runner.run(*parse_argv(args(4, ",data.train_path")))
  # Accepting new contents of the same size by name resumes.
  _write(tmp_path / "data.jsonl", _rows(64, 4))
  runner.run(*parse_argv(args(4, ",data.train_path")))
  assert [r["step"] for r in read_metrics(str(w)) if "loss" in r] == [1, 2, 3, 4]
  saved = json.loads((w / "config.json").read_text())
  assert saved["inputs"]["data"]["train_path"] == fingerprint.file_digest(data)["sha256"][:16]


def test_student_resumed_after_its_teacher_was_retrained_in_place_is_refused(world, tmp_path):
  teacher = tmp_path / "teacher"
  runner.run(*parse_argv(_sft_args(world, teacher, 2)))
  student = lambda steps: _distill_args(world, tmp_path / "s", "offpolicy", steps=steps,
                                        extra=(f"--config.teacher.path={teacher}",
                                               "--config.checkpoint.every=1",
                                               "--config.resume.allow_changes=train.steps"))
  runner.run(*parse_argv(student(2)))
  import shutil
  shutil.rmtree(teacher)
  runner.run(*parse_argv(_sft_args(world, teacher, 2, extra=("--config.seed=9",))))
  with pytest.raises(ValueError, match=rf"(?s)other inputs.*teacher.path \({teacher}\): "
                                       "fingerprint [0-9a-f]{16} -> [0-9a-f]{16}"):
    runner.run(*parse_argv(student(4)))


def test_prompt_len_shorter_than_every_prompt_is_a_config_error_before_any_write(world, tmp_path):
  config, workdir = parse_argv(_distill_args(world, tmp_path / "w", "offpolicy", steps=1,
                                             extra=("--config.data.prompt_len=4",)))
  with pytest.raises(ValueError, match=r"no row of .*train.jsonl fits config keys "
                                       r"data.prompt_len=4"):
    runner.run(config, workdir)
  assert not (tmp_path / "w" / "config.json").exists()
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_heldout_rows_leaving_nothing_to_train_is_a_config_error(world, tmp_path):
  config, workdir = parse_argv(_distill_args(world, tmp_path / "w", "offpolicy", steps=1,
                                             extra=("--config.distill.heldout_rows=1000",)))
  with pytest.raises(ValueError, match=r"config key distill.heldout_rows=1000: only \d+ rows"):
    runner.run(config, workdir)


def test_finished_workdir_with_a_truncated_config_json_is_mended(world, tmp_path, capsys):
  w = tmp_path / "w"
  runner.run(*parse_argv(_sft_args(world, w, 1)))
  good = json.loads((w / "config.json").read_text())
  text = (w / "config.json").read_text()
  (w / "config.json").write_text(text[:len(text) // 2])
  out = runner.run(*parse_argv(_sft_args(world, w, 1)))
  assert out.get("finished_before")
  assert json.loads((w / "config.json").read_text()) == good
  assert "config.json was damaged (not valid JSON); rewritten" in capsys.readouterr().err


def test_eval_model_with_another_tokenizer_than_configured_is_refused(tmp_path):
  import ml_collections
  from jaxlab.models.hf_tokenizer import load_tokenizer
  from jaxlab import sharding
  from jaxlab.evals.models import load_model_and_tokenizer
  from tests.subliminal_drift_test import _checkpoint
  model = tmp_path / "model"
  _checkpoint(model, seed=0)  # a Qwen-template BPE of its own
  other = tokenizers_util.make_chatml_tokenizer(tmp_path / "other", vocab_size=300)
  del other
  mesh = sharding.make_mesh((1, 1, 1))
  config = ml_collections.ConfigDict(dict(tokenizer=dict(path=str(tmp_path / "other")),
                                          dtype=""))
  with pytest.raises(ValueError, match=rf"config key models='{model}': the model's tokenizer"):
    load_model_and_tokenizer(str(model), config, mesh, sharding.DEFAULT_RULES)
  # A judge reads text: its own tokenizer wins over the evaluated models' tokenizer.path.
  judge = load_model_and_tokenizer(str(model), config, mesh, sharding.DEFAULT_RULES,
                                   key="judge.model_path", prefer_own=True)
  assert fingerprint.tokenizer_digest(judge.tokenizer) != fingerprint.tokenizer_digest(
      load_tokenizer(str(tmp_path / "other")))
  config.tokenizer.path = str(model)  # its own: fine
  loaded = load_model_and_tokenizer(str(model), config, mesh, sharding.DEFAULT_RULES)
  assert loaded.tokenizer is not None
