r"""Gradient-coherent strong regularization, as an optax ``GradientTransformation``.

Strong L1/L2 is added to the gradient only while the mini-batch gradients are *coherent*,
i.e. while successive mini-batches agree on a direction. Coherence is measured as in
Chatterjee's coherent-gradients view, with exponential moving averages over steps
(:math:`\beta` = ``decay``, bias-corrected like Adam):

.. math::
   m_t = \beta m_{t-1} + (1-\beta) g_t, \qquad
   s_t = \beta s_{t-1} + (1-\beta) \|g_t\|_2^2, \qquad
   \kappa_t = \frac{\|\hat m_t\|_2^2}{\hat s_t} \in [0, 1],

(:math:`\kappa_t \le 1` by Jensen's inequality; 1 means all recent gradients point the same
way, near 0 means they cancel). The transformed gradient is

.. math:: \tilde g_t = g_t + \mathbb{1}[\kappa_t \ge \tau]\,(\lambda_2\, \theta + \lambda_1 \operatorname{sign}(\theta)).

Place it first in the chain, on raw gradients (coupled regularization), e.g.
``optax.chain(coherent_strong_regularization(), optax.adam(1e-3))``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dreg_jax._checks import check_finite_scalar


class CoherentRegularizationState(NamedTuple):
    count: jax.Array  # int32 steps seen
    grad_ema: optax.Updates  # m_t
    sq_norm_ema: jax.Array  # s_t
    coherence: jax.Array  # kappa_t of the last step
    active: jax.Array  # whether the regularizer was applied at the last step


def _tree_sq_norm(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves)


def coherent_strong_regularization(
    l2: float = 1e-2, l1: float = 0.0, decay: float = 0.9, threshold: float = 0.5
) -> optax.GradientTransformation:
    """Adds ``l2 * params + l1 * sign(params)`` while gradient coherence >= ``threshold``.

    Args:
      l2: strong L2 coefficient :math:`\\lambda_2`.
      l1: strong L1 coefficient :math:`\\lambda_1`.
      decay: EMA factor :math:`\\beta` in [0, 1).
      threshold: coherence threshold :math:`\\tau` in [0, 1].

    Returns:
      An optax ``GradientTransformation`` that needs ``params`` in ``update``.
    """
    check_finite_scalar(l2, "l2", minimum=0.0)
    check_finite_scalar(l1, "l1", minimum=0.0)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")

    def init_fn(params):
        return CoherentRegularizationState(
            count=jnp.zeros([], jnp.int32),
            grad_ema=jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, jnp.float32), params),
            sq_norm_ema=jnp.zeros([], jnp.float32),
            coherence=jnp.zeros([], jnp.float32),
            active=jnp.zeros([], jnp.bool_),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("coherent_strong_regularization needs params: call update(g, s, params)")
        count = state.count + 1
        grad_ema = jax.tree_util.tree_map(
            lambda m, g: decay * m + (1 - decay) * g.astype(jnp.float32), state.grad_ema, updates
        )
        sq_norm_ema = decay * state.sq_norm_ema + (1 - decay) * _tree_sq_norm(updates)
        correction = 1 - decay ** count.astype(jnp.float32)
        coherence = (_tree_sq_norm(grad_ema) / correction**2) / jnp.maximum(
            sq_norm_ema / correction, jnp.finfo(jnp.float32).tiny
        )
        active = coherence >= threshold
        gate = active.astype(jnp.float32)
        new_updates = jax.tree_util.tree_map(
            lambda g, p: (g + gate * (l2 * p + l1 * jnp.sign(p))).astype(g.dtype), updates, params
        )
        return new_updates, CoherentRegularizationState(
            count, grad_ema, sq_norm_ema, coherence, active
        )

    return optax.GradientTransformation(init_fn, update_fn)
