r"""Data scarcity as masks: stratified, nested, deterministic per seed, vmappable over fraction.

Every training example gets a uniform key :math:`u_i` from the run's PRNG key. Within each
class :math:`c` (of :math:`n_c` examples) the examples are ranked by :math:`u`; the mask for
fraction :math:`f` keeps the :math:`k_c = \max(1, \operatorname{round}(f\, n_c))` lowest ranks.
Hence: per-class proportions are kept (stratified), a smaller fraction's set is a subset of a
larger one's for the same key (nested), and the same key gives the same mask. The fraction may
be a traced scalar, so one compiled program covers every fraction.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def stratified_fraction_mask(key, labels: jax.Array, fraction, num_classes: int, rows=None) -> jax.Array:
    """Boolean ``(n,)`` mask keeping a stratified ``fraction`` of the examples.

    Args:
      key: PRNG key (the run's seed): same key, same mask.
      labels: ``(n,)`` integer labels in ``[0, num_classes)``.
      fraction: in (0, 1]; may be traced.
      num_classes: number of classes (static; at least the largest label + 1).
      rows: only the first ``rows`` examples exist, the rest are padding (may be traced;
        default all). The draws of the first ``rows`` examples do not depend on the padding
        (threefry's counters are the flat indices), so the mask is the unpadded one.

    Returns:
      ``(n,)`` bool mask; class ``c`` keeps ``max(1, round(fraction * n_c))`` examples;
      padding rows are never kept.
    """
    labels = jnp.asarray(labels)
    n = labels.shape[0]
    u = jax.random.uniform(key, (n,))
    if rows is not None:
        valid = jnp.arange(n) < rows
        order = jnp.lexsort((u, labels, ~valid))  # real rows first, by class, then by u
        counts = jnp.sum((labels[:, None] == jnp.arange(num_classes)) & valid[:, None], axis=0)
        starts = jnp.cumsum(counts) - counts
        rank_sorted = jnp.arange(n) - starts[labels[order]]
        rank = jnp.zeros(n, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
        keep = jnp.maximum(1, jnp.round(fraction * counts)).astype(jnp.int32)
        return valid & (rank < keep[labels])
    order = jnp.lexsort((u, labels))  # sorted by class, then by u
    counts = jnp.bincount(labels, length=num_classes)
    starts = jnp.cumsum(counts) - counts
    sorted_labels = labels[order]
    rank_sorted = jnp.arange(n) - starts[sorted_labels]
    rank = jnp.zeros(n, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    keep = jnp.maximum(1, jnp.round(fraction * counts)).astype(jnp.int32)
    return rank < keep[labels]


def symmetric_label_noise(key, labels: jax.Array, rate, num_classes: int) -> jax.Array:
    """Each label is, with probability ``rate``, replaced by a uniformly drawn *other* class."""
    k_flip, k_class = jax.random.split(key)
    flip = jax.random.uniform(k_flip, labels.shape) < rate
    shift = jax.random.randint(k_class, labels.shape, 1, jnp.maximum(num_classes, 2))  # may be traced
    return jnp.where(flip, (labels + shift) % num_classes, labels).astype(labels.dtype)
