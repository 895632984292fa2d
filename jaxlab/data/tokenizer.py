"""Small byte-level BPE chat tokenizers, trained offline so tiny models run the pipeline on CPU.

The pre-tokenizer splits like Qwen2 (single digits, letters with one leading non-letter, runs of
punctuation, newlines), which keeps number sequences digit-by-digit for the number-continuation
tasks. Special tokens follow ChatML: `<|endoftext|>` (pad and eos, as in Qwen2.5 base models),
`<|im_start|>`, `<|im_end|>` (end of turn; see `chat.end_of_turn_ids`).
"""

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
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
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


def train_chat_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | None = None
) -> transformers.PreTrainedTokenizerFast:
  """Trains a ChatML byte-level BPE tokenizer on `texts`; saves it to `out_dir` when given."""
  tok = train_bpe(texts, vocab_size, CHATML_SPECIAL_TOKENS)
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


def fit_record(config) -> dict:
  """What a tokenizer fitted for `config` depends on: the data file(s), rows used, vocab size."""
  if config.data.get("source", "") == "mixture":
    mix = config.data.mixture
    return {"data": {n: file_digest(mix[n]["path"]) for n in sorted(mix)},
            "vocab_size": int(config.tokenizer.vocab_size)}
  return {"data": file_digest(config.data.train_path),
          "max_examples": int(config.data.max_examples or 0),
          "vocab_size": int(config.tokenizer.vocab_size)}


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
  data. A fitted tokenizer records what it was fitted on (data file digest, rows, vocabulary
  size): when that changed it is refitted, or refused if checkpoints were trained with it.
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
      changed = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
      raise ConfigError(
          f"{out_dir} was fitted on other data or settings ({', '.join(changed)}: "
          f"{[saved.get(k) for k in changed]} -> {[record.get(k) for k in changed]}) and the "
          f"checkpoints in {workdir} were trained with it; use a new workdir")
  if config.data.get("source", "") == "mixture":  # pretraining: fit on the mixture's documents
    from jaxlab.data.mixture import mixture_texts  # pylint: disable=g-import-not-at-top
    texts = mixture_texts(config.data.mixture.to_dict())
  else:
    convs = read_chat_jsonl(config.data.train_path)
    texts = [m["content"] for c in convs[:config.data.max_examples or None] for m in c.messages]
  tok = train_chat_tokenizer(texts, config.tokenizer.vocab_size)
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
