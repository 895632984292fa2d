"""Tokenizers of HF checkpoint folders: offline loading, per-family stop and pad ids, file copying.

End-of-turn and pad ids come from `jaxlab.data.chat` (one definition for the loss mask and
the sampler's stop tokens): Qwen's `<|im_end|>`, Llama 3's `<|eot_id|>`, then eos.
"""
from __future__ import annotations

import json
import os
import shutil

# Everything a tokenizer (and generation) needs besides the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def load_tokenizer(path: str):
  """AutoTokenizer of a local folder, never touching the network."""
  import transformers  # pylint: disable=g-import-not-at-top  (heavy; only when needed)
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer folder {path} does not exist (jaxlab never downloads)")
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def end_of_turn_ids(tokenizer) -> list[int]:
  """Stop ids for sampling and the loss mask: end-of-turn tokens first, then eos (jaxlab.data.chat)."""
  from jaxlab.data import chat  # pylint: disable=g-import-not-at-top  (jaxlab.data imports transformers)
  return chat.end_of_turn_ids(tokenizer)


def pad_id(tokenizer) -> int:
  """Padding id: the pad token, else eos, else 0 (jaxlab.data.chat)."""
  from jaxlab.data import chat  # pylint: disable=g-import-not-at-top
  return chat.pad_id(tokenizer)


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
  """Copies the tokenizer, chat template and generation config files present in `src`."""
  os.makedirs(dst, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied


def special_token_ids(src: str) -> dict:
  """bos/eos/pad ids for config.json: from `src`'s config.json if any, else from its tokenizer."""
  config = os.path.join(src, "config.json")
  if os.path.exists(config):
    with open(config, encoding="utf-8") as f:
      d = json.load(f)
    return {k: d[k] for k in _TOKEN_ID_KEYS if d.get(k) is not None}
  tok = load_tokenizer(src)
  return {k: getattr(tok, k) for k in _TOKEN_ID_KEYS if getattr(tok, k, None) is not None}
