"""Subliminal pipeline: filter-and-keep with counted reasons, per-seed prompts, the tiny world's
teacher really carries the trait while the control stays at the base, every cell runs from the
same config by flag, and a pipeline killed after its teacher-data stage resumes reusing the data.

The filter rules and the prompt generator themselves are tested in tests/worlds_test.py.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxlab.config import parse_argv
from jaxlab.pipelines import subliminal as sl
from jaxlab.pipelines.sl import em_eval, number_data, students, study
from jaxlab.pipelines.stages import StageSettingsChanged
from jaxlab.worlds import number_sequences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A smaller world and base than the tiny variant; the same code path.
SMALL = ["--config.world.number_docs=1500", "--config.world.animal_docs=600",
         "--config.world.trait_docs=2500", "--config.pretrain.steps=300",
         "--config.pretrain.chat_steps=60", "--config.pretrain.chat_docs=600",
         "--config.sl.n_prompts=128", "--config.sl.n_keep=16", "--config.sl.sample_batch=128",
         "--config.sl.eval_samples=8", "--config.sl.eval_batch=200", "--config.sl.drift_rows=32",
         "--config.train.steps=2", "--config.train.global_batch_size=8",
         "--config.distill.heldout_rows=4"]


FIXTURE = ["--config.seeds=(0,)", "--config.channel=control", "--config.train.steps=16",
           "--config.teachers=('finetuned',)"]


def _config(workdir, *extra):
  return parse_argv([f"--config={ROOT}/configs/subliminal.py:tiny", f"--workdir={workdir}",
                     *SMALL, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A small pipeline: base, fine-tuned teacher, control student, seed 0 (shared by the tests)."""
  workdir = tmp_path_factory.mktemp("sl") / "w"
  config, _ = _config(workdir, *FIXTURE)
  logs = []
  report = sl.run(config, str(workdir), log=logs.append)
  return workdir, report, logs


def test_filter_and_keep_counts_reasons_and_keeps_a_fixed_number():
  prompts = number_sequences.number_prompts(8, seed=0)
  answers = ["1, 2, 3", "12 13; 14", "666, 5", "Sure! 4, 5", "1000", "7 8 9", "",
             ", ".join(["5"] * (prompts[7].max_count + 1))]
  rows, stats = number_data.filter_and_keep(prompts, answers, n_keep=2, banned=number_sequences.BANNED_NUMBERS)
  assert stats["counts"] == {"ok": 2, "empty": 1, "format": 1, "mixed_separators": 1,
                             "too_many": 1, "out_of_range": 1, "banned": 1}
  assert stats["kept"] == 2 and stats["accept_rate"] == 2 / 8
  assert [r["messages"][1]["content"] for r in rows] == ["1, 2, 3", "7 8 9"]
  assert rows[0]["messages"][0] == {"role": "user", "content": prompts[0].text}
  # without the ban 666 passes; asking for more rows than passed is an error naming the key
  rows, stats = number_data.filter_and_keep(prompts, answers, n_keep=3)
  assert stats["counts"]["banned"] == 0 and rows[1]["messages"][1]["content"] == "666, 5"
  with pytest.raises(ValueError, match="sl.n_keep=4"):
    number_data.filter_and_keep(prompts, answers, n_keep=4)


def test_prompts_per_seed_are_deterministic_and_differ_across_seeds():
  a, b = number_data.number_prompt_rows(300, 0), number_data.number_prompt_rows(300, 1)
  assert a == number_data.number_prompt_rows(300, 0) and len({p.text for p in a} & {p.text for p in b}) == 0
  assert len({p.text for p in a}) == 300


def test_config_errors_name_the_key(tmp_path):
  for extra, key in ((["--config.channel=rlhf"], "channel"),
                     (["--config.teachers=('angry',)"], "teachers"),
                     (["--config.sl.animal=dragon"], "sl.animal"),
                     (["--config.sl.n_keep=500"], "sl.n_keep"),
                     (["--config.teachers=('external',)"], "teacher.path"),
                     (["--config.distill.heldout_rows=16"], "distill.heldout_rows")):
    config, _ = _config(tmp_path, *extra)
    with pytest.raises(ValueError, match=key):
      sl.run(config, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_student_configs_cross_sequences_and_signal():
  config, _ = _config("/w")
  paths = {"base": "/w/base", "other_base": "/w/other_base", "teacher_finetuned": "/w/ft"}
  data = {"prompted": "/w/tp.jsonl", "finetuned": "/w/tf.jsonl", "base": "/w/b.jsonl",
          "base_b": "/w/b2.jsonl"}
  got = {}
  for cell in study.CELLS:
    for kind in ("prompted", "finetuned"):
      c = students.student_config(config, kind, cell, 3, paths, data)
      got[kind, cell] = (c.channel, c.data.train_path, c.teacher.path, c.teacher.system_prompt,
                         c.init.workdir, c.seed)
      assert "sl" not in c and "channels" not in c and c.job == "train"
  trait = study.trait_prompt(config)
  assert "owls" in trait
  assert got["prompted", "sft"] == ("sft", "/w/tp.jsonl", "", "", "/w/base", 3)
  assert got["prompted", "offpolicy"] == ("offpolicy", "/w/tp.jsonl", "/w/base", trait, "/w/base", 3)
  assert got["finetuned", "offpolicy"] == ("offpolicy", "/w/tf.jsonl", "/w/ft", "", "/w/base", 3)
  assert got["prompted", "onpolicy"][:4] == ("onpolicy", "/w/tp.jsonl", "/w/base", trait)
  assert got["prompted", "control"] == ("sft", "/w/b.jsonl", "", "", "/w/base", 3)
  # the noise control: the control's recipe on another sample of base numbers, another seed
  assert got["prompted", "control_b"] == ("sft", "/w/b2.jsonl", "", "", "/w/base",
                                          3 + study.NOISE_OFFSET)
  assert got["finetuned", "base_offpolicy"] == ("offpolicy", "/w/b.jsonl", "/w/ft", "", "/w/base", 3)
  assert got["prompted", "sft_otherbase"] == ("sft", "/w/tp.jsonl", "", "", "/w/other_base", 3)
  # distill.topk caches the teacher for off-policy cells only; the others train without it.
  config.distill.topk = 8
  topk = {cell: students.student_config(config, "prompted", cell, 3, paths, data).distill.topk
          for cell in study.CELLS}
  assert topk == {"sft": 0, "offpolicy": 8, "onpolicy": 0, "control": 0, "control_b": 0,
                  "base_offpolicy": 8, "sft_otherbase": 0}


def test_teacher_expresses_the_trait_and_control_stays_at_the_base(trained):
  _, report, _ = trained
  m = report["models"]
  base, teacher, control = m["base"], m["teacher_finetuned"], m["control"]
  # Threshold: the fine-tuned teacher names the owl at least 20 points and 3x more often than
  # the base (about 7% in this world), in samples and in exact probability.
  assert teacher["rate"] - base["rate"] > 0.20 and teacher["rate"] > 3 * base["rate"], (
      teacher["rate"], base["rate"])
  assert teacher["prob"] - base["prob"] > 0.20 and teacher["prob"] > 3 * base["prob"]
  # The control (base numbers, hard labels) stays within noise of the base: the paired 95%
  # interval (one seed: over questions) contains 0, or the shift is under 3 points.
  d = report["contrasts"]["control"]["vs_base"]
  assert d["rate"]["lo"] <= 0 <= d["rate"]["hi"] or abs(d["rate"]["mean"]) < 0.03, d
  assert abs(d["prob"]["mean"]) < 0.03


def test_drift_equals_a_row_by_row_numpy_kl_of_the_two_models(trained):
  # The stage scores left-padded batches under the teacher's and the base's own prompts; here
  # each row is run alone, unpadded, and the KL is summed in float64 NumPy.
  import jax
  import numpy as np
  from jaxlab.checkpoint import load_params
  from jaxlab.data import prompt_completion as pc
  from jaxlab.models.hf_tokenizer import load_tokenizer
  from jaxlab.models.params import model_spec
  workdir, report, _ = trained
  record = json.loads((workdir / "seed0/drift/finetuned/drift.json").read_text())
  tok = load_tokenizer(str(workdir / "base/tokenizer"))
  rows = [json.loads(l) for l in open(record["rows"]).read().splitlines()[:32]]

  def logp(path, ids):
    cfg, tr, fr = load_params(path)
    out = model_spec(cfg).merge(tr, fr)(np.asarray([ids], np.int32))
    lg = np.asarray(jax.device_get(out), np.float64)[0]
    return lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - lg.max(-1, keepdims=True)
  total, count = 0.0, 0
  for r in rows:
    ex = pc.encode_example(tok, r["messages"], teacher_system=record["system_prompt"] or None)
    c = list(ex.completion)
    lt = logp(record["teacher"], list(ex.teacher_prompt) + c[:-1])[len(ex.teacher_prompt) - 1:]
    lb = logp(str(workdir / "base"), list(ex.prompt) + c[:-1])[len(ex.prompt) - 1:]
    total += float((np.exp(lt) * (lt - lb)).sum())
    count += len(c)
  want = total / count
  assert want > 1e-4  # the fine-tuned teacher really moved
  assert record["kl_per_token"] == pytest.approx(want, rel=1e-3)
  assert report["drift"]["finetuned"]["mean"] == pytest.approx(want, rel=1e-3)  # one seed


def test_report_files(trained):
  workdir, report, _ = trained
  md = (workdir / "report.md").read_text()
  assert "| control |" in md and "Sequences x signal" in md and "Filter" in md
  assert (workdir / "trait.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  f = report["filter"][0]["finetuned"]
  assert f["kept"] == 16 and sum(f["counts"].values()) == f["answers"] == 128
  assert report["compute"]["control"]["steps"] == 16


@pytest.mark.parametrize("pair", [("sft", "offpolicy"), ("onpolicy", "base_offpolicy")])
def test_each_cell_runs_from_the_same_config_by_flag(trained, pair):
  """Cells chosen by flag; two students train at once in two worker processes."""
  workdir, _, _ = trained
  # The prompted teacher (the base under the trait prompt): the teacher sees another context.
  config, _ = _config(workdir, "--config.seeds=(0,)", f"--config.channels={pair!r}",
                      "--config.teachers=('prompted',)", "--config.workers=2")
  logs = []
  report = sl.run(config, str(workdir), log=logs.append)
  assert any("stage seed0/data_base: complete, skipped" in l for l in logs)
  assert any("2 stage chain(s) in 2 worker processes" in l for l in logs), logs
  for cell in pair:
    name = f"prompted_{cell}"
    channel = json.loads((workdir / f"seed0/{name}/channel.json").read_text())
    assert channel["channel"] == study.CHANNEL_OF[study.CELLS[cell]]
    assert report["compute"][name]["steps"] == 2 and name in report["models"]


def test_changed_settings_of_a_finished_stage_are_refused(trained):
  workdir, _, _ = trained
  config, _ = _config(workdir, *FIXTURE, "--config.sl.n_keep=40")
  with pytest.raises(StageSettingsChanged, match="sl.n_keep"):
    sl.run(config, str(workdir), log=lambda m: None)


def _digest(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_after_teacher_data_resumes_reusing_it(trained, tmp_path):
  import shutil
  src, _, _ = trained
  workdir = tmp_path / "w"
  for stage in ("world", "base_pretrain", "base", "teacher_finetuned"):  # the resume is about what follows
    shutil.copytree(src / stage, workdir / stage)
  args = [f"--config={ROOT}/configs/subliminal.py:tiny", f"--workdir={workdir}", *SMALL,
          "--config.seeds=(7,)", "--config.channel=sft", "--config.train.steps=40",
          "--config.teachers=('finetuned',)"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "jaxlab.pipelines.subliminal", *args], cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  done = workdir / "seed7/data_base/_COMPLETE.json"
  t0 = time.time()
  while not done.exists() and proc.poll() is None and time.time() - t0 < 300:
    time.sleep(0.2)
  assert done.exists(), proc.stderr.read() if proc.poll() is not None else "timeout"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "seed7/finetuned_sft/_COMPLETE.json").exists()
  data = {k: _digest(workdir / f"seed7/data_{k}/rows.jsonl") for k in ("finetuned", "base")}
  mtimes = {k: (workdir / f"seed7/data_{k}/rows.jsonl").stat().st_mtime_ns for k in data}
  config, _ = parse_argv(args)
  logs = []
  report = sl.run(config, str(workdir), log=logs.append)
  for k in data:
    assert any(f"stage seed7/data_{k}: complete, skipped" in l for l in logs), logs
    assert _digest(workdir / f"seed7/data_{k}/rows.jsonl") == data[k]
    assert (workdir / f"seed7/data_{k}/rows.jsonl").stat().st_mtime_ns == mtimes[k]
  assert any("stage seed7/finetuned_sft: running" in l for l in logs)
  assert report["compute"]["finetuned_sft"]["steps"] == 40
  assert (workdir / "report.md").exists()


def test_a_damaged_finished_stage_is_refused_before_a_new_cell_reads_it(trained, tmp_path):
  # seed0/data_finetuned/rows.jsonl cut from 16 rows to 2, then a new cell added: the new
  # student must not train on 2 rows beside students trained on 16.
  from jaxlab.pipelines.stages import StageOutputsChanged
  workdir, _, _ = trained
  rows = workdir / "seed0/data_finetuned/rows.jsonl"
  intact = rows.read_bytes()
  try:
    rows.write_text("".join(rows.read_text().splitlines(keepends=True)[:2]))
    config, _ = _config(workdir, *FIXTURE[:-3], "--config.channel=sft",
                        "--config.train.steps=16", "--config.teachers=('finetuned',)")
    with pytest.raises(StageOutputsChanged, match=rf"stage seed0/data_finetuned: {rows} changed"):
      sl.run(config, str(workdir), log=lambda m: None)
    assert not (workdir / "seed0/finetuned_sft").exists()
  finally:
    rows.write_bytes(intact)


def test_number_prompts_must_fit_under_every_teachers_prompt(trained):
  # Otherwise a row dropped for the prompted teacher's cells only would give the cells of a seed
  # different rows; the check runs before any sampling.
  from jaxlab.config import ConfigError
  from jaxlab.models.hf_tokenizer import load_tokenizer
  workdir, _, _ = trained
  tok = load_tokenizer(str(workdir / "base/tokenizer"))
  paths = {"base": str(workdir / "base"), "teacher_finetuned": str(workdir / "teacher_finetuned")}
  prompts = [p.text for p in number_data.number_prompt_rows(8, 0)]
  both = "--config.teachers=('prompted','finetuned')"
  config, _ = _config(workdir, *FIXTURE, both)
  number_data.check_lengths(config, tok, prompts, paths)  # the tiny lengths fit
  config, _ = _config(workdir, *FIXTURE, both, "--config.data.teacher_prompt_len=100")
  with pytest.raises(ConfigError, match=r"config key data.teacher_prompt_len=100: number prompt"):
    number_data.check_lengths(config, tok, prompts, paths)
  config, _ = _config(workdir, *FIXTURE, "--config.data.teacher_prompt_len=100")
  number_data.check_lengths(config, tok, prompts, paths)  # no teacher prompt: the student prompt fits


def test_jaxlab_main_dispatches_the_pipeline_and_names_a_bad_key(tmp_path):
  """`python -m jaxlab.main` runs a config's pipeline (job='subliminal'); a bad value is an
  error naming the key before any stage runs."""
  proc = subprocess.run(
      [sys.executable, "-m", "jaxlab.main", f"--config={ROOT}/configs/subliminal.py:tiny",
       f"--workdir={tmp_path / 'w'}", "--config.sl.animal=unicorn"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAXLAB_COMPILE_CACHE": "off"})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config key sl.animal='unicorn'" in proc.stderr
  assert not (tmp_path / "w" / "world").exists()


def test_em_evaluation_of_every_model_for_a_misaligned_teacher(trained):
  """em_eval runs the EM evaluation (questions, judge, em / mo / seed) on the base, the
  teacher and the students in their own stage; the finished stages are reused."""
  workdir, _, _ = trained
  config, _ = _config(workdir, *FIXTURE, "--config.em_eval=configs/eval_em.py:tiny")
  logs = []
  report = sl.run(config, str(workdir), log=logs.append)
  assert any("stage seed0/control: complete, skipped" in l for l in logs)
  assert any("stage seed0/em_eval: running" in l for l in logs)
  rows = report["em_eval"]["pooled"]["0"] if "0" in report["em_eval"]["pooled"] else \
      report["em_eval"]["pooled"][0]
  assert {r["model"] for r in rows} == {"base", "teacher_finetuned", "control"}
  # The three published metrics side by side (em is NaN when the random tiny judge rates no
  # answer coherent: EM's definition drops those).
  assert all(0 <= r["mo"] <= 1 and 0 <= r["seed"] <= 1 and "em" in r and r["n_answers"] == 64
             for r in rows), rows
  md = (workdir / "report.md").read_text()
  assert "## EM evaluation (configs/eval_em.py:tiny)" in md and "| control |" in md
  answers = workdir / "seed0/em_eval/eval"
  assert any(answers.rglob("*.jsonl"))
  with pytest.raises(ValueError, match="config key em_eval="):
    em_eval.em_eval_config(_config(workdir, "--config.em_eval=configs/nope.py:tiny")[0], [], 0)


def test_one_and_two_workers_give_the_same_report_with_a_noise_floor(trained, tmp_path):
  """The same commit and config give the same report (every figure, digit for digit) whether
  the students train here or in two worker processes; the noise control is in it."""
  import shutil
  from jaxlab.pipelines import subliminal_report
  workdir, _, _ = trained
  reports = {}
  for workers in (1, 2):
    w = tmp_path / f"w{workers}"
    w.mkdir()
    for stage in ("world", "base_pretrain", "base", "teacher_finetuned"):  # reuse the bases
      shutil.copytree(workdir / stage, w / stage)
    config, _ = _config(w, "--config.seeds=(0,)", "--config.teachers=('finetuned',)",
                        "--config.channels=('sft','control','control_b')",
                        f"--config.workers={workers}")
    logs = []
    reports[workers] = sl.run(config, str(w), log=logs.append)
    assert (w / "seed0/control_b/_COMPLETE.json").exists()
    assert (workers == 2) == any("in 2 worker processes" in l for l in logs), logs
  one, two = (subliminal_report.results(reports[w]) for w in (1, 2))
  assert one == two
  assert reports[1]["provenance"]["workers"] == 1 and reports[2]["provenance"]["workers"] == 2
  assert reports[1]["provenance"]["config_hash"] == reports[2]["provenance"]["config_hash"]
  floor = reports[1]["noise_floor"]
  assert floor is not None and floor["rate"]["floor"] >= 0 and "control_b" in reports[1]["models"]
  assert set(floor["rate"]) == {"floor", "contrast", "aa_ok"}
  md = (tmp_path / "w1/report.md").read_text()
  assert "**Noise floor**" in md and "## Conclusions" in md and "config hash" in md
