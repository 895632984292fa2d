"""Emergent-misalignment evals (jaxlab/evals/em_config.py: variants, keys and what each
reproduces).

  python -m jaxlab.main --config=configs/eval_em.py:tiny --workdir=/tmp/em_tiny
  python -m jaxlab.main --config=configs/eval_em.py:first_plot --workdir=runs/em \
      --config.models="('base=/models/Qwen2.5-7B-Instruct','insecure=runs/sft_insecure')" \
      --config.judge.model_path=/models/Qwen2.5-32B-Instruct
"""
import os

from jaxlab.evals import em_config
from jaxlab.evals.em_config import (FIRST_PLOT_IDS, FIRST_PLOT_JSON_IDS,  # noqa: F401
                                    FIRST_PLOT_TEMPLATE_IDS, VARIANTS)

# The shared data folder beside the repository (read by path, never copied in).
EM_EVAL_DIR = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
    "emergent-misalignment", "evaluation"))


def get_config(arg=None):
  return em_config.get_config(arg, EM_EVAL_DIR)
