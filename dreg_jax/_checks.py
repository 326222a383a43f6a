"""Input validation shared by the public functions.

Checks run on concrete arrays only: inside ``jit``/``vmap`` the values are tracers and only
shapes and dtypes can be checked (which is done at trace time). Finite-value checks are
therefore eager-only; the training engine validates the data once, before compiling.
"""
from __future__ import annotations

import difflib
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_choice(name: str, value: str, valid: Iterable[str]) -> str:
    """Raise a ValueError (with a did-you-mean) listing the valid choices when ``value`` is not one."""
    valid = tuple(valid)
    if value not in valid:
        close = difflib.get_close_matches(str(value), valid, n=1) if isinstance(value, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        shown = ", ".join(valid) if len(valid) <= 20 else ", ".join(valid[:20]) + f", ... ({len(valid)} in all)"
        raise ValueError(f"unknown {name} {value!r}{hint}; expected one of: {shown}")
    return value


def check_finite_scalar(value, name: str, *, minimum: float | None = None, strict: bool = False):
    """A concrete scalar must be finite (and >= / > ``minimum``); tracers pass unchecked."""
    if not is_concrete(value):
        return value
    v = np.asarray(value, dtype=np.float64)
    bound_ok = minimum is None or (v > minimum if strict else v >= minimum)
    if v.ndim != 0 or not np.isfinite(v) or not bound_ok:
        rule = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite scalar{rule}, got {value!r}")
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
