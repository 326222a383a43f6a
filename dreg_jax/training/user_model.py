"""One adapter for the user's own model (linen module or :class:`dreg_jax.NNXModel`).

The engine trains every model through ``init(key, x)`` and
``apply(variables, x, *, train=False, dropout_rng=None, mutable=False)``. :class:`UserModel` gives
a user's model that interface, so the rest of the engine never asks which kind of model it has:

* **Mode.** Training steps call the model in training mode, evaluation in inference mode. For
  linen, the module's ``__call__`` says how: a ``train`` argument gets ``train=True/False``, a
  ``deterministic`` argument gets ``deterministic=False/True``; a module with neither is called
  as it is. For NNX, ``module.train()`` / ``module.eval()`` set the mode of every submodule
  (Dropout, BatchNorm).
* **Dropout.** Each training step draws its masks from ``dropout_key(step_key)``, the
  step's key folded with 1 (the step key itself feeds the DREG probes). linen gets it as
  ``rngs={"dropout": ...}``; an NNX module's Rngs streams are reseeded from it (stream ``i``
  from ``fold_in(dropout_key, i)``, counts at 0) for the step.
* **BatchNorm statistics.** linen's ``batch_stats`` collection, NNX's ``nnx.BatchStat``
  variables: carried in the train state (scanned across steps), updated in training mode and
  read in inference mode. Any other state kind is refused at ``init``, with its name.

A model's logits must have shape ``(batch, num_classes)``; :func:`check_logits_shape` checks
that on shapes before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import errors as flax_errors
from flax import nnx

from dreg_jax.layers.nnx_model import NNXModel

DROPOUT_STREAM = "dropout"


def dropout_key(step_key):
    """The key a training step's dropout masks come from (the step key feeds the probes)."""
    return jax.random.fold_in(step_key, 1)


@functools.lru_cache(maxsize=None)
def _mode_argument(call) -> str | None:
    params = inspect.signature(call).parameters
    for name in ("train", "deterministic", "training", "is_training"):
        if name in params:
            return name
    return None


def linen_mode_kwargs(module, train: bool) -> dict:
    """The keyword that puts ``module`` in training (or inference) mode, from its signature."""
    name = _mode_argument(type(module).__call__)
    if name is None:
        return {}
    return {name: (not train) if name == "deterministic" else train}


@dataclasses.dataclass(frozen=True)
class UserModel:
    """The user's linen module or ``NNXModel``, with the engine's init/apply (module docs)."""

    module: Any

    @property
    def is_nnx(self) -> bool:
        return isinstance(self.module, NNXModel)

    def init(self, key, x):
        if self.is_nnx:
            return self.module.init(key, x)
        variables = self.module.init(key, x, **linen_mode_kwargs(self.module, False))
        other = sorted(set(variables) - {"params", "batch_stats"})
        if other:
            raise ValueError(f"your module keeps variable collections {other}; the engine carries "
                             "'params' and 'batch_stats' only (train it with your own loop)")
        return variables

    def apply(self, variables, x, *, train: bool = False, dropout_rng=None, mutable=False):
        """The model's output (``(output, updates)`` when ``mutable`` names collections)."""
        if self.is_nnx:
            module = self.bound_nnx(variables, train, dropout_rng)
            out = module(x)
            return (out, self.nnx_updates(module)) if mutable else out
        kwargs = self._linen_kwargs(train, dropout_rng)
        if not train or not mutable:
            out = self.module.apply(variables, x, **kwargs)
            return (out, {}) if mutable else out
        return self.module.apply(variables, x, mutable=mutable, **kwargs)

    # -- what jacobian_terms needs -----------------------------------------------------------
    def terms_call(self, variables, train: bool, dropout_rng):
        """``(model, variables, kwargs, updates_of)`` for ``jacobian_terms`` in this mode;
        ``updates_of(out)`` splits its output into ``(logits, updates)``."""
        if self.is_nnx:
            module = self.bound_nnx(variables, train, dropout_rng)
            return module, None, {}, lambda out: (out, self.nnx_updates(module) if train else {})
        kwargs = self._linen_kwargs(train, dropout_rng)
        if train and "batch_stats" in variables:
            kwargs["mutable"] = ["batch_stats"]
            return self.module, variables, kwargs, lambda out: out
        return self.module, variables, kwargs, lambda out: (out, {})

    def _linen_kwargs(self, train: bool, dropout_rng) -> dict:
        """The mode keyword of the linen module, plus this step's dropout key in training."""
        kwargs = linen_mode_kwargs(self.module, train)
        if train and dropout_rng is not None:
            kwargs["rngs"] = {DROPOUT_STREAM: dropout_rng}
        return kwargs

    # -- NNX -------------------------------------------------------------------------------
    def bound_nnx(self, variables, train: bool, dropout_rng):
        """The NNX module with these params and statistics, its Rngs reseeded, in this mode."""
        module = self.module.merge(variables["params"], variables.get("batch_stats"),
                                   self.module.rng_state(dropout_rng))
        if train:
            module.train()
        else:
            module.eval()
        return module

    @staticmethod
    def nnx_updates(module):
        stats = nnx.state(module, nnx.BatchStat)
        return {"batch_stats": stats} if jax.tree_util.tree_leaves(stats) else {}


def check_logits_shape(model: UserModel, variables, num_features: int, num_classes: int):
    """A user model must map a ``(batch, features)`` batch to ``(batch, num_classes)`` logits:
    checked on shapes (two rows, so a dropped batch axis shows) before anything is compiled."""
    try:
        out = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                             jax.ShapeDtypeStruct((2, num_features), jnp.float32))
    except (flax_errors.ModifyScopeVariableError, flax_errors.InvalidRngError) as err:
        if model.is_nnx or _mode_argument(type(model.module).__call__) is not None:
            raise
        layer = "BatchNorm updates its statistics" if isinstance(err, flax_errors.ModifyScopeVariableError) \
            else "Dropout draws masks"
        raise ValueError(f"your module's {layer} in every call, but its __call__ takes no train (or "
                         "deterministic) argument, so it cannot be evaluated in inference mode: add `train: bool "
                         "= False` and pass it on (BatchNorm(use_running_average=not train), "
                         f"Dropout(rate, deterministic=not train)) ({type(err).__name__})") from None
    shape = getattr(out, "shape", None)
    if shape != (2, num_classes):
        raise ValueError(
            f"your module returns {shape if shape is not None else type(out).__name__} for a batch of 2 "
            f"inputs, but the engine needs logits of shape (batch, num_classes) = (2, {num_classes}) "
            f"for this dataset ({num_classes} classes): give its last layer {num_classes} outputs and "
            "keep the batch axis")

