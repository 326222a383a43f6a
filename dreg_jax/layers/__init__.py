"""Layers: the ChainzRule cubic activation, the activation registry and the MLP builder."""
from dreg_jax.layers.activations import ACTIVATIONS, check_activation, get_activation
from dreg_jax.layers.chainzrule import GELU_CUBIC_FIT, ChainzRule, cubic_value_and_derivative
from dreg_jax.layers.mlp import MLP
from dreg_jax.layers.submodules import submodule_fns
