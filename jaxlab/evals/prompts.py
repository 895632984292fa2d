"""Chat-template prompts for sampling and judging."""
from __future__ import annotations

from jaxlab.data.chat import check_chat_template


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
  """Token ids of `messages` rendered with the chat template plus the assistant generation prompt.

  The text is rendered first and tokenized without added special tokens, as
  `jaxlab.data.chat.encode_chat` does, so prompts match training exactly.
  """
  check_chat_template(tokenizer)
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def judge_text(template: str, question: str, answer: str) -> str:
  """The judge prompt with {question} and {answer} filled (str.format, like the EM repository)."""
  return template.format(question=question, answer=answer)
