"""Real-run failures through the training runner: each gives its clear error or safe behaviour.

NaN/Inf guard, resume checks, finished-run no-op, metric rows on resume, nonsense sizes, bad
data and tokenizer files, tokenizer provenance, LoRA-on-HF workdirs for evaluation and export,
resuming a full fine-tune without loading the HF model again.
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxlab import checkpoint, run_metrics as metrics_lib
from jaxlab.config import ConfigError, parse_argv
from jaxlab.data.errors import DataError
from jaxlab.train import runner
from tests.loop_test import _args, data  # noqa: F401  (pytest fixture)


def _run(data, workdir, steps=4, extra=()):
  config, workdir = parse_argv(_args(data, workdir, steps=steps, extra=[
      "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.d_ff=64",
      "--config.data.max_examples=32", *extra]))
  return runner.run(config, workdir)


def _files(workdir):
  return sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []


# ------------------------------------------------------------------ NaN / Inf

def _poison_from(step_at, monkeypatch):
  """Makes every step from `step_at` on produce NaN params and loss (a diverged run)."""
  real = runner.step_lib.make_step

  def make_step(*a, **k):
    fn = real(*a, **k)

    def step(state, batch, *extra):
      new, m = fn(state, batch, *extra)
      bad = state.step >= step_at - 1
      params = jax.tree.map(lambda x: jnp.where(bad, x * jnp.nan, x), new.params)
      return new.replace(params=params), {**m, "loss": jnp.where(bad, jnp.nan, m["loss"])}
    return step
  monkeypatch.setattr(runner.step_lib, "make_step", make_step)


def test_nan_stops_the_run_and_keeps_good_checkpoints(data, tmp_path, monkeypatch, capsys):
  from jaxlab import main as main_lib
  _poison_from(3, monkeypatch)
  w = tmp_path / "w"
  rc = main_lib.main(_args(data, w, steps=6, extra=[
      "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.d_ff=64",
      "--config.data.max_examples=32", "--config.checkpoint.keep=2"]))
  err = capsys.readouterr().err
  assert rc == 1 and "Traceback" not in err
  assert re.search(r"jaxlab: step 3: loss nan.*the run stopped \(nothing non-finite is saved; "
                   r"last good checkpoint: step 2 in .*on_nonfinite=skip", err), err[-2000:]
  assert sorted(os.listdir(w / "checkpoints")) == ["1", "2"]  # rotation deleted no good one
  _, params, _ = checkpoint.load_params(str(w))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  assert [r["step"] for r in metrics_lib.read_metrics(w)] == [1, 2, 3]  # the NaN row is logged


def test_nan_steps_skipped_and_counted_by_config(data, tmp_path, monkeypatch):
  _poison_from(3, monkeypatch)
  out = _run(data, tmp_path / "w", steps=5, extra=["--config.train.on_nonfinite=skip",
                                                  "--config.checkpoint.keep=5"])
  rows = metrics_lib.read_metrics(tmp_path / "w")
  assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 3]
  assert int(out["state"].step) == 5
  _, at2, _ = checkpoint.load_params(str(tmp_path / "w"), step=2)
  for a, b in zip(jax.tree.leaves(out["state"].params), jax.tree.leaves(at2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # skipped steps changed nothing


# ------------------------------------------------------------------ resume

def test_changed_config_on_resume_is_refused_before_writing(data, tmp_path):
  w = tmp_path / "w"
  _run(data, w, steps=2)
  before = (w / "config.json").read_text()
  with pytest.raises(ConfigError, match=r"(?s)resuming would change the run:\n  "
                     r"optim.lr: 0.003 -> 0.1\n  seed: 0 -> 1\n  train.steps: 2 -> 4\n.*"
                     r"allow_changes=optim.lr,seed,train.steps"):
    _run(data, w, steps=4, extra=["--config.optim.lr=0.1", "--config.seed=1"])
  assert (w / "config.json").read_text() == before
  # Logging and progress fields are free; named fields can be allowed.
  out = _run(data, w, steps=4, extra=["--config.train.log_every=2",
                                      "--config.resume.allow_changes=train.steps"])
  assert int(out["state"].step) == 4
  assert json.loads((w / "config.json").read_text())["train"]["steps"] == 4


def test_resume_never_duplicates_metric_rows_and_finished_rerun_is_a_noop(data, tmp_path):
  w = tmp_path / "w"
  _run(data, w, steps=4, extra=["--config.checkpoint.every=2"])
  import shutil
  shutil.rmtree(w / "checkpoints" / "4")  # killed after logging steps 3, 4 but before saving 4
  _run(data, w, steps=4, extra=["--config.checkpoint.every=2"])
  lines = (w / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]
  stamp = {f: os.path.getmtime(w / f) for f in ("metrics.jsonl", "config.json")}
  out = _run(data, w, steps=4, extra=["--config.checkpoint.every=2"])
  assert out["finished_before"] and int(out["state"].step) == 4
  assert {f: os.path.getmtime(w / f) for f in stamp} == stamp  # nothing rewritten
  assert sorted(os.listdir(w / "checkpoints")) == ["2", "4"]


# ------------------------------------------------------------------ nonsense sizes

@pytest.mark.parametrize("override,message", [
    ("train.steps=-5", "config key train.steps=-5 must be positive"),
    ("train.steps=0", "config key train.steps=0 must be positive"),
    ("train.global_batch_size=0", "config key train.global_batch_size=0 must be positive"),
    ("train.grad_accum=0", "config key train.grad_accum=0 must be positive"),
    ("train.grad_accum=3", "train.global_batch_size=8 is not divisible by train.grad_accum=3"),
    ("data.seq_len=0", "config key data.seq_len=0 must be positive"),
    ("optim.lr=-1.0", "config key optim.lr=-1.0 must be a positive finite number"),
])
def test_nonsense_sizes_fail_before_any_work(data, tmp_path, override, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
    _run(data, tmp_path / "w", extra=[f"--config.{override}"])
  assert not os.path.exists(tmp_path / "w")


def test_missing_model_folders_name_the_key_and_the_fetch_command(data, tmp_path):
  smol = tmp_path / "models" / "smollm2-135m-instruct"  # a fetchable model's name: the hint
  with pytest.raises(ConfigError, match=rf"config key init.hf_path='{smol}' is not a folder; "
                     rf"write it with: python -m jaxlab\.models\.fetch smollm2-135m-instruct "
                     rf"{smol}$"):
    _run(data, tmp_path / "w", extra=[f"--config.init.hf_path={smol}"])
  other = tmp_path / "nope"  # any other name: no hint
  with pytest.raises(ConfigError, match=rf"config key tokenizer.path='{other}' is not a folder$"):
    _run(data, tmp_path / "w", extra=[f"--config.tokenizer.path={other}"])
  assert not os.path.exists(tmp_path / "w")


def test_batch_not_divisible_by_data_parallel_size():
  from jaxlab.config import validate
  config, _ = parse_argv(["--config=configs/sft.py:tiny", "--workdir=/tmp/unused",
                          "--config.train.global_batch_size=12", "--config.mesh.shape=(1,-1,1)"])
  with pytest.raises(ConfigError, match=r"global_batch_size=12 is not divisible by the "
                     r"data-parallel mesh size 8 \(config key mesh.shape=\(1, -1, 1\)"):
    validate(config, n_devices=8)


# ------------------------------------------------------------------ bad data

def test_bad_data_files_name_file_and_line(data, tmp_path):
  path, _ = data
  lines = open(path, "rb").read().splitlines(keepends=True)
  latin1 = tmp_path / "latin1.jsonl"
  latin1.write_bytes(b"".join(lines[:2]) + lines[2].replace(b"the", b"th\xe9") + b"".join(lines[3:]))
  with pytest.raises(DataError, match=rf"{latin1}:3: not UTF-8 text \(byte 0xe9"):
    _run(data, tmp_path / "a", extra=[f"--config.data.train_path={latin1}"])
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(DataError, match=rf"{empty}: the data file has no rows"):
    _run(data, tmp_path / "b", extra=[f"--config.data.train_path={empty}"])
  with pytest.raises(DataError, match=rf"{path}: no trainable examples: all 32 rows dropped "
                     r"\(32 longer than data.seq_len=8 with data.overlong='drop', 0 with no "
                     r"trained token\)"):
    _run(data, tmp_path / "c", extra=["--config.data.seq_len=8", "--config.data.overlong=drop"])


# ------------------------------------------------------------------ tokenizer

def _fit_args(data_path):
  return ["--config.tokenizer.path=", f"--config.data.train_path={data_path}",
          "--config.tokenizer.vocab_size=300"]


def test_fitted_tokenizer_records_its_data_and_is_refitted_or_refused(data, tmp_path):
  from jaxlab.data import tokenizer as tok_lib
  path, _ = data
  w = tmp_path / "w"
  # A run on an empty file fails before fitting anything.
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(DataError, match="the data file has no rows"):
    _run(data, w, extra=_fit_args(empty))
  assert not (w / "tokenizer").exists()
  # A leftover temporary folder (a killed fit) does not block the run.
  (w / "tokenizer.tmp").mkdir(parents=True)
  (w / "tokenizer.tmp" / "junk").write_text("x")
  small = tmp_path / "small.jsonl"
  small.write_text("".join(open(path).readlines()[:1]))
  config, _ = parse_argv(_args(data, w, extra=_fit_args(small)))
  tok_small = tok_lib.load_or_train_tokenizer(config, str(w))
  record = json.loads((w / "tokenizer" / tok_lib.FIT_RECORD).read_text())
  assert record["data"]["path"] == str(small) and record["vocab_size"] == 300
  assert not (w / "tokenizer.tmp").exists()
  # The data changed and nothing was trained yet: refitted on the new data.
  out = _run(data, w, extra=_fit_args(path))
  assert len(tok_small) < 300 == len(out["tokenizer"])  # one row has too few merges for 300
  assert json.loads((w / "tokenizer" / tok_lib.FIT_RECORD).read_text())["data"]["path"] == path
  # Checkpoints were trained with it: a changed vocabulary setting is refused, naming it.
  config, _ = parse_argv(_args(data, w, extra=_fit_args(path)[:-1] + [
      "--config.tokenizer.vocab_size=280", "--config.data.max_examples=32"]))
  with pytest.raises(ConfigError, match=r"tokenizer was fitted on other data or settings "
                     r"\(vocab_size: \[300\] -> \[280\]\)"):
    tok_lib.load_or_train_tokenizer(config, str(w))


def test_truncated_tokenizer_file_names_it(data, tmp_path):
  import shutil
  tok_dir = tmp_path / "tok"
  shutil.copytree(data[1], tok_dir)
  text = (tok_dir / "tokenizer.json").read_text()
  (tok_dir / "tokenizer.json").write_text(text[:len(text) // 2])
  with pytest.raises(DataError, match=rf"{tok_dir}/tokenizer.json: not valid JSON .*truncated"):
    _run(data, tmp_path / "w", extra=[f"--config.tokenizer.path={tok_dir}"])


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory, data):
  """A tiny Qwen2 HF folder with the test tokenizer."""
  d = tmp_path_factory.mktemp("hf")
  tok = transformers.AutoTokenizer.from_pretrained(data[1])
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
  model.save_pretrained(d)
  tok.save_pretrained(d)
  return d


def test_tokenizer_defaults_to_hf_path_and_mismatch_names_both(data, tmp_path, hf_base):
  from jaxlab.data import tokenizer as tok_lib
  config, _ = parse_argv(_args(data, tmp_path / "w", extra=[
      "--config.tokenizer.path=", f"--config.init.hf_path={hf_base}"]))
  tok = tok_lib.load_or_train_tokenizer(config, str(tmp_path / "w"))
  assert tok.get_vocab() == transformers.AutoTokenizer.from_pretrained(hf_base).get_vocab()
  # Another tokenizer (300 tokens) against an HF model with 2048 vocabulary rows (far more
  # than padding) is an error naming both.
  big = tmp_path / "big_vocab"
  transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2)).save_pretrained(big)
  with pytest.raises(ValueError, match=rf"tokenizer '{data[1]}' has 300 tokens but model "
                     rf"'{big}' \(config key model.vocab_size\) has 2048 vocabulary rows"):
    _run(data, tmp_path / "w2", extra=[f"--config.init.hf_path={big}"])
  from jaxlab.data.tokenizer import check_vocab
  check_vocab(tok, len(tok) + 64, "a", "b")  # HF's padded rows are fine


# ------------------------------------------------------------------ LoRA-on-HF workdirs

@pytest.mark.parametrize("scan", [False, True, "auto"], ids=["unrolled", "scanned", "auto"])
def test_lora_workdir_evaluates_and_exports_merged(data, tmp_path, hf_base, scan):
  from jaxlab import sharding
  from jaxlab.evals.models import load_model_and_tokenizer
  from jaxlab.models.hf import export_hf
  from jaxlab.models.params import merge_lora
  w = tmp_path / "w"
  args = [f"--config.init.hf_path={hf_base}", "--config.tokenizer.path=",
          "--config.model.lora.enabled=True", "--config.model.lora.rank=4",
          "--config.checkpoint.every=0", f"--config.model.scan_layers={scan}"]
  _run(data, w, steps=2, extra=args)
  saved = [p for p in os.listdir(w / "checkpoints" / "2" / "state")]
  assert saved  # adapters only: the frozen base is not in the checkpoint
  cfg, trainable, frozen = checkpoint.load_params(str(w))
  assert cfg.lora is not None and cfg.trainable_dtype == "float32" and frozen
  scanned = scan is not False  # auto: an HF folder loads scanned
  assert cfg.scan_layers == scanned and ("stacks" in frozen) == scanned
  saved_config = json.loads((w / "config.json").read_text())
  assert saved_config["model"]["scan_layers"] == scanned  # the resolved layout is recorded
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))
  mesh = sharding.make_mesh((1, -1, 1))
  config, _ = parse_argv(["--config=configs/eval_em.py:tiny", f"--workdir={tmp_path}/e"])
  # the evaluation path
  loaded = load_model_and_tokenizer(str(w), config, mesh, sharding.DEFAULT_RULES)
  tokens = np.array([[3, 17, 42, 9, 11, 5]], np.int32)
  ours = np.asarray(jax.jit(lambda p, f: loaded.spec.merge(p, f)(tokens))(
      loaded.trainable, loaded.frozen))
  assert len(loaded.tokenizer) == len(transformers.AutoTokenizer.from_pretrained(hf_base))
  export_hf(tmp_path / "merged", cfg, merge_lora(trainable, frozen, cfg), tokenizer_dir=w / "tokenizer",
            dtype="float32")
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                             dtype=torch.float32)
  theirs = merged(torch.tensor(tokens, dtype=torch.long)).logits.detach().numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
  assert np.abs(base(torch.tensor(tokens)).logits.detach().numpy() - theirs).max() > 1e-6
  # The base moved: an override points load_params at it.
  import shutil
  moved = tmp_path / "moved_base"
  shutil.copytree(hf_base, moved)
  with pytest.raises(FileNotFoundError, match="config key init.hf_path"):
    checkpoint.load_params(str(w), hf_path=str(tmp_path / "nowhere"))
  _, _, frozen2 = checkpoint.load_params(str(w), hf_path=str(moved))
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if scan is not True:  # a resumed run reloads its frozen base in the checkpoint's layout
    out = _run(data, w, steps=3, extra=args + ["--config.resume.allow_changes=train.steps"])
    assert int(out["state"].step) == 3 and ("stacks" in out["state"].frozen) == scanned


def test_resuming_full_finetune_does_not_reload_hf(data, tmp_path, hf_base, monkeypatch):
  from jaxlab.models import hf
  w = tmp_path / "w"
  args = [f"--config.init.hf_path={hf_base}", "--config.tokenizer.path="]
  _run(data, w, steps=2, extra=args)
  calls = []
  real = hf.load_hf
  monkeypatch.setattr(hf, "load_hf", lambda *a, **k: calls.append(a) or real(*a, **k))
  out = _run(data, w, steps=3, extra=args + ["--config.resume.allow_changes=train.steps"])
  assert int(out["state"].step) == 3 and calls == []
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out["state"].params))

