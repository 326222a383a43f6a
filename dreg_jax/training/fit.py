"""A plain Python training loop over jitted steps, with a progress bar (used by the demo).

Each epoch visits every training example once: the epoch's permutation is cut into
``ceil(n / batch_size)`` batches and the last batch is filled up with the first examples of
the same permutation (so the batch shape stays static for ``jit`` and nothing is dropped).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dreg_jax._checks import check_float_array
from dreg_jax.training.config import TrainConfig
from dreg_jax.training.train import TrainState, balanced_class_weights, create_train_state, eval_step, train_step


class FitResult(NamedTuple):
    state: TrainState
    history: dict  # per-epoch lists: train_loss, train_accuracy (classification), penalty
    test: dict  # final eval metrics as numpy values


def epoch_batch_indices(key, num_examples: int, batch_size: int) -> jax.Array:
    """``(steps, batch_size)`` indices covering a fresh permutation, wrapped (as often as needed,
    so a training set smaller than a batch works) to fill the end."""
    steps = math.ceil(num_examples / batch_size)
    perm = jax.random.permutation(key, num_examples)
    return perm[jnp.arange(steps * batch_size) % num_examples].reshape(steps, batch_size)


def check_labels(y, num_classes: int, name: str = "y"):
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        hint = "; a float target is a regression: TrainConfig(task='regression')" if y.dtype.kind == "f" else ""
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}{hint}")
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (batch,), got shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return y


def check_targets(y, name: str):
    """A regression target: floating and finite (integer class labels mean a classification run)."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.floating):
        raise TypeError(f"{name} holds {y.dtype} values, and a regression run takes a float target: build the data "
                        "with task='regression' (from_csv / from_arrays), or train it with task='classification'")
    bad = np.flatnonzero(~np.isfinite(y))
    if bad.size:
        raise ValueError(f"{name} row {int(bad[0])} is {y[bad[0]]}: a regression target must be finite "
                         f"({bad.size} such value(s))")
    return y


def fit(config: TrainConfig, x_train, y_train, x_test, y_test, *, seed: int = 0,
        num_classes: int | None = None, progress: bool = True, desc: str = "train") -> FitResult:
    """Trains ``config`` on the given arrays and evaluates on the test split.

    ``config.task="regression"``: ``y`` are float targets (standardize them first, e.g.
    ``from_arrays(..., task="regression")``) and ``num_classes`` is 1, the one output."""
    config.validate()
    x_train = check_float_array(jnp.asarray(x_train), "x_train", exact_ndim=2)
    x_test = check_float_array(jnp.asarray(x_test), "x_test", exact_ndim=2)
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"x_train has {x_train.shape[1]} features but x_test has {x_test.shape[1]}")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError("x and y must have the same number of rows in each split")
    if config.task == "regression":
        num_classes = 1
        y_train, y_test = (jnp.asarray(check_targets(y, name), jnp.float32)
                           for y, name in ((y_train, "y_train"), (y_test, "y_test")))
    else:
        num_classes = num_classes or int(max(np.max(y_train), np.max(y_test))) + 1
        y_train = jnp.asarray(check_labels(y_train, num_classes, "y_train"))
        y_test = jnp.asarray(check_labels(y_test, num_classes, "y_test"))

    init_key, loop_key = jax.random.split(jax.random.key(seed))
    total_steps = config.epochs * math.ceil(len(x_train) / config.batch_size)
    state = create_train_state(config, init_key, x_train.shape[1], num_classes, total_steps=total_steps)
    history = {"train_loss": [], "penalty": [], **({"train_accuracy": []} if config.task == "classification" else {})}
    epochs = range(config.epochs)
    if progress:
        try:  # tqdm comes with the study extra; the core install trains without a bar
            from tqdm.auto import tqdm

            epochs = tqdm(epochs, desc=desc, leave=False)
        except ImportError:
            pass
    class_weights = None
    if config.class_weight == "balanced":
        class_weights = balanced_class_weights(jnp.asarray(y_train), jnp.ones(len(y_train)), num_classes)
    for _ in epochs:
        loop_key, perm_key = jax.random.split(loop_key)
        sums = None
        batches = epoch_batch_indices(perm_key, len(x_train), config.batch_size)
        for idx in batches:
            loop_key, step_key = jax.random.split(loop_key)
            batch = {"x": x_train[idx], "y": y_train[idx]}
            if class_weights is not None:
                batch["w"] = class_weights[jnp.asarray(y_train)[idx]]
            state, metrics = train_step(state, batch, step_key, config)
            sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
        history["train_loss"].append(float(sums["loss"]) / len(batches))
        if "train_accuracy" in history:
            history["train_accuracy"].append(float(sums["accuracy"]) / len(batches))
        history["penalty"].append(float(sums["penalty"]) / len(batches))
    test = jax.tree_util.tree_map(np.asarray, eval_step(state, {"x": x_test, "y": y_test}, config))
    return FitResult(state, history, test)
