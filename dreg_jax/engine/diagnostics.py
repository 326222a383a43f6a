r"""Label-free training diagnostics.

**Gradient tail ratio** (the ChainzRule paper's tau). For per-example gradient norms
:math:`n_i = \|\nabla_\theta \ell(f_\theta(x_i), \hat y_i)\|_2` on an evaluation batch,

.. math:: \tau = \frac{\operatorname{p99}(n)}{\operatorname{mean}(n)} .

The natural reading uses the parameter gradient of the loss (``variant="param"``); the
``"input"`` variant uses :math:`\|\nabla_x \ell\|_2`. Labels :math:`\hat y` default to the
model's own predictions (``labels=None``), which makes tau label-free as the paper proposes;
pass true labels to get the supervised variant.

The paper does not say over what the percentile runs. A second reading, over time, is
reported by the engine as ``tau_steps``: p99 / mean of the mini-batch gradient norms
:math:`\|g_t\|` over the optimizer steps of one epoch (the last epoch for the final value).
Per-example norms spread widely (tau of several units), so values of 1.01-1.09 are only
plausible under a reading like this one, where each sample is already a batch average.

**Gradient volatility**: the relative change of the mini-batch gradient norm between
consecutive steps, :math:`v_t = |\,\|g_t\| - \|g_{t-1}\|\,| / \|g_{t-1}\|` (:math:`v_0 = 0`);
the engine reports its per-epoch mean and its peak over training.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dreg_jax._checks import check_choice
from dreg_jax.training.train import model_variables

TAU_VARIANTS = ("param", "input")


def per_example_grad_norms(state, x, labels=None, variant: str = "param") -> jax.Array:
    """``(batch,)`` norms of per-example loss gradients (w.r.t. params or inputs)."""
    check_choice("tau variant", variant, TAU_VARIANTS)
    if labels is None:
        labels = jnp.argmax(state.apply_fn(model_variables(state, state.params), x), -1)

    def loss(params, xi, yi):
        logits = state.apply_fn(model_variables(state, params), xi[None]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]

    if variant == "param":
        grad_fn = lambda xi, yi: optax.tree.norm(jax.grad(loss)(state.params, xi, yi))
    else:
        grad_fn = lambda xi, yi: jnp.linalg.norm(jax.grad(loss, argnums=1)(state.params, xi, yi))
    return jax.vmap(grad_fn)(x, labels)


def tail_ratio(norms: jax.Array, percentile: float = 99.0, count=None) -> jax.Array:
    """``percentile(norms) / mean(norms)`` over the first ``count`` entries (default: all).

    With a ``count`` (an int or a traced scalar, ``1 <= count <= len(norms)``) the percentile
    is ``jnp.percentile``'s linear interpolation over the first ``count`` values, computed
    with a static shape (the rest are padding and never enter)."""
    norms = jnp.asarray(norms)
    if count is None or (isinstance(count, int) and count == norms.shape[0]):
        return jnp.percentile(norms, percentile) / jnp.maximum(jnp.mean(norms), jnp.finfo(jnp.float32).tiny)
    valid = jnp.arange(norms.shape[0]) < count
    ordered = jnp.sort(jnp.where(valid, norms, jnp.inf))
    position = (percentile / 100.0) * (jnp.asarray(count, jnp.float32) - 1.0)
    low = jnp.floor(position).astype(jnp.int32)
    high = jnp.minimum(low + 1, jnp.asarray(count, jnp.int32) - 1)
    weight = position - low
    value = ordered[low] * (1.0 - weight) + ordered[high] * weight
    mean = jnp.sum(jnp.where(valid, norms, 0.0)) / count
    return value / jnp.maximum(mean, jnp.finfo(jnp.float32).tiny)


def gradient_tail_ratio(state, x, labels=None, variant: str = "param", count=None) -> jax.Array:
    """tau = p99 / mean of per-example gradient norms (label-free when ``labels`` is None).

    ``count`` (may be traced): only the first ``count`` rows of ``x`` are examples, the rest
    padding (a shape bucket, :mod:`dreg_jax.engine.buckets`)."""
    return tail_ratio(per_example_grad_norms(state, x, labels, variant), count=count)


def volatility(grad_norm, prev_grad_norm, step) -> jax.Array:
    """Relative change of the gradient norm since the previous step (0 at step 0)."""
    v = jnp.abs(grad_norm - prev_grad_norm) / jnp.maximum(prev_grad_norm, 1e-12)
    return jnp.where(step == 0, 0.0, v)
