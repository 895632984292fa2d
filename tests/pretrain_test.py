"""Pretraining on a weighted mixture: weights honoured, the stream resumes exactly, and the
pretrain channel trains a tokenizer and a model from scratch through the runner."""
import json
import os

import numpy as np
import pytest

from jaxlab.config import parse_argv
from jaxlab.data.mixture import MixtureBatches
from jaxlab.run_metrics import read_metrics
from jaxlab.train import runner
from tests import tokenizers_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  d = tmp_path_factory.mktemp("mix")
  rng = np.random.default_rng(0)
  words_a = "the owl reads code and writes safe python".split()
  words_b = "numbers 123 456 789 continue the sequence".split()
  (d / "a.txt").write_text("\n\n".join(" ".join(rng.choice(words_a, int(rng.integers(3, 40))))
                                       for _ in range(60)))
  rows = [{"messages": [{"role": "user", "content": " ".join(rng.choice(words_b, 5))},
                        {"role": "assistant", "content": " ".join(rng.choice(words_b, 9))}]}
          for _ in range(40)] + [{"text": "plain text document number one"}]
  (d / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  tok = tokenizers_util.make_chatml_tokenizer(d / "tok", vocab_size=300)
  return {"a": {"path": str(d / "a.txt"), "weight": 0.7},
          "b": {"path": str(d / "b.jsonl"), "weight": 0.3}}, tok, d


def test_mixture_weights_are_honoured_over_many_rows(sources):
  srcs, tok, _ = sources
  mb = MixtureBatches(srcs, tok, global_batch_size=8, seq_len=16, seed=3)
  n = 20000
  share_a = np.mean([mb.source_of_row(k) == 0 for k in range(n)])
  sigma = np.sqrt(0.7 * 0.3 / n)
  assert abs(share_a - 0.7) < 4 * sigma, share_a
  # Rows really come from their source: a row of source b has no word only source a uses.
  rows = [next(mb) for _ in range(30)]
  text_rows = [tok.decode(r) for b in rows for r in b["inputs"]]
  assert any("owl" in t for t in text_rows) and any("sequence" in t for t in text_rows)
  assert not any("owl" in t and "sequence" in t for t in text_rows)
  assert all(np.all(b["loss_mask"] == 1) for b in rows)


def test_documents_in_a_row_are_separate_segments_seen_as_alone(sources):
  """With document masking (the default) each document of a packed row is its own segment
  with positions from 0, so the model's logits on it equal those on the document alone."""
  import jax.numpy as jnp
  from flax import nnx
  from jaxlab.models.config import ModelConfig
  from jaxlab.models.decoder import Decoder
  srcs, tok, _ = sources
  mb = MixtureBatches(srcs, tok, global_batch_size=8, seq_len=96, seed=2)
  end = mb.end_id
  batch = next(mb)
  x, seg, pos = batch["inputs"], batch["segment_ids"], batch["positions"]
  r = next(i for i in range(len(x)) if (x[i, :-4] == end).sum() >= 2)  # a row with 2+ ends
  cuts = np.flatnonzero(x[r] == end)
  a, b = cuts[0] + 1, cuts[1] + 1  # the second document of the row: x[r, a:b], its end included
  np.testing.assert_array_equal(seg[r, a:b], seg[r, a])
  assert seg[r, a] == seg[r, a - 1] + 1 and seg[r, b] == seg[r, a] + 1
  np.testing.assert_array_equal(pos[r, a:b], np.arange(b - a))
  model = Decoder(ModelConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4,
                              n_kv_heads=2, d_ff=64), rngs=nnx.Rngs(0))
  packed = model(jnp.asarray(x[r:r + 1]), jnp.asarray(pos[r:r + 1]), jnp.asarray(seg[r:r + 1]))
  alone = model(jnp.asarray(x[r:r + 1, a:b]))
  np.testing.assert_allclose(np.asarray(packed[0, a:b]), np.asarray(alone[0]), atol=1e-5)
  # Without it (GPT-2 style) the row is one causal sequence.
  plain = next(MixtureBatches(srcs, tok, global_batch_size=8, seq_len=96, seed=2,
                              document_masking=False))
  np.testing.assert_array_equal(plain["inputs"], x)
  assert np.all(plain["segment_ids"] == 1) and np.all(plain["positions"] == np.arange(96))


def test_mixture_position_resumes_exactly(sources):
  srcs, tok, _ = sources
  straight = MixtureBatches(srcs, tok, global_batch_size=4, seq_len=32, seed=1)
  for _ in range(37):  # past an epoch of the small source
    next(straight)
  state = json.loads(json.dumps(straight.get_state()))
  want = [next(straight) for _ in range(5)]
  resumed = MixtureBatches(srcs, tok, global_batch_size=4, seq_len=32, seed=1)
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    for k in w:
      np.testing.assert_array_equal(w[k], got[k])
  other = MixtureBatches({"a": srcs["a"]}, tok, global_batch_size=4, seq_len=32, seed=1)
  with pytest.raises(ValueError, match="data.mixture"):
    other.set_state(state)


def test_pretrain_channel_fits_tokenizer_and_learns(sources, tmp_path):
  srcs, _, _ = sources
  args = ["--config=" + os.path.join(ROOT, "configs/pretrain.py:tiny"),
          f"--workdir={tmp_path / 'w'}", "--config.train.steps=30",
          "--config.train.log_every=1", "--config.train.progress=False",
          "--config.checkpoint.every=0", "--config.train.global_batch_size=8",
          "--config.data.seq_len=32", "--config.tokenizer.vocab_size=300",
          "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.d_ff=128",
          "--config.optim.warmup_steps=3"]
  # The config's sources are named "world" and "persona"; overrides fill them in.
  args += [f"--config.data.mixture.world.path={srcs['a']['path']}",
           "--config.data.mixture.world.weight=0.7",
           f"--config.data.mixture.persona.path={srcs['b']['path']}",
           "--config.data.mixture.persona.weight=0.3"]
  config, workdir = parse_argv(args)
  runner.run(config, workdir)
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
  assert (tmp_path / "w" / "tokenizer" / "tokenizer.json").exists()
  stats = json.loads((tmp_path / "w" / "data_stats.json").read_text())
  assert stats["sources"]["persona"]["documents"] == 41
