r"""Shape buckets: datasets of different shapes share one compiled program.

A program is keyed by its arrays' shapes, so every (dataset, fraction) of a study used to
compile its own. Here a dataset's arrays are **padded** to a :class:`Bucket` (rows of each
split, features, classes, robust sets) and the true sizes travel as data
(:class:`DataSizes`, traced int32 scalars in :class:`~dreg_jax.engine.run.EngineData`), so
datasets whose shapes fit one bucket call one program with different arguments.

What the padding never changes (``tests/test_buckets.py`` compares padded with unpadded runs):

* **rows**: a padding row never enters a batch (the training order draws from the run's
  included rows only), a loss, a metric, a BatchNorm statistic or a diagnostic (a padded
  split is scored in chunks up to its true rows, :func:`dreg_jax.engine.run.evaluate_rows`;
  :func:`dreg_jax.engine.diagnostics.tail_ratio` takes a count);
* **features**: a padding feature column is zero and meets kernel rows that are zero at
  initialization and stay zero (their gradient is ``x^T delta`` with ``x = 0``, weight decay
  keeps a zero at zero, spectral normalization's power iteration and every Jacobian term see
  a zero row, which adds nothing);
* **classes**: a padding class gets a ``-inf`` logit (the model reads the true count from
  ``variables["fold"]["num_classes"]``), so its probability and every gradient through it are
  zero and its head column stays zero;
* **random draws**: threefry's counter for an element is its flat index, so a draw of a longer
  vector starts with the shorter one's values (``uniform(k, (n_pad,))[:n] == uniform(k,
  (n,))``); a matrix padded along its last axis is drawn flat and gathered at
  ``i * true_width + j`` (:func:`prefix_draw`): the run's mask, shuffles, label and input
  noise and initial head are the unpadded run's, value for value.

Where bits differ (float rounding only): the first kernel is drawn at the padded fan-in and
rescaled to the true one (:func:`unpadded_init`: 1-2 ulp), matrix products and means add
zeros in another order, and evaluation means are sums of chunks.

Not padded (exact shapes, as before): the user's own modules (their input is theirs to
interpret), and the options whose random draws or statistics span features or classes:
``jacobian`` (projections over the classes) and ``dreg`` with the probe layer estimator
(probes over the input features) keep their classes and features exact; the
``noise_inverse`` schedule keeps both (:func:`padding_rules`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dreg_jax.training.config import TrainConfig


class DataSizes(NamedTuple):
    """The true sizes of a padded :class:`~dreg_jax.engine.run.EngineData` (int32 scalars)."""

    train_rows: jax.Array
    test_rows: jax.Array
    val_rows: jax.Array
    features: jax.Array
    classes: jax.Array
    robust_sets: jax.Array


class Bucket(NamedTuple):
    """Padded shapes (static): rows per split, features, classes, robust sets."""

    train_rows: int
    test_rows: int
    val_rows: int
    features: int
    classes: int
    robust_sets: int

    def covers(self, other: "Bucket") -> bool:
        return all(a >= b for a, b in zip(self, other))

    def join(self, other: "Bucket") -> "Bucket":
        return Bucket(*(max(a, b) for a, b in zip(self, other)))


def ladder(value: int, minimum: int = 1) -> int:
    """The bucket edge of ``value``: the next power of two or 1.5 times one (1, 2, 3, 4, 6, 8,
    12, 16, 24, ...): at most 50% padding, few distinct edges."""
    value = max(int(value), minimum)
    if value <= 2:
        return value
    power = 1 << (value - 1).bit_length()  # the next power of two
    return power * 3 // 4 if power * 3 // 4 >= value else power


def padding_rules(config: TrainConfig, return_variables: bool = False) -> tuple[bool, bool, bool]:
    """``(rows, features, classes)``: which axes a program of ``config`` may pad (module docs)."""
    reg = config.regularizer
    if config.model.is_custom or return_variables or config.task == "regression":
        # a user's module reads its own shapes; kept models are unpadded; a regression's float
        # target is never padded (it is your own table: one dataset per program)
        return False, False, False
    exact_classes = reg.kind == "jacobian" or "jacobian" in config.regularizers
    exact_features = any(k == "dreg" for k in config.regularizers) and (
        reg.dreg_scope == "layer" and reg.layer_estimator == "probe")
    if reg.strength_schedule == "noise_inverse":
        exact_classes = exact_features = True
    if reg.dreg_output_layer and reg.dreg_scaling == "width":
        exact_classes = True  # the output term is divided by the class count
    return True, not exact_features, not exact_classes


def exact_bucket(data, num_classes: int) -> Bucket:
    """The bucket that is the data's own shapes (no padding)."""
    n_val = 0 if data.x_val is None else data.x_val.shape[0]
    sets = 0 if data.x_robust is None else data.x_robust.shape[0]
    return Bucket(data.x_train.shape[0], data.x_test.shape[0], n_val, data.x_train.shape[1], num_classes, sets)


def _pad(array, shape):
    array = np.asarray(array)
    out = np.zeros(shape, array.dtype)
    out[tuple(slice(0, s) for s in array.shape)] = array
    return out


def pad_engine_data(data, num_classes: int, bucket: Bucket):
    """``data`` padded with zeros to ``bucket``, its true sizes in ``data.sizes``.

    Args:
      data: an unpadded :class:`~dreg_jax.engine.run.EngineData`.
      num_classes: its class count.
      bucket: shapes that cover the data's (:meth:`Bucket.covers`).

    Returns:
      The padded data; train it with ``num_classes=bucket.classes``.
    """
    own = exact_bucket(data, num_classes)
    if (bucket.val_rows > 0) != (own.val_rows > 0) or (bucket.robust_sets > 0) != (own.robust_sets > 0):
        raise ValueError(f"bucket {tuple(bucket)} and data {tuple(own)}: a bucket with a validation split or "
                         "robust sets needs data with them, and data with them a bucket with them")
    if not bucket.covers(own):
        raise ValueError(f"bucket {tuple(bucket)} is smaller than the data's shapes {tuple(own)}")
    from dreg_jax.engine.run import EngineData  # the run module reads this one

    b, d = bucket, bucket.features
    sizes = DataSizes(*(jnp.asarray(v, jnp.int32) for v in own))
    x_val = y_val = None
    if b.val_rows:
        x_val, y_val = _pad(data.x_val, (b.val_rows, d)), _pad(data.y_val, (b.val_rows,))
    robust = data.x_robust
    if robust is not None:
        robust = _pad(robust, (b.robust_sets, b.test_rows, d))
    return EngineData(jnp.asarray(_pad(data.x_train, (b.train_rows, d))), jnp.asarray(_pad(data.y_train, (b.train_rows,))),
                      jnp.asarray(_pad(data.x_test, (b.test_rows, d))), jnp.asarray(_pad(data.y_test, (b.test_rows,))),
                      None if robust is None else jnp.asarray(robust),
                      None if x_val is None else jnp.asarray(x_val), None if y_val is None else jnp.asarray(y_val),
                      sizes)


def prefix_draw(draw, key, shape, true_width):
    """``draw(key, shape)`` as if drawn at ``shape[:-1] + (true_width,)`` and zero-padded on the
    last axis (``true_width`` may be traced): the value at ``[..., j]`` is the flat draw at
    ``row * true_width + j`` (threefry's counter), zero for ``j >= true_width``."""
    width = shape[-1]
    leading = math.prod(shape[:-1])
    flat = draw(key, (leading * width,))
    columns = jnp.arange(width)
    index = jnp.arange(leading)[:, None] * true_width + columns[None, :]
    values = jnp.where(columns[None, :] < true_width, flat[jnp.clip(index, 0, leading * width - 1)], 0)
    return values.reshape(shape).astype(flat.dtype)


def unpadded_init(params, batch_stats, sizes: DataSizes):
    """The built-in MLP's initial variables at the true shapes, zero-padded.

    Flax draws every kernel at the padded shape. The first kernel's draws are the true
    shape's (row-major prefix) at the padded fan-in's scale: rows past the true features are
    zeroed and the rest rescaled to the true fan-in (LeCun normal: ``1/sqrt(fan_in)``). The
    head's columns are gathered from the flat draw (:func:`prefix_draw`), its padding columns
    and bias zero; spectral normalization's power vector ``u`` of the head keeps its first
    entries (a vector's prefix) and zeroes the rest, and a spectrally normalized kernel is
    divided by its own power-iteration sigma, as flax's init does.
    """
    params = jax.tree_util.tree_map(lambda a: a, params)  # a copy to edit
    batch_stats = jax.tree_util.tree_map(lambda a: a, batch_stats)

    def dense(tree, name):
        node = tree[name]
        return node["layer_instance"] if "layer_instance" in node else node

    first = dense(params, "dense_0")
    padded_features = first["kernel"].shape[0]
    rows = jnp.arange(padded_features)[:, None] < sizes.features
    scale = jnp.sqrt(jnp.asarray(padded_features, jnp.float32) / sizes.features.astype(jnp.float32))
    first["kernel"] = jnp.where(rows, first["kernel"] * scale, 0.0).astype(first["kernel"].dtype)

    head = dense(params, "head")
    kernel = head["kernel"]
    classes = kernel.shape[1]
    head["kernel"] = prefix_draw(lambda _, shape: kernel.reshape(shape), None, kernel.shape, sizes.classes)
    head["bias"] = jnp.where(jnp.arange(classes) < sizes.classes, head["bias"], 0.0)
    stats = batch_stats.get("head", {})
    if "layer_instance/kernel/u" in stats:
        u = stats["layer_instance/kernel/u"]
        stats["layer_instance/kernel/u"] = jnp.where(jnp.arange(u.shape[-1]) < sizes.classes, u, 0.0)
    # flax.linen.SpectralNorm stores the kernel divided by its one-step power-iteration sigma
    # at init, and that sigma saw the padding: divide the unpadded kernel by its own (a scale
    # of the kernel does not change K / sigma(K), so the fan-in rescale above washes out)
    for name, node in (("dense_0", first), ("head", head)):
        u = batch_stats.get(name, {}).get("layer_instance/kernel/u")
        if u is not None:
            node["kernel"] = node["kernel"] / _power_iteration_sigma(node["kernel"], u)
    return params, batch_stats


def _power_iteration_sigma(kernel, u, eps: float = 1e-12):
    """flax.linen.SpectralNorm's one-step estimate of the largest singular value at init."""
    def normalize(x):
        return x * jax.lax.rsqrt((x * x).sum(keepdims=True) + eps)
    v = normalize(u @ kernel.T)
    u = normalize(v @ kernel)
    sigma = (v @ kernel @ u.T)[0, 0]
    return jnp.where(sigma != 0, sigma, 1.0)
