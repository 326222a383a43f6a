"""Input validation shared by the public functions.

Checks run on concrete arrays only: inside ``jit``/``vmap`` the values are tracers and only
shapes and dtypes can be checked (which is done at trace time). Finite-value checks are
therefore eager-only; the training engine validates the data once, before compiling.
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_choice(name: str, value: str, valid: Iterable[str]) -> str:
    """Raise a ValueError listing the valid choices when ``value`` is not one of them."""
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(valid)}")
    return value


def check_float_array(x, name: str, *, min_ndim: int = 1, exact_ndim: int | None = None):
    """Check that ``x`` is a floating array with the expected rank and, if concrete, finite."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float32, bfloat16, float64, ...), got {x.dtype}; "
            f"cast it first, e.g. {name}.astype(jnp.float32)"
        )
    if exact_ndim is not None and x.ndim != exact_ndim:
        raise ValueError(f"{name} must have {exact_ndim} dimensions, got shape {tuple(x.shape)}")
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions (batch, features...), "
            f"got shape {tuple(x.shape)}"
        )
    if x.ndim >= 1 and x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): a batch mean needs >= 1 row")
    if is_concrete(x):
        finite = np.isfinite(np.asarray(x, dtype=np.float32))
        if not finite.all():
            bad = int((~finite).sum())
            raise ValueError(
                f"{name} contains {bad} NaN/inf value(s) out of {finite.size}; "
                "clean or impute the data before computing penalties"
            )
    return x


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
