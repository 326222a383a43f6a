"""Elementwise activation modules that DREG can see: ``Activation`` (linen) and ``NNXActivation``.

Replacing ``nn.gelu`` by ``dreg_jax.Activation(nn.gelu)`` changes nothing in the forward pass
but marks the activation for the ``"activation"`` scope of :func:`dreg_jax.jacobian_terms`,
whose term is the exact diagonal :math:`\\sum_i \\sigma'(z_i)^2` (batch mean), and lets the
``"exact"`` layer estimator find the activation that follows a Dense or Conv layer.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
from flax import nnx

from dreg_jax.penalties.layer_jacobian import elementwise_value_and_derivative


class Activation(nn.Module):
    """An elementwise activation as a linen module, e.g. ``Activation(nn.gelu)``.

    Attributes:
      fn: the elementwise function (``nn.gelu``, ``jnp.tanh``, ...).
    """

    fn: Callable = nn.gelu

    def __post_init__(self):
        if isinstance(self.fn, str) or not callable(self.fn):
            from dreg_jax.layers.activations import FIXED_ACTIVATIONS

            hint = (f"Activation(nn.{self.fn}) (or dreg_jax.get_activation({self.fn!r}))"
                    if self.fn in FIXED_ACTIVATIONS else "Activation(nn.gelu)")
            raise TypeError(f"Activation takes the function itself, got {self.fn!r}: e.g. {hint}")
        super().__post_init__()

    def __call__(self, z):
        return self.fn(z)

    def value_and_derivative(self, z):
        """``(fn(z), fn'(z))`` from one jvp with an all-ones tangent (exact for elementwise fn)."""
        return elementwise_value_and_derivative(self.fn, z)


class NNXActivation(nnx.Module):
    """An elementwise activation as an NNX module, e.g. ``NNXActivation(nnx.gelu)``."""

    def __init__(self, fn: Callable = nnx.gelu):
        self.fn = fn

    def __call__(self, z):
        return self.fn(z)

    def value_and_derivative(self, z):
        return elementwise_value_and_derivative(self.fn, z)
