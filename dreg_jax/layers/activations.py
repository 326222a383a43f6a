"""Activation registry: names to elementwise functions (``chainzrule`` is a learnable module)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dreg_jax._checks import check_choice

FIXED_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,  # tanh approximation, JAX's default
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
    "softplus": jax.nn.softplus,
    "identity": lambda z: z,
}
LEARNABLE_ACTIVATIONS = ("chainzrule",)
ACTIVATIONS = tuple(FIXED_ACTIVATIONS) + LEARNABLE_ACTIVATIONS


def check_activation(name: str) -> str:
    return check_choice("activation", name, ACTIVATIONS)


def get_activation(name: str):
    """The elementwise function for a fixed activation name."""
    check_activation(name)
    if name in LEARNABLE_ACTIVATIONS:
        raise ValueError(f"{name!r} has parameters: use dreg_jax.ChainzRule (or MLP) instead")
    return FIXED_ACTIVATIONS[name]
