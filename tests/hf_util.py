"""Tiny random transformers checkpoints (with real-template tokenizers) and padded chat batches."""
import numpy as np
import torch
import transformers

from jaxlab.data import chat
from tests import tokenizers_util as tu

VOCAB = 640  # >= the test tokenizers' 600 BPE entries + specials
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# name: (config class, model class, config kwargs, tokenizer maker)
FAMILIES = {
    "llama_gqa_llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                              dict(num_key_value_heads=2, rms_norm_eps=1e-5,
                                   rope_parameters=_LLAMA3_ROPE), tu.make_llama3_tokenizer),
    "qwen2_tied_bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                        dict(num_key_value_heads=2, tie_word_embeddings=True),
                        tu.make_qwen_tokenizer),
    "qwen2_untied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                     dict(num_key_value_heads=4, tie_word_embeddings=False), tu.make_qwen_tokenizer),
    "qwen3_qk_norm": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                      dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
                      tu.make_qwen_tokenizer),
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Continue the sequence: 123, 456"},
     {"role": "assistant", "content": "789"}],
]


def make_checkpoint(family: str, path, *, dtype=torch.float32, seed: int = 0, **save_kw):
  """Saves a random model of `family` with O(1) logits and its tokenizer to `path`; returns both."""
  config_cls, model_cls, kw, make_tok = FAMILIES[family]
  tok = make_tok(path)
  assert len(tok) <= VOCAB
  torch.manual_seed(seed)
  model = model_cls(config_cls(**SMALL, **kw, attn_implementation="eager")).eval()
  with torch.no_grad():  # larger than HF's 0.02 init, so a 1e-4 logit tolerance means something
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.15)
  model = model.to(dtype)
  model.save_pretrained(str(path), **save_kw)
  return model, tok


def chat_batch(tok):
  """Two chat-encoded rows, the first right-padded, the second left-padded by 3.

  Returns (ids, positions, segment_ids, loss_mask) as int32/bool [2, L]; segment 0 is padding.
  """
  encoded = [chat.encode_chat(tok, c) for c in CONVERSATIONS]
  length = max(len(i) for i, _ in encoded) + 3
  pad = chat.pad_id(tok)
  ids = np.full((2, length), pad, np.int32)
  seg = np.zeros((2, length), np.int32)
  loss = np.zeros((2, length), bool)
  (a, ma), (b, mb) = encoded
  ids[0, :len(a)], seg[0, :len(a)], loss[0, :len(a)] = a, 1, ma
  ids[1, length - len(b):], seg[1, length - len(b):], loss[1, length - len(b):] = b, 1, mb
  positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
  return ids, positions, seg, loss


def torch_logits(model, ids, positions, seg) -> np.ndarray:
  """float32 logits of a transformers model with an attention mask and explicit positions."""
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(seg != 0, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def train_batch(tok):
  """`chat_batch` as a next-token training batch (inputs, targets, positions, segments, mask)."""
  ids, pos, seg, loss = chat_batch(tok)
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "positions": pos[:, :-1],
          "segment_ids": seg[:, :-1], "loss_mask": loss[:, 1:].astype(np.float32)}


def torch_loss(model, b):
  """Mean NLL per trained token of a transformers (or PEFT) model on a `train_batch`."""
  out = model(input_ids=torch.tensor(b["inputs"], dtype=torch.long),
              attention_mask=torch.tensor(b["segment_ids"] != 0, dtype=torch.long),
              position_ids=torch.tensor(b["positions"], dtype=torch.long))
  logp = torch.log_softmax(out.logits.float(), -1)
  nll = -torch.gather(logp, -1, torch.tensor(b["targets"], dtype=torch.long)[..., None])[..., 0]
  mask = torch.tensor(b["loss_mask"])
  return (nll * mask).sum() / mask.sum()
