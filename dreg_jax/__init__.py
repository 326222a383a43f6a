"""dreg_jax: DREG (per-layer forward-mode Jacobian penalties) and ChainzRule networks in JAX.

The flat public API: the names in ``__all__``. Everything else (``dreg_jax.penalties.*``
helpers, ``dreg_jax.engine``, ``dreg_jax.data``, ``dreg_jax.analysis``) is reached through
its subpackage.
"""
import importlib
import importlib.util

#: public name -> the module that defines it (imported on first use: `import dreg_jax` stays light,
#: so `dreg-jax --help` does not start JAX)
_EXPORTS = {
    **dict.fromkeys(['ACTIVATIONS', 'GELU_CUBIC_FIT', 'MLP', 'Activation', 'ChainzRule', 'NNXActivation', 'NNXModel', 'call_key', 'cubic_value_and_derivative', 'get_activation', 'jacobian_terms', 'shard_key', 'submodule_fns', 'term_widths'], 'dreg_jax.layers'),
    **dict.fromkeys(['DEFAULT_IGPEN_LAMBDA', 'DEFAULT_JACOBIAN_LAMBDA', 'DEFAULT_LAMBDA', 'DEFAULT_SCOPE', 'LAYER_ESTIMATORS', 'NOISE_REPRESENTATIONS', 'SCALINGS', 'SCHEDULES', 'SCOPES', 'CoherentRegularizationState', 'coherent_strong_regularization', 'dreg_penalty', 'elementwise_value_and_derivative', 'input_gradient_penalty', 'layer_jacobian_sq_norms', 'layer_widths', 'network_jacobian_penalty', 'rademacher', 'representation_noise_ratio', 'strength_multiplier', 'unit_sphere', 'warn_if_penalty_dominates'], 'dreg_jax.penalties'),
    **dict.fromkeys(['DEFAULT_STRENGTHS', 'REGISTRY', 'REGULARIZERS', 'ModelConfig', 'OptimizerConfig', 'Regularizer', 'RegularizerConfig', 'TrainConfig', 'TrainState', 'create_train_state', 'eval_step', 'fit', 'get_regularizer', 'train_step'], 'dreg_jax.training'),
    **dict.fromkeys(['Preprocessing'], 'dreg_jax.preprocessing'),
    **dict.fromkeys(['TrainedModel', 'load_model', 'save_model'], 'dreg_jax.saved_model'),
    **dict.fromkeys(['TuneResult', 'strength_grid', 'tune'], 'dreg_jax.tuning'),
}

__version__ = "0.1.0"


def __getattr__(name):
    """The flat API, imported on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")  # a subpackage: dreg_jax.engine
        raise AttributeError(f"module 'dreg_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def load_results(path):
    """A sweep's results JSONL as a ``pandas.DataFrame``, one flat row per run
    (:func:`dreg_jax.analysis.results.load_results`; imported on use: pandas is heavy)."""
    from dreg_jax.analysis.results import load_results as _load

    return _load(path)


__all__ = [
    # any-model DREG
    "jacobian_terms", "term_widths", "call_key", "shard_key", "Activation", "NNXActivation", "NNXModel",
    "submodule_fns", "layer_jacobian_sq_norms", "layer_widths", "elementwise_value_and_derivative",
    # penalties
    "dreg_penalty", "warn_if_penalty_dominates", "input_gradient_penalty",
    "network_jacobian_penalty", "coherent_strong_regularization", "CoherentRegularizationState",
    "strength_multiplier", "representation_noise_ratio", "rademacher", "unit_sphere",
    "DEFAULT_LAMBDA", "DEFAULT_IGPEN_LAMBDA", "DEFAULT_JACOBIAN_LAMBDA", "DEFAULT_SCOPE",
    "SCOPES", "SCALINGS", "LAYER_ESTIMATORS", "SCHEDULES", "NOISE_REPRESENTATIONS",
    # layers
    "ChainzRule", "MLP", "ACTIVATIONS", "GELU_CUBIC_FIT", "cubic_value_and_derivative",
    "get_activation",
    # regularizers and training
    "Regularizer", "REGISTRY", "REGULARIZERS", "DEFAULT_STRENGTHS", "get_regularizer",
    "ModelConfig", "OptimizerConfig", "RegularizerConfig", "TrainConfig", "TrainState",
    "create_train_state", "train_step", "eval_step", "fit",
    # choosing the strength on validation
    "tune", "TuneResult", "strength_grid",
    # keeping and using a trained model
    "save_model", "load_model", "TrainedModel", "Preprocessing",
    # results
    "load_results",
]
