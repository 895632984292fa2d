"""Chat JSONL reading and chat-template encoding with an exact assistant-token loss mask.

`encode_chat` renders the conversation prefixes with the tokenizer's own chat template: for each
assistant message i, P_i = render(messages[:i], add_generation_prompt=True) and
C_i = render(messages[:i+1]). The template must be prefix-stable (P_i is a prefix of C_i, C_i of
P_{i+1}, ...), which we check; templates that rewrite earlier turns fail with a DataError. The text
is cut at these boundaries and each piece is tokenized on its own, so the prompt tokens are exactly
what the sampler would feed at inference (a BPE merge never straddles the generation prompt). In
each assistant piece, the tokens up to and including the first end-of-turn id are trained; the
generation prompt, system/user turns and whatever follows the end-of-turn token are not. Injected
text (Qwen2.5's default system prompt, Llama 3.1's date header) lands in prompt pieces.
"""

import dataclasses
import json
from typing import Any

import numpy as np

from jaxlab.data.errors import DataError, where

ROLES = ("system", "user", "assistant")
# Tokens that end an assistant turn (first match in the vocabulary wins the mask) or a document.
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>")
_DOC_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>")

Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One JSONL row: its messages and where it came from (path, 1-based line)."""

  messages: list[Message]
  source: tuple[str, int] | None = None


def _check_messages(messages: Any, source) -> list[Message]:
  """Validates a `messages` value; returns clean {role, content} dicts."""
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where(source)}: 'messages' must be a non-empty list")
  out = []
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise DataError(f"{where(source)}: message {k} needs 'role' and 'content'")
    if m["role"] not in ROLES:
      raise DataError(
          f"{where(source)}: message {k} has unknown role {m['role']!r}; expected one of {ROLES}")
    if not isinstance(m["content"], str):
      raise DataError(f"{where(source)}: message {k} content must be a string")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def parse_chat_row(line: str, source) -> dict:
  """One JSONL line -> its row dict with validated `messages`; DataError at "path:line"."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{where(source)}: malformed JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(row, dict) or "messages" not in row:
    raise DataError(f"{where(source)}: expected an object with a 'messages' list")
  row["messages"] = _check_messages(row["messages"], source)
  return row


def read_chat_jsonl(path: str) -> list[Conversation]:
  """Reads `{"messages": [...]}` rows (blank lines skipped); raises DataError at "path:line".

  A missing or empty file, bytes that are not UTF-8 and malformed rows are errors naming the
  file (and line). Paths go through etils.epath, so gs:// files read like local ones.
  """
  from jaxlab import paths  # pylint: disable=g-import-not-at-top
  file = paths.path(path)
  if not file.is_file():
    raise DataError(f"{path}: no such data file")
  convs = []
  with file.open("rb") as f:
    for lineno, raw in enumerate(f, start=1):
      source = (str(path), lineno)
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{where(source)}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                        f"{e.start + 1}); re-encode the file as UTF-8") from None
      if not line.strip():
        continue
      convs.append(Conversation(parse_chat_row(line, source)["messages"], source))
  if not convs:
    raise DataError(f"{path}: the data file has no rows")
  return convs


def _token_id(tokenizer, token: str) -> int | None:
  """The id of `token` if it is a single token of this tokenizer's vocabulary, else None."""
  i = tokenizer.convert_tokens_to_ids(token)
  if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != token:
    return None
  return int(i)


def end_of_turn_ids(tokenizer) -> list[int]:
  """Stop ids for sampling: end-of-turn tokens (im_end, eot_id, ...), then eos and document ends."""
  ids = [_token_id(tokenizer, t) for t in _TURN_END_TOKENS]
  ids.append(tokenizer.eos_token_id)
  ids += [_token_id(tokenizer, t) for t in _DOC_END_TOKENS]
  return list(dict.fromkeys(int(i) for i in ids if i is not None))


def pad_id(tokenizer) -> int:
  """Padding id: the pad token, else eos, else 0."""
  for i in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if i is not None:
      return int(i)
  return 0


def _tokenizer_name(tokenizer) -> str:
  return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def check_chat_template(tokenizer) -> None:
  """Raises DataError unless the tokenizer has a chat template."""
  if not getattr(tokenizer, "chat_template", None):
    raise DataError(
        f"tokenizer {_tokenizer_name(tokenizer)!r} has no chat template; set "
        "tokenizer.chat_template (e.g. jaxlab.data.tokenizer.CHATML_TEMPLATE) or use an "
        "Instruct model's tokenizer")


def encode_chat(
    tokenizer, messages: list[Message], *, source=None
) -> tuple[np.ndarray, np.ndarray]:
  """Returns (ids int32[n], loss_mask bool[n]): True on assistant content + end-of-turn tokens."""
  check_chat_template(tokenizer)
  roles = [m["role"] for m in messages]
  turns = [i for i, r in enumerate(roles) if r == "assistant"]
  if not turns:
    raise DataError(f"{where(source)}: conversation has no assistant turn, nothing to train on")
  if turns[0] == 0:
    raise DataError(
        f"{where(source)}: conversation starts with an assistant turn; it needs a prompt")
  prompts = tokenizer.apply_chat_template(
      [messages[:i] for i in turns], tokenize=False, add_generation_prompt=True)
  closed = tokenizer.apply_chat_template(
      [messages[:i + 1] for i in turns] + [messages], tokenize=False, add_generation_prompt=False)
  full = closed[-1]
  # Cut points 0 <= p_1 <= c_1 <= p_2 <= ... <= len(full): text[p_i:c_i] is assistant turn i.
  cuts, pos = [0], 0
  for k, (p, c) in enumerate(zip(prompts, closed[:-1])):
    if not (p.startswith(full[:pos]) and c.startswith(p) and full.startswith(c)):
      raise DataError(
          f"{where(source)}: chat template of {_tokenizer_name(tokenizer)!r} is not "
          f"prefix-stable at assistant message {turns[k]} (rendering more messages changes "
          "earlier text), so the assistant tokens cannot be located")
    cuts += [len(p), len(c)]
    pos = len(c)
  cuts.append(len(full))
  pieces = [full[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
  piece_ids = tokenizer(pieces, add_special_tokens=False)["input_ids"]
  stops = set(end_of_turn_ids(tokenizer))
  ids, mask = [], []
  for k, toks in enumerate(piece_ids):
    m = [False] * len(toks)
    if k % 2 == 1:  # an assistant piece: content, end-of-turn token, template suffix
      end = next((j for j, t in enumerate(toks) if t in stops), None)
      if end is None:
        raise DataError(
            f"{where(source)}: assistant message {turns[k // 2]} has no end-of-turn token "
            f"(looked for ids {sorted(stops)}) after rendering with {_tokenizer_name(tokenizer)!r}")
      m[:end + 1] = [True] * (end + 1)
    ids += toks
    mask += m
  return np.asarray(ids, np.int32), np.asarray(mask, np.bool_)
