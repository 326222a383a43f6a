"""Apply DREG to an existing Flax model made of submodules.

:func:`submodule_fns` turns named submodules of a Flax model into pure callables
``h -> submodule(h)`` bound to given variables, ready for
:func:`dreg_jax.layer_jacobian_sq_norms`::

    fns = dreg_jax.submodule_fns(model, {"params": params}, ["block1", "block2", "head"])
    logits, sq = dreg_jax.layer_jacobian_sq_norms(fns, x, key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss += dreg_jax.dreg_penalty(sq)

The names must be submodules defined in ``setup`` (attributes), whose composition in the
given order is the model's forward pass. List items are addressed as ``"layers.0"``.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn


def _resolve(module: nn.Module, path: str):
    obj = module
    for part in path.split("."):
        if isinstance(obj, (list, tuple)):
            if not part.isdigit() or int(part) >= len(obj):
                raise ValueError(f"submodule path {path!r}: {part!r} is not an index below {len(obj)}")
            obj = obj[int(part)]
            continue
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = None
        if obj is None:
            names = sorted(module.variables.get("params", {}).keys())
            raise ValueError(
                f"{type(module).__name__} has no submodule {path!r} (attributes defined in "
                f"setup); its parameter scopes are: {', '.join(names) or '(none)'} (a list "
                f"attribute's scope 'layers_0' is addressed as 'layers.0')"
            )
    if not callable(obj):
        raise TypeError(f"{path!r} resolves to a non-callable {type(obj).__name__}")
    return obj


def submodule_fns(model: nn.Module, variables, names: Sequence[str]):
    """Pure callables ``h -> model.<name>(h)`` for each name, bound to ``variables``.

    Args:
      model: an unbound Flax linen module whose submodules are defined in ``setup``.
      variables: its variables, e.g. ``{"params": params}``.
      names: submodule attribute paths in forward order (``"layers.0"`` for list items).

    Returns:
      A list of callables, one per name, each a pure function of its input.
    """
    if isinstance(names, str) or not names:
        raise ValueError("names must be a non-empty list of submodule names, e.g. ['dense1', 'head']")
    bound = model.bind(variables)
    for name in names:  # fail now, with the valid names, not inside a trace
        _resolve(bound, name)

    def make(name):
        return lambda h: model.apply(variables, h, method=lambda m, inp: _resolve(m, name)(inp))

    return [make(name) for name in names]
