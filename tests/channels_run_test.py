"""Distillation channels through the runner (configs/distill.py): learning, resume, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxlab import checkpoint
from jaxlab.config import parse_argv
from jaxlab.metrics import read_metrics
from jaxlab.train import runner
from tests import tokenizers_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the owl reads code and writes safe python functions with care every night".split()
VOCAB = 320
# Learning: held-out forward KL to the teacher must fall to at most this share of its start.
KL_DROP = 0.6


def _rows(n, seed):
  rng = np.random.default_rng(seed)
  say = lambda k: " ".join(rng.choice(WORDS, k))
  return [{"messages": [{"role": "user", "content": say(int(rng.integers(3, 8)))},
                        {"role": "assistant", "content": say(int(rng.integers(3, 12)))}]}
          for _ in range(n)]


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _common(tok, workdir, steps):
  return [f"--workdir={workdir}", f"--config.tokenizer.path={tok}",
          f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.train.progress=False", "--config.checkpoint.every=0",
          "--config.train.global_batch_size=8", f"--config.model.vocab_size={VOCAB}",
          "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.d_ff=128",
          "--config.optim.warmup_steps=2", "--config.data.max_examples=0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  d = tmp_path_factory.mktemp("distill")
  rows = _rows(96, 0)
  data = _write(d / "train.jsonl", rows)
  texts = [m["content"] for r in rows for m in r["messages"]]
  tokenizers_util.make_chatml_tokenizer(d / "tok", texts=texts, vocab_size=300)
  teacher = d / "teacher"
  config, workdir = parse_argv(["--config=" + os.path.join(ROOT, "configs/sft.py:tiny"),
                                f"--config.data.train_path={data}", "--config.data.seq_len=64",
                                "--config.optim.lr=3e-3",
                                *_common(str(d / "tok"), teacher, 40)])
  runner.run(config, workdir)
  return {"dir": d, "data": data, "tok": str(d / "tok"), "teacher": str(teacher)}


def _distill_args(world, workdir, channel, steps=30, extra=()):
  return ["--config=" + os.path.join(ROOT, "configs/distill.py:tiny"),
          f"--config.channel={channel}", f"--config.data.train_path={world['data']}",
          f"--config.teacher.path={world['teacher']}", "--config.seed=1",
          "--config.data.prompt_len=24", "--config.data.teacher_prompt_len=24",
          "--config.data.completion_len=16", "--config.distill.heldout_rows=16",
          f"--config.distill.eval_every={steps}", "--config.optim.lr=3e-3",
          *_common(world["tok"], workdir, steps), *extra]


@pytest.mark.parametrize("channel,extra", [
    ("offpolicy", ()), ("onpolicy", ()), ("onpolicy", ("--config.distill.estimator=sampled",)),
    ("gkd", ("--config.distill.lmbda=0.5", "--config.distill.beta=0.5"))])
def test_each_channel_lowers_heldout_kl_to_a_different_teacher(world, tmp_path, channel, extra):
  config, workdir = parse_argv(_distill_args(world, tmp_path / "w", channel, extra=extra))
  runner.run(config, workdir)
  rows = {r["step"]: r for r in read_metrics(workdir)}
  start, end = rows[0]["heldout_kl_forward"], rows[30]["heldout_kl_forward"]
  assert start > 0.5, start  # the teacher is far from the fresh student
  assert end < KL_DROP * start, (channel, extra, start, end)
  info = json.loads((tmp_path / "w" / "channel.json").read_text())
  assert info["channel"] == channel and info["kl"] == {"offpolicy": "forward", "onpolicy": "reverse",
                                                       "gkd": "jsd"}[channel]
  if channel in ("onpolicy", "gkd"):
    assert 0 < rows[30]["sample_len"] <= 16 and 0 <= rows[30]["sample_hit_limit"] <= 1


def test_cached_topk_matches_live_teacher_at_full_k_and_is_checked(world, tmp_path):
  live_cfg, live_dir = parse_argv(_distill_args(world, tmp_path / "live", "offpolicy", steps=3))
  live = runner.run(live_cfg, live_dir)
  cache = tmp_path / "topk.npz"
  cached_cfg, cached_dir = parse_argv(_distill_args(
      world, tmp_path / "cached", "offpolicy", steps=3,
      extra=(f"--config.distill.topk={VOCAB}", f"--config.distill.topk_path={cache}")))
  cached = runner.run(cached_cfg, cached_dir)
  assert cache.exists()
  a = [r["loss"] for r in read_metrics(live_dir) if "loss" in r]
  b = [r["loss"] for r in read_metrics(cached_dir) if "loss" in r]
  np.testing.assert_allclose(a, b, rtol=2e-4)
  # A cache made with another tokenizer is refused, naming the file.
  other_rows = _rows(40, 7)
  texts = [m["content"] + " zebra quartz" for r in other_rows for m in r["messages"]]
  tokenizers_util.make_chatml_tokenizer(tmp_path / "tok2", texts=texts, vocab_size=300)
  bad_cfg, bad_dir = parse_argv(_distill_args(
      world, tmp_path / "bad", "offpolicy", steps=1,
      extra=(f"--config.distill.topk={VOCAB}", f"--config.distill.topk_path={cache}",
             f"--config.tokenizer.path={tmp_path / 'tok2'}")))
  with pytest.raises(ValueError, match=rf"{cache}: teacher top-k file was made with another tokenizer"):
    runner.run(bad_cfg, bad_dir)


def test_teacher_with_other_vocabulary_is_an_error(world, tmp_path):
  other = tmp_path / "other_teacher"
  config, workdir = parse_argv(["--config=" + os.path.join(ROOT, "configs/sft.py:tiny"),
                                f"--config.data.train_path={world['data']}",
                                "--config.data.seq_len=64",
                                *_common(world["tok"], other, 1),
                                f"--config.model.vocab_size={VOCAB + 64}"])
  runner.run(config, workdir)
  config, workdir = parse_argv(_distill_args(world, tmp_path / "w", "offpolicy", steps=1,
                                             extra=(f"--config.teacher.path={other}",)))
  with pytest.raises(ValueError, match=rf"teacher.path='{other}'.*{VOCAB + 64} tokens, the student's {VOCAB}"):
    runner.run(config, workdir)


def test_unknown_channel_is_an_error(world, tmp_path):
  config, workdir = parse_argv(_distill_args(world, tmp_path / "w", "telepathy", steps=1))
  with pytest.raises(ValueError, match=r"config key channel='telepathy'"):
    runner.run(config, workdir)


def _cli(args):
  return [sys.executable, "-m", "jaxlab.main", *args]


def test_onpolicy_kill9_and_resume_matches_straight_run(world, tmp_path):
  extra = ("--config.checkpoint.every=1", "--config.train.grad_accum=2")
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(_cli(_distill_args(world, straight, "onpolicy", steps=6, extra=extra)),
                 check=True, cwd=ROOT, capture_output=True)
  proc = subprocess.Popen(_cli(_distill_args(world, killed, "onpolicy", steps=6, extra=extra)),
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt3 = killed / "checkpoints" / "3"
  deadline = time.time() + 300
  while not ckpt3.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = subprocess.run(_cli(_distill_args(world, killed, "onpolicy", steps=6, extra=extra)),
                           cwd=ROOT, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  keys = ("loss", "sample_len", "trained_tokens")
  rows = lambda w: [(r["step"], *[r.get(k) for k in keys]) for r in read_metrics(w) if "loss" in r]
  assert rows(killed) == rows(straight)
  assert len(rows(straight)) == 6
  _, pa, _ = checkpoint.load_params(str(straight))
  _, pb, _ = checkpoint.load_params(str(killed))
  for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
