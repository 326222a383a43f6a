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
from dreg_jax.layers.jacobian_terms import jacobian_terms
from dreg_jax.penalties.schedules import LENGTH_SCHEDULES
from dreg_jax.training.config import TrainConfig
from dreg_jax.training.regularizers import get_regularizer, shares_model_pass
from dreg_jax.training.tasks import batch_metrics, finish_metrics
from dreg_jax.training.user_model import UserModel, check_logits_shape, dropout_key

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


class TrainState(train_state.TrainState):
    batch_stats: Any = struct.field(default_factory=dict)
    strength: jax.Array = 0.0  # lambda_0, an array so it can be vmapped over
    total_steps: jax.Array = 0  # T of the lambda schedule (warmup / cosine)
    # folded programs only (TrainConfig.fold): the run's index into fold.activations and
    # fold.regularizers; None otherwise
    activation_index: Any = None
    regularizer_index: Any = None
    # padded programs only (a shape bucket, dreg_jax.engine.buckets): the run's true class
    # count; the model's logits beyond it are -inf. None otherwise.
    num_classes: Any = None


def build_model(config: TrainConfig, num_classes: int):
    """The built-in MLP of ``config.model``, or the user's own ``config.model.module`` behind
    its one adapter (:class:`dreg_jax.training.user_model.UserModel`)."""
    m = config.model
    if m.is_custom:
        return UserModel(m.module)
    activations = config.activations
    return MLP(
        hidden=tuple(m.hidden),
        num_classes=num_classes,
        activation=activations[0] if len(activations) == 1 else activations,
        spectral_norm=get_regularizer(config.regularizer.kind).spectral_norm,
        spectral_norm_head=config.regularizer.spectral_norm_head,
        chainzrule_per_feature=m.chainzrule_per_feature,
        chainzrule_init=m.chainzrule_init,
        chainzrule_input_bound=m.chainzrule_input_bound,
        dtype=DTYPES[m.dtype],
    )


def build_optimizer(config: TrainConfig, learning_rate, strength, regularizer_index=0,
                    total_steps=None) -> optax.GradientTransformation:
    """Adam, with the optimizer side of the configured regularizer folded in (its
    :attr:`Regularizer.optimizer`); hyperparameters injected as arrays so they can be vmapped.

    A program folding several regularizers (``config.fold``) uses AdamW when weight decay is
    among them, with the decay at ``strength`` for weight-decay runs and 0 for the others:
    ``u + 0 * theta = u``, so the other runs' updates are Adam's, bit for bit.
    """
    reg, kinds = config.regularizer, config.regularizers
    if len(kinds) == 1:
        return get_regularizer(kinds[0]).optimizer(reg, learning_rate, strength, total_steps)
    optimizers = {get_regularizer(k).optimizer for k in kinds}
    if len(optimizers) == 1:
        return optimizers.pop()(reg, learning_rate, strength, total_steps)
    decaying = next(k for k in kinds if get_regularizer(k).decoupled_decay)
    decay = jnp.where(jnp.asarray(regularizer_index) == kinds.index(decaying), strength, 0.0)
    return get_regularizer(decaying).optimizer(reg, learning_rate, decay, total_steps)


def create_train_state(
    config: TrainConfig, key, num_features: int, num_classes: int,
    learning_rate=None, strength=None, total_steps=None, activation_index=0, regularizer_index=0,
) -> TrainState:
    """Initial state. ``learning_rate``/``strength`` default to the config's and may be traced.

    ``total_steps`` (the run's optimizer steps) is required by the ``linear_warmup`` and
    ``cosine_decay`` strength schedules (:mod:`dreg_jax.penalties.schedules`).
    ``activation_index``/``regularizer_index`` pick the run's choice in a folded config
    (``config.fold``); they may be traced.
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
    if config.model.is_custom:
        check_logits_shape(model, variables, num_features, num_classes)
    folded_activation = len(config.activations) > 1
    folded_regularizer = len(config.regularizers) > 1
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=build_optimizer(config, learning_rate, strength, regularizer_index, total_steps),
        strength=jnp.asarray(strength, jnp.float32),
        total_steps=jnp.asarray(0 if total_steps is None else total_steps, jnp.int32),
        activation_index=jnp.asarray(activation_index, jnp.int32) if folded_activation else None,
        regularizer_index=jnp.asarray(regularizer_index, jnp.int32) if folded_regularizer else None,
    )


def model_variables(state: TrainState, params):
    """The variables ``state.apply_fn`` takes: params, batch stats, the run's fold choice."""
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    fold = {}
    if state.activation_index is not None:
        fold["activation_index"] = state.activation_index
    if state.num_classes is not None:
        fold["num_classes"] = state.num_classes
    if fold:
        variables["fold"] = fold
    return variables


def balanced_class_weights(labels, included, num_classes: int):
    """``TrainConfig.class_weight="balanced"``: :math:`w_c = n / (C\\, n_c)` over the included
    training rows (``n`` rows, ``n_c`` of class ``c``, ``C`` classes with a row; sklearn's
    ``compute_class_weight("balanced")``); 0 for a class with no row.

    Args:
      labels: ``(rows,)`` int training labels (after any label noise: what the loss sees).
      included: ``(rows,)`` bool or 0/1, the rows a run trains on (data fraction, padding).
      num_classes: the class count.

    Returns:
      ``(num_classes,)`` float32 weights.
    """
    counts = jnp.zeros((num_classes,), jnp.float32).at[labels].add(jnp.asarray(included, jnp.float32))
    present = jnp.sum(counts > 0)
    return jnp.where(counts > 0, jnp.sum(counts) / (present * jnp.maximum(counts, 1.0)), 0.0)


class LossContext(NamedTuple):
    """What a regularizer's loss hook reads (:attr:`Regularizer.loss`)."""

    state: TrainState
    variables: dict
    x: jax.Array
    y: jax.Array
    key: jax.Array
    config: TrainConfig
    apply: Callable  # (*args, **kwargs) -> (model output, mutable-collection updates)
    weights: jax.Array | None = None  # (B,) per-example loss weights (TrainConfig.class_weight)


def loss_fn(params, state: TrainState, batch, key, config: TrainConfig, kinds=None):
    """Data loss + penalty for the configured regularizer (its :attr:`Regularizer.loss`).

    ``kinds`` (a branch of a folded config, :func:`loss_branches`): the regularizers this loss
    serves; a branch of several kinds is the shared MLP pass with the DREG penalty counted
    only for DREG runs (``state.regularizer_index``).

    Returns:
      ``(loss, (aux_metrics, new_batch_stats))``.
    """
    kinds = config.regularizers if kinds is None else kinds
    variables = model_variables(state, params)
    mutable = ["batch_stats"] if state.batch_stats else False

    if config.model.is_custom:  # training mode, with this step's dropout masks
        kwargs_train = {"train": True, "dropout_rng": dropout_key(key)}
    else:
        kwargs_train = {}

    def apply(*args, **kwargs):
        out = state.apply_fn(variables, *args, mutable=mutable, **kwargs_train, **kwargs)
        return out if mutable else (out, {})

    ctx = LossContext(state, variables, batch["x"], batch["y"], key, config, apply, batch.get("w"))
    penalized = [k for k in kinds if get_regularizer(k).penalizes_loss]
    if penalized and len(kinds) > 1:  # the shared pass: DREG's terms come from the forward every
        terms = get_regularizer(penalized[0]).loss(ctx)  # kind of this branch needs
        counted = state.regularizer_index == config.regularizers.index(penalized[0])
        terms = terms._replace(penalty=jnp.where(counted, terms.penalty, 0.0))
    else:  # one kind, or kinds with the same loss (no regularizer, weight decay)
        terms = get_regularizer(kinds[0]).loss(ctx)
    loss = terms.data_loss + terms.penalty
    metrics = {"loss": loss, "data_loss": terms.data_loss, "penalty": terms.penalty, **terms.metrics}
    if config.task == "classification":  # a regression batch has no per-batch score (R^2 needs the split)
        metrics["accuracy"] = jnp.mean(jnp.argmax(terms.logits, -1) == batch["y"])
    return loss, (metrics, terms.batch_stats_updates.get("batch_stats", state.batch_stats))


def loss_branches(config: TrainConfig) -> tuple[tuple[str, ...], ...]:
    """The regularizers of ``config`` grouped into the branches of one train step.

    Kinds whose loss is the model's own pass (no regularizer, weight decay, and DREG whose
    terms the built-in MLP computes in that pass: activation scope or the exact layer
    estimator) form one branch, where DREG's penalty is counted only for DREG runs; each other
    kind (IGPen, the Jacobian penalty, probe DREG, ...) is a branch of its own. One branch per
    program unless the config is folded.
    """
    shared, own = [], []
    for kind in config.regularizers:
        (shared if shares_model_pass(kind, config) else own).append(kind)
    return tuple(([tuple(shared)] if shared else []) + [(k,) for k in own])


def _nan_like(shape_dtype):
    return jnp.full(shape_dtype.shape, jnp.nan, shape_dtype.dtype)


@functools.partial(jax.jit, static_argnums=(3,))
def train_step(state: TrainState, batch, key, config: TrainConfig):
    """One optimizer step on ``batch = {"x": (B, D) float, "y": (B,) int}``.

    In a folded config with several branches (:func:`loss_branches`) the run's branch is
    chosen by ``lax.switch`` on ``state.regularizer_index``; each branch differentiates its own
    loss, so the selected gradients are exactly that branch's (under ``vmap`` every branch is
    computed and the results selected). Metrics a branch does not produce are NaN.
    """
    branches = loss_branches(config)

    def branch_grads(kinds):
        def grads_of(state):
            return jax.grad(loss_fn, has_aux=True)(state.params, state, batch, key, config, kinds)
        return grads_of

    if len(branches) == 1:
        grads, (metrics, batch_stats) = branch_grads(branches[0])(state)
    else:
        fns = [branch_grads(kinds) for kinds in branches]
        produced = {}  # every branch's metrics, padded to the union (a switch needs one structure)
        for fn in fns:
            for name, shape in jax.eval_shape(fn, state)[1][0].items():
                produced.setdefault(name, shape)

        def padded(fn):
            def run(state):
                grads, (metrics, batch_stats) = fn(state)
                return grads, ({k: metrics[k] if k in metrics else _nan_like(s) for k, s in produced.items()},
                               batch_stats)
            return run

        branch_of = jnp.asarray([next(b for b, kinds in enumerate(branches) if kind in kinds)
                                 for kind in config.regularizers], jnp.int32)
        grads, (metrics, batch_stats) = jax.lax.switch(
            branch_of[state.regularizer_index], [padded(fn) for fn in fns], state)
    state = state.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
    return state, {**metrics, "grad_norm": optax.tree.norm(grads)}


def _custom_eval_terms(config, variables, x):
    """A user module's logits (inference mode) and its marked activations' exact terms (none
    marked: ``(0,)``)."""
    model = UserModel(config.model.module)
    module, module_variables, kwargs, _ = model.terms_call(variables, False, None)
    try:
        logits, terms = jacobian_terms(module, module_variables, x, scope="activation", **kwargs)
    except ValueError as err:
        if "found no marked activation" not in str(err):
            raise
        return model.apply(variables, x), jnp.zeros((0,), jnp.float32)
    return logits, jnp.stack(list(terms.values()))


@functools.partial(jax.jit, static_argnums=(2,))
def eval_step(state: TrainState, batch, config: TrainConfig):
    """The task's metrics (:func:`dreg_jax.training.tasks.batch_metrics`: loss and accuracy, or
    loss and :math:`R^2`) and the activation-scope per-layer Jacobian terms (a diagnostic).

    ``batch["rows"]`` (optional, may be traced): only the first ``rows`` examples count, the
    rest are padding (a shape bucket, :mod:`dreg_jax.engine.buckets`). ``batch["weights"]``
    (optional, 0/1 per example): the metrics are **sums** over the examples of weight 1 (a
    chunk of a larger batch gives its part; divide the totals by the count, then
    :func:`dreg_jax.training.tasks.finish_metrics`). Sums of 0/1 counts are exact, so an
    accuracy never leaves [0, 1] by rounding. Built-in MLP only, for either.
    """
    variables = model_variables(state, state.params)
    weights, rows = batch.get("weights"), batch.get("rows")
    if rows is not None:
        weights = (jnp.arange(batch["x"].shape[0]) < rows).astype(jnp.float32)
    if config.model.is_custom:
        if weights is not None:
            raise ValueError("padded or weighted evaluation batches (batch['rows'], batch['weights']) need "
                             "the built-in MLP")
        logits, sq_norms = _custom_eval_terms(config, variables, batch["x"])
    else:
        logits, sq_norms = state.apply_fn(variables, batch["x"], jacobian_scope="activation",
                                          method=MLP.forward_with_jacobian_terms, row_weights=weights)
    metrics = batch_metrics(logits, batch["y"], config.task, weights)
    if weights is not None and rows is None:
        return {**metrics, "jacobian_sq_norms": sq_norms}  # sums of a chunk
    if rows is not None:  # the sums over the real rows (the terms too: row_weights), as means
        metrics, sq_norms = jax.tree_util.tree_map(lambda v: v / jnp.asarray(rows, jnp.float32), (metrics, sq_norms))
    return {**finish_metrics(metrics, config.task), "jacobian_sq_norms": sq_norms}
