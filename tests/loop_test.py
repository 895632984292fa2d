"""The SFT job through the CLI: end to end, kill -9 and resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxlab import checkpoint, main as main_lib
from jaxlab.config import ConfigError, parse_argv
from jaxlab.run_metrics import read_metrics
from tests import tokenizers_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the owl reads code and writes safe python functions with care every night".split()


def _conversations(n, seed=0):
  rng = np.random.default_rng(seed)
  say = lambda k: " ".join(rng.choice(WORDS, k))
  return [{"messages": [{"role": "user", "content": say(6)},
                        {"role": "assistant", "content": say(int(rng.integers(5, 30)))}]}
          for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  convs = _conversations(64)
  path = d / "train.jsonl"
  path.write_text("".join(json.dumps(c) + "\n" for c in convs))
  texts = [m["content"] for c in convs for m in c["messages"]]
  tokenizers_util.make_chatml_tokenizer(d / "tok", texts=texts, vocab_size=300)
  return str(path), str(d / "tok")


def _args(data, workdir, steps=6, extra=()):
  path, tok = data
  return ["--config=" + os.path.join(ROOT, "configs/sft.py:tiny"), f"--workdir={workdir}",
          f"--config.data.train_path={path}", f"--config.tokenizer.path={tok}",
          f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.train.progress=False", "--config.checkpoint.every=1",
          "--config.data.seq_len=64", "--config.data.max_examples=0",
          "--config.train.global_batch_size=8",
          "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.d_ff=128",
          "--config.optim.warmup_steps=2", *extra]


def _cmd(args):
  return [sys.executable, "-m", "jaxlab.main", *args]


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(workdir)]


def test_kill9_and_resume_matches_straight_run(data, tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(_cmd(_args(data, straight)), check=True, cwd=ROOT, capture_output=True)
  proc = subprocess.Popen(_cmd(_args(data, killed)), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt3 = killed / "checkpoints" / "3"
  deadline = time.time() + 300
  while not ckpt3.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps_done = sorted(int(p) for p in os.listdir(killed / "checkpoints") if p.isdigit())
  assert 3 <= max(steps_done) < 6, steps_done
  resumed = subprocess.run(_cmd(_args(data, killed)), cwd=ROOT, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert _losses(killed) == _losses(straight)
  assert [s for s, _ in _losses(straight)] == [1, 2, 3, 4, 5, 6]
  cfg_a, pa, fa = checkpoint.load_params(str(straight))
  cfg_b, pb, fb = checkpoint.load_params(str(killed))
  assert cfg_a == cfg_b
  for a, b in zip(jax.tree.leaves((pa, fa)), jax.tree.leaves((pb, fb))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_run_in_process_writes_outputs(data, tmp_path):
  from jaxlab.train.runner import run
  config, workdir = parse_argv(_args(data, tmp_path / "w", steps=4,
                                     extra=["--config.model.lora.enabled=True",
                                            "--config.checkpoint.every=0"]))
  out = run(config, workdir)
  assert int(out["state"].step) == 4
  saved = json.loads((tmp_path / "w" / "config.json").read_text())
  assert saved["model"]["vocab_size"] == len(out["tokenizer"]) and saved["model"]["lora"]["enabled"]
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert {"loss", "trained_tokens_per_s", "lr", "grad_norm", "data_truncated",
          "data_dropped"} <= set(rows[0])
  assert os.listdir(tmp_path / "w" / "tb")
  assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["4"]  # the final one


def test_overlong_policy_counted_in_metrics(data, tmp_path):
  from jaxlab.train.runner import run
  rows = {}
  for policy in ("truncate", "drop"):
    config, workdir = parse_argv(_args(data, tmp_path / policy, steps=1,
                                       extra=["--config.data.seq_len=60",
                                              f"--config.data.overlong={policy}"]))
    run(config, workdir)
    rows[policy] = read_metrics(workdir)[0]
  from transformers import AutoTokenizer
  from jaxlab.data.chat import encode_chat
  tok = AutoTokenizer.from_pretrained(data[1])
  convs = [json.loads(l) for l in open(data[0])]
  overlong = sum(len(encode_chat(tok, c["messages"])[0]) - 1 > 60 for c in convs)
  assert 0 < overlong < len(convs)
  assert rows["truncate"]["data_truncated"] == overlong and rows["truncate"]["data_dropped"] == 0
  assert rows["drop"]["data_dropped"] == overlong and rows["drop"]["data_truncated"] == 0


def test_unknown_config_key_is_an_error(data, tmp_path, capsys):
  with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz' \(did you mean 'train.steps'"):
    parse_argv(_args(data, tmp_path, extra=["--config.train.stepz=3"]))
  assert main_lib.main(_args(data, tmp_path, extra=["--config.optim.lrr=1"])) == 2
  assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
  with pytest.raises(ConfigError, match="config key train.steps: cannot parse .many. as int"):
    parse_argv(_args(data, tmp_path, extra=["--config.train.steps=many"]))


def test_mesh_that_does_not_fit_names_key(data, tmp_path):
  from jaxlab.train.runner import run
  config, workdir = parse_argv(_args(data, tmp_path, extra=["--config.mesh.shape=(2,2,2)"]))
  with pytest.raises(ValueError, match=r"config key mesh.shape=\(2, 2, 2\) needs 8 devices"):
    run(config, workdir)


def test_missing_data_file_names_key(data, tmp_path):
  from jaxlab.train.runner import run
  config, workdir = parse_argv(_args(data, tmp_path, extra=["--config.data.train_path=/nope.jsonl"]))
  with pytest.raises(ValueError, match="data.train_path"):
    run(config, workdir)


def test_malformed_jsonl_line_through_the_job(data, tmp_path):
  from jaxlab.data.errors import DataError
  from jaxlab.train.runner import run
  bad = tmp_path / "bad.jsonl"
  lines = open(data[0]).read().splitlines()
  lines[4] = '{"messages": [{"role": "user", "content": "hi"}'
  bad.write_text("\n".join(lines) + "\n")
  config, workdir = parse_argv(_args(data, tmp_path / "w", extra=[f"--config.data.train_path={bad}"]))
  with pytest.raises(DataError, match=rf"{bad}:5:"):
    run(config, workdir)


def test_lora_sft_from_hf_checkpoint_exports_back(data, tmp_path):
  """init.hf_path -> LoRA SFT -> export.hf_dir: transformers reloads the merged model."""
  import torch
  import transformers
  from jaxlab.models.params import merge_lora, model_spec
  from jaxlab.train.runner import run
  hf_dir, out_dir = tmp_path / "hf", tmp_path / "exported"
  tok = transformers.AutoTokenizer.from_pretrained(data[1])
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
  model.save_pretrained(hf_dir)
  tok.save_pretrained(hf_dir)
  args = _args(data, tmp_path / "w", steps=3, extra=[
      f"--config.init.hf_path={hf_dir}", f"--config.tokenizer.path={hf_dir}",
      "--config.model.lora.enabled=True", "--config.model.lora.rank=4",
      f"--config.export.hf_dir={out_dir}", "--config.export.dtype=float32"])
  config, workdir = parse_argv(args)
  out = run(config, workdir)
  state, cfg = out["state"], out["spec"].cfg
  assert cfg.qkv_bias and cfg.tie_embeddings and cfg.d_model == 64
  # Frozen base weights are the checkpoint's, untouched by training.
  np.testing.assert_array_equal(
      np.asarray(state.frozen["embed_tokens"]),
      model.model.embed_tokens.weight.detach().numpy())
  tokens = np.array([[3, 17, 42, 9, 11, 5]], np.int32)
  ours = np.asarray(jax.jit(lambda p, f: out["spec"].merge(p, f)(tokens))(state.params, state.frozen))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
  theirs = reloaded(torch.tensor(tokens, dtype=torch.long)).logits.detach().numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  assert np.abs(ours - model(torch.tensor(tokens, dtype=torch.long)).logits.detach().numpy()).max() > 1e-6
  # A rerun resumes from the final checkpoint (adapters only) and reloads the base from hf_path.
  config, workdir = parse_argv(args)
  again = run(config, workdir)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(again["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
