"""pretrain: next-token prediction on every token of packed rows (config data.source="mixture",
see jaxlab.data.mixture). The loss is SFT's negative log-likelihood; what differs is the data:
documents of a weighted mixture, no chat mask."""
from __future__ import annotations

from jaxlab.train.channels import sft

DATA_FORMATS = ("packed",)
NEEDS_TEACHER = False
DEFAULT_KL = None
USES_TOPK_CACHE = False
SAMPLES = False
SETTINGS = ()
prepare = sft.prepare
loss_sum = sft.loss_sum
