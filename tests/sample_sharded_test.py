"""Sharded sampling on 8 fake CPU devices equals 1-device sampling for the same seed.

XLA_FLAGS must be set before jax is imported, and the test suite shares one
process, so the check runs in a fresh Python subprocess.
"""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
  import json
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import PartitionSpec as P
  from jaxlab import sharding
  from jaxlab.models import ModelConfig
  from jaxlab.models.params import init_params, model_spec
  from jaxlab.sample import Sampler, sample
  from jaxlab.sample.cache import cache_sharding

  assert jax.device_count() == 8, jax.devices()
  FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  spec = model_spec(cfg)
  mesh8 = sharding.make_mesh((2, 2, 2))
  mesh1 = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  tr8, fr8 = init_params(spec, mesh8, seed=0)
  tr1, fr1 = jax.device_put((tr8, fr8), spec.shardings(mesh1))
  assert tr8["layers"][0]["mlp"]["up_proj"]["kernel"].sharding.spec != P()
  rng = np.random.default_rng(0)
  b, p = 8, 12
  n = rng.integers(1, p + 1, b).astype(np.int32)
  tok = np.zeros((b, p), np.int32)
  for i in range(b):
    tok[i, p - n[i]:] = rng.integers(1, 64, n[i])
  spec_list = lambda sp: [list(a) if isinstance(a, tuple) else a for a in sp]
  res = {"cache_spec": spec_list(cache_sharding(cfg, b, p + 9, mesh8).spec)}
  for name, kw in [("greedy", dict(temperature=0.0)), ("t1", dict(temperature=1.0)),
                   ("topp", dict(temperature=0.8, top_p=0.9, top_k=20))]:
    kw.update(max_new_tokens=10, stop_ids=(3, 4))
    f8 = jax.jit(lambda tr, fr, t, l, k: sample(spec, tr, fr, t, l, k, mesh=mesh8, **kw),
                 compiler_options=FAST)
    f1 = jax.jit(lambda tr, fr, t, l, k: sample(spec, tr, fr, t, l, k, **kw),
                 compiler_options=FAST)
    t8 = jax.device_put(tok, sharding.batch_sharding(mesh8, 2))
    o8 = f8(tr8, fr8, t8, jax.device_put(n, sharding.batch_sharding(mesh8, 1)), jax.random.key(5))
    o1 = jax.device_get(f1(tr1, fr1, tok, n, jax.random.key(5)))
    res[name] = {"tokens_equal": bool((np.asarray(o8.tokens) == o1.tokens).all()),
                 "lengths_equal": bool((np.asarray(o8.lengths) == o1.lengths).all()),
                 "max_lp_diff": float(np.abs(np.asarray(o8.logprobs) - o1.logprobs).max()),
                 "out_spec": spec_list(o8.tokens.sharding.spec)}
  s8 = Sampler(spec, tr8, fr8, mesh=mesh8, batch_size=8, stop_ids=(3,), pad_id=0,
               buckets=(16,), compiler_options=FAST)
  s1 = Sampler(spec, tr1, fr1, mesh=mesh1, batch_size=8, stop_ids=(3,), pad_id=0,
               buckets=(16,), compiler_options=FAST)
  prompts = [tok[i, p - n[i]:].tolist() for i in range(b)] * 2
  c8 = s8.generate(prompts, seed=1, max_new_tokens=8)
  c1 = s1.generate(prompts, seed=1, max_new_tokens=8)
  res["engine_equal"] = all(np.array_equal(a.tokens, c.tokens) for a, c in zip(c8, c1))
  # Packed prefill on the mesh (rows of 32: the 8 prompts fit in 4 rows, one per batch shard).
  s8p = Sampler(spec, tr8, fr8, mesh=mesh8, batch_size=8, stop_ids=(3,), pad_id=0,
                buckets=(32,), compiler_options=FAST, pack_prefill=True)
  c8p = s8p.generate(prompts, seed=1, max_new_tokens=8)
  res["packed_rows"] = sorted(k[-1] for k in s8p._compiled)
  res["engine_packed_equal"] = all(np.array_equal(a.tokens, c.tokens) for a, c in zip(c8p, c1))
  print("RESULT" + json.dumps(res))
""")


def test_sharded_sampling_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  res = json.loads(line[len("RESULT"):])
  assert res["cache_spec"] == [["data", "fsdp"], "tensor", None, None], res
  for name in ("greedy", "t1", "topp"):
    r = res[name]
    assert r["tokens_equal"] and r["lengths_equal"], (name, r)
    assert r["max_lp_diff"] < 1e-4, (name, r)
    assert r["out_spec"][0] == ["data", "fsdp"], (name, r)  # outputs stay batch-sharded
  assert res["engine_equal"], res
  assert res["packed_rows"] == [4] and res["engine_packed_equal"], res
