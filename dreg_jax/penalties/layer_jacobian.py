r"""Per-layer Jacobian squared norms from one forward-mode pass.

For a chain :math:`h_{l+1} = f_l(h_l)`, :math:`h_0 = x`, :func:`layer_jacobian_sq_norms`
runs every layer once under :func:`jax.jvp`. The primal output of layer ``l`` is the input of
layer ``l + 1`` (no second forward pass) and the tangent output gives :math:`J_l v`, with
:math:`J_l = \partial f_l / \partial h_l` at the current input and :math:`v` a Rademacher probe.
Because :math:`E[v v^T] = I`,

.. math:: E_v \|J_l v\|_2^2 = \operatorname{tr}(J_l^T J_l) = \|J_l\|_F^2 ,

so the batch/probe mean of :math:`\sum_i (J_l v)_i^2` is an unbiased estimate of the mean
squared Frobenius norm of the per-example Jacobian. For elementwise layers
:math:`J_l = \operatorname{diag}(\sigma'(z))` and :math:`(J_l v)_i^2 = \sigma'(z_i)^2 v_i^2
= \sigma'(z_i)^2`: the estimate is exact with a single probe.

Layers are assumed to act on each batch row independently (dense layers, activations,
convolutions on per-example inputs). Layers that mix rows (batch norm in training mode) give
the Frobenius norm of the full batch Jacobian divided by the batch size.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from dreg_jax._checks import check_float_array, check_positive_int
from dreg_jax.penalties.probes import rademacher

LayerFn = Callable[[jax.Array], jax.Array]


def _accumulation_dtype(dtype):
    # Squares of bfloat16 tangents lose most of their bits when summed: accumulate in >= f32.
    return jnp.promote_types(dtype, jnp.float32)


def row_sq_norm_mean(tangents: jax.Array) -> jax.Array:
    """Mean over all leading (probe, batch) rows of the squared L2 norm of the rest.

    Args:
      tangents: ``(probes, batch, ...)`` array of Jacobian-vector products.

    Returns:
      Scalar :math:`\\frac{1}{PB}\\sum_{p,b} \\sum_i t_{p,b,i}^2` in at least float32.
    """
    t = tangents.astype(_accumulation_dtype(tangents.dtype))
    per_row = jnp.sum(jnp.square(t), axis=tuple(range(2, t.ndim)))
    return jnp.mean(per_row)


def jvp_with_probes(fn: LayerFn, h: jax.Array, probes: jax.Array):
    """``(fn(h), [J v_p for each probe])`` with the primal computed once.

    Args:
      fn: the layer map.
      h: its input, ``(batch, ...)``.
      probes: ``(num_probes, batch, ...)`` tangents.

    Returns:
      ``(y, jv)`` with ``y = fn(h)`` and ``jv`` of shape ``(num_probes,) + y.shape``.
    """
    if probes.shape[0] == 1:  # the common case: skip the vmap bookkeeping
        y, jv = jax.jvp(fn, (h,), (probes[0],))
        return y, jv[None]
    # The primal does not depend on the tangent, so vmap keeps it unbatched (out_axes=None):
    # one primal evaluation shared by all probes.
    return jax.vmap(lambda v: jax.jvp(fn, (h,), (v,)), out_axes=(None, 0))(probes)


def _check_layer_output(y, batch: int, index: int):
    if not hasattr(y, "shape") or y.ndim < 1 or y.shape[0] != batch:
        shape = getattr(y, "shape", type(y).__name__)
        raise ValueError(
            f"layer_fns[{index}] must map (batch, ...) to (batch, ...) keeping batch={batch} "
            f"rows; it returned {shape}"
        )


def layer_jacobian_sq_norms(
    layer_fns: Sequence[LayerFn], x: jax.Array, key: jax.Array, num_probes: int = 1
):
    r"""Runs the chain once with ``jax.jvp`` at every layer; returns output and per-layer terms.

    Args:
      layer_fns: callables ``h -> h'``, already closed over their parameters, applied in order.
      x: the input batch ``(batch, features)`` (more trailing axes are allowed).
      key: PRNG key for the Rademacher probes (one independent probe set per layer).
      num_probes: probes per example and layer; the estimate's variance falls as ``1/num_probes``.

    Returns:
      ``(y, sq_norms)``: ``y`` equals ``layer_fns[-1](...layer_fns[0](x))``; ``sq_norms[l]`` is
      the mean over batch rows and probes of :math:`\sum_i (J_l v)_i^2`, an unbiased estimate
      of :math:`E_x \|J_l\|_F^2` (exact for elementwise layers), shape ``(len(layer_fns),)``,
      dtype at least float32. No normalization is applied here (see :func:`dreg_penalty`).
    """
    layer_fns = tuple(layer_fns)
    if not layer_fns:
        raise ValueError("layer_fns is empty: pass at least one callable h -> h'")
    for i, fn in enumerate(layer_fns):
        if not callable(fn):
            raise TypeError(f"layer_fns[{i}] is not callable: {type(fn).__name__}")
    check_float_array(x, "x", min_ndim=2)
    num_probes = check_positive_int(num_probes, "num_probes")
    keys = jax.random.split(key, len(layer_fns))
    h, sq_norms = x, []
    for i, (fn, k) in enumerate(zip(layer_fns, keys)):
        probes = rademacher(k, (num_probes,) + h.shape, h.dtype)
        y, jv = jvp_with_probes(fn, h, probes)
        _check_layer_output(y, x.shape[0], i)
        sq_norms.append(row_sq_norm_mean(jv))
        h = y
    return h, jnp.stack(sq_norms)


def elementwise_value_and_derivative(fn: LayerFn, z: jax.Array):
    """``(fn(z), fn'(z))`` for an elementwise ``fn`` from one jvp with an all-ones tangent.

    For elementwise maps the Jacobian is ``diag(fn'(z))``, so ``J 1 = fn'(z)`` exactly.
    """
    return jax.jvp(fn, (z,), (jnp.ones_like(z),))


def layer_widths(layer_fns: Sequence[LayerFn], x: jax.Array) -> tuple[int, ...]:
    """Output width (product of non-batch dims) of every layer, from shapes only (no FLOPs)."""
    widths, h = [], jax.ShapeDtypeStruct(x.shape, x.dtype)
    for i, fn in enumerate(layer_fns):
        h = jax.eval_shape(fn, h)
        _check_layer_output(h, x.shape[0], i)
        widths.append(math.prod(h.shape[1:]))
    return tuple(widths)
