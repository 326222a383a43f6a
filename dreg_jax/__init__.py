"""dreg_jax: DREG (per-layer forward-mode Jacobian penalties) and ChainzRule networks in JAX.

The flat public API re-exports the penalties, layers and training helpers.
"""
from dreg_jax.layers import (
    ACTIVATIONS,
    GELU_CUBIC_FIT,
    MLP,
    ChainzRule,
    cubic_value_and_derivative,
    get_activation,
    submodule_fns,
)
from dreg_jax.penalties import (
    DEFAULT_IGPEN_LAMBDA,
    DEFAULT_JACOBIAN_LAMBDA,
    DEFAULT_LAMBDA,
    DEFAULT_SCOPE,
    LAYER_ESTIMATORS,
    NOISE_REPRESENTATIONS,
    SCALINGS,
    SCHEDULES,
    SCOPES,
    CoherentRegularizationState,
    coherent_strong_regularization,
    dreg_penalty,
    elementwise_value_and_derivative,
    input_gradient_penalty,
    layer_jacobian_sq_norms,
    layer_widths,
    network_jacobian_penalty,
    rademacher,
    representation_noise_ratio,
    strength_multiplier,
    unit_sphere,
)
from dreg_jax.training import (
    DEFAULT_STRENGTHS,
    REGULARIZERS,
    ModelConfig,
    OptimizerConfig,
    RegularizerConfig,
    TrainConfig,
    TrainState,
    create_train_state,
    eval_step,
    fit,
    train_step,
)

__version__ = "0.1.0"
