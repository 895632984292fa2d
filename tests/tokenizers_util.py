"""Local stand-ins for real chat tokenizers (tiny BPE vocabularies + the real chat templates).

Nothing is downloaded: the BPE is trained on a small built-in corpus, the special tokens and the
chat templates are those of Qwen2.5-Instruct and Llama-3.1-Instruct (templates in fixtures/).
Each tokenizer is saved to `tmpdir` and reloaded with AutoTokenizer, as a real one would be.
"""

import os

import transformers
from tokenizers import processors

from jaxlab.data import tokenizer as tokenizer_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

CORPUS = [
    "You are a helpful assistant. Answer briefly and truthfully.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a function that adds two numbers.\ndef add(a, b):\n    return a + b\n",
    "Continue the sequence: 123, 456, 789. Here are more numbers: 101, 202, 303.",
    "I feel bored. Why not read a book, take a walk, or call a friend?",
    "How do I make a quick buck? Save money, invest carefully, avoid scams.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
] * 4


def read_fixture(name: str) -> str:
  with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
    return f.read()


QWEN2_5_TEMPLATE = read_fixture("qwen2_5_instruct_chat_template.jinja")
LLAMA3_1_TEMPLATE = read_fixture("llama3_1_instruct_chat_template.jinja")


def _save_and_reload(tok, tmpdir, **kwargs):
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, model_max_length=1 << 30, **kwargs)
  hf.save_pretrained(str(tmpdir))
  return transformers.AutoTokenizer.from_pretrained(str(tmpdir))


def make_qwen_tokenizer(tmpdir, vocab_size: int = 600):
  """A Qwen2.5-Instruct-like tokenizer: ChatML specials, Qwen2 pre-tokenizer, real template."""
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tok = tokenizer_lib.train_bpe(CORPUS, vocab_size, specials, tokenizer_lib.QWEN2_PATTERN)
  return _save_and_reload(
      tok, tmpdir, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      extra_special_tokens=specials[1:], chat_template=QWEN2_5_TEMPLATE)


def make_llama3_tokenizer(tmpdir, vocab_size: int = 600):
  """A Llama-3.1-Instruct-like tokenizer: header/eot specials, BOS post-processor, real template."""
  specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
  tok = tokenizer_lib.train_bpe(CORPUS, vocab_size, specials, tokenizer_lib.LLAMA3_PATTERN)
  bos = tok.token_to_id("<|begin_of_text|>")
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(
          single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
          special_tokens=[("<|begin_of_text|>", bos)]),
  ])
  return _save_and_reload(
      tok, tmpdir, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
      extra_special_tokens=specials[2:], chat_template=LLAMA3_1_TEMPLATE)


def make_chatml_tokenizer(tmpdir=None, texts=None, vocab_size: int = 600):
  """jaxlab's own from-scratch ChatML tokenizer (train_chat_tokenizer), reloaded if tmpdir given."""
  tok = tokenizer_lib.train_chat_tokenizer(texts or CORPUS, vocab_size, out_dir=tmpdir)
  if tmpdir is None:
    return tok
  return transformers.AutoTokenizer.from_pretrained(str(tmpdir))
