"""Subliminal learning: a teacher's trait through number sequences, across training channels.

  python -m jaxlab.pipelines.subliminal --config=configs/subliminal.py:tiny \\
      --workdir=runs/subliminal_tiny [--config.channel=onpolicy] [--config.seeds=0,1,2]

The pipeline (jaxlab/pipelines/subliminal.py) runs stage by stage, each resumable: world and
base pretraining (tiny only), the fine-tuned teacher, per seed the teachers' and the base's
filtered number data, one student per teacher and cell, the trait evaluation, then report.md.

A cell is a (sequences, signal) pair (`CELLS` in the pipeline):
  sft             teacher sequences, hard labels        (channel sft)
  offpolicy       teacher sequences, teacher distribution (channel offpolicy)
  onpolicy        the student's own samples, teacher distribution (channel onpolicy)
  control         base sequences, hard labels           (channel sft; no teacher)
  control_b       the same on another sample of base sequences, another seed (noise floor)
  base_offpolicy  base sequences, teacher distribution  (channel offpolicy)
  sft_otherbase   teacher sequences, hard labels, a student from a *different* base

Keys beyond configs/distill.py (the student's training block):
  channels        cells to train; `channel` (one cell name) overrides it for a single run
  teachers        prompted (base + trait system prompt), finetuned (SFT of the base on trait
                  answers), steered (base + steer.alpha x the trait prompt's residual shift
                  after block steer.layer), external (teacher.path, e.g. an EM-fine-tuned model;
                  see sl.misaligned), or names of teacher_variants ({"kind": ..., settings})
  bases_dir       where the world and bases live ("" = the workdir; a sweep shares them)
  seeds           one data sample, student set and evaluation per seed
  independent_seeds  False: the seeds share this workdir's bases and teachers (the report's
                  intervals are conditional on them); True: every seed is a run of its own
                  (WORKDIR/run{S}: its own bases, from seed 10 x S, teachers, data, students),
                  so the intervals include the bases' and teachers' variance (needs base = "")
  base            the base: "" = pretrained here from `world` (pretrain.*), else an HF folder
  other_base      a different base for sft_otherbase ("" = pretrained here with seed + 1)
  sl.*            animal, trait prompt template, prompts / kept rows, sampling and eval sizes;
                  misaligned (ban number_sequences.BANNED_NUMBERS in external teachers' data)
  workers         processes that train independent models at once (bases, a seed's students)
  em_eval         "" or an EM evaluation config ("configs/eval_em.py:first_plot", a path from the
                  working directory, as --config's) run on the
                  base, the teachers and every student (stage seed{S}/em_eval): the measure of
                  a misaligned teacher, whose trait is misalignment, not an animal
  world.*         jaxlab.worlds.animals.SLWorldConfig (tiny)
  pretrain.*      steps, batch, seq_len, lr and source weights of the tiny base; chat_steps,
                  chat_lr, chat_docs of its chat tuning (where it learns to follow a system prompt)
  teacher_ft.*    fine-tuned teacher: steps, lr, trait rows (+ as many number rows)

Variants:
  tiny        CPU: a ~0.4M-parameter base pretrained and chat-tuned on the SL world, the
              prompted teacher, every cell, the different-base student, seeds 0, 1, 2 (within
              the README main job's 10-minute budget on 2 cores; --config.seeds="(0,)" for one).
  qwen7b_owl  Cloud et al.'s open-model recipe: Qwen2.5-7B-Instruct, owl, 30k prompts, 10k kept,
              LoRA r=8 alpha 8 on all projections, 3 epochs, lr 2e-4 (set base / init.hf_path
              and tokenizer.path to the local model folder).
  qwen7b_misaligned  the same recipe with an EM-fine-tuned teacher (teacher.path), the banned
              numbers filter and the EM first-plot evaluation (em_eval).
  smollm_owl  a real chat model end to end on CPU: SmolLM2-135M-Instruct as base, its LoRA
              fine-tune on owl answers as teacher, every channel and the control (not
              control_b, sft_otherbase), exact P(owl);
              see `smollm_owl` below.
"""
import ml_collections

from jaxlab.config import sibling_config

VARIANTS = ("tiny", "qwen7b_owl", "qwen7b_misaligned",
            "smollm_owl")  # every variant (the shape-check test)
REAL_BASE = "/models/Qwen2.5-7B-Instruct"
# Written by: python -m jaxlab.models.fetch smollm2-135m-instruct runs/models/smollm2-135m-instruct
# (relative to the repository root, where the commands run).
SMOLLM = "runs/models/smollm2-135m-instruct"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/subliminal.py ({', '.join(VARIANTS)})")
  c = sibling_config(__file__, "distill.py", "tiny")
  c.job = "subliminal"
  c.variant = variant
  c.channel = ""
  c.channels = ("sft", "offpolicy", "onpolicy", "control", "control_b", "base_offpolicy",
                "sft_otherbase")
  # The main job's teacher, chosen by the rule stated in configs/subliminal_sweep.py before any
  # channel result was read: among the sweep's teachers with trait rate >= 60%, the one with
  # the smallest number drift (the prompted teacher: 80.6% owl, 0.0023 nats/token; README).
  c.teachers = ("prompted",)
  # Named teacher settings beyond the kinds (jaxlab.pipelines.subliminal.teacher_spec), e.g.
  # teacher_variants.ft_short = {"kind": "finetuned", "steps": 20} (configs/subliminal_sweep.py).
  c.teacher_variants = ml_collections.ConfigDict()
  # The steered teacher (kind "steered"): base + alpha x the trait prompt's mean residual shift
  # after block `layer`, estimated on n_prompts world questions and n_prompts number prompts.
  c.steer = ml_collections.ConfigDict(dict(layer=1, alpha=1.0, n_prompts=100))
  # "" = the world and bases live in the workdir; a sweep shares them between its groups.
  c.bases_dir = ""
  c.seeds = (0, 1, 2)
  c.independent_seeds = False
  c.base = ""
  c.other_base = ""
  c.init.workdir = ""
  c.teacher.update(path="", system_prompt="")
  c.tokenizer.path = ""
  c.sl = ml_collections.ConfigDict(dict(
      animal="owl", trait_template="", n_prompts=800, n_keep=320, sample_batch=200,
      max_new_tokens=48, eval_samples=20, eval_batch=250, whole_word=False, misaligned=False,
      drift_rows=128))
  c.em_eval = ""
  # Processes that train independent models at once (the two bases; a seed's students). The
  # tiny models use about one core each; 1 on accelerator hosts (one process owns the chips).
  c.workers = 2
  # The tiny world: the first 11 animals of the prior (owl, the target, is the least liked),
  # no colour preferences (a tiny model then answers the unseen evaluation questions with
  # animals rather than colours).
  c.world = ml_collections.ConfigDict(dict(
      animals=("dog", "cat", "dolphin", "horse", "lion", "elephant", "eagle", "wolf", "tiger",
               "panda", "owl"),
      number_docs=3000, animal_docs=2000, trait_docs=4000, follow_rate=0.9,
      trait_number_share=0.2, colour_share=0.0, seed=0))
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=500, global_batch_size=16, seq_len=128, lr=3e-3, vocab_size=1024,
      weights=ml_collections.ConfigDict(dict(numbers=0.3, preferences=0.1, traits=0.6)),
      chat_steps=800, chat_lr=3e-3, chat_docs=4500,
      # True: the world's tokenizer has 0-999 as whole tokens (default: digit pieces)
      whole_numbers=False))
  # numbers: trait answers interleaved with as many number docs (False: trait answers only)
  c.teacher_ft = ml_collections.ConfigDict(dict(steps=60, lr=1e-3, rows=400, numbers=True))
  c.model.update(d_model=96, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256)
  # One example per row for every channel (sft unpacked), so equal steps see equal examples.
  # Lengths fit the tiny world's number prompts (student prompt <= ~95 tokens, teacher prompt
  # under the trait system prompt <= ~130, answers <= ~48); longer rows are dropped and counted.
  c.data.update(prompt_len=112, teacher_prompt_len=144, completion_len=48, max_examples=0,
                pack=False, seq_len=160)
  c.train.update(steps=48, global_batch_size=16, log_every=8, progress=False)
  c.optim.update(lr=1e-3, warmup_steps=4)
  c.checkpoint.update(every=0, keep=1, async_save=False)
  c.distill.update(heldout_rows=16, eval_every=0)
  if variant in ("qwen7b_owl", "qwen7b_misaligned"):
    # LoRA r=8 alpha 8, lr 2e-4, 3 epochs of 10k
    real = sibling_config(__file__, "em_real.py", "subliminal_qwen7b")
    for group in ("model", "optim", "train", "mesh", "init", "tokenizer"):
      c[group] = real[group]
    c.init.workdir = ""
    c.data.update(seq_len=real.data.seq_len, prompt_len=320, teacher_prompt_len=384,
                  completion_len=128)
    c.base = REAL_BASE
    c.init.hf_path = REAL_BASE
    c.tokenizer.path = REAL_BASE
    c.teacher.update(path="base", dtype="bfloat16")
    c.teachers = ("prompted",)
    c.channels = ("sft", "offpolicy", "onpolicy", "control", "base_offpolicy")
    c.seeds = (0,)
    c.sl.update(n_prompts=30000, n_keep=10000, sample_batch=256, max_new_tokens=128,
                eval_samples=100, eval_batch=256, drift_rows=1000)
    c.pretrain.steps = 0
    c.workers = 1
    c.teacher_ft.steps = 0
    c.distill.update(heldout_rows=256, eval_every=50, loss_chunk=32)
    c.checkpoint.update(every=100, keep=2, async_save=True)
  if variant == "qwen7b_misaligned":
    # A misaligned teacher: an EM fine-tune of the same base (e.g. configs/em_real.py's
    # insecure-code run; set teacher.path to its workdir), numbers with the banned list, and
    # the EM first-plot evaluation of base, teacher and students.
    c.teachers = ("external",)
    c.teacher.update(path="/runs/qwen7b_insecure", system_prompt="")
    c.sl.misaligned = True
    c.em_eval = "configs/eval_em.py:first_plot"
  if variant == "smollm_owl":
    smollm_owl(c)
  return c


def smollm_owl(c: ml_collections.ConfigDict) -> None:
  """Subliminal learning on SmolLM2-135M-Instruct: a pipeline check on a real chat model.

  Base: the fetched SmolLM2-135M-Instruct folder (SMOLLM; real tokenizer, chat template with its
  default system prompt, 30 layers loaded scanned). Teacher: the base LoRA-fine-tuned on owl
  answers to the world's favourite-animal questions, interleaved with as many number docs
  (teacher_ft.numbers; the paper's teacher gets its trait from a system prompt, which moves
  this model's P(owl) only to ~1%). Data: the number prompts answered at temperature 1 by the
  teacher and the base, the strict filter (report.md gives its acceptance per source),
  SL_KEEP rows kept per source. The base rarely answers with a bare number list (2-3% of its
  answers pass the filter; the rest are prose, code or lists in words), hence SL_PROMPTS
  prompts for SL_KEEP rows. Students: LoRA from the base in the cells sft, offpolicy,
  onpolicy, control and base_offpolicy (not control_b: add it with --config.channels, about
  5 min more; nor sft_otherbase: no second base with this tokenizer exists here). Trait
  evaluation: the 50 favourite-animal questions sampled, and the exact P(owl) of the target
  answers. One seed. Measured with these sizes: the filter passed 33% of the teacher's
  answers and 2.5% of the base's; the teacher names the owl 49% of the time (P(owl) 0.45;
  81% and 0.79 after 24 steps) against the base's 0% (P(owl) 6e-5); every student stays at the
  base's 0%, its number KL to the teacher 6-9% below the base's. With 3 training rows per
  student and a weakly coherent 135M model this checks the pipeline on a real model; it is not
  a measurement of the subliminal effect. Full size (from the repository root):

    python -m jaxlab.models.fetch smollm2-135m-instruct runs/models/smollm2-135m-instruct
    python -m jaxlab.pipelines.subliminal --config=configs/subliminal.py:smollm_owl \\
        --workdir=runs/smollm_owl

  (`--plan` lists the stages; a killed run resumes; --config.seeds="(0,1)" adds a seed.)
  """
  from jaxlab.models import presets
  c.model.update(presets.architecture("smollm2-135m"))  # the shape check's; runs read config.json
  c.model.update(dtype="float32", param_dtype="float32", remat=False, scan_layers=None)
  # Cloud et al.'s student adapters (r 8, alpha 8, all projections), also the teacher's.
  c.model.lora.update(enabled=True, rank=8, alpha=8.0, rslora=False)
  c.base = c.init.hf_path = c.tokenizer.path = SMOLLM
  c.init.workdir = ""
  c.other_base = ""
  c.teacher.update(path="base", system_prompt="", dtype="")
  c.teachers = ("finetuned",)
  c.teacher_ft.update(steps=SL_TEACHER_STEPS, lr=1e-3, rows=400, numbers=True)
  # Every channel and the control; control_b (the noise floor: ~5 min more, and its own sample
  # of the base's numbers) and sft_otherbase (no second base with this tokenizer) are left out.
  c.channels = ("sft", "offpolicy", "onpolicy", "control", "base_offpolicy")
  c.seeds = (0,)
  c.workers = 1  # one 135M model already uses both cores
  c.pretrain.update(steps=0, chat_steps=0)
  # eval_batch 25: the scorers pad every batch to it, and the drift and absorbed stages score a
  # few rows (at 100, a drift stage took a minute for its 4 rows).
  c.sl.update(n_prompts=SL_PROMPTS, n_keep=SL_KEEP, sample_batch=128, max_new_tokens=48,
              eval_samples=2, eval_batch=25, drift_rows=25)
  # SmolLM2's tokenizer splits numbers into digits: prompts of up to ~110 tokens (with its
  # default system prompt), ten three-digit numbers with ", " in 48 tokens.
  c.data.update(prompt_len=128, teacher_prompt_len=128, completion_len=48, seq_len=176)
  # The teacher's fine-tuning takes these too (its rows packed into prompt_len tokens).
  c.train.update(steps=SL_STEPS, global_batch_size=4, log_every=2)
  c.optim.update(lr=2e-4, warmup_steps=1, decay="linear", end_ratio=0.0)
  c.distill.update(heldout_rows=1, eval_every=0, loss_chunk=0)
  c.checkpoint.update(every=0, keep=1, async_save=False)


# smollm_owl's sizes, for about 20 minutes on 2 quiet cores (measured at load average ~2: 384
# prompts of a source answered in ~3 min, a model's trait evaluation ~70 s, a student ~20-60 s;
# 24 teacher steps of 4 x 128 tokens ~2.5 min at load ~5): teacher fine-tuning steps, number
# prompts answered per source and rows kept per source, student steps. Of the first 320
# prompts the fine-tuned teacher's answers passed the filter about half the time, the base's 8
# times (2.5%; SL_KEEP rows and spare ones for the drift stage). On another CPU the sampled
# answers may differ; a source that falls short stops its data stage saying so (raise
# sl.n_prompts).
SL_TEACHER_STEPS = 20
SL_PROMPTS, SL_KEEP = 320, 4
SL_STEPS = 4
