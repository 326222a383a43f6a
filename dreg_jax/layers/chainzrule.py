r"""ChainzRule: a learnable cubic polynomial activation.

.. math:: p(u) = a_0 + a_1 u + a_2 u^2 + a_3 u^3, \qquad
          p'(z) = (a_1 + 2 a_2 u + 3 a_3 u^2)\,\frac{du}{dz}

with coefficients per feature (default) or shared by the layer.

Initialization (``coefficient_init``):

* ``"gelu"`` (default): the least-squares cubic fit of exact GELU on 601 points of [-3, 3].
  GELU minus x/2 is even, so the fit has :math:`a_1 = 1/2`, :math:`a_3 = 0` and
  :math:`a_0 \approx 0.145`, :math:`a_2 \approx 0.174` (see :data:`GELU_CUBIC_FIT`; RMS error
  0.10, max 0.21 at the interval ends): the layer starts as a smooth GELU-like unit whose
  slope is 1/2 at 0 and never blows up initially.
* ``"identity"``: :math:`a = (0, 1, 0, 0)`; the network starts linear.

Guard against blow-up (``input_bound``, default 4.0): a cubic grows like :math:`z^3`, so one
large pre-activation can overflow, especially in bfloat16. The input is soft-clipped first,
:math:`u = c \tanh(z / c)` (identity for :math:`|z| \ll c`, bounded by :math:`c`, smooth), and
the derivative carries the chain factor :math:`du/dz = 1 - \tanh^2(z/c)`. ``input_bound=None``
disables the guard (:math:`u = z`).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dreg_jax._checks import check_choice

INITS = ("gelu", "identity")


def _fit_gelu_cubic() -> np.ndarray:
    z = np.linspace(-3.0, 3.0, 601)
    gelu = 0.5 * z * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
    basis = np.stack([z**k for k in range(4)], axis=1)
    coeffs, *_ = np.linalg.lstsq(basis, gelu, rcond=None)
    return coeffs.astype(np.float32)


#: (a0, a1, a2, a3) of the least-squares cubic fit of exact GELU on [-3, 3].
GELU_CUBIC_FIT = _fit_gelu_cubic()
IDENTITY_COEFFS = np.array([0.0, 1.0, 0.0, 0.0], np.float32)


def cubic_value_and_derivative(z, coefficients, input_bound=None):
    """Closed-form ``(p(u), dp/dz)`` for coefficients ``(..., 4)`` broadcast over ``z``'s last axis.

    Args:
      z: pre-activations ``(..., features)``.
      coefficients: ``(features, 4)`` or ``(1, 4)`` array of :math:`a_0..a_3`.
      input_bound: soft-clip bound :math:`c`, or None for no guard.

    Returns:
      ``(p, dp)`` with the shape and dtype of ``z``.
    """
    if not jnp.issubdtype(jnp.asarray(z).dtype, jnp.floating):  # ints would truncate the coefficients
        z = jnp.asarray(z, jnp.promote_types(coefficients.dtype, jnp.float32))
    a = coefficients.astype(z.dtype)
    a0, a1, a2, a3 = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    if input_bound is None:
        u, du = z, None
    else:
        t = jnp.tanh(z / input_bound)
        u, du = input_bound * t, 1 - t * t
    value = a0 + u * (a1 + u * (a2 + u * a3))  # Horner
    slope = a1 + u * (2 * a2 + 3 * a3 * u)
    return value, slope if du is None else slope * du


class ChainzRule(nn.Module):
    """Learnable cubic activation; see the module docstring for the math and init.

    Attributes:
      per_feature: one coefficient set per feature (True) or one shared by the layer.
      coefficient_init: ``"gelu"`` or ``"identity"``.
      input_bound: soft-clip bound ``c`` (None disables the guard).
    """

    per_feature: bool = True
    coefficient_init: str = "gelu"
    input_bound: float | None = 4.0
    param_dtype: Any = jnp.float32

    @nn.compact
    def value_and_derivative(self, z):
        """``(p(z), p'(z))`` from one elementwise pass (the activation-scope DREG term)."""
        check_choice("ChainzRule coefficient_init", self.coefficient_init, INITS)
        if not jnp.issubdtype(z.dtype, jnp.floating):  # integer coefficients would truncate to 0
            z = z.astype(jnp.promote_types(self.param_dtype, jnp.float32))
        base = GELU_CUBIC_FIT if self.coefficient_init == "gelu" else IDENTITY_COEFFS
        features = z.shape[-1] if self.per_feature else 1
        coefficients = self.param(
            "coefficients",
            lambda _key, shape, dtype: jnp.broadcast_to(jnp.asarray(base, dtype), shape),
            (features, 4),
            self.param_dtype,
        )
        return cubic_value_and_derivative(z, coefficients, self.input_bound)

    def __call__(self, z):
        return self.value_and_derivative(z)[0]

