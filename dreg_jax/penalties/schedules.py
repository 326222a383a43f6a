"""Step-dependent penalty strength: ``lambda_t = lambda_0 * m_t`` (lambda schedules).

The ChainzRule paper reports that the best lambda schedule depends on representation noise
without defining either; our readings, with the formulas (``t`` = optimizer step counted
from 0, ``T`` = total steps of the run):

* ``constant``: ``m_t = 1``.
* ``linear_warmup``: ``m_t = min(1, (t + 1) / (w T))`` with ``w = warmup_fraction``
  (0.25 by default): the penalty ramps up over the first quarter of training.
* ``cosine_decay``: ``m_t = (1 + cos(pi * min(t / T, 1))) / 2``: full strength at the start,
  zero at the end.
* ``noise_inverse``: ``m_t = 1 / (1 + N_t / S_t) = S_t / (S_t + N_t)``, inverse to one plus
  the measured noise-to-signal ratio of a representation ``h`` on the current batch
  (:func:`representation_noise_ratio`): ``N_t`` is its within-class scatter (noise),
  ``S_t`` its between-class scatter (signal), both per example, from the batch's training
  labels. The representation is the last hidden layer's output (``"penultimate"``, default:
  the noise the network carries at step ``t``) or the input features (``"input"``: the noise
  of a frozen representation, constant in expectation). ``m_t`` is computed under
  ``stop_gradient``: the schedule sets the strength, it is not a term to optimize.

Why ``1 / (1 + N/S)``: it is 1 for a noise-free representation, falls smoothly as the
noise share grows, stays in ``(0, 1]`` (never above the study's fixed ``lambda_0``) and needs
no extra constant. ``S_t + N_t`` is the total scatter, so ``m_t`` is the between-class share
of the representation's variance.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dreg_jax._checks import check_choice

SCHEDULES = ("constant", "linear_warmup", "cosine_decay", "noise_inverse")
#: the schedules whose m_t depends on the run length T
LENGTH_SCHEDULES = ("linear_warmup", "cosine_decay")
NOISE_REPRESENTATIONS = ("penultimate", "input")
DEFAULT_WARMUP_FRACTION = 0.25
_EPS = 1e-12


def representation_noise_ratio(h, labels, num_classes: int):
    """Noise-to-signal ratio ``N / S`` of representation ``h`` on one batch.

    .. math::
       N = \\frac1B \\sum_i \\|h_i - c_{y_i}\\|^2, \\qquad
       S = \\frac1B \\sum_i \\|c_{y_i} - \\bar h\\|^2,

    with ``c_k`` the batch mean of class ``k`` and ``\\bar h`` the batch mean (classes absent
    from the batch do not contribute).

    Args:
      h: ``(batch, features)`` representation.
      labels: ``(batch,)`` integer labels in ``[0, num_classes)``.
      num_classes: number of classes (static).

    Returns:
      The scalar ratio ``N / S`` (float32; ``N / eps`` when the class means coincide).
    """
    if h.ndim != 2 or labels.shape != h.shape[:1]:
        raise ValueError(f"expected h (batch, features) and labels (batch,), got {h.shape} and {labels.shape}")
    h = h.astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # (B, K)
    counts = onehot.sum(0)
    means = (onehot.T @ h) / jnp.maximum(counts, 1.0)[:, None]  # (K, F)
    own_mean = onehot @ means  # c_{y_i}, (B, F)
    noise = jnp.mean(jnp.sum(jnp.square(h - own_mean), -1))
    signal = jnp.mean(jnp.sum(jnp.square(own_mean - h.mean(0)), -1))
    return noise / jnp.maximum(signal, _EPS)


def strength_multiplier(schedule: str, step, total_steps, *, warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
                        noise_ratio=None):
    """The factor ``m_t`` of ``lambda_t = lambda_0 * m_t`` (formulas in the module docstring).

    Args:
      schedule: one of ``SCHEDULES``.
      step: current optimizer step ``t`` (scalar, may be traced).
      total_steps: ``T`` (scalar, may be traced; used by the warmup and cosine schedules).
      warmup_fraction: ``w`` for ``linear_warmup``, in ``(0, 1]``.
      noise_ratio: ``N_t / S_t`` for ``noise_inverse`` (see :func:`representation_noise_ratio`).

    Returns:
      A float32 scalar in ``[0, 1]``.
    """
    check_choice("strength_schedule", schedule, SCHEDULES)
    t = jnp.asarray(step, jnp.float32)
    total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
    if schedule == "constant":
        return jnp.ones([], jnp.float32)
    if schedule == "linear_warmup":
        if not 0.0 < warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must be in (0, 1], got {warmup_fraction}")
        return jnp.minimum(1.0, (t + 1.0) / jnp.maximum(warmup_fraction * total, 1.0))
    if schedule == "cosine_decay":
        return 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t / total, 1.0)))
    if noise_ratio is None:
        raise ValueError('strength_schedule="noise_inverse" needs noise_ratio (representation_noise_ratio)')
    return 1.0 / (1.0 + jax.lax.stop_gradient(jnp.asarray(noise_ratio, jnp.float32)))
