"""Random probe vectors for stochastic Jacobian-norm estimators."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rademacher(key, shape, dtype=jnp.float32):
    """Independent +-1 entries with probability 1/2 each: E[v v^T] = I."""
    return jax.random.rademacher(key, shape, dtype=dtype)


def unit_sphere(key, shape, dtype=jnp.float32):
    """Rows (last axis) drawn uniformly on the unit sphere: E[v v^T] = I / dim."""
    g = jax.random.normal(key, shape, dtype=jnp.float32)
    g = g / jnp.linalg.norm(g, axis=-1, keepdims=True)
    return g.astype(dtype)
