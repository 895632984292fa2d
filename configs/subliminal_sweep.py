"""The subliminal world's knobs, swept (jaxlab/pipelines/subliminal_sweep.py).

  python -m jaxlab.pipelines.subliminal_sweep --config=configs/subliminal_sweep.py \\
      --workdir=runs/subliminal_sweep [--config.sweep.only=teachers,student_lr]

Every group is the tiny subliminal config (configs/subliminal.py:tiny) with 5 seeds, the cells
sft / offpolicy / onpolicy, the control and the noise control (control_b), and the
different-base student, plus its overrides:

  teachers      the default world and student; teacher strength as (trait rate, number drift)
                pairs: prompted (the paper's system prompt), fine-tuned on trait answers +
                number docs for 60 steps (default) or 20 (ft_short), fine-tuned on trait answers
                only (ft_trait), and steering-vector teachers (base + alpha x the trait prompt's
                residual shift after block 1) at alpha 0.5, 1 and 1.5 (measured on the tiny
                base before the sweep, teacher only: alpha 2 names the owl 81% of the time
                but only 38% of its number answers pass the filter, too few for sl.n_keep;
                alpha 4: 13%, alpha 16: 0.5%: a steered teacher that strong visibly changes
                its numbers, so it is not a subliminal teacher)
  student_lr    students at lr 3e-4 instead of 1e-3 (less student noise, less absorption)
  whole_numbers the world's tokenizer with 0-999 as whole tokens (a new base)
  untied        separate input and output embeddings (the tiny model ties them; a new base)
  wide          d_model 128, 4 layers instead of 96, 3 (a new base)
  student_steps students trained 6x longer (300 steps instead of 48: ~15 passes over the
                320 kept rows) at student_lr's lr 3e-4: does longer training of a low-noise
                student absorb more of the teacher and transfer?
  independent   the teachers group's default world, with every seed its own run: its own
                bases (pretrained from seed 10 s) and teachers as well as data and students
                (independent_seeds), so the seed-level intervals include the variance of the
                base and the teacher, not only of the students (the other groups' intervals
                are conditional on one base and teacher set)
  steps_independent  student_steps' students (lr 3e-4, 300 steps) with independent seeds
                (every seed its own bases and teachers, as `independent`): does student_steps'
                transfer, measured on one shared base, hold across bases?

The main job's teacher is chosen by a rule stated here before any channel result was seen:
among the `teachers` group's teachers whose own trait rate is >= 60%, the one with the
smallest number drift from the base (the most subliminal teacher that clearly has the trait);
the main job keeps that teacher, every cell and 3 seeds (its 10-minute budget).
"""
import ml_collections

from jaxlab.config import sibling_config

CELLS = ("sft", "offpolicy", "onpolicy", "control", "control_b", "sft_otherbase")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "subliminal.py", "tiny")
  c.job = "subliminal_sweep"
  c.seeds = (0, 1, 2, 3, 4)
  c.channels = CELLS
  c.teachers = ("prompted", "finetuned")
  two = ("prompted", "finetuned")
  # Groups run in this order (the teachers group first: the main job's rule reads it).
  c.sweep = ml_collections.ConfigDict(dict(only=arg or "", order=(
      "teachers", "student_lr", "whole_numbers", "untied", "wide", "student_steps",
      "independent", "steps_independent"),
      groups=dict(
      teachers=dict(
          teachers=("prompted", "finetuned", "ft_short", "ft_trait", "steer_a05", "steer_a1",
                    "steer_a15"),
          teacher_variants=dict(
              ft_short=dict(kind="finetuned", steps=20),
              ft_trait=dict(kind="finetuned", numbers=False),
              steer_a05=dict(kind="steered", alpha=0.5),
              steer_a1=dict(kind="steered", alpha=1.0),
              steer_a15=dict(kind="steered", alpha=1.5))),
      student_lr=dict(teachers=two, optim=dict(lr=3e-4)),
      whole_numbers=dict(teachers=two, pretrain=dict(whole_numbers=True)),
      untied=dict(teachers=two, model=dict(tie_embeddings=False)),
      wide=dict(teachers=two, model=dict(d_model=128, n_layers=4)),
      student_steps=dict(teachers=two, optim=dict(lr=3e-4), train=dict(steps=300)),
      independent=dict(teachers=two, independent_seeds=True),
      steps_independent=dict(teachers=two, optim=dict(lr=3e-4), train=dict(steps=300),
                             independent_seeds=True),
  )))
  return c
