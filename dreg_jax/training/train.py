"""Train state, one regularized train step and an eval step (flax-examples style).

``train_step`` and ``eval_step`` are pure functions of (state, batch, key) with the static
:class:`TrainConfig` as the last argument, so they ``jit`` with ``static_argnums`` and
``vmap`` over states (seeds, learning rates, regularization strengths stored in the state).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from dreg_jax.layers.mlp import MLP
from dreg_jax.penalties.schedules import LENGTH_SCHEDULES
from dreg_jax.training.config import TrainConfig
from dreg_jax.training.regularizers import cross_entropy, get_regularizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


class TrainState(train_state.TrainState):
    batch_stats: Any = struct.field(default_factory=dict)
    strength: jax.Array = 0.0  # lambda_0, an array so it can be vmapped over
    total_steps: jax.Array = 0  # T of the lambda schedule (warmup / cosine)


def build_model(config: TrainConfig, num_classes: int):
    """The built-in MLP of ``config.model``, or the user's own ``config.model.module``."""
    m = config.model
    if m.is_custom:
        return m.module
    return MLP(
        hidden=tuple(m.hidden),
        num_classes=num_classes,
        activation=m.activation,
        spectral_norm=get_regularizer(config.regularizer.kind).spectral_norm,
        chainzrule_per_feature=m.chainzrule_per_feature,
        chainzrule_init=m.chainzrule_init,
        chainzrule_input_bound=m.chainzrule_input_bound,
        dtype=DTYPES[m.dtype],
    )


def build_optimizer(config: TrainConfig, learning_rate, strength) -> optax.GradientTransformation:
    """Adam, with the optimizer side of the configured regularizer folded in (its
    :attr:`Regularizer.optimizer`); hyperparameters injected as arrays so they can be vmapped.
    """
    reg = config.regularizer
    return get_regularizer(reg.kind).optimizer(reg, learning_rate, strength)


def create_train_state(
    config: TrainConfig, key, num_features: int, num_classes: int,
    learning_rate=None, strength=None, total_steps=None,
) -> TrainState:
    """Initial state. ``learning_rate``/``strength`` default to the config's and may be traced.

    ``total_steps`` (the run's optimizer steps) is required by the ``linear_warmup`` and
    ``cosine_decay`` strength schedules (:mod:`dreg_jax.penalties.schedules`).
    """
    config.validate()
    if total_steps is None and config.regularizer.strength_schedule in LENGTH_SCHEDULES:
        raise ValueError(
            f"strength_schedule={config.regularizer.strength_schedule!r} depends on the run length: "
            "pass total_steps=epochs * steps_per_epoch to create_train_state"
        )
    learning_rate = config.optimizer.learning_rate if learning_rate is None else learning_rate
    strength = config.regularizer.resolved_strength() if strength is None else strength
    model = build_model(config, num_classes)
    variables = model.init(key, jnp.zeros((1, num_features), jnp.float32))
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=build_optimizer(config, learning_rate, strength),
        strength=jnp.asarray(strength, jnp.float32),
        total_steps=jnp.asarray(0 if total_steps is None else total_steps, jnp.int32),
    )


def _variables(state: TrainState, params):
    return {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}


class LossContext(NamedTuple):
    """What a regularizer's loss hook reads (:attr:`Regularizer.loss`)."""

    state: TrainState
    variables: dict
    x: jax.Array
    y: jax.Array
    key: jax.Array
    config: TrainConfig
    apply: Callable  # (*args, **kwargs) -> (model output, mutable-collection updates)


def loss_fn(params, state: TrainState, batch, key, config: TrainConfig):
    """Data loss + penalty for the configured regularizer (its :attr:`Regularizer.loss`).

    Returns:
      ``(loss, (aux_metrics, new_batch_stats))``.
    """
    variables = _variables(state, params)
    mutable = ["batch_stats"] if state.batch_stats else False

    def apply(*args, **kwargs):
        out = state.apply_fn(variables, *args, mutable=mutable, **kwargs)
        return out if mutable else (out, {})

    ctx = LossContext(state, variables, batch["x"], batch["y"], key, config, apply)
    terms = get_regularizer(config.regularizer.kind).loss(ctx)
    accuracy = jnp.mean(jnp.argmax(terms.logits, -1) == batch["y"])
    loss = terms.data_loss + terms.penalty
    metrics = {"loss": loss, "data_loss": terms.data_loss, "penalty": terms.penalty,
               "accuracy": accuracy, **terms.metrics}
    return loss, (metrics, terms.batch_stats_updates.get("batch_stats", state.batch_stats))


@functools.partial(jax.jit, static_argnums=(3,))
def train_step(state: TrainState, batch, key, config: TrainConfig):
    """One optimizer step on ``batch = {"x": (B, D) float, "y": (B,) int}``."""
    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params, state, batch, key, config
    )
    state = state.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
    return state, {**metrics, "grad_norm": optax.tree.norm(grads)}


def _custom_eval_terms(config, variables, x):
    """A user module's logits and its marked activations' exact terms (none marked: ``(0,)``)."""
    from dreg_jax.layers.jacobian_terms import jacobian_terms

    from dreg_jax.training.regularizers import user_module

    module, module_variables = user_module(config.model.module, variables)
    try:
        logits, terms = jacobian_terms(module, module_variables, x, scope="activation")
    except ValueError as err:
        if "found no marked activation" not in str(err):
            raise
        return config.model.module.apply(variables, x), jnp.zeros((0,), jnp.float32)
    return logits, jnp.stack(list(terms.values()))


@functools.partial(jax.jit, static_argnums=(2,))
def eval_step(state: TrainState, batch, config: TrainConfig):
    """Loss, accuracy and the activation-scope per-layer Jacobian terms (a diagnostic)."""
    variables = _variables(state, state.params)
    if config.model.is_custom:
        logits, sq_norms = _custom_eval_terms(config, variables, batch["x"])
    else:
        logits, sq_norms = state.apply_fn(variables, batch["x"], jacobian_scope="activation",
                                          method=MLP.forward_with_jacobian_terms)
    return {
        "loss": jnp.mean(cross_entropy(logits, batch["y"])),
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"]),
        "jacobian_sq_norms": sq_norms,
    }
