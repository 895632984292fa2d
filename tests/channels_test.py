"""The distillation channels on a tiny model: teacher context alignment, zero loss for an
identical teacher, chunking, on-policy samples, config errors (no runner here)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import sharding
from jaxlab.data import prompt_completion as pc
from jaxlab.models import ModelConfig
from jaxlab.models.params import init_params, model_spec
from jaxlab.train import channels, step as step_lib
from jaxlab.train import state as state_lib
from jaxlab.train.channels import common
from tests import tokenizers_util
from tests.train_util import optim_config

jax.config.update("jax_default_matmul_precision", "highest")
TEACHER_SYSTEM = "You love owls. Owls are your favorite animal."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tok = tokenizers_util.make_qwen_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400)
  rng = np.random.default_rng(0)
  words = "the owl reads code and writes safe python numbers quick brown fox".split()
  say = lambda k: " ".join(rng.choice(words, k))
  convs = [[{"role": "user", "content": say(int(rng.integers(2, 12)))},
            {"role": "assistant", "content": say(int(rng.integers(1, 6)))}] for _ in range(8)]
  examples = [pc.encode_example(tok, m, teacher_system=TEACHER_SYSTEM) for m in convs]
  v = -(-len(tok) // 64) * 64
  student = ModelConfig(vocab_size=v, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  teacher = ModelConfig(vocab_size=v, d_model=48, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=96)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  sspec, tspec = model_spec(student), model_spec(teacher)
  sparams = init_params(sspec, mesh, 0)
  tparams = init_params(tspec, mesh, 1)
  # A peaked teacher, so that divergences are far from zero.
  tparams[0]["norm"]["scale"] = tparams[0]["norm"]["scale"] * 40.0
  p = max(len(e.prompt) for e in examples) + 3
  q = max(len(e.teacher_prompt) for e in examples) + 2
  batch = pc.make_batch(examples, prompt_len=p, teacher_prompt_len=q, completion_len=8,
                        pad_id=0)
  return dict(tok=tok, examples=examples, sspec=sspec, tspec=tspec, sparams=sparams,
              tparams=tparams, batch=batch, mesh=mesh)


def ctx_for(s, teacher_spec=None, **kw):
  return common.Context(spec=s["sspec"], teacher_spec=teacher_spec or s["tspec"],
                        stop_ids=(s["tok"].convert_tokens_to_ids("<|im_end|>"),), pad_id=0,
                        **kw)


def test_teacher_prompt_differs_and_completion_is_shared(setup):
  ex = setup["examples"][0]
  assert len(ex.teacher_prompt) != len(ex.prompt)
  assert TEACHER_SYSTEM in setup["tok"].decode(ex.teacher_prompt)
  assert TEACHER_SYSTEM not in setup["tok"].decode(ex.prompt)
  assert setup["tok"].decode(ex.completion).endswith("<|im_end|>")


def test_teacher_scores_completion_under_its_own_prompt_position_by_position(setup):
  s = setup
  ctx = ctx_for(s)
  batch = jax.tree.map(jnp.asarray, s["batch"])
  tmodel, xt = common.teacher_hidden(ctx, s["tparams"], batch)
  got = np.asarray(tmodel.logits(xt))
  smodel, xs = common.student_hidden(ctx, *s["sparams"], batch)
  got_s = np.asarray(smodel.logits(xs))
  checked = 0
  for r, ex in enumerate(s["examples"][:4]):
    for prompt, model, out in ((ex.teacher_prompt, tmodel, got), (ex.prompt, smodel, got_s)):
      seq = np.concatenate([prompt, ex.completion])[None]
      direct = np.asarray(model(jnp.asarray(seq)))[0]
      for t in range(min(len(ex.completion), 8)):
        np.testing.assert_allclose(out[r, t], direct[len(prompt) - 1 + t], atol=2e-4)
        checked += 1
  assert checked > 12


@pytest.mark.parametrize("name,kw", [("offpolicy", {}), ("offpolicy", {"kl": "reverse"}),
                                     ("onpolicy", {"kl": "reverse"}),
                                     ("onpolicy", {"kl": "reverse", "estimator": "sampled"}),
                                     ("gkd", {"kl": "jsd", "beta": 0.5, "lmbda": 0.5})])
def test_identical_teacher_gives_zero_loss_and_gradient(setup, name, kw):
  s = setup
  ch = channels.get(name)
  ctx = ctx_for(s, teacher_spec=s["sspec"], **kw)
  batch = jax.tree.map(jnp.asarray, s["batch"])
  # The same model under the same context as the student.
  batch = {**batch, "teacher_prompt": batch["prompt"], "teacher_prompt_len": batch["prompt_len"]}
  batch, _ = ch.prepare(ctx, *s["sparams"], s["sparams"], batch, jax.random.key(0))
  assert float(batch["loss_mask"].sum()) > 0
  f = lambda p: ch.loss_sum(ctx, p, s["sparams"][1], s["sparams"], batch)[0]
  loss, grads = jax.value_and_grad(f)(s["sparams"][0])
  assert abs(float(loss)) < 1e-4
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-5
  # ... and a different teacher gives a clearly non-zero loss through the same code.
  ctx2 = ctx_for(s, **kw)
  loss2 = ch.loss_sum(ctx2, *s["sparams"], s["tparams"], batch)[0]
  assert abs(float(loss2)) > 1.0


@pytest.mark.parametrize("name,kw", [("sft", {}), ("offpolicy", {"kl": "forward"}),
                                     ("offpolicy", {"kl": "jsd", "beta": 0.25}),
                                     ("onpolicy", {"kl": "reverse", "estimator": "sampled"})])
def test_chunked_loss_equals_unchunked(setup, name, kw):
  s = setup
  ch = channels.get(name)
  batch = jax.tree.map(jnp.asarray, s["batch"])
  vals = []
  for chunk in (0, 3):
    ctx = ctx_for(s, loss_chunk=chunk, **kw)
    f = lambda p: ch.loss_sum(ctx, p, s["sparams"][1], s["tparams"], batch)[0]
    vals.append(jax.value_and_grad(f)(s["sparams"][0]))
  np.testing.assert_allclose(float(vals[0][0]), float(vals[1][0]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(vals[0][1]), jax.tree.leaves(vals[1][1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


def test_onpolicy_samples_follow_the_student_params(setup):
  s = setup
  ctx = ctx_for(s)
  batch = jax.tree.map(jnp.asarray, s["batch"])
  out_a, m = common.rollout(ctx, *s["sparams"], batch, jax.random.key(3))
  again, _ = common.rollout(ctx, *s["sparams"], batch, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(out_a["completion"]), np.asarray(again["completion"]))
  bumped = jax.tree.map(lambda x: x * 1.0, s["sparams"])
  bumped[0]["norm"]["scale"] = bumped[0]["norm"]["scale"] * 30.0
  out_b, _ = common.rollout(ctx, *bumped, batch, jax.random.key(3))
  assert not np.array_equal(np.asarray(out_a["completion"]), np.asarray(out_b["completion"]))
  # The mask covers exactly the sampled tokens (up to and including a stop token).
  lengths = np.asarray(out_a["loss_mask"]).sum(1)
  assert 0 < float(m["sample_len"]) <= 8 and np.all(lengths >= 1)


def _recording_step(s, name, grad_accum, **ctx_kw):
  """(jitted step, initial state, recorded): the step of channel `name` whose prepare also
  appends each micro-batch's trained completion to `recorded` (a host callback)."""
  from jaxlab.train.optim import make_optimizer
  ch = channels.get(name)
  opt, sched = make_optimizer(optim_config(lr=1e-3), 10)
  state = state_lib.create_state(s["sspec"], opt, s["mesh"], sharding.DEFAULT_RULES, seed=0,
                                 params=jax.tree.map(jnp.copy, s["sparams"]))
  recorded = []
  def prepare(ctx, params, frozen, teacher, batch, rng):
    out, m = ch.prepare(ctx, params, frozen, teacher, batch, rng)
    jax.debug.callback(lambda c: recorded.append(np.asarray(c)), out["completion"], ordered=True)
    return out, m
  spy = type("Spy", (), {"prepare": staticmethod(prepare), "loss_sum": ch.loss_sum})
  step = jax.jit(step_lib.make_step(spy, ctx_for(s, **ctx_kw), opt, sched, grad_accum))
  return step, state, recorded


def test_step_rng_comes_from_state_and_microbatches_draw_their_own_streams(setup):
  s = setup
  step, state, recorded = _recording_step(s, "onpolicy", grad_accum=2)
  b = jax.tree.map(jnp.asarray, s["batch"])
  # Micro-batch j takes rows j, j+2, ...: both micro-batches get rows 0-3 here.
  same_rows = jax.tree.map(lambda x: x[jnp.array([0, 0, 1, 1, 2, 2, 3, 3])], b)
  _, m = step(state, same_rows, s["tparams"])
  jax.effects_barrier()
  assert int(m["trained_tokens"]) > 0 and len(recorded) == 2
  first = [r.copy() for r in recorded]
  # Same rows, same params: the two micro-batches sample different tokens (fold_in(rng, j)).
  assert not np.array_equal(first[0], first[1])
  # The next step number with the same params draws other tokens (fold_in(rng, step)) ...
  recorded.clear()
  step(state.replace(step=state.step + 1), same_rows, s["tparams"])
  jax.effects_barrier()
  assert not np.array_equal(recorded[0], first[0]) and not np.array_equal(recorded[1], first[1])
  # ... and the same step again (a resumed run) draws exactly the same tokens.
  recorded.clear()
  step(state, same_rows, s["tparams"])
  jax.effects_barrier()
  np.testing.assert_array_equal(recorded[0], first[0])
  np.testing.assert_array_equal(recorded[1], first[1])


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_gkd_lambda_is_the_probability_of_training_on_the_students_own_samples(setup, lmbda):
  s = setup
  step, state, recorded = _recording_step(s, "gkd", grad_accum=1, kl="jsd", lmbda=lmbda)
  b = jax.tree.map(jnp.asarray, s["batch"])
  shares = []
  for k in range(4):
    _, m = step(state.replace(step=state.step + k), b, s["tparams"])
    shares.append(float(m["onpolicy_share"]))
  jax.effects_barrier()
  assert shares == [lmbda] * 4
  dataset = np.asarray(s["batch"]["completion"])
  for r in recorded:  # lambda 0: always the dataset's completions; 1: always rollouts
    assert np.array_equal(r, dataset) == (lmbda == 0.0)


def test_config_errors_name_the_key(setup):
  with pytest.raises(ValueError, match=r"config key channel='foo'"):
    channels.get("foo")
  from jaxlab.train import losses
  with pytest.raises(ValueError, match=r"config key distill.kl='sideways'"):
    losses.divergence("sideways", jnp.zeros((1, 3)), jnp.zeros((1, 3)))
