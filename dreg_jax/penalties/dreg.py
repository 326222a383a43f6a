r"""The DREG penalty: a weighted, optionally width-normalized sum of per-layer Jacobian terms.

Given per-layer terms :math:`s_l \approx E_x\|J_l\|_F^2` (from
:func:`layer_jacobian_sq_norms` or from a model's activation pass) the penalty is

.. math:: P = \lambda \sum_{l=1}^{L} w_l \, \frac{s_l}{c_l},
   \qquad c_l = \begin{cases} 1   & \text{scaling = "none" (default)} \\
                              d_l & \text{scaling = "width"} \end{cases}

with :math:`d_l` the output width (units) of layer :math:`l` and :math:`w_l` optional layer
weights (default 1).

Which scaling is the default, and why: the published study fixes :math:`\lambda = 10^{-2.5}`
with no tuning. Under ``"none"`` (the literal reading: the sum over layers of the mean squared
Frobenius norms) that coefficient makes a penalty of ~0.1-0.2 next to a cross-entropy of
~0.2-0.4 for our 2x64 MLPs, and changes accuracy measurably; under ``"width"`` the same
coefficient gives a penalty ~50x smaller that changed no accuracy we measured (pima, corrupted
digits; 3 seeds). So ``"none"`` is the reading under which the published coefficient acts as a
regularizer. ``"width"`` divides each term by the width, giving the mean squared slope per unit,
O(1) for any width: use it (with a larger :math:`\lambda`) to carry one coefficient across
architectures of different widths.

Why the pressure lands on the layers with the largest activation derivative: the gradient
of :math:`\sigma'(z_i)^2` is :math:`2\sigma'(z_i)\,\partial\sigma'(z_i)`, proportional to the
slope itself, so steep units and layers receive proportionally more of the penalty's push.

Scopes (where the Jacobian is taken, chosen by the model pass, not here):

* ``"activation"`` (default): :math:`J_l = \operatorname{diag}(\sigma'(z_l))`, the activation
  alone. Exact, elementwise cost only; for the ChainzRule cubic
  :math:`\sigma'(z) = a_1 + 2a_2 z + 3a_3 z^2` is computed in the same pass.
* ``"layer"``: :math:`J_l = \operatorname{diag}(\sigma'(W_l h + b_l)) W_l`, the whole layer map.
  Two estimators (``layer_estimator``):

  - ``"probe"`` (default): Rademacher probes through ``jax.jvp`` (unbiased for any layer;
    one extra matmul per layer forward and one backward);
  - ``"exact"``: for a dense layer followed by an elementwise activation the Frobenius norm
    has the closed form :math:`\|\operatorname{diag}(\sigma') W\|_F^2 = \sum_j \sigma'(z_j)^2
    \|W_{:,j}\|_2^2` (column norms of the kernel), exact and elementwise in cost.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreg_jax._checks import check_choice, is_concrete

DEFAULT_LAMBDA = 10 ** -2.5
SCOPES = ("activation", "layer")
DEFAULT_SCOPE = "activation"
SCALINGS = ("none", "width")
DEFAULT_SCALING = "none"
LAYER_ESTIMATORS = ("probe", "exact")


def dreg_penalty(
    sq_norms: jax.Array | Mapping[str, jax.Array],
    widths: Sequence[int] | Mapping[str, int] | None = None,
    *,
    strength: float | jax.Array = DEFAULT_LAMBDA,
    scaling: str = "none",
    layer_weights: jax.Array | None = None,
    data_loss: jax.Array | None = None,
) -> jax.Array:
    r"""Returns :math:`\lambda \sum_l w_l s_l / c_l` (see the module docstring).

    Args:
      sq_norms: ``(L,)`` per-layer squared-Jacobian terms :math:`s_l`, or the ``terms`` dict
        of :func:`dreg_jax.jacobian_terms` (its values, in order).
      widths: the ``L`` output widths :math:`d_l` (a sequence, or a dict with the keys of
        ``sq_norms``); required for ``scaling="width"`` (``dreg_jax.layer_widths``,
        ``dreg_jax.term_widths`` or ``MLP.hidden`` give them), ignored otherwise.
      strength: :math:`\lambda \ge 0`, default :math:`10^{-2.5}`; may be a traced scalar (vmap over lambda).
      scaling: ``"none"`` (default, raw sum) or ``"width"`` (divide each term by its width).
      layer_weights: optional ``(L,)`` weights :math:`w_l`, default all ones.
      data_loss: optional data loss of the same step; the first time a penalty larger than it
        is computed, a ``UserWarning`` says so, once per process (see "Choosing lambda" in
        docs/guide/your_model.md). Under ``jit`` the check runs as a host callback.

    Returns:
      A scalar penalty, float32 or wider (float64 under x64 for float64 terms).
    """
    check_choice("scaling", scaling, SCALINGS)
    if isinstance(sq_norms, Mapping):
        if not sq_norms:
            raise ValueError("sq_norms is an empty dict: jacobian_terms selected no layer")
        if isinstance(widths, Mapping):
            missing = [k for k in sq_norms if k not in widths]
            if missing:
                raise ValueError(f"widths has no entry for {missing}; pass dreg_jax.term_widths(...) "
                                 "with the same layers as jacobian_terms")
            widths = [widths[k] for k in sq_norms]
        sq_norms = jnp.stack([jnp.asarray(v) for v in sq_norms.values()])
    sq_norms = jnp.asarray(sq_norms)
    if not jnp.issubdtype(sq_norms.dtype, jnp.floating):  # integers would truncate lambda to 0
        sq_norms = sq_norms.astype(jnp.float32)
    sq_norms = sq_norms.astype(jnp.promote_types(sq_norms.dtype, jnp.float32))
    if is_concrete(sq_norms):
        concrete = np.asarray(sq_norms, np.float64)
        if not np.isfinite(concrete).all():
            raise ValueError(f"sq_norms holds NaN/inf ({sq_norms}); the layer terms diverged or the input "
                             "was not finite")
        if (concrete < 0).any():  # squared norms: a negative one is not a DREG term
            raise ValueError(f"sq_norms holds negative values ({sq_norms}); each term is a squared "
                             "Jacobian norm, >= 0")
    if isinstance(strength, (bool, np.bool_)) or (hasattr(strength, "dtype") and strength.dtype == bool):
        raise TypeError(f"strength must be a number, got the boolean {strength!r}")
    if is_concrete(strength):
        strength_value = np.asarray(strength, dtype=np.float64)
        if strength_value.ndim != 0 or not np.isfinite(strength_value) or strength_value < 0:
            raise ValueError(f"strength must be a finite scalar >= 0, got {strength!r}")
    if sq_norms.ndim != 1:
        raise ValueError(f"sq_norms must be a 1-D array of per-layer terms, got shape {sq_norms.shape}")
    num_layers = sq_norms.shape[0]
    terms = sq_norms
    if scaling == "width":
        if widths is None:
            raise ValueError(
                'scaling="width" needs widths (the output width of every layer); pass '
                'widths=dreg_jax.layer_widths(layer_fns, x) or use scaling="none"'
            )
        given = tuple(widths)
        if (len(given) != num_layers or any(isinstance(w, (bool, np.bool_)) for w in given)
                or any(not float(w).is_integer() or w < 1 for w in given)):
            raise ValueError(
                f"widths must hold {num_layers} positive ints (one per layer), got {given}"
            )
        widths = tuple(int(w) for w in given)
        terms = terms / jnp.asarray(widths, dtype=terms.dtype)
    if layer_weights is not None:
        layer_weights = jnp.asarray(layer_weights, dtype=terms.dtype)
        if layer_weights.shape != (num_layers,):
            raise ValueError(
                f"layer_weights must have shape ({num_layers},), got {layer_weights.shape}"
            )
        if is_concrete(layer_weights) and not (np.isfinite(np.asarray(layer_weights, np.float64)).all()
                                               and (np.asarray(layer_weights) >= 0).all()):
            raise ValueError(f"layer_weights must be finite and >= 0, got {layer_weights}")
        terms = terms * layer_weights
    penalty = jnp.asarray(strength, dtype=terms.dtype) * jnp.sum(terms)
    if is_concrete(penalty) and not np.isfinite(np.asarray(penalty, np.float64)):
        raise ValueError(f"the penalty overflows {penalty.dtype} (strength {strength!r} times terms summing to "
                         f"{float(jnp.sum(terms)):.4g}); use a smaller strength or scaling='width'")
    if data_loss is not None:
        warn_if_penalty_dominates(penalty, data_loss, scaling=scaling, strength=strength)
    return penalty


_WARNED = []
_LIBRARY_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 os.path.dirname(os.path.abspath(jax.__file__)))


def _user_call_site():
    """``(filename, lineno)`` of the first frame outside dreg_jax and JAX: the user's line that
    computed the penalty (taken when the call is traced, so a jitted step names it too)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_LIBRARY_DIRS) and "/flax/" not in filename and not filename.startswith("<"):
            return frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back
    return "<unknown>", 0


def _advice(scaling, strength) -> str:
    shown = f"{float(strength):.3g}" if is_concrete(strength) and np.ndim(strength) == 0 else "the strength"
    if scaling == "width":
        return (f"you already pass scaling='width': use a smaller strength than {shown} "
                "(docs/guide/your_model.md, 'Choosing lambda')")
    return ("the raw sum grows with the number of units per term (conv feature maps, sequence "
            f"positions, deep stacks): pass scaling='width' or use a smaller strength than {shown} "
            "(docs/guide/your_model.md, 'Choosing lambda')")


def _warn_once(penalty, data_loss, *, advice, site):
    if _WARNED:
        return
    penalty, data_loss = float(np.mean(penalty)), float(np.mean(data_loss))
    if penalty > data_loss:
        _WARNED.append(True)
        warnings.warn_explicit(
            f"the DREG penalty ({penalty:.4g}) exceeds the data loss ({data_loss:.4g}): the "
            f"regularizer dominates training; {advice}. This warning is shown once per process.",
            UserWarning, site[0], site[1], module="dreg_jax",
        )


def warn_if_penalty_dominates(penalty, data_loss, *, scaling=None, strength=None):
    """Warns once per process when ``penalty > data_loss`` (a host callback under ``jit``).

    The warning names the caller's line (the user's code, not this library's or JAX's) and
    gives advice for what was passed (``scaling``, ``strength``: :func:`dreg_penalty`'s).
    """
    if _WARNED:
        return
    callback = functools.partial(_warn_once, advice=_advice(scaling, strength), site=_user_call_site())
    if is_concrete(penalty) and is_concrete(data_loss):
        callback(penalty, data_loss)
    else:
        jax.debug.callback(callback, penalty, data_loss)
