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
from jaxlab import console
from jaxlab.config import parse_argv
from jaxlab.run_metrics import read_metrics
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
          "--config.data.prompt_len=48", "--config.data.teacher_prompt_len=48",
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
  # (The teacher's own tokenizer already differs, which is refused before the cache is read.)
  with pytest.raises(ValueError, match=r"config key teacher.path=.*: the model's tokenizer .* "
                                       r"differs from the one this run uses"):
    runner.run(bad_cfg, bad_dir)
  # Every other recorded setting is compared too: another teacher of the same vocabulary
  # (its weights' fingerprint and path), other prompt lengths, another max_examples.
  other = tmp_path / "other_teacher"
  config, workdir = parse_argv(["--config=" + os.path.join(ROOT, "configs/sft.py:tiny"),
                                f"--config.data.train_path={world['data']}",
                                "--config.data.seq_len=64", "--config.seed=5",
                                *_common(world["tok"], other, 1)])
  runner.run(config, workdir)
  for extra, fields in (((f"--config.teacher.path={other}",), ("teacher_weights", "teacher")),
                        (("--config.data.prompt_len=44",), ("prompt_len",)),
                        (("--config.data.max_examples=90",), ("max_examples",))):
    cfg, wd = parse_argv(_distill_args(
        world, tmp_path / f"bad_{fields[0]}", "offpolicy", steps=1,
        extra=(f"--config.distill.topk={VOCAB}", f"--config.distill.topk_path={cache}", *extra)))
    with pytest.raises(ValueError, match=rf"{cache}: teacher top-k file") as e:
      runner.run(cfg, wd)
    named = {line.split(":")[0].strip() for line in str(e.value).splitlines()[1:-1]}
    assert named == set(fields), (extra, str(e.value))


@pytest.mark.parametrize("channel", ["onpolicy", "gkd"])
def test_topk_cache_with_a_rollout_channel_is_a_config_error(world, tmp_path, channel):
  # The cache describes the dataset's completions; a rollout replaces them (before the fix
  # onpolicy with distill.kl=forward trained on stale targets, loss ~105, no error).
  config, workdir = parse_argv(_distill_args(
      world, tmp_path / "w", channel, steps=1,
      extra=("--config.distill.topk=8", "--config.distill.kl=forward")))
  with pytest.raises(ValueError, match=rf"config key distill.topk=8: channel '{channel}'"):
    runner.run(config, workdir)
  assert not (tmp_path / "w").exists()  # refused before anything was written


def test_every_channel_trains_on_the_same_rows_in_the_same_order(world, tmp_path, monkeypatch):
  from jaxlab.data import prompt_completion as pc
  consumed = []
  next_ids = pc.PromptCompletionBatches.next_ids
  def record(self):
    ids = next_ids(self)
    consumed[-1].append(ids.tolist())
    return ids
  monkeypatch.setattr(pc.PromptCompletionBatches, "next_ids", record)
  held, examples = {}, {}
  for channel in ("sft", "offpolicy", "onpolicy", "gkd"):
    consumed.append([])
    config, workdir = parse_argv(_distill_args(world, tmp_path / channel, channel, steps=3))
    runner.run(config, workdir)
    stats = json.loads((tmp_path / channel / "data_stats.json").read_text())
    held[channel], examples[channel] = stats["heldout_rows"], stats["examples_kept"]
    assert len([r for r in read_metrics(workdir) if "loss" in r]) == 3
  assert all(len(c) == 3 and all(len(b) == 8 for b in c) for c in consumed), consumed
  assert all(c == consumed[0] for c in consumed), consumed
  assert len(set(held.values())) == 1 and len(set(examples.values())) == 1, (held, examples)
  assert held["sft"] == 16 and examples["sft"] > 64


def test_packing_in_a_channel_comparison_is_refused_for_every_channel(world, tmp_path):
  config, workdir = parse_argv(_distill_args(world, tmp_path / "w", "sft", steps=1,
                                             extra=("--config.data.pack=True",)))
  with pytest.raises(ValueError, match=r"config key data.pack=True"):
    runner.run(config, workdir)


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


def test_truncated_rows_are_a_warning_printed_once_per_run(world, tmp_path, capfd):
  """A warning the user can act on still shows (issue 24), once per process, not once per batch
  or per trained model: completions cut to 4 tokens print one line naming the config key."""
  config, workdir = parse_argv(_distill_args(world, tmp_path / "w", "sft", steps=3,
                                             extra=("--config.data.completion_len=4",)))
  runner.run(config, workdir)
  warnings = [l for l in capfd.readouterr().err.splitlines() if "jaxlab: warning:" in l]
  assert len(warnings) == 1, warnings
  assert "truncated" in warnings[0] and "config key data.completion_len=4" in warnings[0]
  console._state["warned"].clear()  # pylint: disable=protected-access  (a new process)
  config, workdir = parse_argv(_distill_args(world, tmp_path / "w2", "sft", steps=3,
                                             extra=("--config.data.completion_len=64",)))
  runner.run(config, workdir)  # every completion fits: nothing to say
  assert "jaxlab: warning:" not in capfd.readouterr().err
  config, workdir = parse_argv(_distill_args(world, tmp_path / "w3", "sft", steps=3,
                                             extra=("--config.data.completion_len=4",)))
  runner.run(config, workdir)  # one line per process, not one per trained model
  assert "jaxlab: warning:" in capfd.readouterr().err
  config, workdir = parse_argv(_distill_args(world, tmp_path / "w4", "sft", steps=3,
                                             extra=("--config.data.completion_len=4",)))
  runner.run(config, workdir)
  assert "jaxlab: warning:" not in capfd.readouterr().err
