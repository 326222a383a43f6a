r"""IGPen: the input-gradient penalty (double backpropagation, Drucker & LeCun 1992).

.. math:: P = \lambda \; \frac{1}{B}\sum_{b=1}^{B} \big\|\nabla_{x_b} \ell(f(x_b), y_b)\big\|_2^2

The per-example input gradients come from one reverse pass of :math:`\sum_b \ell_b` (examples
do not interact), and differentiating :math:`P` w.r.t. the parameters is the second backward
pass ("double backprop").
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dreg_jax._checks import check_float_array
from dreg_jax.penalties.layer_jacobian import row_sq_norm_mean

DEFAULT_IGPEN_LAMBDA = 1e-2


def input_gradient_penalty(
    per_example_loss_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    *,
    lam: float | jax.Array = DEFAULT_IGPEN_LAMBDA,
):
    """Mean loss and the input-gradient penalty from one forward and one backward pass.

    Args:
      per_example_loss_fn: ``x -> (batch,)`` losses, closed over params and labels.
      x: ``(batch, ...)`` inputs.
      lam: penalty weight :math:`\\lambda`.

    Returns:
      ``(mean_loss, penalty)``; add them and differentiate w.r.t. the parameters.
    """
    check_float_array(x, "x", min_ndim=2)
    total, grad_x = jax.value_and_grad(lambda inp: jnp.sum(per_example_loss_fn(inp)))(x)
    return total / x.shape[0], jnp.asarray(lam, jnp.float32) * row_sq_norm_mean(grad_x[None])
