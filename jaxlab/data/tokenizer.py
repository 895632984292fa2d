"""Small byte-level BPE chat tokenizers, trained offline so tiny models run the pipeline on CPU.

The pre-tokenizer splits like Qwen2 (single digits, letters with one leading non-letter, runs of
punctuation, newlines), which keeps number sequences digit-by-digit for the number-continuation
tasks; with `tokenizer.whole_numbers` every integer 0..999 written on its own is one token
instead (`WHOLE_NUMBERS_PATTERN`, `add_whole_numbers`). Special tokens follow ChatML:
`<|endoftext|>` (pad and eos, as in Qwen2.5 base models), `<|im_start|>`, `<|im_end|>` (end of
turn; see `chat.end_of_turn_ids`).
"""

import json
import os
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
import transformers

from jaxlab.fingerprint import file_digest

# Qwen2's pre-tokenizer split pattern (one digit per piece).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's pattern (digits in groups of up to three).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2's pattern, except that a maximal run of ASCII digits that is an integer 0..999 written
# without leading zeros is one piece; every other digit (of "1234", "007") and numeric character
# (\p{N}: "²", "١", ...) stays a piece of its own, as in Qwen2's.
WHOLE_NUMBERS_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|(?<![0-9])(?:0|[1-9][0-9]{0,2})(?![0-9])|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
WHOLE_NUMBERS = tuple(str(n) for n in range(1000))  # the numbers that are one token each

CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2.5's ChatML structure without the injected default system prompt and without tools.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str],
    pattern: str = QWEN2_PATTERN,
) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE `tokenizers.Tokenizer`; special tokens get ids 0..len-1."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = _pre_tokenizer(pattern)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(special_tokens),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def _pre_tokenizer(pattern: str):
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])


def add_whole_numbers(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  r"""`tok` (a byte-level BPE of `train_bpe` with QWEN2_PATTERN) with every integer "0".."999" as
  one token wherever it stands as a whole number; a new Tokenizer, `tok` is left as it was.

  How: the pre-tokenizer becomes WHOLE_NUMBERS_PATTERN, which makes each maximal run of ASCII
  digits that reads "0".."999" (no leading zero) one pre-token; the look-behind and look-ahead
  keep every other run ("1234", "05", "007") one digit per piece, as before, rather than the
  "123","4" of Llama 3's greedy \p{N}{1,3}, which depends on where the run starts. The BPE
  model gets the 990 tokens "10".."999" (the digits are already in the byte alphabet) with
  merges that build each of them from its digits: (a, b) -> "ab"; (ab, c) and, where "bc" is
  itself a number, (a, bc) -> "abc", since BPE takes whichever of the pairs (a, b), (b, c)
  ranks first. Every multi-digit pre-token is such a number, so it always ends as one token.

  Why not the alternatives (checked with tokenizers 0.23):
  * merges learned by the trainer alone: a BPE fitted with a 1-3 digit pattern only merges the
    numbers frequent in its corpus, so a rare number would be two or three pieces, and the
    numbers would spend the vocabulary budget meant for the text.
  * non-special AddedTokens "0".."999" (single_word=True): they are matched on the raw text
    before the pre-tokenizer runs, which then sees the text around a number as separate
    segments: "word  42" gives "word","ĠĠ","42" where "word  next" gives "word","Ġ","Ġnext"
    (the whitespace before a number is cut differently from that before a word); single_word
    leaves "abc12" and "_12" in digits (letters and "_" count as word characters); and they
    add 1,000 entries to tokenizer_config.json that transformers handles apart from the
    vocabulary.
  Here the pre-tokenizer alone decides every boundary, exactly as the default one does except
  inside digit runs: ids and pieces of any text are those of the default tokenizer fitted on the
  same data, except that each whole number 10..999 is one token ("10".."999" get the ids after
  the fitted vocabulary, in numeric order). Decoding is plain byte-level, so decode(encode(x))
  == x for any text. The fitted part is untouched (the BPE is trained with the default pattern,
  which never merges digits), so tokenizer.vocab_size stays the BPE's budget and the tokenizer
  grows by 990 tokens: a model with model.vocab_size <= 0 takes len(tokenizer).
  """
  spec = json.loads(tok.to_str())
  model = spec["model"]
  if model.get("type") != "BPE":
    raise ValueError(f"whole numbers need a BPE model, not {model.get('type')}")
  vocab, merges = model["vocab"], model["merges"]
  as_text = bool(merges) and isinstance(merges[0], str)  # older tokenizers write "a b"
  have = {tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges}
  digits = lambda t: t.isascii() and t.isdigit()
  if any(digits(a) and digits(b) for a, b in have):  # they would compete with the merges below
    raise ValueError("the BPE already merges digits (fitted with a pattern that groups them); "
                     "fit it with QWEN2_PATTERN")
  missing = [d for d in "0123456789" if d not in vocab]
  if missing:
    raise ValueError(f"the BPE vocabulary lacks the digits {missing} (not a byte-level BPE)")
  ids = list(vocab.values()) + [t["id"] for t in spec.get("added_tokens", [])]
  next_id = max(ids) + 1

  def merge(a: str, b: str) -> None:
    nonlocal next_id
    if a + b not in vocab:
      vocab[a + b] = next_id
      next_id += 1
    if (a, b) not in have:
      have.add((a, b))
      merges.append(f"{a} {b}" if as_text else [a, b])

  for n in range(10, 100):
    merge(str(n)[0], str(n)[1])
  for n in range(100, 1000):
    a, b, c = str(n)
    merge(a + b, c)
    if b != "0":
      merge(a, b + c)
  out = tokenizers.Tokenizer.from_str(json.dumps(spec))
  out.pre_tokenizer = _pre_tokenizer(WHOLE_NUMBERS_PATTERN)
  return out


def train_chat_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | None = None, whole_numbers: bool = False
) -> transformers.PreTrainedTokenizerFast:
  """Trains a ChatML byte-level BPE tokenizer on `texts`; saves it to `out_dir` when given.

  whole_numbers: every integer 0..999 standing on its own is one token (`add_whole_numbers`);
  the tokenizer then has up to 990 tokens more than `vocab_size`, the BPE's budget.
  """
  tok = train_bpe(texts, vocab_size, CHATML_SPECIAL_TOKENS)
  if whole_numbers:
    tok = add_whole_numbers(tok)
  hf_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok,
      eos_token="<|endoftext|>",
      pad_token="<|endoftext|>",
      extra_special_tokens=["<|im_start|>", "<|im_end|>"],
      chat_template=CHATML_TEMPLATE,
      model_max_length=1 << 30,
  )
  if out_dir is not None:
    hf_tok.save_pretrained(out_dir)
  return hf_tok


# ------------------------------------------------------------------ the run's tokenizer

FIT_RECORD = "jaxlab_fit.json"  # what a fitted tokenizer was fitted on


# Fit-record keys written only when not at these values, so that the records of tokenizers
# fitted before the key existed still equal those of the same settings now.
_FIT_DEFAULTS = {"whole_numbers": False}


def fit_record(config) -> dict:
  """What a tokenizer fitted for `config` depends on: the data file(s), rows used, vocab size,
  and `whole_numbers` when set (tokenizer.whole_numbers; absent means False)."""
  if config.data.get("source", "") == "mixture":
    mix = config.data.mixture
    record = {"data": {n: file_digest(mix[n]["path"]) for n in sorted(mix)},
              "vocab_size": int(config.tokenizer.vocab_size)}
  else:
    record = {"data": file_digest(config.data.train_path),
              "max_examples": int(config.data.max_examples or 0),
              "vocab_size": int(config.tokenizer.vocab_size)}
  if wants_whole_numbers(config):
    record["whole_numbers"] = True
  return record


def wants_whole_numbers(config) -> bool:
  """config.tokenizer.whole_numbers (False when the config has no such key)."""
  value = config.tokenizer.get("whole_numbers", False)
  if not isinstance(value, bool):
    from jaxlab.config import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f"config key tokenizer.whole_numbers must be true or false, not {value!r}")
  return value


def load_tokenizer_dir(path):
  """AutoTokenizer of a local or gs:// folder; a damaged tokenizer file is an error naming it."""
  import json  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from jaxlab import paths  # pylint: disable=g-import-not-at-top
  from jaxlab.data.errors import DataError  # pylint: disable=g-import-not-at-top
  folder = paths.path(path)
  if not folder.is_dir():
    raise DataError(f"tokenizer folder {path} does not exist (jaxlab never downloads)")
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    file = folder / name
    if file.exists():
      try:
        json.loads(file.read_text())
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not valid JSON ({e}); the file is damaged or truncated") from None
  local = str(folder)
  if paths.is_uri(path):  # transformers reads local folders only
    local = tempfile.mkdtemp(prefix="jaxlab_tok_")
    for f in folder.iterdir():
      if f.is_file():
        f.copy(paths.path(local, f.name))
  try:
    return transformers.AutoTokenizer.from_pretrained(local, local_files_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"tokenizer folder {path} cannot be loaded: {e}") from e


def _save_dir(tok, out_dir, record: dict) -> None:
  """Saves `tok` and its record to out_dir (process 0) through a fresh temporary folder, so a
  killed run never leaves half a tokenizer and a leftover temporary never blocks a rerun."""
  import json  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from jaxlab import paths  # pylint: disable=g-import-not-at-top
  if not paths.is_writer():
    return
  out = paths.path(out_dir)
  tmp = out.parent / (out.name + ".tmp")
  if tmp.exists():
    tmp.rmtree()
  with tempfile.TemporaryDirectory(prefix="jaxlab_tok_") as local:
    tok.save_pretrained(local)
    with open(f"{local}/{FIT_RECORD}", "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2)
    tmp.mkdir(parents=True)
    for name in sorted(os.listdir(local)):
      paths.path(local, name).copy(tmp / name)
  if out.exists():
    out.rmtree()
  tmp.rename(out)


def load_or_train_tokenizer(config, workdir):
  """The run's tokenizer, kept in WORKDIR/tokenizer (so the workdir is self-contained).

  `tokenizer.path`, defaulting to `init.hf_path` (an HF model is fine-tuned with its own
  tokenizer, never a fresh BPE), else init.workdir's; else a ChatML BPE fitted on the train
  data (with tokenizer.whole_numbers, numbers 0..999 as whole tokens: `add_whole_numbers`). A
  fitted tokenizer records what it was fitted on (data file digest, rows, vocabulary size,
  whole_numbers when set): when that changed it is refitted, or refused if checkpoints were
  trained with it.
  """
  import json  # pylint: disable=g-import-not-at-top
  from jaxlab import paths  # pylint: disable=g-import-not-at-top
  from jaxlab.config import ConfigError  # pylint: disable=g-import-not-at-top
  out_dir = paths.path(workdir, "tokenizer")
  init = config.get("init", {})
  source = config.tokenizer.path or init.get("hf_path", "") or (
      str(paths.path(init["workdir"], "tokenizer")) if init.get("workdir", "") else "")
  if source:
    tok = load_tokenizer_dir(source)
    record = {"source": str(paths.path(source))}
    saved = paths.read_text(out_dir / FIT_RECORD)
    if saved is None or json.loads(saved) != record:
      _save_dir(tok, out_dir, record)
    return tok
  from jaxlab.data.chat import read_chat_jsonl  # pylint: disable=g-import-not-at-top
  record = fit_record(config)
  saved = paths.read_text(out_dir / FIT_RECORD)
  ckpts = paths.path(workdir, "checkpoints")
  trained = ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())
  if saved is None and trained and (out_dir / "tokenizer.json").exists():
    import sys  # pylint: disable=g-import-not-at-top
    print(f"jaxlab: {out_dir} has no fit record (an older jaxlab fitted it); using it as is",
          file=sys.stderr)
    return load_tokenizer_dir(out_dir)
  if saved is not None and (out_dir / "tokenizer.json").exists():
    saved = json.loads(saved)
    if saved == record:
      return load_tokenizer_dir(out_dir)
    if trained:
      get = lambda d, k: d.get(k, _FIT_DEFAULTS.get(k))
      changed = sorted(k for k in set(saved) | set(record) if get(saved, k) != get(record, k))
      raise ConfigError(
          f"{out_dir} was fitted on other data or settings ({', '.join(changed)}: "
          f"{[get(saved, k) for k in changed]} -> {[get(record, k) for k in changed]}) and the "
          f"checkpoints in {workdir} were trained with it; use a new workdir")
  if config.data.get("source", "") == "mixture":  # pretraining: fit on the mixture's documents
    from jaxlab.data.mixture import mixture_texts  # pylint: disable=g-import-not-at-top
    texts = mixture_texts(config.data.mixture.to_dict())
  else:
    convs = read_chat_jsonl(config.data.train_path)
    texts = [m["content"] for c in convs[:config.data.max_examples or None] for m in c.messages]
  tok = train_chat_tokenizer(texts, config.tokenizer.vocab_size,
                             whole_numbers=wants_whole_numbers(config))
  _save_dir(tok, out_dir, record)
  return tok


def own_tokenizer_dir(model_path: str) -> str | None:
  """The tokenizer folder that came with a model: an HF folder's own files, or a jaxlab
  workdir's tokenizer/ (None: the model brings none)."""
  from jaxlab import paths  # pylint: disable=g-import-not-at-top
  for d in (paths.path(model_path), paths.path(model_path, "tokenizer")):
    if (d / "tokenizer_config.json").exists() or (d / "tokenizer.json").exists():
      return str(d)
  return None


def check_model_tokenizer(tokenizer, tokenizer_name: str, model_path: str, key: str) -> None:
  """Raises ValueError unless the model at `model_path` (config key `key`) was made with a
  tokenizer of the same contents as `tokenizer` (jaxlab.fingerprint.tokenizer_digest: vocab,
  merges, normalisation, special tokens, chat template). Two BPEs of the same size fitted on
  other data map the same text to other ids: a teacher's distributions, a judge's scores or an
  eval model's answers would then be read against the wrong tokens. A model without tokenizer
  files of its own cannot be checked and passes."""
  from jaxlab.fingerprint import tokenizer_digest  # pylint: disable=g-import-not-at-top
  own = own_tokenizer_dir(model_path)
  if own is None:
    return
  mine, theirs = tokenizer_digest(tokenizer), tokenizer_digest(load_tokenizer_dir(own))
  if mine != theirs:
    raise ValueError(
        f"config key {key}={model_path!r}: the model's tokenizer ({own}, fingerprint {theirs}) "
        f"differs from the one this run uses ({tokenizer_name}, fingerprint {mine}): other ids "
        "for the same text. Use the model's own tokenizer, or a model made with this one")


def check_vocab(tokenizer, vocab_size: int, tokenizer_name: str, model_name: str) -> None:
  """Raises ValueError naming both unless the model's vocabulary holds the tokenizer's exactly,
  or with only the few padded rows HF checkpoints add (Qwen2.5: 151,665 tokens, 151,936 rows)."""
  n = len(tokenizer)
  if vocab_size < n or vocab_size - n > max(128, n // 64):
    raise ValueError(
        f"tokenizer {tokenizer_name} has {n} tokens but model {model_name} has {vocab_size} "
        "vocabulary rows: they do not belong together (set tokenizer.path to the model's "
        "tokenizer, or leave it empty to use init.hf_path's)")
