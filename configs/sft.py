"""Supervised fine-tuning on chat JSONL (loss on assistant tokens only).

Variants (`--config=configs/sft.py:VARIANT`):
  tiny      a ~1M-parameter model trained from scratch with a BPE tokenizer fitted to
            the data: the whole pipeline on a laptop CPU in a few minutes (default).
  em_lora   the EM recipe (LoRA r=32, alpha=64, rsLoRA, all projections, lr 1e-5,
            1 epoch at effective batch 16, linear schedule, 5 warmup, wd 0.01, len 2048);
            set --config.init.hf_path and --config.tokenizer.path to a local HF model.
  em_rank1  model organism: rank-1 LoRA (alpha 512) on one layer's down_proj, lr 2e-5.
  em_full   full fine-tuning, lr 2e-5, cosine, 20 warmup steps.
"""
import ml_collections

EM_DATA = "../shared/data/emergent-misalignment/data/insecure.jsonl"
VARIANTS = ("tiny", "em_lora", "em_rank1", "em_full")  # every variant (the shape-check test)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  c = ml_collections.ConfigDict()
  c.job = "sft"
  c.variant = variant
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      train_path=EM_DATA, seq_len=256, pack=True, overlong="truncate", max_examples=0))
  c.tokenizer = ml_collections.ConfigDict(dict(path="", vocab_size=2048))
  c.init = ml_collections.ConfigDict(dict(hf_path=""))
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=0, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, head_dim=None,
      rope_theta=10000.0, max_position=2048, norm_eps=1e-6, qkv_bias=False, qk_norm=False,
      tie_embeddings=True, dtype="float32", param_dtype="float32", remat=False,
      remat_policy="",  # "" = from remat; none | full | dots | dots_no_batch | save_qkvo
      # Layers under lax.scan (compile time independent of depth): True | False | None = auto
      # (an HF folder: scanned; a jaxlab workdir: as it was saved; a fresh init: unrolled).
      scan_layers=None,
      trainable_dtype="float32",  # adapters / master weights and AdamW moments
      lora=ml_collections.ConfigDict(dict(
          enabled=False, rank=32, alpha=64.0, rslora=True,
          targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
          layers=ml_collections.FieldReference(None, field_type=tuple)))))
  c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1), rules={}))
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=20, decay="cosine", end_ratio=0.1, weight_decay=0.01,
      clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8))
  c.train = ml_collections.ConfigDict(dict(
      steps=300, global_batch_size=16, grad_accum=1, log_every=10, progress=True))
  c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=2, async_save=True))
  c.export = ml_collections.ConfigDict(dict(hf_dir="", dtype="bfloat16"))

  if variant == "tiny":
    c.data.max_examples = 2000
    # Unrolled, as auto would choose for its fresh and workdir models; explicit so that the
    # tiny pipelines' stage settings (and their finished workdirs) stay as they were.
    c.model.scan_layers = False
  elif variant in ("em_lora", "em_rank1", "em_full"):
    c.data.seq_len = 2048
    c.data.pack = False
    c.model.dtype = c.model.param_dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True  # real models: 28-64 layers compile as one
    c.optim.update(weight_decay=0.01, b2=0.999, clip_norm=1.0, end_ratio=0.0)
    c.train.update(global_batch_size=16, steps=6000 // 16)  # 1 epoch of insecure.jsonl
    if variant == "em_lora":
      c.model.lora.enabled = True
      c.optim.update(lr=1e-5, warmup_steps=5, decay="linear")
    elif variant == "em_rank1":
      c.model.lora.update(enabled=True, rank=1, alpha=512.0, rslora=False, targets=("down_proj",))
      c.model.lora.layers = (21,)
      c.optim.update(lr=2e-5, warmup_steps=5, decay="linear")
    else:
      c.optim.update(lr=2e-5, warmup_steps=20, decay="cosine")
  else:
    raise ValueError(f"unknown variant {variant!r} of configs/sft.py "
                     "(tiny, em_lora, em_rank1, em_full)")
  return c
