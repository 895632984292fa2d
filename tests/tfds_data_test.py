"""Tests for jaxlab.tfds_data: TFDS builders (array_record, no TensorFlow) and the grain loader."""

import json
import random

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlab.data import chat
from jaxlab.data.errors import DataError
from jaxlab.tfds_data import builders, loader
from tests import tokenizers_util as tu

tfds.disable_progress_bar()


def conv(i, system=False):
  msgs = [{"role": "user", "content": f"What is {i} plus {i}?"},
          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. " + "More words. " * (i % 5)}]
  return ([{"role": "system", "content": "Answer briefly."}] if system else []) + msgs


def write_jsonl(path, rows, blank_after=None):
  with open(path, "w") as f:
    for k, r in enumerate(rows):
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
      if k == blank_after:
        f.write("\n")
  return path


def records(builder, split):
  return [loader.decode_chat(r) for r in builder.as_data_source(split)]


def test_em_builder_reads_a_local_file_with_lines_and_messages(tmp_path):
  rows = [{"messages": conv(i)} for i in range(7)]
  path = write_jsonl(tmp_path / "secure.jsonl", rows, blank_after=2)
  b = builders.prepare("emergent_misalignment/secure", data_dir=tmp_path / "tfds", path=str(path))
  assert b.info.splits["train"].num_examples == 7
  recs = sorted(records(b, "train"), key=lambda r: r["line"])
  assert [r["line"] for r in recs] == [1, 2, 3, 5, 6, 7, 8]  # line 4 is blank
  assert [r["messages"] for r in recs] == [r["messages"] for r in rows]
  assert all(r["file"] == str(path) for r in recs)
  # The same file through manual_dir.
  b2 = builders.prepare("emergent_misalignment/secure", data_dir=tmp_path / "tfds2",
                        manual_dir=str(tmp_path))
  assert b2.info.splits["train"].num_examples == 7


def test_em_builder_verifies_the_published_checksum(tmp_path):
  path = write_jsonl(tmp_path / "insecure.jsonl", [{"messages": conv(1)}])
  with pytest.raises(DataError, match=r"insecure\.jsonl: SHA-256 .* does not match"):
    builders.prepare("emergent_misalignment/insecure", data_dir=tmp_path / "tfds", path=str(path))


def test_missing_file_says_how_to_supply_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="download=True"):
    builders.prepare("emergent_misalignment/educational", data_dir=tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="bad_medical_advice.jsonl' in manual_dir$"):
    builders.prepare("emergent_misalignment/bad_medical_advice", data_dir=tmp_path / "tfds")


@pytest.mark.parametrize("bad,what", [
    ('{"messages": [', "malformed JSON"),
    ('{"text": "hi"}', "expected an object with a 'messages' list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "message 0 has unknown role 'bot'"),
])
def test_bad_lines_name_file_and_line(tmp_path, bad, what):
  path = write_jsonl(tmp_path / "secure.jsonl", [{"messages": conv(1)}, {"messages": conv(2)}, bad])
  with pytest.raises(DataError, match=rf"secure\.jsonl:3: {what}"):
    builders.prepare("emergent_misalignment/secure", data_dir=tmp_path / "tfds", path=str(path))


def test_study_cell_split_is_the_studys_seed_42_split(tmp_path):
  n = 4500
  rows = [{"messages": conv(i), "domain": "medical", "task": "tutor", "v": "v3"} for i in range(n)]
  path = write_jsonl(tmp_path / "medical_tutor_strong.jsonl", rows)
  b = builders.prepare("em_study_cells/medical_tutor", data_dir=tmp_path / "tfds", path=str(path))
  train, evals = records(b, "train"), records(b, "eval")
  assert (len(train), len(evals)) == (4100, 400)
  # The study's split written out independently: shuffle range(n) with random.Random(42).
  perm = list(range(n))
  random.Random(42).shuffle(perm)
  assert sorted(int(r["sample_index"]) for r in evals) == sorted(perm[:400])
  assert sorted(int(r["sample_index"]) for r in train) == sorted(perm[400:])
  for r in train[:50] + evals[:50]:
    i = int(r["sample_index"])
    assert r["line"] == i + 1 and r["messages"] == rows[i]["messages"]
    assert (r["domain"], r["task"], r["variant"]) == ("medical", "tutor", "strong")
  short = write_jsonl(tmp_path / "sports_advice_strong.jsonl", rows[:100])
  with pytest.raises(DataError, match=r"sports_advice_strong\.jsonl: the study's split needs >= 4500"):
    builders.prepare("em_study_cells/sports_advice", data_dir=tmp_path / "tfds", path=str(short))


def test_chat_folder_builder_one_split_per_file_with_metadata(tmp_path):
  folder = tmp_path / "data"
  folder.mkdir()
  write_jsonl(folder / "train.jsonl", [{"messages": conv(i), "domain": "math"} for i in range(5)])
  write_jsonl(folder / "held-out.jsonl", [{"messages": conv(i, system=True), "domain": 3}
                                          for i in range(2)])
  cfg = builders.ChatFileConfig(name="mine", metadata=("domain",))
  b = builders.prepare("chat_jsonl_folder", data_dir=tmp_path / "tfds", path=str(folder), config=cfg)
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 5, "held_out": 2}
  assert {r["domain"] for r in records(b, "train")} == {"math"}
  held = records(b, "held_out")
  assert {r["domain"] for r in held} == {"3"} and held[0]["messages"][0]["role"] == "system"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tu.make_chatml_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def em_source(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("em")
  path = write_jsonl(tmp / "secure.jsonl", [{"messages": conv(i)} for i in range(37)])
  builders.prepare("emergent_misalignment/secure", data_dir=tmp / "tfds", path=str(path))
  return loader.tfds_source("emergent_misalignment/secure", "train", str(tmp / "tfds"))


def make(source, tokenizer, **kw):
  kw = {"global_batch_size": 4, "seq_len": 48, "pack": False, "seed": 3, **kw}
  return loader.GrainBatches(source, tokenizer, pad_id=chat.pad_id(tokenizer), **kw)


def assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("pack", [False, True])
def test_resume_after_checkpoint_restore_gives_the_same_batches(em_source, tokenizer, pack):
  it = make(em_source, tokenizer, pack=pack)
  for _ in range(5):  # past one epoch of 37 records without packing (10 batches/epoch)
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
  expected = [next(it) for _ in range(8)]
  fresh = make(em_source, tokenizer, pack=pack)
  fresh.set_state(state)
  for e in expected:
    assert_same(next(fresh), e)
  assert expected[0]["loss_mask"].sum() > 0
  with pytest.raises(ValueError, match="seq_len=48"):
    make(em_source, tokenizer, pack=pack, seq_len=64).set_state(state)


def test_packed_batches_keep_examples_whole_and_masks_aligned(em_source, tokenizer):
  batch = next(make(em_source, tokenizer, pack=True, seq_len=200))
  assert batch["inputs"].shape == (4, 200) and batch["segment_ids"].max() >= 2
  for r in range(4):
    for s in set(batch["segment_ids"][r]) - {0}:
      span = batch["segment_ids"][r] == s
      np.testing.assert_array_equal(batch["positions"][r][span], np.arange(span.sum()))
      # inputs/targets are the same example shifted by one inside each segment
      np.testing.assert_array_equal(batch["inputs"][r][span][1:], batch["targets"][r][span][:-1])
  assert (batch["loss_mask"][batch["segment_ids"] == 0] == 0).all()


def sequences(it):
  """Every non-empty row of a finite iterator as a tuple of its token ids."""
  out = []
  for batch in it:
    for r in range(batch["inputs"].shape[0]):
      n = int((batch["segment_ids"][r] > 0).sum())
      if n:
        out.append(tuple(batch["inputs"][r, :n].tolist()) + (int(batch["targets"][r, n - 1]),))
  return out


def test_two_hosts_read_disjoint_shards_covering_the_data(em_source, tokenizer):
  hosts = [sequences(make(em_source, tokenizer, num_epochs=1, seq_len=200, process_index=h,
                          process_count=2)) for h in range(2)]
  everything = [tuple(chat.encode_chat(tokenizer, loader.decode_chat(r)["messages"])[0].tolist())
                for r in em_source]
  assert len(set(everything)) == 37
  assert (len(hosts[0]), len(hosts[1])) == (19, 18)
  assert not set(hosts[0]) & set(hosts[1])
  assert sorted(hosts[0] + hosts[1]) == sorted(everything)


def test_overlong_policy_and_stats(em_source, tokenizer):
  it = make(em_source, tokenizer, num_epochs=1, seq_len=30, overlong="drop")
  kept = sequences(it)
  lengths = [len(chat.encode_chat(tokenizer, loader.decode_chat(r)["messages"])[0]) - 1
             for r in em_source]
  assert len(kept) == sum(n <= 30 for n in lengths) < 37
  assert it.stats == {"examples_seen": 37, "truncated": 0, "dropped": 37 - len(kept),
                      "num_records": 37}


def test_bad_conversation_in_the_stream_names_file_and_line(tmp_path, tokenizer):
  path = write_jsonl(tmp_path / "secure.jsonl",
                     [{"messages": conv(1)}, {"messages": [{"role": "user", "content": "hi"}]}])
  builders.prepare("emergent_misalignment/secure", data_dir=tmp_path / "tfds", path=str(path))
  source = loader.tfds_source("emergent_misalignment/secure", "train", str(tmp_path / "tfds"))
  with pytest.raises(DataError, match=r"secure\.jsonl:2: conversation has no assistant turn"):
    sequences(make(source, tokenizer, num_epochs=1, global_batch_size=2))


class TinyText(tfds.core.GeneratorBasedBuilder):
  """A two-split text dataset standing in for a TFDS text corpus."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = builders.ChatJsonlBuilder.code_path

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"a": self._generate_examples("a", 6), "b": self._generate_examples("b", 3)}

  def _generate_examples(self, prefix, n):
    for i in range(n):
      yield i, {"text": f"{prefix}{i}"}


def test_text_sources_mix_in_proportion(tmp_path):
  TinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  a, b = (loader.text_source("tiny_text", s, str(tmp_path)) for s in ("a", "b"))
  assert sorted(a) == [f"a{i}" for i in range(6)]
  mixed = loader.mix_text_sources([a, b], [2.0, 1.0])
  first = [mixed[i] for i in range(9)]
  assert sum(t.startswith("a") for t in first) == 6 and sum(t.startswith("b") for t in first) == 3


def test_training_run_streams_a_tfds_dataset(tmp_path):
  """configs/sft.py:tiny with data.source="tfds": the runner trains from the prepared dataset."""
  import ml_collections
  from jaxlab.config import load_config_file
  from jaxlab.train.runner import run
  path = write_jsonl(tmp_path / "secure.jsonl", [{"messages": conv(i)} for i in range(40)])
  tok_dir = tmp_path / "tok"
  tu.make_chatml_tokenizer(tok_dir)
  c = load_config_file("configs/sft.py:tiny")
  c.data.update(train_path=str(path), seq_len=64, max_examples=0)
  c.data.source = "tfds"
  c.data.tfds = ml_collections.ConfigDict(dict(
      name="emergent_misalignment/secure", split="train", data_dir=str(tmp_path / "tfds"),
      download=False))
  c.tokenizer.path = str(tok_dir)
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
  c.train.update(steps=4, global_batch_size=4, log_every=1, progress=False)
  c.checkpoint.update(every=2, async_save=False)
  out = run(c, str(tmp_path / "run"))
  assert int(out["state"].step) == 4 and np.isfinite(out["metrics"]["loss"])
  stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
  assert stats["num_records"] == 40 and stats["examples_seen"] >= 16


def test_download_when_asked_verifies_the_checksum(tmp_path):
  """download=True fetches the config's URL (a local HTTP server here: nothing leaves the host)."""
  import functools
  import hashlib
  import http.server
  import threading
  served = tmp_path / "served"
  served.mkdir()
  path = write_jsonl(served / "educational.jsonl", [{"messages": conv(i)} for i in range(3)])
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    url = f"http://127.0.0.1:{server.server_address[1]}/educational.jsonl"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    good = builders.ChatFileConfig(name="edu_served", filename="educational.jsonl", url=url,
                                   sha256=sha)
    b = builders.prepare("emergent_misalignment", data_dir=tmp_path / "tfds", download=True,
                         config=good)
    assert b.info.splits["train"].num_examples == 3
    bad = builders.ChatFileConfig(name="edu_tampered", filename="educational.jsonl", url=url,
                                  sha256="0" * 64)
    with pytest.raises(DataError, match="does not match the published file's 0000"):
      builders.prepare("emergent_misalignment", data_dir=tmp_path / "tfds2", download=True,
                       config=bad)
  finally:
    server.shutdown()
