"""Property-based fuzzing: every input gives the float64 reference's value or a clear TypeError/ValueError."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dreg_jax

# derandomized: CI sees the same examples on every run
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
DTYPES = ["float32", "bfloat16", "int32", "bool", "float16"]
TOL = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 3e-2}


@st.composite
def arrays(draw, max_rows=4, features=None):
    rows = draw(st.integers(0, max_rows))
    cols = features or draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(DTYPES))
    values = draw(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=rows * cols, max_size=rows * cols))
    x = np.asarray(values, np.float64).reshape(rows, cols)
    if rows and draw(st.booleans()) and draw(st.booleans()):
        x[draw(st.integers(0, rows - 1)), 0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    with np.errstate(invalid="ignore"):
        return jnp.asarray(x.astype(dtype) if dtype not in ("bfloat16",) else x, dtype=dtype), x


def tanh_term_reference(x):
    slope = 1 - np.tanh(x) ** 2
    return np.mean(np.sum(slope**2, axis=1))


def check_tanh_term(x, compute):
    """``compute()`` (the tanh layer's term for input ``x``) equals the float64 reference, or ``x``
    is one the functions must refuse (non-float, empty, non-finite) and it raised a clear error."""
    try:
        term = compute()
    except (TypeError, ValueError) as err:
        assert str(err)
        assert (not jnp.issubdtype(x.dtype, jnp.floating) or x.shape[0] == 0
                or not np.isfinite(np.asarray(x, np.float64)).all())
        return
    ref = tanh_term_reference(np.asarray(x, np.float64))
    # low precision: 1 - tanh(z)^2 cancels for |z| >~ 2, so each slope carries an absolute error
    # of a few eps (each squared slope is <= 1): bound the sum over the row's features by that
    eps = float(jnp.finfo(x.dtype).eps) if str(x.dtype) in ("float16", "bfloat16") else 0.0
    np.testing.assert_allclose(float(term), ref, rtol=TOL[str(x.dtype)] * 4, atol=1e-6 + 4 * eps * x.shape[1])


@SETTINGS
@given(arrays())
def test_layer_jacobian_sq_norms(data):
    x, _ = data
    check_tanh_term(x, lambda: dreg_jax.layer_jacobian_sq_norms([jnp.tanh], x, jax.random.key(0))[1][0])


@SETTINGS
@given(arrays(max_rows=1, features=None),
       st.sampled_from([0.0, 1e-3, 1.0, -1.0, np.nan, np.inf, 3, True, False, 1e39]),
       st.sampled_from([None, (1.0, 2.0, 3.0, 4.0), (1.9, 2, 3, 4), (-1.0, 1.0, 1.0, 1.0)]),
       st.sampled_from([None, (2, 2, 2, 2), (1.5, 2, 2, 2), (0, 1, 1, 1)]))
def test_dreg_penalty(data, strength, weights, widths):
    terms = jnp.ravel(data[0])
    if terms.size == 0:
        return
    n = terms.shape[0]
    kwargs = {}
    if weights is not None:
        kwargs["layer_weights"] = jnp.asarray(weights[:n], jnp.float32)
    if widths is not None:
        kwargs.update(widths=list(widths[:n]), scaling="width")
    t64 = np.asarray(terms, np.float64)
    w = np.ones(n) if weights is None else np.asarray(weights[:n], np.float64)
    d = np.ones(n) if widths is None else np.asarray(widths[:n], np.float64)
    valid = (not isinstance(strength, bool) and np.isfinite(strength) and strength >= 0
             and np.isfinite(t64).all() and (t64 >= 0).all() and (w >= 0).all()
             and (d >= 1).all() and (d == np.round(d)).all())
    ref = float(strength) * np.sum(t64 * w / d) if valid else np.nan
    valid = valid and abs(ref) < np.finfo(np.float32).max / 2  # overflows refused, not returned as inf
    try:
        value = dreg_jax.dreg_penalty(terms, strength=strength, **kwargs)
    except (TypeError, ValueError) as err:
        assert str(err) and not valid, (err, strength, weights, widths)
        return
    assert valid, ("accepted an input it must refuse", terms, strength, weights, widths)
    np.testing.assert_allclose(float(value), ref, rtol=1e-5, atol=1e-6)


class TanhNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(dreg_jax.Activation(jnp.tanh, name="act")(x))


NET = TanhNet()
NET_VARS = NET.init(jax.random.key(0), jnp.ones((1, 3)))


@SETTINGS
@given(arrays(features=3))
def test_jacobian_terms(data):
    x, _ = data
    check_tanh_term(x, lambda: dreg_jax.jacobian_terms(NET, NET_VARS, x, scope="activation")[1]["act"])


@SETTINGS
@given(arrays(features=3), st.sampled_from([None, 4.0]))
def test_chainzrule(data, bound):
    x, _ = data
    layer = dreg_jax.ChainzRule(input_bound=bound)
    params = layer.init(jax.random.key(0), jnp.ones((1, 3)))
    try:
        y = layer.apply(params, x)
    except (TypeError, ValueError) as err:
        assert str(err)
        return
    z = np.asarray(x, np.float64)
    u = z if bound is None else bound * np.tanh(z / bound)
    a = np.asarray(dreg_jax.GELU_CUBIC_FIT, np.float64)
    with np.errstate(invalid="ignore"):  # inf inputs give nan references, compared only where finite
        ref = a[0] + a[1] * u + a[2] * u**2 + a[3] * u**3
        # rounding bound of a polynomial: a few eps times the sum of its terms' magnitudes
        scale = np.abs(a[0]) + np.abs(a[1] * u) + np.abs(a[2] * u**2) + np.abs(a[3] * u**3)
    finite = np.isfinite(ref)
    rtol = TOL.get(str(y.dtype), 1e-5) * 4
    eps = float(jnp.finfo(y.dtype).eps)
    got = np.asarray(y, np.float64)[finite]
    assert np.all(np.abs(got - ref[finite]) <= rtol * np.abs(ref[finite]) + 8 * eps * scale[finite] + 1e-6)
    assert jnp.issubdtype(y.dtype, jnp.floating)
