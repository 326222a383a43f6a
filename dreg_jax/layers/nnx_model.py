"""An NNX module as the engine's model: pure ``init``/``apply`` over its ``nnx.Param`` state.

The engine builds every run's model inside one compiled program (vmapped over seeds), so it
needs the model as pure functions of arrays. :class:`NNXModel` wraps a factory
``factory(rngs) -> nnx.Module`` (the module's class, or a named function):

* ``init(key, x)`` constructs the module with ``nnx.Rngs(key)`` and returns ``{"params": state}``
  (its ``nnx.Param`` state, a pytree);
* ``apply(variables, x)`` merges the params into the module's graph and calls it;
* ``merge(params)`` gives the module itself, for :func:`dreg_jax.jacobian_terms`.

Modules with BatchNorm statistics (``nnx.BatchStat``) and Dropout (Rngs streams) are trained
through :class:`dreg_jax.training.user_model.UserModel`, which carries the statistics and
reseeds the streams each step; any other state kind is refused at ``init``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class NNXModel:
    """``factory(rngs) -> nnx.Module`` as a model with linen-style ``init`` / ``apply``."""

    factory: Callable

    def __repr__(self) -> str:  # stable across processes (it enters the run id)
        name = f"{getattr(self.factory, '__module__', '?')}.{getattr(self.factory, '__qualname__', type(self.factory).__name__)}"
        return f"NNXModel({name})"

    @functools.cached_property
    def _abstract(self):
        """``(graphdef, params, batch_stats, rng_state)`` of the module, on shapes only."""
        module = nnx.eval_shape(lambda: self.factory(nnx.Rngs(0)))
        return nnx.split(module, nnx.Param, nnx.BatchStat, nnx.RngState, ...)[:4]

    @property
    def graphdef(self):
        return self._abstract[0]

    def init(self, key, x=None):
        """``{"params": ...}``, plus ``"batch_stats"`` (its ``nnx.BatchStat`` state) if it has any.

        Dropout's Rngs streams are not kept: each step reseeds them (:meth:`rng_state`).
        """
        del x  # NNX modules are built with their shapes
        module = self.factory(nnx.Rngs(key))
        if not isinstance(module, nnx.Module):
            raise TypeError(f"NNXModel factory must return an nnx.Module, got {type(module).__name__}")
        _, params, stats, _, rest = nnx.split(module, nnx.Param, nnx.BatchStat, nnx.RngState, ...)
        if jax.tree_util.tree_leaves(rest):
            kinds = sorted({type(v).__name__ for v in jax.tree_util.tree_leaves(
                rest, is_leaf=lambda v: isinstance(v, nnx.Variable))})
            raise ValueError(f"{self!r} keeps state other than nnx.Param, nnx.BatchStat and Rngs "
                             f"({', '.join(kinds)}); the engine carries parameters and batch "
                             "statistics only: train it with your own loop")
        variables = {"params": params}
        if jax.tree_util.tree_leaves(stats):
            variables["batch_stats"] = stats
        return variables

    def rng_state(self, key=None):
        """The module's Rngs state reseeded from ``key``: stream ``i`` from ``fold_in(key, i)``,
        counts at 0 (``key=None``: ``key(0)``, for inference, where no stream is drawn)."""
        key = jax.random.key(0) if key is None else key
        template = self._abstract[3]
        counter = iter(range(len(jax.tree_util.tree_leaves(template))))

        def fill(leaf):
            i = next(counter)
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                return jax.random.fold_in(key, i)
            return jnp.zeros(leaf.shape, leaf.dtype)

        return jax.tree_util.tree_map(fill, template)

    def merge(self, params, batch_stats=None, rng_state=None):
        """The module with these parameters (and statistics; Rngs reseeded from ``key(0)`` unless given)."""
        graphdef, _, stats, _ = self._abstract
        stats = stats if batch_stats is None else batch_stats
        rng_state = self.rng_state() if rng_state is None else rng_state
        fresh = lambda tree: jax.tree_util.tree_map(lambda a: a, tree)  # Variables at this trace level
        return nnx.merge(graphdef, fresh(params), fresh(stats), rng_state)

    def apply(self, variables, x, **kwargs):
        kwargs.pop("mutable", None)
        return self.merge(variables["params"], variables.get("batch_stats"))(x, **kwargs)
