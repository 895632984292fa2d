"""Test settings: silent broadcasting bugs fail (nanodo style), float32 matmuls exact."""
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # pylint: disable=wrong-import-position


@pytest.fixture(autouse=True)
def _fresh_warnings():
  """Each test starts as a fresh process would: `console.warn_once` remembers keys per process,
  and under pytest-xdist an earlier test in the same worker must not silence a later one's."""
  from jaxlab import console  # pylint: disable=import-outside-toplevel
  console._state["warned"].clear()  # pylint: disable=protected-access
  yield
