r"""Whole-network Jacobian penalty with random projections (Hoffman, Roberts & Yaida, 2019).

For the network :math:`f: \mathbb{R}^{D} \to \mathbb{R}^{C}` with Jacobian :math:`J(x)`,

.. math:: \|J\|_F^2 = C\, E_{v \sim U(S^{C-1})} \|v^T J\|_2^2
   \approx \frac{C}{n_{proj}} \sum_{p=1}^{n_{proj}} \|v_p^T J\|_2^2 ,

and the penalty (their Algorithm 1, their default :math:`\lambda_{JR} = 0.01`,
:math:`n_{proj} = 1`) is

.. math:: P = \frac{\lambda_{JR}}{2} \cdot \frac{1}{B}\sum_b \|J(x_b)\|_F^2 .

The products :math:`v^T J` are vector-Jacobian products (reverse mode), as in the paper: the
output dimension :math:`C` is small. Unlike DREG this sees only the end-to-end map.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dreg_jax._checks import check_float_array, check_positive_int
from dreg_jax.penalties.layer_jacobian import row_sq_norm_mean
from dreg_jax.penalties.probes import unit_sphere

DEFAULT_JACOBIAN_LAMBDA = 1e-2


def network_jacobian_penalty(
    apply_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    key: jax.Array,
    *,
    strength: float | jax.Array = DEFAULT_JACOBIAN_LAMBDA,
    num_projections: int = 1,
):
    """Network output and the random-projection Jacobian penalty from one forward pass.

    Args:
      apply_fn: ``x -> (batch, C)`` outputs (logits), closed over the parameters.
      x: ``(batch, ...)`` inputs.
      key: PRNG key for the projections.
      strength: :math:`\\lambda_{JR}`.
      num_projections: :math:`n_{proj}`.

    Returns:
      ``(y, penalty)`` with ``y = apply_fn(x)``.
    """
    check_float_array(x, "x", min_ndim=2)
    num_projections = check_positive_int(num_projections, "num_projections")
    y, vjp_fn = jax.vjp(apply_fn, x)
    if y.ndim != 2:
        raise ValueError(f"apply_fn must return (batch, outputs), got shape {y.shape}")
    num_out = y.shape[-1]
    v = unit_sphere(key, (num_projections,) + y.shape, y.dtype)
    vjps = jax.vmap(lambda p: vjp_fn(p)[0])(v)  # (n_proj, batch, ...)
    frob_sq = num_out * row_sq_norm_mean(vjps)
    return y, 0.5 * jnp.asarray(strength, jnp.float32) * frob_sq
