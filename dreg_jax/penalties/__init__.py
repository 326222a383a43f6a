"""Penalties: DREG (per-layer forward-mode Jacobian terms) and the baseline regularizers."""
from dreg_jax.penalties.coherent import (
    CoherentRegularizationState,
    coherent_strong_regularization,
)
from dreg_jax.penalties.dreg import (
    DEFAULT_LAMBDA,
    DEFAULT_SCOPE,
    LAYER_ESTIMATORS,
    SCALINGS,
    SCOPES,
    dreg_penalty,
    warn_if_penalty_dominates,
)
from dreg_jax.penalties.input_gradient import DEFAULT_IGPEN_LAMBDA, input_gradient_penalty
from dreg_jax.penalties.layer_jacobian import (
    elementwise_value_and_derivative,
    jvp_with_probes,
    layer_jacobian_sq_norms,
    layer_widths,
    row_sq_norm_mean,
)
from dreg_jax.penalties.network_jacobian import DEFAULT_JACOBIAN_LAMBDA, network_jacobian_penalty
from dreg_jax.penalties.probes import rademacher, unit_sphere
from dreg_jax.penalties.schedules import (
    NOISE_REPRESENTATIONS,
    SCHEDULES,
    representation_noise_ratio,
    strength_multiplier,
)
