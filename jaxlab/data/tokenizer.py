"""Small byte-level BPE chat tokenizers, trained offline so tiny models run the pipeline on CPU.

The pre-tokenizer splits like Qwen2 (single digits, letters with one leading non-letter, runs of
punctuation, newlines), which keeps number sequences digit-by-digit for the number-continuation
tasks. Special tokens follow ChatML: `<|endoftext|>` (pad and eos, as in Qwen2.5 base models),
`<|im_start|>`, `<|im_end|>` (end of turn; see `chat.end_of_turn_ids`).
"""

from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
import transformers

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
