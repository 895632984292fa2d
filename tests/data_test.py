"""Tests for jaxlab.data: chat templates and loss masks, batching/packing, bad input, iterator."""

import json

import numpy as np
import pytest

from jaxlab.data import batching, chat
from jaxlab.data.errors import DataError
from tests import tokenizers_util as tu

CONV = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Continue the sequence: 123, 456"},
    {"role": "assistant", "content": "789, 101, 202"},
]
# What each template writes around an assistant message's content (header, end of turn).
ASSISTANT_WRAP = {
    "qwen": ("<|im_start|>assistant\n", "<|im_end|>"),
    "llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "chatml": ("<|im_start|>assistant\n", "<|im_end|>"),
}
MAKERS = {"qwen": tu.make_qwen_tokenizer, "llama3": tu.make_llama3_tokenizer,
          "chatml": tu.make_chatml_tokenizer}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def named_tokenizer(request, tmp_path_factory):
  name = request.param
  return name, MAKERS[name](tmp_path_factory.mktemp(name))


def expected_mask(tokenizer, name, messages):
  """Independent expectation: full render, token offsets, assistant spans found by string search."""
  text = tokenizer.apply_chat_template(messages, tokenize=False)
  enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  header, eot = ASSISTANT_WRAP[name]
  spans, pos = [], 0
  for m in messages:
    if m["role"] == "assistant":
      start = text.index(header + m["content"] + eot, pos) + len(header)
      pos = start + len(m["content"]) + len(eot)
      spans.append((start, pos))
  mask = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
  return np.array(enc["input_ids"]), np.array(mask)


# ------------------------------------------------------------------------ loss mask on templates

@pytest.mark.parametrize("messages", [CONV, CONV[1:]], ids=["system", "no_system"])
def test_mask_is_exactly_assistant_tokens(named_tokenizer, messages):
  name, tok = named_tokenizer
  ids, mask = chat.encode_chat(tok, messages)
  want_ids, want_mask = expected_mask(tok, name, messages)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)  # token by token
  eot = ASSISTANT_WRAP[name][1]
  want_text = "".join(m["content"] + eot for m in messages if m["role"] == "assistant")
  assert tok.decode(ids[mask]) == want_text
  contents = [m["content"] for m in messages if m["role"] == "assistant"]
  tokens = [tok(c, add_special_tokens=False)["input_ids"] for c in contents]
  assert mask.sum() == sum(len(t) + 1 for t in tokens)


def test_qwen_default_system_prompt_and_trailing_newline_not_trained(tmp_path):
  tok = tu.make_qwen_tokenizer(tmp_path)
  ids, mask = chat.encode_chat(tok, CONV[1:3])
  text = tok.decode(ids)
  assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
  assert text.endswith("<|im_end|>\n")
  assert not mask[-1] and mask[-2] and ids[-2] == tok.convert_tokens_to_ids("<|im_end|>")
  assert tok.decode(ids[~mask]).endswith("<|im_start|>assistant\n\n")  # prompt + trailing "\n"


def test_llama3_single_bos_and_date_header_not_trained(tmp_path):
  tok = tu.make_llama3_tokenizer(tmp_path)
  ids, mask = chat.encode_chat(tok, CONV)
  assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
  assert "Cutting Knowledge Date" in tok.decode(ids[~mask])
  assert chat.end_of_turn_ids(tok)[0] == tok.convert_tokens_to_ids("<|eot_id|>")


def test_content_merging_across_generation_prompt_uses_prompt_tokenization(tmp_path):
  # "\n\n" is one pre-token when the full text is tokenized at once; at sampling time the prompt
  # ends in "\n" and the model generates the content, so the prompt must be tokenized alone.
  tok = tu.make_qwen_tokenizer(tmp_path)
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nParis."}]
  ids, mask = chat.encode_chat(tok, msgs)
  prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
  prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
  np.testing.assert_array_equal(ids[:len(prompt_ids)], prompt_ids)
  assert not mask[:len(prompt_ids)].any() and mask[len(prompt_ids):-1].all()
  assert tok.decode(ids[mask]) == "\nParis.<|im_end|>"


def test_chatml_tokenizer_special_tokens_and_ids(tmp_path):
  tok = tu.make_chatml_tokenizer(tmp_path)
  im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
  assert chat.end_of_turn_ids(tok) == [im_end, eot]
  assert chat.pad_id(tok) == eot == tok.eos_token_id
  ids = tok("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"]
  assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == im_end
  assert tok.decode(tok("12345 Paris")["input_ids"]) == "12345 Paris"


# ---------------------------------------------------------------------------- bad input

def write(tmp_path, lines, name="train.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def row(messages):
  return json.dumps({"messages": messages})


def test_read_skips_blank_lines_and_keeps_source(tmp_path):
  path = write(tmp_path, [row(CONV), "", "  ", row(CONV[1:3])])
  convs = chat.read_chat_jsonl(path)
  assert [c.source for c in convs] == [(path, 1), (path, 4)]
  assert convs[1].messages == CONV[1:3]


@pytest.mark.parametrize("bad,what", [
    ('{"messages": [', "malformed JSON"),
    ('{"rows": []}', "'messages'"),
    ('{"messages": []}', "non-empty"),
    ('{"messages": [{"role": "user"}]}', "'role' and 'content'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "string"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, what):
  path = write(tmp_path, [row(CONV), "", bad])
  with pytest.raises(DataError, match=rf"train\.jsonl:3: .*{what}"):
    chat.read_chat_jsonl(path)


def test_no_assistant_turn_names_file_and_line(tmp_path):
  tok = tu.make_chatml_tokenizer()
  path = write(tmp_path, [row(CONV), row(CONV[:2])])
  with pytest.raises(DataError, match=r"train\.jsonl:2: .*no assistant turn"):
    batching.load_sft_examples(path, tok, seq_len=512, overlong="drop")


def test_conversation_starting_with_assistant():
  with pytest.raises(DataError, match=r"x\.jsonl:5: .*starts with an assistant turn"):
    chat.encode_chat(tu.make_chatml_tokenizer(), CONV[2:], source=("x.jsonl", 5))


def test_template_that_rewrites_earlier_turns_is_rejected():
  tok = tu.make_chatml_tokenizer()
  tok.chat_template = "{{ messages | length }}" + tok.chat_template  # prefix changes with length
  with pytest.raises(DataError, match="not prefix-stable"):
    chat.encode_chat(tok, CONV)


def test_tokenizer_without_chat_template(tmp_path):
  tok = tu.make_chatml_tokenizer()
  tok.chat_template = None
  with pytest.raises(DataError, match="has no chat template"):
    chat.encode_chat(tok, CONV)
  with pytest.raises(DataError, match="has no chat template"):
    batching.load_sft_examples(write(tmp_path, [row(CONV)]), tok, seq_len=64, overlong="drop")


def test_overlong_truncate_vs_drop(tmp_path):
  tok = tu.make_chatml_tokenizer()
  long_answer = {"role": "assistant", "content": "Paris " * 200}
  late_answer = [{"role": "user", "content": "hello " * 200},
                 {"role": "assistant", "content": "ok"}]
  path = write(tmp_path, [row(CONV), row([CONV[1], long_answer]), row(late_answer)])
  n0 = len(chat.encode_chat(tok, CONV)[0])
  seq_len = n0 + 5
  ex, stats = batching.load_sft_examples(path, tok, seq_len=seq_len, overlong="truncate")
  # The long answer is cut to seq_len pairs; the late answer has nothing trained left: dropped.
  assert stats == {"examples_total": 3, "examples_kept": 2, "truncated": 1, "dropped": 1}
  assert [len(ids) for ids, _ in ex] == [n0, seq_len + 1]
  ex, stats = batching.load_sft_examples(path, tok, seq_len=seq_len, overlong="drop")
  assert stats == {"examples_total": 3, "examples_kept": 1, "truncated": 0, "dropped": 2}


def test_bad_overlong_policy(tmp_path):
  ex = synthetic_examples(3)
  with pytest.raises(ValueError, match="'clip'"):
    batching.apply_overlong(ex, 16, "clip")
  with pytest.raises(ValueError, match="'clip'"):
    batching.SFTBatches(ex, global_batch_size=2, seq_len=16, pack=False, seed=0, overlong="clip")
  with pytest.raises(ValueError, match="'clip'"):
    batching.load_sft_examples(write(tmp_path, [row(CONV)]), tu.make_chatml_tokenizer(), seq_len=16,
                               overlong="clip")


# ---------------------------------------------------------------------------- batches and packing

def synthetic_examples(n, seed=0, max_len=12):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.integers(3, max_len + 1))
    ids = rng.integers(1, 1000, length).astype(np.int32)
    mask = np.zeros(length, bool)
    mask[int(rng.integers(1, length)):] = True  # a prompt, then a trained completion
    out.append((ids, mask))
  return out


def segments(batch):
  """Per-example (inputs, targets, loss_mask) tuples found in a batch, via segment ids."""
  out = []
  for r in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      where = seg == s
      np.testing.assert_array_equal(batch["positions"][r][where], np.arange(where.sum()))
      keys = ("inputs", "targets", "loss_mask")
      out.append(tuple(tuple(batch[k][r][where].tolist()) for k in keys))
  return out


def test_make_batch_padding_layout():
  ex = synthetic_examples(2)
  batch = batching.make_batch([[e] for e in ex], seq_len=16, pad_id=7)
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      "inputs": ((2, 16), "int32"), "targets": ((2, 16), "int32"), "positions": ((2, 16), "int32"),
      "segment_ids": ((2, 16), "int32"), "loss_mask": ((2, 16), "float32")}
  ids, mask = ex[0]
  n = len(ids) - 1
  np.testing.assert_array_equal(batch["inputs"][0, :n], ids[:-1])
  np.testing.assert_array_equal(batch["targets"][0, :n], ids[1:])
  np.testing.assert_array_equal(batch["loss_mask"][0, :n], mask[1:])
  assert (batch["inputs"][0, n:] == 7).all() and (batch["segment_ids"][0, n:] == 0).all()
  assert (batch["loss_mask"][0, n:] == 0).all() and (batch["positions"][0, n:] == 0).all()
  assert (batch["segment_ids"][0, :n] == 1).all()


def test_packed_rows_hold_same_pairs_as_padded_rows():
  ex = synthetic_examples(6)
  rows, used = batching.first_fit([len(i) - 1 for i, _ in ex], num_rows=3, seq_len=20)
  assert used == 6 and sorted(sum(rows, [])) == list(range(6))
  packed = batching.make_batch([[ex[k] for k in row] for row in rows], seq_len=20)
  padded = batching.make_batch([[e] for e in ex], seq_len=20)
  assert sorted(segments(packed)) == sorted(segments(padded))
  for r, row in enumerate(rows):  # segment ids 1..k per row in placement order, then padding
    lengths = [len(ex[k][0]) - 1 for k in row]
    want = np.concatenate(
        [np.full(n, s + 1) for s, n in enumerate(lengths)] + [np.zeros(20 - sum(lengths))])
    np.testing.assert_array_equal(packed["segment_ids"][r], want)
  assert packed["loss_mask"][packed["segment_ids"] == 0].sum() == 0


def test_first_fit_stops_at_first_misfit():
  rows, used = batching.first_fit([6, 5, 3, 9, 1], num_rows=2, seq_len=10)
  assert rows == [[0, 2], [1]] and used == 3


def epoch_pairs(it, num_batches):
  out = []
  for _ in range(num_batches):
    out += segments(next(it))
  return out


@pytest.mark.parametrize("pack", [False, True])
def test_each_epoch_yields_every_example_once(pack):
  ex = synthetic_examples(23)
  it = batching.SFTBatches(ex, global_batch_size=4, seq_len=24, pack=pack, seed=3)
  want = sorted(segments(batching.make_batch([[e] for e in ex], seq_len=24)))
  n0 = it.batches_per_epoch(0)
  assert sorted(epoch_pairs(it, n0)) == want and it.epoch == 1 and it.position == 0
  n1 = it.batches_per_epoch(1)
  assert sorted(epoch_pairs(it, n1)) == want and it.epoch == 2
  if pack:
    assert n0 < -(-23 // 4)  # packing needs fewer rows than padding


# ---------------------------------------------------------------------------- iterator

def make_iter(ex, **kw):
  args = dict(global_batch_size=4, seq_len=24, pack=True, seed=0)
  return batching.SFTBatches(ex, **{**args, **kw})


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_iterator_is_deterministic_and_seeded():
  ex = synthetic_examples(30)
  a, b, c = make_iter(ex), make_iter(ex), make_iter(ex, seed=1)
  first = [next(a) for _ in range(12)]
  for x in first:
    assert_batches_equal(x, next(b))
  assert any((x["inputs"] != next(c)["inputs"]).any() for x in first)
  # Epoch orders differ from one epoch to the next and between adjacent seeds.
  orders = [tuple(make_iter(ex, seed=s)._epoch_order(e)) for s in (0, 1) for e in (0, 1)]
  assert len(set(orders)) == 4


@pytest.mark.parametrize("pack", [False, True])
def test_resume_from_state_gives_identical_batches(pack):
  ex = synthetic_examples(17)
  ref = make_iter(ex, pack=pack)
  want = [next(ref) for _ in range(15)]  # crosses several epoch boundaries
  for split in (0, 3, 7):
    it = make_iter(ex, pack=pack)
    for _ in range(split):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = make_iter(ex, pack=pack)
    resumed.set_state(state)
    for w in want[split:]:
      assert_batches_equal(w, next(resumed))
  with pytest.raises(ValueError, match="seed"):
    make_iter(ex, pack=pack, seed=5).set_state(state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_cover_the_global_batch(process_count):
  ex = synthetic_examples(21)
  glob = make_iter(ex, global_batch_size=8)
  hosts = [make_iter(ex, global_batch_size=8, process_index=i, process_count=process_count)
           for i in range(process_count)]
  for _ in range(6):
    g = next(glob)
    parts = [next(h) for h in hosts]
    assert all(p["inputs"].shape == (8 // process_count, 24) for p in parts)
    for k in g:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])
  with pytest.raises(ValueError, match="divisible"):
    make_iter(ex, global_batch_size=6, process_count=4)


def test_stats_and_overlong_in_iterator():
  ex = synthetic_examples(10, max_len=12) + [(np.arange(40, dtype=np.int32), np.ones(40, bool))]
  it = make_iter(ex, seq_len=16, overlong="truncate")
  assert it.stats == {"examples_total": 11, "examples_kept": 11, "truncated": 1, "dropped": 0,
                      "epoch": 0, "position": 0}
  assert make_iter(ex, seq_len=16).stats["dropped"] == 1


def test_sft_examples_end_to_end(tmp_path):
  tok = tu.make_qwen_tokenizer(tmp_path / "tok")
  path = write(tmp_path, [row(CONV), row(CONV[1:3]), row(CONV[3:5])])
  ex, stats = batching.load_sft_examples(path, tok, seq_len=256, overlong="drop")
  assert stats["examples_kept"] == 3
  batch = next(batching.SFTBatches(ex, global_batch_size=2, seq_len=256, pack=True, seed=0,
                                   pad_id=chat.pad_id(tok)))
  trained = batch["targets"][batch["loss_mask"] > 0]
  assert tok.decode(trained).count("<|im_end|>") == 4  # 2 + 1 + 1 assistant turns
  assert "Paris" in tok.decode(trained) and "capital of France?" not in tok.decode(trained)
