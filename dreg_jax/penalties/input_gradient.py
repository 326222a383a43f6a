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
    per_example_loss_fn: Callable,
    x: jax.Array,
    *,
    strength: float | jax.Array = DEFAULT_IGPEN_LAMBDA,
    has_aux: bool = False,
):
    """Mean loss and the input-gradient penalty from one forward and one backward pass.

    Args:
      per_example_loss_fn: ``x -> (batch,)`` losses, closed over params and labels; with
        ``has_aux`` it returns ``(losses, aux)`` (e.g. the logits, to avoid a second forward).
      x: ``(batch, ...)`` inputs.
      strength: penalty weight :math:`\\lambda`.
      has_aux: whether ``per_example_loss_fn`` returns auxiliary data.

    Returns:
      ``(mean_loss, penalty)``, or ``(mean_loss, penalty, aux)`` with ``has_aux``; add the
      first two and differentiate w.r.t. the parameters.
    """
    check_float_array(x, "x", min_ndim=2)

    def total(inp):
        out = per_example_loss_fn(inp)
        losses, aux = out if has_aux else (out, None)
        return jnp.sum(losses), aux

    (loss_sum, aux), grad_x = jax.value_and_grad(total, has_aux=True)(x)
    penalty = jnp.asarray(strength, jnp.float32) * row_sq_norm_mean(grad_x[None])
    return (loss_sum / x.shape[0], penalty) + ((aux,) if has_aux else ())
