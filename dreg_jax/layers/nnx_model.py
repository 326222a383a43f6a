"""An NNX module as the engine's model: pure ``init``/``apply`` over its ``nnx.Param`` state.

The engine builds every run's model inside one compiled program (vmapped over seeds), so it
needs the model as pure functions of arrays. :class:`NNXModel` wraps a factory
``factory(rngs) -> nnx.Module`` (the module's class, or a named function):

* ``init(key, x)`` constructs the module with ``nnx.Rngs(key)`` and returns ``{"params": state}``
  (its ``nnx.Param`` state, a pytree);
* ``apply(variables, x)`` merges the params into the module's graph and calls it;
* ``merge(params)`` gives the module itself, for :func:`dreg_jax.jacobian_terms`.

Modules that keep other state (BatchNorm statistics, Dropout rng streams) are refused: the
engine's train state carries parameters only for NNX models.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class NNXModel:
    """``factory(rngs) -> nnx.Module`` as a model with linen-style ``init`` / ``apply``."""

    factory: Callable

    def __repr__(self) -> str:  # stable across processes (it enters the run id)
        name = f"{getattr(self.factory, '__module__', '?')}.{getattr(self.factory, '__qualname__', type(self.factory).__name__)}"
        return f"NNXModel({name})"

    @functools.cached_property
    def graphdef(self):
        return nnx.split(nnx.eval_shape(lambda: self.factory(nnx.Rngs(0))), nnx.Param, ...)[0]

    def init(self, key, x=None):
        del x  # NNX modules are built with their shapes
        module = self.factory(nnx.Rngs(key))
        if not isinstance(module, nnx.Module):
            raise TypeError(f"NNXModel factory must return an nnx.Module, got {type(module).__name__}")
        _, params, rest = nnx.split(module, nnx.Param, ...)
        if jax.tree_util.tree_leaves(rest):
            kinds = sorted({type(v).__name__ for v in jax.tree_util.tree_leaves(
                rest, is_leaf=lambda v: isinstance(v, nnx.Variable))})
            raise ValueError(f"{self!r} keeps state other than nnx.Param ({', '.join(kinds)}); the engine "
                             "trains NNX modules with parameters only (no BatchNorm statistics or "
                             "Dropout rng streams); use a linen module or your own training loop")
        return {"params": params}

    def merge(self, params):
        return nnx.merge(self.graphdef, params)

    def apply(self, variables, x, **kwargs):
        kwargs.pop("mutable", None)  # no mutable state (see init)
        return self.merge(variables["params"])(x, **kwargs)
