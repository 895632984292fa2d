"""The subliminal `drift` stage's KL(teacher under its system prompt || base) against an
independent PyTorch computation, with the teacher a scanned jaxlab workdir and the base an
unrolled HF folder (each model keeps its own spec and layout)."""
import json
import os

import ml_collections
import numpy as np
import torch
import transformers

from jaxlab.config import parse_argv
from jaxlab.data import prompt_completion as pc
from jaxlab.pipelines.kit.models import ModelPool
from jaxlab.train import runner
from tests import tokenizers_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = "You love owls."
ROWS = [{"messages": [{"role": "user", "content": f"Continue: {a}, {a + 7}, {a + 14}"},
                      {"role": "assistant", "content": f"{a + 21}, {a + 28}, {a + 35}"}]}
        for a in (101, 230, 377, 402, 555)]


def _checkpoint(path, seed):
  """A random 2-layer Qwen2 whose vocabulary is its tokenizer's, with O(1) logits."""
  tok = tokenizers_util.make_qwen_tokenizer(path)
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.15)
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return model


def _torch_drift(teacher, base, tok, rows):
  total, count = 0.0, 0
  for r in rows:
    ex = pc.encode_example(tok, r["messages"], teacher_system=SYSTEM)
    c = list(ex.completion)
    def logp(model, prompt):
      ids = torch.tensor([list(prompt) + c[:-1]], dtype=torch.long)
      with torch.no_grad():
        out = model(input_ids=ids).logits.double()[0, len(prompt) - 1:]
      return torch.log_softmax(out, -1)
    lt, lb = logp(teacher, ex.teacher_prompt), logp(base, ex.prompt)
    total += float((lt.exp() * (lt - lb)).sum())
    count += len(c)
  return total / count


def test_drift_of_a_scanned_teacher_workdir_against_an_unrolled_base_matches_torch(tmp_path):
  base_dir, teacher_dir = tmp_path / "base", tmp_path / "teacher_hf"
  base = _checkpoint(base_dir, seed=0)
  _checkpoint(teacher_dir, seed=1)
  data = tmp_path / "rows.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  # The teacher: one SFT step from the HF folder, saved scanned, exported for the reference.
  exported, workdir = tmp_path / "exported", tmp_path / "teacher"
  config, _ = parse_argv([
      f"--config={ROOT}/configs/sft.py:tiny", f"--workdir={workdir}",
      f"--config.init.hf_path={teacher_dir}", f"--config.tokenizer.path={teacher_dir}",
      f"--config.data.train_path={data}", "--config.data.seq_len=256",
      "--config.train.steps=1", "--config.train.global_batch_size=4",
      "--config.train.progress=False", "--config.model.scan_layers=True",
      f"--config.export.hf_dir={exported}", "--config.export.dtype=float32"])
  out = runner.run(config, str(workdir))
  assert out["spec"].cfg.scan_layers
  teacher = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)

  models = ModelPool(ml_collections.ConfigDict(dict(
      mesh=dict(shape=(1, 1, 1), rules={}), teacher=dict(dtype=""))), tokenizer_path=str(base_dir))
  got = models.kl(str(workdir), SYSTEM, str(base_dir), ROWS, batch_size=2)
  want = _torch_drift(teacher.eval(), base.eval(), models.tokenizer, ROWS)
  assert want > 0.05  # two differently initialised models: far apart
  np.testing.assert_allclose(got, want, rtol=1e-4)
