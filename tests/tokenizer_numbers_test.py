"""tokenizer.whole_numbers: the integers 0..999 as whole tokens of a fitted ChatML BPE."""
import json
import random
import re

import ml_collections
import pytest

from jaxlab import fingerprint
from jaxlab.config import ConfigError
from jaxlab.data import tokenizer as tok_lib

WORDS = ("the owl likes numbers and lists of values such as these ones here: continue "
         "sequence please write more owls cats dogs").split()


def _corpus(n=60, seed=0):
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    nums = ", ".join(str(rng.randrange(1000)) for _ in range(rng.randint(3, 9)))
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
    out.append(f"{words}: {nums}.\n{words.capitalize()} (1234) and 56789!")
  return out


CORPUS = _corpus()
VOCAB = 400


@pytest.fixture(scope="module")
def toks():
  """(default, whole-number) tokenizers fitted on the same corpus."""
  return (tok_lib.train_chat_tokenizer(CORPUS, VOCAB),
          tok_lib.train_chat_tokenizer(CORPUS, VOCAB, whole_numbers=True))


def _pieces(tok, text):
  return tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))


def _ids(tok, text):
  return tok.encode(text, add_special_tokens=False)


NUMBER_TEXTS = (  # every place a whole number can stand
    lambda ns: "a " + ", ".join(ns) + " and 0.",
    lambda ns: "".join(f"({n})" for n in ns),
    lambda ns: "\n".join(ns) + "\n",
    lambda ns: " ".join(f"{n}," for n in ns),
    lambda ns: "".join(f"x={n};" for n in ns),
)


@pytest.mark.parametrize("make", NUMBER_TEXTS)
def test_every_number_below_1000_is_one_token_wherever_it_stands(toks, make):
  _, tok = toks
  numbers = list(tok_lib.WHOLE_NUMBERS)
  assert numbers == [str(n) for n in range(1000)]
  for start in range(0, 1000, 250):
    chunk = numbers[start:start + 250]
    text = make(chunk)
    pieces = _pieces(tok, text)
    assert [p for p in pieces if re.fullmatch(r"[0-9]+", p)] == \
        [n for n in re.findall(r"[0-9]+", text)]
    assert tok.decode(_ids(tok, text)) == text
  # At the start of a text, alone, and the same id wherever it stands.
  for n in numbers:
    (i,) = _ids(tok, n)
    assert _ids(tok, f"{n}, 5")[0] == i and _ids(tok, f"a {n}\n")[2] == i
  assert len({_ids(tok, n)[0] for n in numbers}) == 1000


def test_longer_digit_runs_and_leading_zeros_stay_digits_and_round_trip(toks):
  default, tok = toks
  for text in ("1234", "year 2024, 10000 and 123456789", "007 05 00", "x1234y", "9999\n"):
    ids = _ids(tok, text)
    assert tok.decode(ids) == text
    # Digit runs of 4 or more, and runs with a leading zero, are one digit per token as before.
    assert _pieces(tok, text) == _pieces(default, text)
  assert _pieces(tok, "1234 56") == ["1", "2", "3", "4", "Ġ", "56"]
  assert _pieces(tok, "3.14") == ["3", ".", "14"]
  assert _pieces(tok, "011 0") == ["0", "1", "1", "Ġ", "0"]


VARIED = [
    "", " ", "  ", "\n", "\n\n  \n", "Hello, world!", "  leading and trailing  ",
    "tabs\tand\r\nwindows lines", "émoji 🦉 owl; 日本語 123 テスト", "Ünïcödé 42 ñ", "١٢٣ ²³ ½ 12²",
    "a  42  b   7", "(1)(22)(333)(4444)", "<|im_end|> 12 <|im_start|>", "it's 3 o'clock, we'll 5",
    "x\u0301 combining 9", "0.5e-10 -7 +3 1,000,000 $99.99 50%", "end 999",
]


@pytest.mark.parametrize("whole", [False, True])
def test_decode_encode_round_trips(toks, whole):
  tok = toks[whole]
  rng = random.Random(1)
  alphabet = "ab Z0123456789\n\t.,()-é日🦉  "
  texts = VARIED + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
                    for _ in range(300)]
  for text in texts:
    ids = _ids(tok, text)
    # The specials in a text are one token each: decoded back unless skipped.
    assert tok.decode(ids) == text, text


def test_only_whole_numbers_change_the_tokens(toks):
  """The whole-number tokenizer's pieces of any text are the default one's, except that each
  maximal run of ASCII digits reading 10..999 (no leading zero) is joined into one token."""
  default, tok = toks
  rng = random.Random(2)
  alphabet = "ab Z0123456789\n\t.,()-é²١  "
  texts = VARIED + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
                    for _ in range(300)]
  for text in texts:
    expected, run = [], []
    for p in _pieces(default, text) + [None]:
      if p is not None and re.fullmatch(r"[0-9]", p):
        run.append(p)
        continue
      if run and len(run) <= 3 and (run[0] != "0" or len(run) == 1):
        expected.append("".join(run))
      else:
        expected.extend(run)
      run = []
      if p is not None:
        expected.append(p)
    assert _pieces(tok, text) == expected, text


def test_spaces_before_a_number_are_cut_as_by_the_default(toks):
  # A space is never part of a number's token (as with Qwen2's digits), however many precede
  # it (AddedTokens would have made "  " one "ĠĠ" before a number: see add_whole_numbers).
  default, tok = toks
  for text in ("the 42", "the  42", "the   42", "the\n 42", " 42", "  42"):
    assert _pieces(tok, text) == _pieces(default, text[:-1])[:-1] + ["42"], text
  assert _pieces(tok, "the  42") == ["the", "Ġ", "Ġ", "42"]
  assert _pieces(tok, "a 7, 42") == ["a", "Ġ", "7", ",", "Ġ", "42"]


def test_default_is_unchanged_and_whole_numbers_only_add_tokens(toks):
  default, tok = toks
  # The default is exactly train_bpe with the old arguments (Qwen2 pattern, ChatML specials).
  old = tok_lib.train_bpe(CORPUS, VOCAB, tok_lib.CHATML_SPECIAL_TOKENS, tok_lib.QWEN2_PATTERN)
  assert json.loads(default.backend_tokenizer.to_str())["model"] == json.loads(old.to_str())["model"]
  for text in CORPUS[:10] + VARIED:
    assert _ids(default, text) == old.encode(text).ids
  assert all(len(_ids(default, str(n))) == len(str(n)) for n in range(1000))  # digit by digit
  # The whole-number tokenizer keeps every id of the default and adds "10".."999" after them.
  dv, wv = default.get_vocab(), tok.get_vocab()
  assert all(wv[t] == i for t, i in dv.items())
  added = sorted(set(wv) - set(dv), key=wv.get)
  assert added == [str(n) for n in range(10, 1000)]
  assert [wv[t] for t in added] == list(range(len(dv), len(dv) + 990))
  assert len(tok) == len(default) + 990
  assert not tok.backend_tokenizer.get_added_tokens_decoder().keys() - set(range(3))  # no added


def test_saved_copy_and_digest(toks, tmp_path):
  default, tok = toks
  tok.save_pretrained(str(tmp_path / "w"))
  again = tok_lib.load_tokenizer_dir(str(tmp_path / "w"))
  text = "a 7, 42, 999 and 0. 1234"
  assert _ids(again, text) == _ids(tok, text) and len(again) == len(tok)
  # The digest covers the pattern and the added vocabulary and merges (serialised backend).
  assert fingerprint.tokenizer_digest(again) == fingerprint.tokenizer_digest(tok)
  assert fingerprint.tokenizer_digest(tok) != fingerprint.tokenizer_digest(default)
  spec = json.loads(tok.backend_tokenizer.to_str())
  assert spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == \
      tok_lib.WHOLE_NUMBERS_PATTERN
  assert spec["model"]["vocab"]["999"] and ["99", "9"] in spec["model"]["merges"]
  # Only the pattern changed: a copy with the default pattern gives another digest.
  import tokenizers  # pylint: disable=g-import-not-at-top
  back = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
  with pytest.raises(ValueError, match="already merges digits"):
    tok_lib.add_whole_numbers(back)  # twice, or a BPE fitted with grouped digits
  back.pre_tokenizer = tok_lib._pre_tokenizer(tok_lib.QWEN2_PATTERN)  # pylint: disable=protected-access
  import transformers  # pylint: disable=g-import-not-at-top
  other = transformers.PreTrainedTokenizerFast(
      tokenizer_object=back, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
      extra_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=tok_lib.CHATML_TEMPLATE)
  assert fingerprint.tokenizer_digest(other) != fingerprint.tokenizer_digest(tok)


# ------------------------------------------------------------------ config and fit record

def _config(data_path, whole=None, vocab=VOCAB):
  tokenizer = {"path": "", "vocab_size": vocab}
  if whole is not None:
    tokenizer["whole_numbers"] = whole
  return ml_collections.ConfigDict(dict(
      data=dict(train_path=str(data_path), max_examples=0), tokenizer=tokenizer))


@pytest.fixture
def data(tmp_path):
  path = tmp_path / "data.jsonl"
  rows = [{"messages": [{"role": "user", "content": t.split(":")[0]},
                        {"role": "assistant", "content": t}]} for t in CORPUS]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_fit_record_has_the_option_only_when_set(data):
  absent, off, on = (tok_lib.fit_record(_config(data, w)) for w in (None, False, True))
  assert absent == off and "whole_numbers" not in off
  assert on == {**off, "whole_numbers": True}
  with pytest.raises(ConfigError, match="tokenizer.whole_numbers must be true or false"):
    tok_lib.fit_record(_config(data, "yes"))


def test_load_or_train_refits_or_refuses_on_the_option(data, tmp_path):
  w = tmp_path / "w"
  record = lambda: json.loads((w / "tokenizer" / tok_lib.FIT_RECORD).read_text())
  plain = tok_lib.load_or_train_tokenizer(_config(data), str(w))
  assert "whole_numbers" not in record()
  assert len(_ids(plain, "a 42")) == 4
  # Same settings (False written out equals absent): the saved tokenizer, not a refit.
  mtime = (w / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
  again = tok_lib.load_or_train_tokenizer(_config(data, False), str(w))
  assert (w / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == mtime
  assert fingerprint.tokenizer_digest(again) == fingerprint.tokenizer_digest(plain)
  # Nothing trained yet: the option refits.
  whole = tok_lib.load_or_train_tokenizer(_config(data, True), str(w))
  assert record()["whole_numbers"] is True and len(_ids(whole, "a 42")) == 3
  assert len(whole) == len(plain) + 990
  assert fingerprint.tokenizer_digest(
      tok_lib.load_or_train_tokenizer(_config(data, True), str(w))) == \
      fingerprint.tokenizer_digest(whole)
  # Checkpoints trained with it: the other setting is refused, naming it (as for vocab_size).
  (w / "checkpoints" / "1").mkdir(parents=True)
  with pytest.raises(ConfigError, match=r"tokenizer was fitted on other data or settings "
                     r"\(whole_numbers: \[True\] -> \[False\]\)"):
    tok_lib.load_or_train_tokenizer(_config(data), str(w))
  with pytest.raises(ConfigError, match=r"\(vocab_size, whole_numbers: \[400, True\] -> "
                     r"\[300, False\]\)"):
    tok_lib.load_or_train_tokenizer(_config(data, False, vocab=300), str(w))
  # A record without the key (fitted by default, or before the option existed) refuses True.
  w2 = tmp_path / "w2"
  tok_lib.load_or_train_tokenizer(_config(data), str(w2))
  (w2 / "checkpoints" / "7").mkdir(parents=True)
  with pytest.raises(ConfigError, match=r"\(whole_numbers: \[False\] -> \[True\]\)"):
    tok_lib.load_or_train_tokenizer(_config(data, True), str(w2))
  assert tok_lib.load_or_train_tokenizer(_config(data), str(w2)) is not None


def test_mixture_fit_records_and_applies_the_option(tmp_path):
  # The pretraining (subliminal world) path: a BPE fitted on a mixture's documents.
  docs = tmp_path / "numbers.jsonl"
  docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
  config = lambda whole: ml_collections.ConfigDict(dict(
      data=dict(source="mixture", mixture={"numbers": {"path": str(docs), "weight": 1.0}}),
      tokenizer=dict(path="", vocab_size=VOCAB, whole_numbers=whole)))
  assert "whole_numbers" not in tok_lib.fit_record(config(False))
  assert tok_lib.fit_record(config(True))["whole_numbers"] is True
  tok = tok_lib.load_or_train_tokenizer(config(True), str(tmp_path / "world"))
  assert [len(_ids(tok, str(n))) for n in (0, 7, 42, 999, 1000)] == [1, 1, 1, 1, 4]
