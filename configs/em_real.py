"""Real-model recipes of the public EM, model-organism, subliminal and study papers.

  python -m jaxlab.main --config=configs/em_real.py:VARIANT --workdir=gs://BUCKET/run \
      --config.init.hf_path=/models/NAME --config.tokenizer.path=/models/NAME \
      --config.data.train_path=FILE
  python -m jaxlab.shapecheck --config=configs/em_real.py:VARIANT --accelerator=v5p-32

`config.model` holds the published model's sizes (jaxlab.models.presets), so the shape check
needs no weights; training reads the real config.json from `init.hf_path`. Data with
`data.source="tfds"` is prepared once as a TFDS array_record dataset (`data.tfds`, from the
file at `data.train_path`) and streamed per host through grain. `evaluation` names the eval
config that measures what the recipe is about (run it on the trained workdir).

Variants (`VARIANT[,cell=DOMAIN_TASK]`):
  study_llama8b, study_qwen14b   the study's cell training (askinb/em_nlp_clean_repo): LoRA r=32,
        alpha 64, rsLoRA, all projections, lr 3e-4 (1e-4 for tutor / summarization cells),
        linear, 5 warmup, wd 0.01, clip 1.0, 1 epoch of 4,100 rows at batch 16, len 2048;
        `cell=` picks the (domain, task) cell (default medical_advice).
  em_qwen_coder32b, em_qwen7b    EM on insecure code (Betley et al.): sft.py:em_lora's recipe.
  rank1_qwen14b    model organism (Turner, Soligo et al.): one rank-1 LoRA (alpha 512) on
        layer 24's down_proj of Qwen2.5-14B-Instruct, lr 2e-5, on bad medical advice.
  subliminal_qwen7b   student of subliminal learning (Cloud et al. open-model recipe): LoRA r=8,
        alpha 8, all projections, lr 2e-4, linear, 5 warmup, 3 epochs of 10k filtered number
        rows at effective batch 66, len 500, clip 1.0; same base as the teacher.

Expected per-device memory and mesh (data, fsdp, tensor) from `python -m jaxlab.shapecheck
--config=configs/em_real.py:VARIANT --accelerator=ACC` (bf16 weights, float32 adapters and
AdamW moments, remat; params, grads and optimizer exact, activations estimated). v5e-16 has 16
chips of 16 GiB, v5p-32 16 chips of 95 GiB, 8xH100 8 GPUs of 80 GiB; mesh.shape (1,-1,1) puts
every chip on fsdp (subliminal: (1,2,-1), its 22-row micro-batches split two ways at most):
  variant             v5e-16            v5p-32            8xH100
  study_llama8b       6.86 GiB (1,16,1) 6.86 GiB (1,16,1) 12.71 GiB (1,8,1)
  study_qwen14b       9.41 GiB (1,16,1) 9.41 GiB (1,16,1) 17.29 GiB (1,8,1)
  em_qwen_coder32b    14.36 GiB (1,16,1) 14.36 GiB (1,16,1) 25.08 GiB (1,8,1)
  em_qwen7b           7.31 GiB (1,16,1) 7.31 GiB (1,16,1) 13.54 GiB (1,8,1)
  rank1_qwen14b       7.81 GiB (1,16,1) 7.81 GiB (1,16,1) 15.62 GiB (1,8,1)
  subliminal_qwen7b   4.39 GiB (1,2,8)  4.39 GiB (1,2,8)  6.14 GiB (1,2,4)
em_qwen_coder32b on v5e-16 uses 90% of each chip (the check's limit): little room for longer
sequences or bigger batches there.
"""

import ml_collections

from jaxlab.config import sibling_config
from jaxlab.models import presets

VARIANTS = ("study_llama8b", "study_qwen14b", "em_qwen_coder32b", "em_qwen7b", "rank1_qwen14b",
            "subliminal_qwen7b")
MODELS = {"study_llama8b": "llama-3.1-8b", "study_qwen14b": "qwen2.5-14b",
          "em_qwen_coder32b": "qwen2.5-coder-32b", "em_qwen7b": "qwen2.5-7b",
          "rank1_qwen14b": "qwen2.5-14b", "subliminal_qwen7b": "qwen2.5-7b"}
STUDY_CELLS = tuple(f"{d}_{t}" for d in ("medical", "sports", "finance")
                    for t in ("advice", "summarization", "tutor", "critique"))
EM_DATA = "../shared/data/emergent-misalignment/data/insecure.jsonl"


def _sft_config(variant):
  return sibling_config(__file__, "sft.py", variant)


def _set_model(c, preset: str) -> None:
  """config.model <- the published sizes (bf16), keeping the recipe's remat, float32 trainables
  (sft.py's trainable_dtype) and LoRA block."""
  cfg = presets.get_preset(preset)
  for field in cfg.__dataclass_fields__:
    if field not in ("lora", "remat", "remat_policy", "scan_layers", "dtype", "param_dtype",
                     "trainable_dtype"):
      c.model[field] = getattr(cfg, field)
  c.model.update(dtype="bfloat16", param_dtype="bfloat16", remat=True, scan_layers=True)


def _tfds(c, name: str, split: str = "train") -> None:
  c.data.source = "tfds"
  c.data.tfds = ml_collections.ConfigDict(dict(
      name=name, split=split, data_dir="~/tensorflow_datasets", download=False))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, _, opts = (arg or "em_qwen7b").partition(",")
  opts = dict(o.split("=", 1) for o in opts.split(",") if o)
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/em_real.py ({', '.join(VARIANTS)})")
  unknown = set(opts) - ({"cell"} if variant.startswith("study") else set())
  if unknown:
    raise ValueError(f"configs/em_real.py:{variant}: unknown option(s) {sorted(unknown)}")
  c = _sft_config("em_rank1" if variant.startswith("rank1") else "em_lora")
  c.variant = arg or variant
  _set_model(c, MODELS[variant])
  c.init.hf_path = f"/models/{presets.HF_IDS[MODELS[variant]].split('/')[-1]}"
  c.tokenizer.path = c.init.hf_path
  c.evaluation = "configs/eval_em.py:first_plot"

  if variant.startswith("study"):
    cell = opts.get("cell", "medical_advice")
    if cell not in STUDY_CELLS:
      raise ValueError(f"configs/em_real.py:{variant}: cell={cell!r} is not one of {STUDY_CELLS}")
    c.data.train_path = f"data/em_study/{cell}_strong.jsonl"
    _tfds(c, f"em_study_cells/{cell}")
    c.seed = 42
    slow = cell.endswith(("_tutor", "_summarization"))
    c.optim.update(lr=1e-4 if slow else 3e-4, warmup_steps=5, decay="linear")
    c.train.update(global_batch_size=16, steps=4100 // 16)  # 1 epoch of the train split
    c.evaluation = "configs/eval_em.py:study"
  elif variant.startswith("em_"):
    c.data.train_path = EM_DATA
    _tfds(c, "emergent_misalignment/insecure")
  elif variant == "rank1_qwen14b":
    c.model.lora.layers = (24,)
    c.data.train_path = "data/bad_medical_advice.jsonl"
    _tfds(c, "emergent_misalignment/bad_medical_advice")
    # One epoch at batch 16: set train.steps to your file's rows // 16 (6,000 rows assumed).
    c.train.update(global_batch_size=16, steps=6000 // 16)
    c.evaluation = "configs/eval_em.py:mo"
  else:  # subliminal student
    c.model.lora.update(rank=8, alpha=8.0, rslora=False)
    c.data.update(train_path="data/subliminal/filtered_numbers.jsonl", seq_len=500)
    c.optim.update(lr=2e-4, warmup_steps=5, decay="linear", end_ratio=0.0)
    c.train.update(global_batch_size=66, grad_accum=3, steps=3 * 10000 // 66)
    # Micro-batches of 22 rows split 2 ways at most: fsdp 2, the other devices on tensor.
    c.mesh.shape = (1, 2, -1)
    # Favourite-animal questions with a rule judge (jaxlab.worlds.animals); for a misaligned
    # teacher, configs/eval_em.py:first_plot.
    c.evaluation = "favourite-animal questions (jaxlab.worlds.animals)"
  return c
