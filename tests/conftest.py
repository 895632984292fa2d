"""Test settings: silent broadcasting bugs fail (nanodo style), float32 matmuls exact."""
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
