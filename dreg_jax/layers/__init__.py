"""Layers: ChainzRule, the activation registry, the MLP builder and the any-model DREG API."""
from dreg_jax.layers.activations import ACTIVATIONS, check_activation, get_activation
from dreg_jax.layers.chainzrule import GELU_CUBIC_FIT, ChainzRule, cubic_value_and_derivative
from dreg_jax.layers.elementwise import Activation, NNXActivation
from dreg_jax.layers.jacobian_terms import (
    ELEMENTWISE_MODULES,
    TERM_ESTIMATORS,
    TERM_SCOPES,
    call_key,
    jacobian_terms,
    nnx_module_paths,
    shard_key,
    term_widths,
)
from dreg_jax.layers.mlp import MLP
from dreg_jax.layers.nnx_model import NNXModel
from dreg_jax.layers.submodules import submodule_fns
