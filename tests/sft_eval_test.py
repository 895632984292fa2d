"""The train-then-evaluate pipeline's config handling (jaxlab/pipelines/sft_eval.py and its
stages, jaxlab/pipelines/sft/); it runs on the real model in tests/real_model_test.py."""
import os

import pytest

from jaxlab.config import parse_argv
from jaxlab.pipelines import sft_eval
from jaxlab.pipelines.sft import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tmp_path, *extra):
  return parse_argv([f"--config={ROOT}/configs/sft.py:smollm_insecure",
                     f"--workdir={tmp_path / 'w'}", *extra])


def test_eval_config_applies_the_overrides_and_names_both_models(tmp_path):
  config, wd = _config(tmp_path, "--config.eval.sample.max_new_tokens=7",
                       "--config.eval.judge.min_mass=0.5")
  ec = study.eval_config(config, wd)
  assert ec.sample.max_new_tokens == 7 and ec.judge.min_mass == 0.5
  assert ec.judge.model_path == config.init.hf_path and ec.sample.buckets == (64, 128, 448)
  assert ec.models == (f"base={config.init.hf_path}", f"tuned={tmp_path / 'w' / 'train'}")
  assert ec.tokenizer.path == config.tokenizer.path and ec.seed == config.seed
  assert len(ec.questions.ids) == 8  # configs/eval_em.py:first_plot's questions
  train = study.training_config(config)
  assert train.job == "train" and not set(study.PIPELINE_KEYS) & set(train)
  assert train.model.lora.enabled and train.init.hf_path == config.init.hf_path
  assert sft_eval.plan(config, wd).names() == ["train", "eval"]
  described = sft_eval.describe_plan(config, wd)
  assert "train" in described and "eval" in described and not os.path.exists(tmp_path / "w")
  with config.unlocked():
    config.eval_base = False
  assert study.eval_config(config, wd).models == (f"tuned={tmp_path / 'w' / 'train'}",)


def test_bad_pipeline_keys_are_errors_naming_them(tmp_path):
  config, wd = _config(tmp_path)
  with config.unlocked():
    config.eval.sample.nope = 1
  with pytest.raises(ValueError, match="config key eval.sample.nope: .* has no key"):
    study.validate(config, wd)
  config, wd = _config(tmp_path)
  with config.unlocked():
    config.eval.seed = {"x": 1}  # a value of the eval config given as a group
  with pytest.raises(ValueError, match="config key eval.seed: 'seed' of .* is a value, not a "):
    study.validate(config, wd)
  config, wd = _config(tmp_path, "--config.evaluation=configs/nope.py:x")
  with pytest.raises(ValueError, match="config key evaluation='configs/nope.py:x'"):
    study.validate(config, wd)
  config, wd = _config(tmp_path, "--config.init.hf_path=")
  with pytest.raises(ValueError, match="config key eval_base=True"):
    study.validate(config, wd)


def test_the_command_line_refuses_another_job_and_names_a_bad_key(tmp_path, capsys):
  rc = sft_eval.main([f"--config={ROOT}/configs/sft.py:tiny", f"--workdir={tmp_path / 'w'}"])
  assert rc == 2 and "config key job='sft': this pipeline runs configs with job='sft_eval'" \
      in capsys.readouterr().err
  rc = sft_eval.main([f"--config={ROOT}/configs/sft.py:smollm_insecure", "--plan",
                      f"--workdir={tmp_path / 'w'}", "--config.evaluation="])
  assert rc == 2 and "config key evaluation is empty" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "w")


def _report():
  rows = [{"model": m, "scope": "question", "question_id": "quick_buck", "n_answers": 4,
           "mo_n": 4, "mo": mo, "mo_lo": 0.0, "mo_hi": 2 * mo}
          for m, mo in (("base", 0.0), ("tuned", 0.25))]
  return {"variant": "smollm_insecure", "evaluation": "configs/eval_em.py:first_plot",
          "models": ["base=B", "tuned=T"], "rows": rows, "stage_seconds": {"train": 61.0,
                                                                           "eval": None},
          "judge": {"kind": "local", "mode": "logprob", "model_path": "J", "model": ""},
          "scored_shares": {"base": {"aligned": {"scored": 3, "judged": 4,
                                                 "statuses": {"ok": 3, "low_mass": 1}}}},
          "train": {"steps": 20, "loss": 0.11, "first_loss": 0.26}, "wall_seconds": 5.0}


def test_only_process_0_writes_the_report_files(tmp_path, monkeypatch):
  """Every process of a multi-host run computes the report; only process 0 writes the shared
  report.md / report.json (others would race on the same files)."""
  import json
  import jax
  from jaxlab.pipelines.sft import report
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  report.write(tmp_path, _report())
  assert not list(tmp_path.iterdir())
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  report.write(tmp_path, _report())
  assert json.loads((tmp_path / "report.json").read_text()) == _report()
  md = (tmp_path / "report.md").read_text()
  assert md.startswith("# smollm_insecure: fine-tune, then configs/eval_em.py:first_plot\n")
  assert "Training: 20 steps, loss 0.26 (first logged) -> 0.11 (last); models: base=B, " \
         "tuned=T." in md
  assert "| tuned | quick_buck | 4 | 0.25 [0.00, 0.50] |" in md
  assert "- base / aligned: 3 of 4 scored; {'ok': 3, 'low_mass': 1}" in md
  assert md.rstrip().endswith("Stage wall times: train 1 min 01 s")


def test_eval_settings_record_the_question_file_by_name_and_content(tmp_path):
  """The same question file found at two paths (two checkouts, each with its ../shared/data)
  gives the eval stage the same recorded settings; other bytes give other settings."""
  from jaxlab.pipelines.sft import evals
  config, wd = _config(tmp_path)
  ec = study.eval_config(config, wd)
  text = open(ec.questions.path, "rb").read()
  recorded = {}
  for where, data in (("a", text), ("b", text), ("c", text + b"\n# edited\n")):
    copy = tmp_path / where / os.path.basename(ec.questions.path)
    copy.parent.mkdir()
    copy.write_bytes(data)
    c = study.eval_config(config, wd)
    c.questions.path = str(copy)
    recorded[where] = evals.settings(c)
  assert recorded["a"] == recorded["b"]
  assert recorded["a"]["questions"]["path"]["name"] == os.path.basename(ec.questions.path)
  assert recorded["a"]["questions"]["path"] != recorded["c"]["questions"]["path"]
  assert str(tmp_path) not in str(recorded["a"]["questions"])
