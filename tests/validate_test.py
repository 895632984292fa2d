"""config.validate on the distillation and sampling keys, before anything is written."""
import glob
import importlib.util
import os

import pytest

from jaxlab.config import (ConfigError, apply_overrides, load_config_file, resume_changes,
                           validate, validate_against_vocab)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def distill(*overrides):
  return apply_overrides(load_config_file(os.path.join(ROOT, "configs/distill.py:tiny")),
                         list(overrides))


@pytest.mark.parametrize("override, message", [
    ("distill.temperature=-1.0", "config key distill.temperature=-1.0 must be a positive finite"),
    ("distill.temperature=0.0", "config key distill.temperature=0.0 must be a positive finite"),
    ("distill.sample_temperature=-1.0",
     "config key distill.sample_temperature=-1.0 must be a positive finite"),
    ("distill.sample_temperature=0.0",
     "config key distill.sample_temperature=0.0 must be a positive finite"),
    ("distill.top_p=0.0", r"config key distill.top_p=0.0 must be in \(0, 1\]"),
    ("distill.top_p=1.5", r"config key distill.top_p=1.5 must be in \(0, 1\]"),
    ("distill.beta=-0.1", r"config key distill.beta=-0.1 must be in \[0, 1\]"),
    ("distill.beta=1.1", r"config key distill.beta=1.1 must be in \[0, 1\]"),
    ("distill.lmbda=2.0", r"config key distill.lmbda=2.0 must be in \[0, 1\]"),
    ("distill.kl=backward", r"config key distill.kl='backward': expected one of"),
    ("distill.estimator=mc", r"config key distill.estimator='mc': expected one of"),
    ("distill.loss_chunk=-1", "config key distill.loss_chunk=-1 must be >= 0"),
])
def test_bad_distill_keys_name_key_and_value(override, message):
  with pytest.raises(ConfigError, match=message):
    validate(distill(override))


def test_non_finite_temperatures():
  c = distill()
  with c.unlocked():
    c.distill.temperature = float("nan")
  with pytest.raises(ConfigError, match="distill.temperature=nan must be a positive finite"):
    validate(c)
  c = distill()
  with c.unlocked():
    c.distill.sample_temperature = float("inf")
  with pytest.raises(ConfigError, match="distill.sample_temperature=inf must be a positive"):
    validate(c)


@pytest.mark.parametrize("good", [
    (), ("distill.beta=0.0",), ("distill.beta=1.0",), ("distill.lmbda=0.0",),
    ("distill.top_p=1.0",), ("distill.kl=reverse",), ("distill.kl=",),
    ("distill.estimator=sampled",), ("channel=onpolicy", "distill.estimator=exact",
                                     "distill.sample_temperature=0.7", "distill.top_p=0.9"),
    ("channel=onpolicy", "distill.estimator=sampled", "distill.temperature=2.0",
     "distill.sample_temperature=2.0"),
    ("channel=gkd", "distill.sample_temperature=0.5"),
])
def test_good_distill_keys_pass(good):
  validate(distill(*good))


@pytest.mark.parametrize("bias", [
    ("distill.sample_temperature=0.7",),
    ("distill.top_p=0.9",),
    ("distill.temperature=2.0",),
])
def test_sampled_onpolicy_estimator_needs_unbiased_rollouts(bias):
  c = distill("channel=onpolicy", "distill.estimator=sampled", *bias)
  with pytest.raises(ConfigError) as e:
    validate(c)
  msg = str(e.value)
  for key in ("distill.sample_temperature=", "distill.temperature=", "distill.top_p=",
              "distill.allow_biased_estimator"):
    assert key in msg, msg
  validate(distill("channel=onpolicy", "distill.estimator=sampled", *bias,
                   "distill.allow_biased_estimator=True"))  # the explicit waiver
  validate(distill("channel=offpolicy", "distill.estimator=sampled", *bias))  # not on-policy


def test_allow_biased_estimator_is_free_on_resume():
  saved = distill().to_dict()
  del saved["distill"]["allow_biased_estimator"]  # a run from before the key existed
  assert resume_changes(saved, distill("distill.allow_biased_estimator=True")) == []


def test_topk_against_the_vocabulary():
  validate_against_vocab(distill("distill.topk=0"), 300)
  validate_against_vocab(distill("distill.topk=300"), 300)
  with pytest.raises(ConfigError, match=r"config key distill.topk=301 .*300"):
    validate_against_vocab(distill("distill.topk=301"), 300)
  validate_against_vocab(load_config_file(os.path.join(ROOT, "configs/sft.py:tiny")), 10)


def _variants():
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    spec = importlib.util.spec_from_file_location("_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in getattr(module, "VARIANTS", (None,)):
      yield f"{os.path.basename(path)}:{variant}" if variant else os.path.basename(path)


@pytest.mark.parametrize("spec", list(_variants()))
def test_every_config_variant_validates(spec):
  c = load_config_file(os.path.join(ROOT, "configs", spec))
  validate(c)
  if "distill" in c:
    for channel in ("offpolicy", "onpolicy", "gkd"):
      with c.unlocked():
        c.channel = channel
      validate(c)
