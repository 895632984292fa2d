"""Training channels: one small module each (see `common` for the interface)."""
from __future__ import annotations

import importlib

CHANNELS = ("sft", "pretrain", "offpolicy", "onpolicy", "gkd")


def get(name: str):
  """The channel module called `name`; an unknown name is an error naming the config key."""
  if name not in CHANNELS:
    raise ValueError(f"config key channel={name!r}: expected one of {CHANNELS}")
  return importlib.import_module(f"jaxlab.train.channels.{name}")
