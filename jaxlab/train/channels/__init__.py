"""Training channels: one small module each (see `common` for what a channel declares).

The runner asks the channel, through the functions here, what it needs: its rows
(`data_format`), whether it needs a teacher (NEEDS_TEACHER), whether it samples rollouts
(SAMPLES), whether cached teacher top-k log-probs apply (`uses_topk_cache`), the context its
step runs in (`context`) and the settings it records (`describe`, channel.json).
"""
from __future__ import annotations

import importlib

import ml_collections

from jaxlab import config as config_lib

CHANNELS = ("sft", "pretrain", "offpolicy", "onpolicy", "gkd")


def get(name: str):
  """The channel module called `name`; an unknown name is an error naming the config key."""
  if name not in CHANNELS:
    raise ValueError(f"config key channel={name!r}: expected one of {CHANNELS}")
  return importlib.import_module(f"jaxlab.train.channels.{name}")


def _distill(config) -> ml_collections.ConfigDict:
  return config.get("distill", ml_collections.ConfigDict())


def data_format(config, channel) -> str:
  """"packed" or "prompt_completion": what the run's rows are.

  A config with a `distill` section compares channels, so every channel that can (sft as well
  as the distillation channels) trains on the same prompt/completion rows: the same examples,
  held-out rows, order, steps and examples per step whatever `channel` is. Packing cannot
  apply to the distillation channels, so there it is refused for all rather than applied to
  some."""
  formats = channel.DATA_FORMATS
  fmt = "prompt_completion" if "distill" in config and "prompt_completion" in formats \
      else formats[0]
  if fmt == "prompt_completion" and config.data.get("pack", False):
    raise config_lib.ConfigError(
        "config key data.pack=True: in a channel comparison (a config with a `distill` "
        "section) every channel trains one example per row; set data.pack=False")
  return fmt


def uses_topk_cache(config, channel) -> bool:
  """Whether the run trains on cached teacher top-k log-probs (jaxlab.train.topk_cache)."""
  return channel.USES_TOPK_CACHE and int(config.distill.get("topk", 0)) > 0


def check(config, channel) -> None:
  """Settings the chosen channel cannot honour are errors naming the key, before any work."""
  d = _distill(config)
  topk = int(d.get("topk", 0) or 0)
  if topk <= 0:
    return
  name = config.get("channel", "sft")
  if not channel.USES_TOPK_CACHE:
    raise config_lib.ConfigError(
        f"config key distill.topk={topk}: channel {name!r} cannot train on cached teacher "
        "top-k log-probs (they describe the dataset's completions; this channel "
        + ("samples its own" if channel.NEEDS_TEACHER else "trains on hard labels")
        + "); set distill.topk=0")
  kl = d.get("kl", "") or channel.DEFAULT_KL
  if kl != "forward":
    raise config_lib.ConfigError(
        f"config key distill.kl={kl!r}: cached teacher top-k log-probs (distill.topk={topk}) "
        "support only the forward KL")


def context(config, channel, fmt: str, spec, teacher_spec, tokenizer, mesh, rules):
  """The static settings the channel's step reads (common.Context)."""
  from jaxlab.data.chat import end_of_turn_ids, pad_id
  from jaxlab.train import losses
  from jaxlab.train.channels import common
  d = _distill(config)
  if fmt != "prompt_completion":
    return common.Context(spec=spec, loss_chunk=int(config.get("distill", {}).get("loss_chunk", 0)))
  kl = d.get("kl", "") or channel.DEFAULT_KL or "forward"
  if kl not in losses.DIVERGENCES:
    raise ValueError(f"config key distill.kl={kl!r}: expected one of {losses.DIVERGENCES}")
  return common.Context(
      spec=spec, teacher_spec=teacher_spec, kl=kl, beta=float(d.get("beta", 0.5)),
      temperature=float(d.get("temperature", 1.0)), lmbda=float(d.get("lmbda", 0.5)),
      estimator=d.get("estimator", "exact"), loss_chunk=int(d.get("loss_chunk", 0)),
      sample_temperature=float(d.get("sample_temperature", 1.0)),
      top_p=float(d.get("top_p", 1.0)), stop_ids=tuple(end_of_turn_ids(tokenizer)),
      pad_id=pad_id(tokenizer), mesh=mesh, rules=rules)


def describe(config, channel, fmt: str, ctx, use_cache: bool) -> dict:
  """What a run records in channel.json: the channel and, on prompt/completion rows, the
  settings it uses (None for those it does not: SETTINGS, SAMPLES)."""
  info = {"channel": config.get("channel", "sft")}
  if fmt != "prompt_completion":
    return info
  uses = lambda key, value: value if key in channel.SETTINGS else None
  rollouts = lambda value: value if channel.SAMPLES else None
  info.update(kl=ctx.kl, beta=ctx.beta, temperature=ctx.temperature,
              estimator=uses("estimator", ctx.estimator),
              sample_temperature=rollouts(ctx.sample_temperature), top_p=rollouts(ctx.top_p),
              biased_estimator=bool(
                  "estimator" in channel.SETTINGS and ctx.estimator == "sampled"
                  and (ctx.sample_temperature != ctx.temperature or ctx.top_p != 1.0)),
              lmbda=uses("lmbda", ctx.lmbda), teacher=config.teacher.path,
              teacher_cache=bool(use_cache))
  return info
