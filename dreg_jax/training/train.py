"""Train state, one regularized train step and an eval step (flax-examples style).

``train_step`` and ``eval_step`` are pure functions of (state, batch, key) with the static
:class:`TrainConfig` as the last argument, so they ``jit`` with ``static_argnums`` and
``vmap`` over states (seeds, learning rates, regularization strengths stored in the state).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from dreg_jax.layers.mlp import MLP
from dreg_jax.penalties.coherent import coherent_strong_regularization
from dreg_jax.penalties.dreg import dreg_penalty
from dreg_jax.penalties.input_gradient import input_gradient_penalty
from dreg_jax.penalties.network_jacobian import network_jacobian_penalty
from dreg_jax.penalties.schedules import (
    LENGTH_SCHEDULES,
    representation_noise_ratio,
    strength_multiplier,
)
from dreg_jax.training.config import TrainConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


class TrainState(train_state.TrainState):
    batch_stats: Any = struct.field(default_factory=dict)
    reg_strength: jax.Array = 0.0  # lambda_0, an array so it can be vmapped over
    total_steps: jax.Array = 0  # T of the lambda schedule (warmup / cosine)


def build_model(config: TrainConfig, num_classes: int) -> MLP:
    m = config.model
    return MLP(
        hidden=tuple(m.hidden),
        num_classes=num_classes,
        activation=m.activation,
        spectral_norm=config.regularizer.kind == "spectral_norm",
        chainzrule_per_feature=m.chainzrule_per_feature,
        chainzrule_init=m.chainzrule_init,
        chainzrule_input_bound=m.chainzrule_input_bound,
        dtype=DTYPES[m.dtype],
    )


def build_optimizer(config: TrainConfig, learning_rate, strength) -> optax.GradientTransformation:
    """Adam, with the optimizer-side regularizers folded in; hyperparameters injected as arrays.

    ``weight_decay`` is decoupled (AdamW, ``optax.adamw``); ``coherent`` adds strong coupled L2
    before Adam while gradients are coherent (``coherent_strong_regularization``).
    """
    reg = config.regularizer
    if reg.kind == "weight_decay":
        return optax.inject_hyperparams(optax.adamw)(learning_rate=learning_rate, weight_decay=strength)
    if reg.kind == "coherent":
        def coherent_adam(learning_rate, l2):
            return optax.chain(
                coherent_strong_regularization(
                    l2=l2, l1=reg.coherent_l1, decay=reg.coherent_decay,
                    threshold=reg.coherent_threshold,
                ),
                optax.adam(learning_rate),
            )
        return optax.inject_hyperparams(coherent_adam)(learning_rate=learning_rate, l2=strength)
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)


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
        reg_strength=jnp.asarray(strength, jnp.float32),
        total_steps=jnp.asarray(0 if total_steps is None else total_steps, jnp.int32),
    )


def _variables(state: TrainState, params):
    return {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def loss_fn(params, state: TrainState, batch, key, config: TrainConfig):
    """Data loss + penalty for the configured regularizer.

    Returns:
      ``(loss, (aux_metrics, new_batch_stats))``.
    """
    reg = config.regularizer
    x, y = batch["x"], batch["y"]
    variables = _variables(state, params)
    mutable = ["batch_stats"] if state.batch_stats else False

    def apply(*args, **kwargs):
        out = state.apply_fn(variables, *args, mutable=mutable, **kwargs)
        return out if mutable else (out, {})

    sq_norms = None
    schedule_metrics = {}
    if reg.kind == "dreg":
        (logits, sq_norms, h), updates = apply(
            x, key, jacobian_scope=reg.dreg_scope, num_probes=reg.num_probes,
            layer_estimator=reg.layer_estimator, update_stats=True, return_representation=True,
            method=MLP.forward_with_jacobian_terms,
        )
        data_loss = jnp.mean(_cross_entropy(logits, y))
        noise_ratio = None
        if reg.strength_schedule == "noise_inverse":
            rep = h if reg.noise_representation == "penultimate" else x
            noise_ratio = representation_noise_ratio(jax.lax.stop_gradient(rep), y, logits.shape[-1])
            schedule_metrics["representation_noise"] = noise_ratio
        multiplier = strength_multiplier(
            reg.strength_schedule, state.step, state.total_steps,
            warmup_fraction=reg.warmup_fraction, noise_ratio=noise_ratio,
        )
        schedule_metrics["strength_multiplier"] = multiplier
        penalty = dreg_penalty(
            sq_norms, config.model.hidden, lam=state.reg_strength * multiplier, scaling=reg.dreg_scaling
        )
    elif reg.kind == "igpen":
        def per_example(inp):
            logits = state.apply_fn(variables, inp)
            return _cross_entropy(logits, y), logits

        data_loss, penalty, logits = input_gradient_penalty(
            per_example, x, lam=state.reg_strength, has_aux=True
        )
        updates = {}
    elif reg.kind == "jacobian":
        logits, penalty = network_jacobian_penalty(
            lambda inp: state.apply_fn(variables, inp), x, key, lam=state.reg_strength
        )
        updates = {}
        data_loss = jnp.mean(_cross_entropy(logits, y))
    else:  # none, weight_decay, coherent (optimizer side), spectral_norm (in the model)
        logits, updates = apply(x, update_stats=True)
        data_loss = jnp.mean(_cross_entropy(logits, y))
        penalty = jnp.zeros([], jnp.float32)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    metrics = {"loss": data_loss + penalty, "data_loss": data_loss, "penalty": penalty,
               "accuracy": accuracy, **schedule_metrics}
    if sq_norms is not None:
        metrics["jacobian_sq_norms"] = sq_norms
    return data_loss + penalty, (metrics, updates.get("batch_stats", state.batch_stats))


@functools.partial(jax.jit, static_argnums=(3,))
def train_step(state: TrainState, batch, key, config: TrainConfig):
    """One optimizer step on ``batch = {"x": (B, D) float, "y": (B,) int}``."""
    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params, state, batch, key, config
    )
    state = state.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
    return state, {**metrics, "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnums=(2,))
def eval_step(state: TrainState, batch, config: TrainConfig):
    """Loss, accuracy and the activation-scope per-layer Jacobian terms (a diagnostic)."""
    del config  # structure is in the state's apply_fn; kept for a uniform signature
    logits, sq_norms = state.apply_fn(
        _variables(state, state.params), batch["x"], jacobian_scope="activation",
        method=MLP.forward_with_jacobian_terms,
    )
    return {
        "loss": jnp.mean(_cross_entropy(logits, batch["y"])),
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"]),
        "jacobian_sq_norms": sq_norms,
    }
